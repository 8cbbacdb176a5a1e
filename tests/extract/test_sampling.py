import numpy as np
import pytest

from datp.extract.sampling import frame_indices, segment_indices, segment_times, stride_indices


def _eq(got, want):
    got = np.asarray(got)
    assert got.tolist() == list(want), f"got {got.tolist()}, want {list(want)}"


@pytest.mark.parametrize(
    "T, N, L, want",
    [
        (30, 3, 1, [5, 15, 25]),  # tick = 30 / 3 = 10: centres 5, 15, 25
        (30, 3, 5, [4, 13, 21]),  # tick = 26 / 3 = 8.67: int(4.33), int(13), int(21.67)
        (10, 4, 1, [1, 3, 6, 8]),  # tick = 2.5: int(1.25), int(3.75), int(6.25), int(8.75)
        (2, 4, 1, [0, 0, 1, 1]),  # T < N: tick = 0.5, starts repeat
        (3, 2, 5, [0, 0]),  # T < L: no valid start but 0
        (1, 3, 1, [0, 0, 0]),  # T = 1
        (1, 1, 5, [0]),
        (6, 7, 1, [0, 1, 2, 2, 3, 4, 5]),  # TSN's float formula: 3/7 + 6/7*3 = 2.999... -> 2
    ],
)
def test_test_mode_hand_computed(T, N, L, want):
    starts = segment_indices(T, N, L, "test")
    assert starts.dtype == np.int64
    _eq(starts, want)


def test_test_mode_equals_tsn_formula_and_stays_in_range():
    for T in range(1, 80):
        for N in (1, 3, 7, 10):
            for L in (1, 5):
                starts = segment_indices(T, N, L, "test")
                tick = (T - L + 1) / float(N)
                tsn = [max(int(tick / 2.0 + tick * k), 0) for k in range(N)]
                _eq(starts, tsn)
                assert starts.min() >= 0 and starts.max() <= max(T - L, 0), (T, N, L, starts)


def test_train_mode_one_start_per_part_and_seeded():
    T, N, L = 30, 3, 5  # avg = 26 // 3 = 8: part k is [8k, 8k + 8)
    for seed in range(20):
        starts = segment_indices(T, N, L, "train", np.random.default_rng(seed))
        for k, s in enumerate(starts):
            assert 8 * k <= s < 8 * k + 8, (seed, starts)
    a = segment_indices(T, N, L, "train", np.random.default_rng(7))
    b = segment_indices(T, N, L, "train", np.random.default_rng(7))
    _eq(a, b.tolist())
    draws = {tuple(segment_indices(T, N, L, "train", np.random.default_rng(s))) for s in range(20)}
    assert len(draws) > 1, "train mode gave the same starts for 20 seeds"


def test_train_mode_short_videos():
    rng = np.random.default_rng(0)
    # avg = 0 and T > max(N, L): sorted draws in [0, span)
    for _ in range(20):
        starts = segment_indices(8, 10, 1, "train", rng)
        assert np.all(np.diff(starts) >= 0) and starts.min() >= 0 and starts.max() <= 7, starts
    # avg = 0, T <= max(N, L), span = 7 - 5 + 1 = 3: round(0.3 k) = [0, 0, 1, 1, 1, 2, 2, 2, 2, 3],
    # the last clipped to the last valid start 2
    _eq(segment_indices(7, 10, 5, "train", rng), [0, 0, 1, 1, 1, 2, 2, 2, 2, 2])
    _eq(segment_indices(5, 4, 5, "train", rng), [0, 0, 0, 0])  # mmaction2: [0, 0, 0, 1]
    # T < L: zeros
    _eq(segment_indices(3, 4, 5, "train", rng), [0, 0, 0, 0])
    _eq(segment_indices(1, 2, 1, "train", rng), [0, 0])


def test_bad_arguments():
    with pytest.raises(ValueError, match="rng"):
        segment_indices(30, 3, 1, "train")
    with pytest.raises(ValueError, match="num_frames=0"):
        segment_indices(0, 3, 1, "test")
    with pytest.raises(ValueError, match="unknown sampling mode"):
        segment_indices(30, 3, 1, "val")
    with pytest.raises(ValueError, match="stride=0"):
        stride_indices(30, 0)
    with pytest.raises(ValueError, match="must lie in"):
        frame_indices(np.array([0, 30]), 1, 30)


def test_stride_indices():
    _eq(stride_indices(30, 10, 1), [0, 10, 20])
    _eq(stride_indices(30, 10, 5), [0, 10, 20])  # last valid start is 25
    _eq(stride_indices(26, 7, 5), [0, 7, 14, 21])  # last valid start is 21
    _eq(stride_indices(3, 10, 5), [0])  # shorter than one segment: one segment
    _eq(stride_indices(1, 4, 1), [0])


def test_frame_indices_clamp():
    got = frame_indices(np.array([0, 3, 4]), 3, 6)
    _eq(got, [[0, 1, 2], [3, 4, 5], [4, 5, 5]])
    # flow of a 4-frame video: 3 pairs (indices 0..2), L = 5
    _eq(frame_indices(segment_indices(3, 2, 5), 5, 3), [[0, 1, 2, 2, 2]] * 2)


def test_segment_times():
    got = segment_times(np.array([5, 15, 25]), 1, 30)
    want = np.array([5.5, 15.5, 25.5]) / 30
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=1e-6)
    got = segment_times(np.array([0, 10]), 5, 12)  # (0 + 2.5) / 12, (10 + 2.5) / 12 clipped to 1
    np.testing.assert_allclose(got, [2.5 / 12, 1.0], rtol=1e-6)
