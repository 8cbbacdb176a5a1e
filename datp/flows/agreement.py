"""How close two flow implementations are: the pairs they are compared on and the figures.

Used by `tests/flows/test_tvl1_agreement.py` (small inputs) and `bench/tvl1_agreement.py` (full
resolution, the table in docs/flow-presets.md). The figures for a pair of flows a, b (H, W, 2):

- `median_diff`, `mean_diff`: median and mean over pixels of the end-point distance |a - b|.
- `quantized_equal`: share of pixels whose stored uint8 flow (`datp.flows.quantize`, both
  channels) is the same; `quantized_within_one`: at most one step apart.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np

from datp.flows.middlebury import find_pairs, read_flo, read_gray
from datp.flows.quantize import quantize

# Three real clips of ../shared/data/clips (a demo video, UCF101, UCF101): frame pairs from each.
CLIPS = ("mmaction2/demo.mp4", "misc/v_Basketball_g01_c01.avi",
         "torchvision/v_SoccerJuggling_g23_c01.avi")


def compare_flows(a: np.ndarray, b: np.ndarray, bound: float = 20.0) -> dict:
    """{"median_diff", "mean_diff", "max_diff", "quantized_equal"} of two (H, W, 2) flows."""
    if a.shape != b.shape:
        raise ValueError(f"flows differ in shape: {a.shape} and {b.shape}")
    dist = np.linalg.norm(a.astype(np.float64) - b, axis=-1)  # (H, W)
    qa, qb = quantize(a, bound).astype(np.int16), quantize(b, bound).astype(np.int16)
    steps = np.abs(qa - qb).max(axis=-1)  # (H, W): uint8 steps apart, worse channel
    return {"median_diff": float(np.median(dist)), "mean_diff": float(dist.mean()),
            "max_diff": float(dist.max()), "quantized_equal": float((steps == 0).mean()),
            "quantized_within_one": float((steps <= 1).mean())}


def scaled_ground_truth(gt: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Ground truth (H, W, 2) at another size (H', W'): nearest-neighbour samples (unknown pixels
    stay unknown), multiplied by the size ratio."""
    h, w = size
    small = cv2.resize(gt, (w, h), interpolation=cv2.INTER_NEAREST)
    known = np.all(np.abs(small) < 1e9, axis=-1, keepdims=True)
    ratio = np.array([w / gt.shape[1], h / gt.shape[0]], np.float32)
    return np.where(known, small * ratio, small).astype(np.float32)


def ground_truth_pairs(root: str | Path, scale: float = 1.0) -> Iterator[tuple[str, np.ndarray, np.ndarray, np.ndarray]]:
    """(name, prev, next, ground truth) of every pair under `root` (the flow-gt folder), frames
    resized by `scale` (INTER_AREA) and the ground truth with them."""
    for name, first, second, gt_path in find_pairs(root):
        prev, nxt, gt = read_gray(first), read_gray(second), read_flo(gt_path)
        if scale != 1.0:
            h, w = round(prev.shape[0] * scale), round(prev.shape[1] * scale)
            prev = cv2.resize(prev, (w, h), interpolation=cv2.INTER_AREA)
            nxt = cv2.resize(nxt, (w, h), interpolation=cv2.INTER_AREA)
            gt = scaled_ground_truth(gt, (h, w))
        yield name, prev, nxt, gt


def clip_pairs(clips_root: str | Path, *, pairs: int = 4, start: int = 10, short_side: int | None = 128,
               size: tuple[int, int] | None = None, clips=CLIPS) -> Iterator[tuple[str, np.ndarray, np.ndarray]]:
    """(name, prev, next) grayscale frame pairs: `pairs` consecutive pairs from frame `start` of
    each clip, decoded and resized as extract-flow does (`short_side` or `size` (W, H))."""
    from datp.flows.compute import to_gray
    from datp.io.decode import iter_frames

    for clip in clips:
        frames = []
        for i, rgb in enumerate(iter_frames(Path(clips_root) / clip, short_side=short_side, size=size)):
            if i >= start:
                frames.append(to_gray(rgb))
            if len(frames) == pairs + 1:
                break
        stem = Path(clip).stem
        for i in range(len(frames) - 1):
            yield f"{stem}#{start + i}", frames[i], frames[i + 1]
