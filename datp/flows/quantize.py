"""Flow <-> uint8 for storage, compatible with TSN / mmaction2 / denseflow flow images.

    q = round(255 * (clip(f, -bound, bound) + bound) / (2 * bound))      quantize
    f' = q * 2 * bound / 255 - bound                                      dequantize

Why round and not truncate: truncation (`x.astype(np.uint8)`, as in `flow_to_img` of
mmaction2's tools/misc/flow_extraction.py) maps every value to the bottom of its step, so the
stored flow is biased by half a step (bound / 255 = 0.078 px at bound 20) everywhere, and zero flow
lands on 127 instead of 128. Rounding keeps the error within half a step on either side.

Zero flow is stored as 128 and reads back as 128 * 40 / 255 - 20 = +0.0784 px, because 255 steps
have no exact middle. TSN-style readers (which map 0..255 linearly back to -bound..bound) see the
same offset; it is below the step, so `|dequantize(quantize(f)) - f| <= bound / 255` holds for
every |f| <= bound.

Values exactly half-way between two steps round as `np.rint` does: half to even (127.5 -> 128,
128.5 -> 128), so the rule never biases ties upward on average. Zero flow is itself such a tie
(255 * 20 / 40 = 127.5 exactly) and goes to 128 under half-to-even and half-up alike.
"""

from __future__ import annotations

import numpy as np


def _check_bound(bound: float) -> None:
    if not bound > 0:
        raise ValueError(f"bound must be > 0 pixels, got {bound!r}; TSN and mmaction2 use 20")


def quantize(flow: np.ndarray, bound: float = 20.0) -> np.ndarray:
    """Clips flow to [-bound, bound] and maps it to 0..255 with rounding.

    Args:
        flow: flow in pixels, any shape (typically (H, W, 2) or (T, H, W, 2)).
        bound: clipping bound in pixels (> 0).

    Returns:
        uint8 array of the same shape; -bound -> 0, 0 -> 128, +bound -> 255.
    """
    _check_bound(bound)
    flow = np.asarray(flow, dtype=np.float32)
    scaled = (np.clip(flow, -bound, bound) + bound) * (255.0 / (2.0 * bound))
    # np.rint rounds half to even; clip again guards against float overshoot past 255.
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def dequantize(q: np.ndarray, bound: float = 20.0) -> np.ndarray:
    """Inverse of `quantize` up to the step: q * 2 * bound / 255 - bound.

    Args:
        q: uint8 array from `quantize` (any shape).
        bound: the bound used to quantize (> 0).

    Returns:
        float32 flow in pixels, same shape; 128 -> +0.0784 at bound 20 (see the module docstring).
    """
    _check_bound(bound)
    q = np.asarray(q)
    if q.dtype != np.uint8:
        raise ValueError(f"dequantize expects uint8 values from quantize, got {q.dtype}")
    return (q.astype(np.float32) * np.float32(2.0 * bound / 255.0) - np.float32(bound)).astype(np.float32)
