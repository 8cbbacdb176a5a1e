"""Weakly supervised temporal localization from attention weights (TSRNet, Zhang et al. 2019).

A head trained on video labels pools N segments with attention weights a (N,) and predicts video
class scores s (C,). The class-wise segment scores `w_i^c = a_i * s_c` say when each class happens:

1. `class_segment_scores` builds w per stream; `fuse_streams` mixes RGB and flow,
   `theta * rgb + (1 - theta) * flow`.
2. `localize_video` keeps the classes whose video score passes `class_threshold`, divides each kept
   class's curve by its maximum, cuts it at `segment_threshold` into contiguous runs of segments,
   turns each run into a `Detection` with start/end seconds and a score, and applies per-class NMS.
3. `datp.pool.detect.formats` saves them in ActivityNet's results format (and reads them back);
   `datp.pool.detect.plots` draws the weights over time against the ground truth.

`segment_seconds` gives each segment its time span from the frames the segments show.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torchvision.ops import batched_nms

from datp.pool.detect.formats import Detection, checked_array


def class_segment_scores(weights, class_scores) -> np.ndarray:
    """Class-wise segment scores `w_i^c = a_i * s_c`.

    Args:
        weights: (N,) attention weight a_i of each segment (array or tensor).
        class_scores: (C,) video-level class scores s_c, as probabilities (softmax or sigmoid).

    Returns:
        (N, C) float64 scores.
    """
    a = checked_array(weights, "weights", 1)
    s = checked_array(class_scores, "class_scores", 1)
    return a[:, None] * s[None, :]


def fuse_streams(rgb, flow, *, theta: float = 0.5) -> np.ndarray:
    """Two-stream fusion `theta * rgb + (1 - theta) * flow` of equally shaped score arrays.

    The default 0.5 weighs both streams equally (TSRNet tunes theta on validation data).
    """
    if not 0.0 <= theta <= 1.0:
        raise ValueError(f"theta={theta} must be in [0, 1] (1 = RGB only, 0 = flow only)")
    rgb, flow = np.asarray(rgb, dtype=np.float64), np.asarray(flow, dtype=np.float64)
    if rgb.shape != flow.shape:
        raise ValueError(f"rgb scores {rgb.shape} and flow scores {flow.shape} differ; both need the same segments")
    return theta * rgb + (1.0 - theta) * flow


def segment_seconds(shown, *, fps: float, num_frames: int) -> np.ndarray:
    """Start and end second of each segment, centred on the frame the segment shows.

    Frame i covers `[i / fps, (i + 1) / fps)`, so its centre is `(i + 0.5) / fps`. Segment k spans from
    the midpoint between the centres of the frames segments k-1 and k show to the midpoint between k's
    and k+1's; the first starts at 0 and the last ends with the video, so the segments tile it and each
    shown frame sits in the middle of its span (stride stores: a span of one stride centred on the
    shown frame; TSN's fixed layout, which shows the centre of each of N equal parts: the parts
    themselves, up to half a frame). Repeated shown frames give empty segments (start == end).

    Before this rule, segment k ran from its shown frame to the next one's: detections came out half a
    segment late, and in the fixed layout (T = 1000, N = 10) the segment showing the centre of frames
    300-399 was given [350, 450), so an event filling that part scored tIoU 0.33.

    Args:
        shown: (N,) frame each segment shows, non-decreasing; or (N, 2) [first, end) frames, used as
            they are.
        fps: frames per second of the video.
        num_frames: frame count of the video (the end of the last segment for (N,) frames).

    Returns:
        (N, 2) float64 [start, end] seconds.
    """
    if fps <= 0:
        raise ValueError(f"fps={fps} must be > 0")
    shown = np.asarray(shown, dtype=np.float64)
    if shown.ndim == 2 and shown.shape[1] == 2:
        return shown / fps
    if shown.ndim != 1 or len(shown) == 0 or np.any(np.diff(shown) < 0):
        raise ValueError(f"shown must be (N,) non-decreasing frames or (N, 2) [first, end); got {shown.shape}")
    if num_frames <= shown[-1]:
        raise ValueError(f"num_frames={num_frames} is not after the last shown frame {shown[-1]:g}")
    centres = shown + 0.5
    bounds = np.concatenate([[0.0], (centres[:-1] + centres[1:]) / 2, [float(num_frames)]])
    return np.stack([bounds[:-1], bounds[1:]], axis=1) / fps


def _runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """(first, last) index of each run of consecutive True values."""
    padded = np.concatenate([[False], mask, [False]])
    edges = np.flatnonzero(padded[1:] != padded[:-1])
    return [(int(a), int(b) - 1) for a, b in zip(edges[::2], edges[1::2])]


def nms(detections: Sequence[Detection], *, iou_threshold: float) -> list[Detection]:
    """Per-video, per-class greedy non-maximum suppression by temporal IoU.

    In score order, a detection is dropped when its tIoU with a kept detection of the same video and
    class is greater than `iou_threshold`. Uses torchvision's `batched_nms` on boxes `(start, 0, end, 1)`,
    whose IoU equals the temporal IoU.

    Returns:
        The kept detections, highest score first.
    """
    if not 0.0 <= iou_threshold <= 1.0:
        raise ValueError(f"iou_threshold={iou_threshold} must be in [0, 1]")
    if not detections:
        return []
    groups = {key: i for i, key in enumerate(sorted({(d.video, d.label) for d in detections}))}
    boxes = torch.tensor([[d.start, 0.0, d.end, 1.0] for d in detections], dtype=torch.float64)
    scores = torch.tensor([d.score for d in detections], dtype=torch.float64)
    idxs = torch.tensor([groups[(d.video, d.label)] for d in detections])
    keep = batched_nms(boxes, scores, idxs, iou_threshold)
    return [detections[int(i)] for i in keep]


def localize_video(
    segment_scores,
    video_scores,
    *,
    segment_times,
    class_names: Sequence[str],
    video: str,
    class_threshold: float = 0.1,
    keep_top_class: bool = True,
    segment_threshold: float | Sequence[float] = 0.5,
    contrast_weight: float = 0.0,
    outer_ratio: float = 0.25,
    nms_iou: float = 0.5,
) -> list[Detection]:
    """Detections of one video from its class-wise segment scores.

    For each class c with `video_scores[c] >= class_threshold` (and the top class if none passes and
    `keep_top_class`): the curve `r_i = w_i^c / max_j w_j^c` (1 at its peak) is cut at each
    `segment_threshold`; each run of consecutive segments with `r_i >= threshold` becomes a detection
    from the run's first segment start to its last segment end, with score

        score = video_scores[c] * (mean of r over the run - contrast_weight * mean of r just outside),

    where "just outside" is up to `max(1, round(outer_ratio * run length))` segments on each side
    (0 if the run fills the video). With the default `contrast_weight=0` the score is the class
    probability times the run's mean relative weight; a positive weight rewards runs that stand out
    from their surroundings (AutoLoc's outer-inner contrast). Then per-class NMS with `nms_iou`.

    Args:
        segment_scores: (N, C) non-negative scores w (from `class_segment_scores`, maybe fused).
        video_scores: (C,) video class scores s (probabilities).
        segment_times: (N, 2) [start, end] seconds of each segment (`segment_seconds`).
        class_names: C labels written into the detections.
        video: the video id written into the detections.
        class_threshold: minimal video score of a class to localize it.
        keep_top_class: localize the best class when no class passes (a weakly labelled untrimmed
            video holds at least one action).
        segment_threshold: one fraction of the peak in (0, 1], or several (runs from all, then NMS).
        contrast_weight: weight of the outer mean in the score (0 = off).
        outer_ratio: width of the outer region, as a fraction of the run length.
        nms_iou: tIoU above which the lower-scored of two same-class detections is removed.

    Returns:
        Detections, highest score first.
    """
    w = checked_array(segment_scores, "segment_scores", 2)
    s = checked_array(video_scores, "video_scores", 1)
    times = checked_array(segment_times, "segment_times", 2)
    N, C = w.shape
    if s.shape != (C,) or times.shape != (N, 2) or len(class_names) != C:
        raise ValueError(
            f"segment_scores {w.shape} needs video_scores ({C},), segment_times ({N}, 2) and {C} class_names; "
            f"got {s.shape}, {times.shape} and {len(class_names)}"
        )
    if N and w.min() < 0:
        raise ValueError(f"segment_scores has negative values (min {w.min():.3g}); pass probabilities, not logits")
    thresholds = [segment_threshold] if np.isscalar(segment_threshold) else list(segment_threshold)
    if not thresholds or any(not 0.0 < t <= 1.0 for t in thresholds):
        raise ValueError(f"segment_threshold={segment_threshold} must be in (0, 1] (a fraction of the peak)")

    classes = np.flatnonzero(s >= class_threshold)
    if len(classes) == 0 and keep_top_class and C:
        classes = np.array([int(np.argmax(s))])
    detections = []
    for c in classes:
        peak = w[:, c].max() if N else 0.0
        if peak <= 0:
            continue
        r = w[:, c] / peak
        for threshold in thresholds:
            for first, last in _runs(r >= threshold):
                inner = r[first : last + 1].mean()
                margin = max(1, round(outer_ratio * (last - first + 1)))
                outer_idx = np.r_[max(0, first - margin) : first, last + 1 : min(N, last + 1 + margin)]
                outer = r[outer_idx].mean() if len(outer_idx) else 0.0
                score = float(s[c] * (inner - contrast_weight * outer))
                detections.append(
                    Detection(video, str(class_names[c]), float(times[first, 0]), float(times[last, 1]), score)
                )
    return nms(detections, iou_threshold=nms_iou)


# ------------------------------------------------------------------------------------------ files


