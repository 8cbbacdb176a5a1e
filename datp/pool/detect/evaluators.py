"""Temporal action detection: ground truth and prediction readers, and the two standard evaluators.

Two evaluators are in common use and give different numbers for the same detections, so every
`DetectionResult` carries the name of the one that made it (see docs/detection.md):

- `"anet"` follows ActivityNet's official `Evaluation/eval_detection.py`
  (`ANETdetection` + `compute_average_precision_detection`, github.com/activitynet/ActivityNet):
  prediction-centric matching with tIoU >= threshold, interpolated (VOC-style) AP,
  default thresholds 0.50:0.05:0.95.
- `"thumos14"` follows the THUMOS14 evaluation kit's `TH14evalDet.m` / `TH14eventdetpr.m`
  (crcv.ucf.edu/THUMOS14): ground-truth-centric matching with overlap strictly greater than the
  threshold, detections overlapping an "Ambiguous" region are dropped from the false positives,
  non-interpolated AP, default thresholds 0.1:0.1:0.7.

Both score every class that has ground truth; a class with no predictions scores AP 0 (as the later
ActivityNet code and `TH14evalDet_Updated.m` do), and predicted labels without ground truth are left
out and listed in `DetectionResult.ignored_labels`. Predictions on videos that have no ground truth of
their class are false positives, as in both official tools: pass only the evaluated subset's videos.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from datp.pool.detect.formats import (
    AmbiguousRegion,
    Detection,
    GroundTruth,
    GroundTruthSet,
)

ANET_THRESHOLDS = tuple(round(0.5 + 0.05 * i, 2) for i in range(10))  # 0.50, 0.55, ..., 0.95
THUMOS14_THRESHOLDS = tuple(round(0.1 * i, 1) for i in range(1, 8))  # 0.1, 0.2, ..., 0.7
EVALUATORS = ("anet", "thumos14")


@dataclass(frozen=True)
class DetectionResult:
    """Mean average precision of detections, labelled with the evaluator that computed it.

    Attributes:
        evaluator: "anet" or "thumos14".
        thresholds: (T,) tIoU thresholds.
        ap: class name -> (T,) AP at each threshold, for every class with ground truth.
        map: (T,) mean over classes of the AP at each threshold.
        average_map: mean of `map` over thresholds.
        ignored_labels: predicted labels that have no ground truth (not scored).
        videos: videos the ground truth lists (None when not counted).
        detections: detections scored (None when not counted).
        left_out: detections on videos the ground truth does not list that were left out on request
            (`eval_detection(..., annotated_only=True)`); 0 when they were scored as false positives.
    """

    evaluator: str
    thresholds: tuple[float, ...]
    ap: dict[str, tuple[float, ...]]
    map: tuple[float, ...]
    average_map: float
    ignored_labels: tuple[str, ...] = field(default=())
    videos: int | None = None
    detections: int | None = None
    left_out: int = 0


# -------------------------------------------------------------------------------------- matching


def temporal_iou(segment: Sequence[float], others: np.ndarray) -> np.ndarray:
    """tIoU of one `[start, end]` with each row of `others` (K, 2); 0 where the union is empty.

    Same formula as ActivityNet's `utils.segment_iou` and THUMOS14's `intervaloverlapvalseconds`
    (which only counts a strictly positive intersection; both agree since the IoU is 0 otherwise).
    """
    others = np.asarray(others, dtype=np.float64).reshape(-1, 2)
    inter = (np.minimum(segment[1], others[:, 1]) - np.maximum(segment[0], others[:, 0])).clip(0)
    union = (others[:, 1] - others[:, 0]) + (segment[1] - segment[0]) - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def interpolated_ap(precision: np.ndarray, recall: np.ndarray) -> float:
    """ActivityNet's `interpolated_prec_rec`: area under the precision-recall curve after making
    precision monotonically decreasing, summed over the points where recall changes."""
    mprec = np.concatenate([[0.0], precision, [0.0]])
    mrec = np.concatenate([[0.0], recall, [1.0]])
    mprec = np.maximum.accumulate(mprec[::-1])[::-1]
    idx = np.flatnonzero(mrec[1:] != mrec[:-1]) + 1
    return float(np.sum((mrec[idx] - mrec[idx - 1]) * mprec[idx]))


def _anet_class_ap(gts: list[GroundTruth], dets: list[Detection], thresholds: Sequence[float]) -> np.ndarray:
    """Per-threshold AP of one class, as ActivityNet's `compute_average_precision_detection`."""
    ap = np.zeros(len(thresholds))
    if not dets:
        return ap
    gt_by_video: dict[str, list[int]] = defaultdict(list)
    for i, g in enumerate(gts):
        gt_by_video[g.video].append(i)
    gt_segments = np.array([[g.start, g.end] for g in gts], dtype=np.float64)
    # Decreasing score. The official code uses argsort()[::-1]; a stable sort keeps ties in input order.
    order = np.argsort(-np.array([d.score for d in dets]), kind="stable")
    locked = np.zeros((len(thresholds), len(gts)), dtype=bool)  # ground truth already matched
    tp = np.zeros((len(thresholds), len(dets)))
    for rank, k in enumerate(order):
        det = dets[k]
        candidates = gt_by_video.get(det.video, [])
        if not candidates:
            continue  # no ground truth of this class in the video: false positive at every threshold
        tiou = temporal_iou((det.start, det.end), gt_segments[candidates])
        by_tiou = np.argsort(-tiou, kind="stable")  # best overlap first
        for t, threshold in enumerate(thresholds):
            for j in by_tiou:
                if tiou[j] < threshold:
                    break  # the rest overlap even less: false positive
                if not locked[t, candidates[j]]:
                    locked[t, candidates[j]] = True
                    tp[t, rank] = 1.0
                    break
    tp_cum = np.cumsum(tp, axis=1)
    fp_cum = np.cumsum(1.0 - tp, axis=1)
    for t in range(len(thresholds)):
        ap[t] = interpolated_ap(tp_cum[t] / (tp_cum[t] + fp_cum[t]), tp_cum[t] / len(gts))
    return ap


