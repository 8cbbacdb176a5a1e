"""Which frames each segment reads: TSN segment sampling, stride sampling and segment times.

Conventions (shared by every function here):
- Indices are 0-based. A segment is described by its first index `start`; it reads the `new_length`
  (L) consecutive indices `start, start + 1, ..., start + L - 1`.
- `num_frames` (T) is the length of the index space the segment reads from: the decoded frame count
  for RGB, and the number of flow pairs (decoded frames - 1) for flow, where flow index i is the pair
  (frame i, frame i + 1).
- Indices never leave `[0, T - 1]`: starts lie in `[0, max(T - L, 0)]`, and `frame_indices` clamps a
  stack that runs past the end to the last index (TSN repeats the last frame the same way).
- Sampling matches TSN (`TSNDataSet._get_test_indices` / `_sample_indices`) and mmaction2
  (`SampleFrames` with `clip_len=L, frame_interval=1`), shifted to 0-based.
"""

from __future__ import annotations

from typing import Literal

import numpy as np


def _check(num_frames: int, num_segments: int, new_length: int) -> None:
    if num_frames < 1:
        raise ValueError(
            f"num_frames={num_frames} must be >= 1; an empty video (or the flow of a one-frame video) "
            "has nothing to sample"
        )
    if num_segments < 1:
        raise ValueError(f"num_segments={num_segments} must be >= 1")
    if new_length < 1:
        raise ValueError(f"new_length={new_length} must be >= 1 (1 for RGB, 5 for flow)")


def segment_indices(
    num_frames: int,
    num_segments: int,
    new_length: int = 1,
    mode: Literal["test", "train"] = "test",
    rng: np.random.Generator | None = None,
) -> np.ndarray:
    """First index of each of N segments, by TSN's rules.

    Let `span = T - L + 1`, the number of valid starts.

    Test mode (deterministic): `tick = span / N` and segment k starts at `int(tick / 2 + tick * k)`,
    the centre of the k-th of N equal parts. This is TSN's float formula, kept bit for bit: where
    `tick / 2 + tick * k` is an integer on paper, float rounding can land just below it, and the start
    is then one lower than `floor((2k + 1) * span / (2N))` (e.g. T=6, N=7 gives [0, 1, 2, 2, 3, 4, 5]).
    When `span < N` (fewer valid starts than segments) starts repeat; when `T < L` every start is 0.

    Train mode (random, mmaction2's `_get_train_clips`), with `avg = span // N`:
    - `avg > 0`: segment k starts at `k * avg + rng.integers(avg)`, one random start in each part;
    - else if `T > max(N, L)`: N sorted draws from `rng.integers(span)`;
    - else if `span >= 1` (`avg == 0`): the evenly spread `round(k * span / N)` (deterministic),
      clipped to the last valid start `span - 1` (mmaction2 leaves e.g. T=5, N=4, L=5 -> [0, 0, 0, 1]
      with start 1 past the end; here it is [0, 0, 0, 0]);
    - else (`T < L`): every start is 0.

    Args:
        num_frames: T, the length of the index space (frames for RGB, flow pairs for flow).
        num_segments: N.
        new_length: L, consecutive indices per segment.
        mode: "test" or "train".
        rng: the random source for train mode (required there, e.g. `np.random.default_rng(seed)`);
            ignored in test mode.

    Returns:
        (N,) int64 starts, non-decreasing, each in `[0, max(T - L, 0)]`.
    """
    _check(num_frames, num_segments, new_length)
    span = num_frames - new_length + 1
    k = np.arange(num_segments)
    if mode == "test":
        if span < 1:
            return np.zeros(num_segments, dtype=np.int64)
        tick = span / float(num_segments)
        return np.array([int(tick / 2.0 + tick * i) for i in k], dtype=np.int64)
    if mode != "train":
        raise ValueError(f"unknown sampling mode {mode!r}; choose from ['test', 'train']")
    if rng is None:
        raise ValueError("train-mode sampling needs rng, e.g. rng=np.random.default_rng(seed)")
    avg = span // num_segments
    if avg > 0:
        starts = k * avg + rng.integers(avg, size=num_segments)
    elif num_frames > max(num_segments, new_length):
        starts = np.sort(rng.integers(span, size=num_segments))
    elif span >= 1:
        starts = np.minimum(np.around(k * (span / num_segments)), span - 1)
    else:
        starts = np.zeros(num_segments)
    return starts.astype(np.int64)


