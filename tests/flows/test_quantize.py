import numpy as np
import pytest

from datp.flows.quantize import dequantize, quantize

FLOAT_SLACK = 1e-5  # float32 arithmetic on values up to 20 px


@pytest.mark.parametrize("bound", [20.0, 5.0, 127.5])
def test_round_trip_error_is_within_half_a_step(bound):
    flow = np.random.default_rng(0).uniform(-bound, bound, size=(7, 11, 2)).astype(np.float32)
    error = np.abs(dequantize(quantize(flow, bound), bound) - flow).max()
    assert error <= bound / 255 + FLOAT_SLACK, f"largest round-trip error {error} > bound/255 = {bound / 255}"


def test_quantize_matches_the_formula_by_hand():
    flow = np.array([-20.0, -10.0, 0.0, 0.1, 3.0, 19.9, 20.0], dtype=np.float32)
    # round(255 * (f + 20) / 40): -20 -> 0, -10 -> 63.75 -> 64, 0 -> 127.5 -> 128, 0.1 -> 128.1375 -> 128,
    # 3 -> 146.625 -> 147, 19.9 -> 254.3625 -> 254, 20 -> 255
    expected = np.array([0, 64, 128, 128, 147, 254, 255], dtype=np.uint8)
    got = quantize(flow)
    assert got.dtype == np.uint8
    np.testing.assert_array_equal(got, expected)


def test_zero_flow_is_128_and_reads_back_with_the_tsn_offset():
    q = quantize(np.zeros((2, 3, 2), dtype=np.float32))
    assert (q == 128).all(), f"zero flow quantized to {np.unique(q)}"
    back = dequantize(q)
    np.testing.assert_allclose(back, 128 * 40 / 255 - 20, rtol=0, atol=1e-6)  # +0.0784 px
    assert back.dtype == np.float32


def test_rounding_not_truncation():
    # 0.1 px is 128.1375 steps; 1.2 px is 135.15; -0.1 px is 126.86: truncation gives 128, 135, 126.
    got = quantize(np.array([-0.1, 0.1, 1.2], dtype=np.float32))
    np.testing.assert_array_equal(got, [127, 128, 135])


def test_clipping_at_bound():
    flow = np.array([-1000.0, -20.0, -20.5, 20.5, 20.0, 1e6], dtype=np.float32)
    np.testing.assert_array_equal(quantize(flow), [0, 0, 0, 255, 255, 255])
    np.testing.assert_allclose(dequantize(quantize(flow)), [-20, -20, -20, 20, 20, 20], atol=1e-5)


def test_exact_half_steps_round_half_to_even_like_numpy():
    # bound 127.5 makes one step exactly 1 px: q = round(f + 127.5), so f = k + 0.5 - 127.5 is a tie.
    flow = np.array([0.0, 1.0, -1.0, 2.0, -127.0], dtype=np.float32)  # 127.5, 128.5, 126.5, 129.5, 0.5
    expected = np.rint(flow.astype(np.float64) + 127.5).astype(np.uint8)  # numpy: half to even
    np.testing.assert_array_equal(quantize(flow, bound=127.5), expected)
    np.testing.assert_array_equal(expected, [128, 128, 126, 130, 0])


def test_input_is_not_mutated():
    flow = np.array([[30.0, -30.0]], dtype=np.float32)
    quantize(flow)
    np.testing.assert_array_equal(flow, [[30.0, -30.0]])


@pytest.mark.parametrize("bound", [0.0, -1.0])
def test_bound_must_be_positive(bound):
    with pytest.raises(ValueError, match="bound must be > 0"):
        quantize(np.zeros(2, dtype=np.float32), bound)
    with pytest.raises(ValueError, match="bound must be > 0"):
        dequantize(np.zeros(2, dtype=np.uint8), bound)


def test_dequantize_rejects_non_uint8():
    with pytest.raises(ValueError, match="uint8"):
        dequantize(np.zeros(2, dtype=np.float32))