def _thumos_class_ap(
    gts: list[GroundTruth],
    dets: list[Detection],
    ambiguous: Sequence[AmbiguousRegion],
    threshold: float,
) -> float:
    """AP of one class at one threshold, as THUMOS14's `TH14eventdetpr.m` + `prap`."""
    gt_by_video: dict[str, list[GroundTruth]] = defaultdict(list)
    for g in gts:
        gt_by_video[g.video].append(g)
    det_by_video: dict[str, list[Detection]] = defaultdict(list)
    for d in dets:
        det_by_video[d.video].append(d)
    amb_by_video: dict[str, list[AmbiguousRegion]] = defaultdict(list)
    for a in ambiguous:
        amb_by_video[a.video].append(a)

    kept: list[tuple[float, bool]] = []  # (confidence, is true positive), videos in sorted order
    for video in sorted(det_by_video):
        vdets = sorted(det_by_video[video], key=lambda d: -d.score)  # stable, like MATLAB's sort
        segments = np.array([[d.start, d.end] for d in vdets], dtype=np.float64)
        free = np.ones(len(vdets), dtype=bool)
        # Ground-truth-centric: each ground truth, in file order, takes the free detection with the
        # largest overlap (the first, i.e. most confident, on ties) if that overlap is > threshold.
        for g in gt_by_video.get(video, []):
            candidates = np.flatnonzero(free)
            if len(candidates) == 0:
                break
            ov = temporal_iou((g.start, g.end), segments[candidates])
            best = int(np.argmax(ov))
            if ov[best] > threshold:
                free[candidates[best]] = False
        # An unmatched detection that overlaps any ambiguous region at all is dropped, not a false positive.
        in_ambiguous = np.zeros(len(vdets), dtype=bool)
        for a in amb_by_video.get(video, []):
            in_ambiguous |= temporal_iou((a.start, a.end), segments) > 0
        for det, is_free, is_ambiguous in zip(vdets, free, in_ambiguous):
            if not (is_free and is_ambiguous):
                kept.append((det.score, not is_free))
    if not kept:
        return 0.0
    kept.sort(key=lambda row: -row[0])  # stable
    is_tp = np.array([row[1] for row in kept])
    tp_cum = np.cumsum(is_tp)
    precision = tp_cum / np.arange(1, len(is_tp) + 1)
    # Non-interpolated: the precision at each true positive, summed and divided by the ground truth count.
    return float(precision[is_tp].sum() / len(gts))


# -------------------------------------------------------------------------------------- evaluate