def stride_indices(num_frames: int, stride: int, new_length: int = 1) -> np.ndarray:
    """Starts of segments every `stride` indices, for long, untrimmed videos (variable N).

    Starts are `0, S, 2S, ...` up to the last valid start `T - L`, so every segment lies inside the
    video and N = `(T - L) // S + 1`. A video shorter than one segment (`T < L`) gets the single start
    0 (its stack is clamped by `frame_indices`), so N >= 1 always.

    Args:
        num_frames: T, the length of the index space (frames for RGB, flow pairs for flow).
        stride: S >= 1, indices between consecutive starts.
        new_length: L, consecutive indices per segment.

    Returns:
        (N,) int64 starts.
    """
    _check(num_frames, 1, new_length)
    if stride < 1:
        raise ValueError(f"stride={stride} must be >= 1")
    return np.arange(0, max(num_frames - new_length, 0) + 1, stride, dtype=np.int64)


def seconds_indices(num_frames: int, stride_seconds: float, fps: float, new_length: int = 1) -> np.ndarray:
    """Starts of segments every `stride_seconds` seconds: `stride_indices` with the stride in time.

    Index i is taken to start at time i / fps (frame i of a constant-rate video; flow pair i
    starts at frame i). Segment k starts at the index nearest to time k * S,
    `floor(k * (S * fps) + 1/2)` (the step S * fps computed first, halves rounded up), for
    k = 0, 1, ... while that start is <= T - L, so the starts do not drift when S * fps is not
    a whole number (1 s at 29.97 fps gives 0, 30, 60, 90, 120, 150, ...,
    with a stride of 29 between some). Starts closer than one index (S * fps < 1) are kept once.
    A video shorter than one segment gets the single start 0.

    Args:
        num_frames: T, the length of the index space (frames for RGB, flow pairs for flow).
        stride_seconds: S > 0.
        fps: the video's frame rate (> 0; rawframe folders have none: give a stride in frames).
        new_length: L.

    Returns:
        (N,) int64 starts, increasing.
    """
    _check(num_frames, 1, new_length)
    if not stride_seconds > 0:
        raise ValueError(f"stride_seconds={stride_seconds} must be > 0")
    if not fps > 0:
        raise ValueError(f"the video has no frame rate (fps {fps}); a stride in seconds needs one: "
                         "use --stride in frames")
    last = max(num_frames - new_length, 0)
    count = int(np.floor((last + 0.5) / (stride_seconds * fps))) + 1  # every k with start <= last
    starts = np.floor(np.arange(count + 1) * (stride_seconds * fps) + 0.5).astype(np.int64)
    return np.unique(starts[starts <= last])


def frame_indices(starts: np.ndarray, new_length: int, num_frames: int) -> np.ndarray:
    """Every index each segment reads, clamped to the last valid index.

    Args:
        starts: (N,) first index of each segment.
        new_length: L.
        num_frames: T, the length of the index space; flow passes the number of flow pairs
            (decoded frames - 1), so index i means the pair (frame i, frame i + 1).

    Returns:
        (N, L) int64 with row n = `min(starts[n] + [0, ..., L - 1], T - 1)`: a stack that runs past
        the end repeats the last index.
    """
    _check(num_frames, 1, new_length)
    starts = np.asarray(starts, dtype=np.int64)
    if starts.size and (starts.min() < 0 or starts.max() >= num_frames):
        raise ValueError(
            f"segment starts {starts.tolist()} must lie in [0, {num_frames - 1}] for num_frames={num_frames}"
        )
    return np.minimum(starts[:, None] + np.arange(new_length), num_frames - 1)


def segment_times(starts: np.ndarray, new_length: int, num_frames: int) -> np.ndarray:
    """Centre time of each segment, normalised to [0, 1].

    Index i is taken to cover the interval [i, i + 1) of T equal steps, so a segment covering
    `[start, start + L)` has its centre at `t = (start + L / 2) / T`, clipped to [0, 1] (a stack that
    runs past the end of a short video would otherwise give t > 1). For L = 1 this is the centre of
    the frame, (i + 0.5) / T.

    Args:
        starts: (N,) first index of each segment.
        new_length: L.
        num_frames: T, the length of the index space the starts refer to.

    Returns:
        (N,) float32 times in [0, 1].
    """
    _check(num_frames, 1, new_length)
    starts = np.asarray(starts, dtype=np.float64)
    return np.clip((starts + new_length / 2.0) / num_frames, 0.0, 1.0).astype(np.float32)