def evaluate_detection(
    predictions: Iterable[Detection],
    ground_truth: GroundTruthSet | Iterable[GroundTruth],
    *,
    evaluator: Literal["anet", "thumos14"],
    tiou_thresholds: Sequence[float] | None = None,
) -> DetectionResult:
    """Mean average precision of temporal detections over classes, at several tIoU thresholds.

    Args:
        predictions: the detections of every video.
        ground_truth: a `GroundTruthSet` (from a reader) or plain ground truth instances.
        evaluator: "anet" (ActivityNet) or "thumos14" (THUMOS14 kit); see the module docstring.
        tiou_thresholds: thresholds in [0, 1]; None uses the evaluator's defaults
            (`ANET_THRESHOLDS` 0.50:0.05:0.95, `THUMOS14_THRESHOLDS` 0.1:0.1:0.7).

    Returns:
        AP per class and threshold, mAP per threshold and their average, labelled with `evaluator`.
    """
    if evaluator not in EVALUATORS:
        raise ValueError(f"unknown evaluator {evaluator!r}; choose from {list(EVALUATORS)}")
    if tiou_thresholds is None:
        tiou_thresholds = ANET_THRESHOLDS if evaluator == "anet" else THUMOS14_THRESHOLDS
    thresholds = tuple(float(t) for t in tiou_thresholds)
    if not thresholds or any(not 0.0 <= t <= 1.0 for t in thresholds):
        raise ValueError(f"tiou_thresholds={list(thresholds)} must be a non-empty list of values in [0, 1]")
    if not isinstance(ground_truth, GroundTruthSet):
        ground_truth = GroundTruthSet(tuple(ground_truth))
    if not ground_truth.instances:
        raise ValueError("the ground truth has no instances; check the file and the subset")

    gt_by_label: dict[str, list[GroundTruth]] = defaultdict(list)
    for g in ground_truth.instances:
        gt_by_label[g.label].append(g)
    det_by_label: dict[str, list[Detection]] = defaultdict(list)
    for d in predictions:
        det_by_label[d.label].append(d)

    ap: dict[str, tuple[float, ...]] = {}
    for label in sorted(gt_by_label):
        gts, dets = gt_by_label[label], det_by_label.get(label, [])
        if evaluator == "anet":
            values = _anet_class_ap(gts, dets, thresholds)
        else:
            values = [_thumos_class_ap(gts, dets, ground_truth.ambiguous, t) for t in thresholds]
        ap[label] = tuple(float(v) for v in values)
    per_threshold = np.mean(np.array(list(ap.values())), axis=0)
    return DetectionResult(
        evaluator=evaluator,
        thresholds=thresholds,
        ap=ap,
        map=tuple(float(v) for v in per_threshold),
        average_map=float(per_threshold.mean()),
        ignored_labels=tuple(sorted(set(det_by_label) - set(gt_by_label))),
    )


def format_result(result: DetectionResult, *, per_class: bool = False) -> str:
    """A plain-text table: mAP at each threshold and their average (and each class's AP if asked)."""
    rule = "tIoU >= t, interpolated AP" if result.evaluator == "anet" else "overlap > t, non-interpolated AP"
    lines = [f"evaluator: {result.evaluator} ({rule}); {len(result.ap)} classes"]
    if result.detections is not None:
        lines.append(f"{result.detections} detections scored on {result.videos} annotated videos"
                     + (f"; {result.left_out} detections on videos without ground truth left out (--annotated-only)"
                        if result.left_out else "; detections on videos without ground truth count as false positives"))
    if result.ignored_labels:
        lines.append(f"ignored predicted labels without ground truth: {', '.join(result.ignored_labels)}")
    header = "tIoU   mAP"
    if per_class:
        header += "".join(f"  {label:>{max(len(label), 6)}}" for label in result.ap)
    lines.append(header)
    for t, threshold in enumerate(result.thresholds):
        row = f"{threshold:<6.2f} {100 * result.map[t]:6.2f}"
        if per_class:
            row += "".join(f"  {100 * v[t]:{max(len(k), 6)}.2f}" for k, v in result.ap.items())
        lines.append(row)
    span = f"{result.thresholds[0]:.2f}:{result.thresholds[-1]:.2f}"
    lines.append(f"average mAP [{span}] ({result.evaluator}): {100 * result.average_map:.2f}")
    return "\n".join(lines)
