"""`datp localize` and `datp eval-detection`: a trained run's attention -> detections -> mAP.

- `localize_run(run_dir, features, out=...)` scores every done video of a feature store (or one split)
  with a `train_head` run, turns the attention weights a (N,) and the video class probabilities
  s = softmax(logits) (C,) into class-wise segment scores `w_i^c = a_i * s_c`, optionally fuses a
  flow run (`theta * rgb + (1 - theta) * flow`, for w and for s), cuts them into detections with
  `datp.pool.detect.localize.localize_video` and writes ActivityNet results JSON.
- `localize_arrays(...)` is the pure part (weights, scores, masks, frames -> detections), so it can be
  checked with hand-made weights.
- `eval_detection(detections, ground_truth, evaluator=...)` reads both files and runs
  `datp.pool.detect.evaluators.evaluate_detection`.
- `plot_videos(...)` draws the attention of a few videos against their ground truth (one PNG each);
  `localize_run(..., plot=DIR, ground_truth=FILE)` calls it.

Segment times come from the store: segment i of a video spans from the midpoint between the frames
segments i-1 and i show to the midpoint between i's and i+1's (centred on what it shows), the first
starts at frame 0 and the last runs to `videos/num_frames`; seconds
divide by `videos/fps` (`datp.pool.detect.localize.segment_seconds`). A segment shows `segments/frame` in an
RGB-only store, and `segments/frame + L // 2` in a store with the flow stream, whose segments read
flow pairs `start .. start + L - 1` and the RGB frame `start + L // 2` (`datp.extract.features`;
`shown_frames`).
"""

from __future__ import annotations

import json
from dataclasses import replace
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

from datp.extract.store import FeatureStore
from datp.pool.data import store_summary
from datp.pool.detect.evaluators import DetectionResult, evaluate_detection
from datp.pool.detect.formats import (
    Detection,
    check_replaceable,
    export_weights,
    read_activitynet_predictions,
    read_ground_truth,
    to_activitynet_json,
    write_activitynet_json,
)
from datp.pool.detect.localize import (
    class_segment_scores,
    fuse_streams,
    localize_video,
    segment_seconds,
)
from datp.pool.detect.plots import PLOT_COUNT, plot_videos
from datp.pool.predict import predict, run_data
from datp.pool.runs import load_run

# Defaults of `localize_video`, repeated here so that the CLI help and external_data name them.
CLASS_THRESHOLD = 0.1
SEGMENT_THRESHOLD = 0.5
NMS_IOU = 0.5


def _predict_rows(run_dir: str | Path, store: FeatureStore, rows: np.ndarray, *, device: str,
                  batch_size: int) -> tuple[dict, list[str]]:
    """`datp.pool.predict.predict` of a run over `rows` of an open store, and the run's class names."""
    run = load_run(run_dir, device=device)
    data = run_data(run, store, rows)
    p = predict(run.head, data, rows, batch_size=batch_size, device=run.device)
    p["head"], p["stream"] = run.name, run.stream
    p["loss"] = (run.config.get("config") or {}).get("loss", "ce")  # runs before --loss trained with "ce"
    # Class probabilities as the head was trained to give them: a sigmoid per class after --loss bce
    # (multi-label videos), else the softmax.
    logits = torch.from_numpy(np.asarray(p["logits"], np.float64))
    p["probs"] = (logits.sigmoid() if p["loss"] == "bce" else logits.softmax(-1)).numpy()
    return p, run.class_names


def shown_frames(frames: np.ndarray, new_length: Mapping[str, int]) -> np.ndarray:
    """The frame each segment shows, from the store's `segments/frame` and its `new_length` attribute.

    With the flow stream, segment k of `datp extract-features` reads flow pairs `start_k .. start_k + L - 1`
    (frames `start_k .. start_k + L`) and the RGB frame `start_k + L // 2`, and `segments/frame` holds
    `start_k`: both streams show `start_k + L // 2`. Timing the segments from `start_k` would put every
    detection L // 2 frames early. Without flow the RGB frame is `start_k` itself. One rule covers both and
    imported stores (`datp import-features`: every stream's row k covers the `L = frames_per_row` frames
    from `start_k`): a segment shows `start_k + max(L over the streams) // 2`.

    Args:
        frames: (V, N) `segments/frame` of V videos (padded positions pass through shifted).
        new_length: the store's {stream: L}.

    Returns:
        (V, N) int64 shown frames for `segment_seconds` (which centres each span on them and starts the
        first at 0): `frames + max(new_length.values()) // 2` (extract-features: L of flow with the flow
        stream, `frames` without, since RGB has L = 1).
    """
    return np.array(frames, dtype=np.int64) + max(int(L) for L in new_length.values()) // 2


def localize_arrays(
    weights: np.ndarray,
    logits: np.ndarray,
    mask: np.ndarray,
    frames: np.ndarray,
    *,
    ids: Sequence[str],
    num_frames: Sequence[int],
    fps: Sequence[float],
    class_names: Sequence[str],
    flow: tuple[np.ndarray, np.ndarray] | None = None,
    theta: float = 0.5,
    class_threshold: float = CLASS_THRESHOLD,
    segment_threshold: float | Sequence[float] = SEGMENT_THRESHOLD,
    nms_iou: float = NMS_IOU,
    scores_are_probs: bool = False,
) -> tuple[dict[str, list[Detection]], dict[str, tuple[np.ndarray, np.ndarray]]]:
    """Detections of V videos from padded attention weights and video logits.

    Args:
        weights: (V, N) attention weights a (padded positions are ignored).
        logits: (V, C) video logits; s = softmax(logits) (or `logits` as they are with
            `scores_are_probs`).
        mask: (V, N) bool, True for real segments.
        frames: (V, N) first frame of each segment.
        ids, num_frames, fps: (V,) video ids, frame counts and frame rates.
        class_names: C labels.
        flow: (weights (V, N), logits (V, C)) of a flow run on the same videos and segments, fused
            with `theta * rgb + (1 - theta) * flow` for both w and s.
        theta, class_threshold, segment_threshold, nms_iou: see `localize_run`.
        scores_are_probs: `logits` already holds class probabilities.

    Returns:
        video id -> detections (highest score first), and video id -> (attention weights (n,),
        segment seconds (n, 2)) of its n real segments (fused `theta * a_rgb + (1 - theta) * a_flow`
        with `flow`).
    """
    weights, logits = np.asarray(weights, np.float64), np.asarray(logits, np.float64)
    mask, frames = np.asarray(mask, bool), np.asarray(frames)
    V, N = weights.shape
    if logits.shape[0] != V or mask.shape != (V, N) or frames.shape != (V, N) or len(ids) != V:
        raise ValueError(f"weights {weights.shape} need logits ({V}, C), mask and frames ({V}, {N}) and {V} ids; "
                         f"got {logits.shape}, {mask.shape}, {frames.shape} and {len(ids)}")

    def probs(x: np.ndarray) -> np.ndarray:
        return x if scores_are_probs else torch.from_numpy(x).softmax(-1).numpy()

    s_all = probs(logits)
    if flow is not None:
        flow_weights, flow_logits = (np.asarray(x, np.float64) for x in flow)
        if flow_weights.shape != weights.shape or flow_logits.shape != logits.shape:
            raise ValueError(f"the flow run gives weights {flow_weights.shape} and logits {flow_logits.shape}; "
                             f"the rgb run {weights.shape} and {logits.shape}: run both on the same store")
        s_flow = probs(flow_logits)
    detections, attention = {}, {}
    for v, video in enumerate(ids):
        if fps[v] <= 0:
            raise ValueError(f"video {video!r} has fps {fps[v]} in the store; re-extract its features so that "
                             "the store records the frame rate")
        real = mask[v]
        times = segment_seconds(frames[v, real], fps=float(fps[v]), num_frames=int(num_frames[v]))
        a, s = weights[v, real], s_all[v]
        w = class_segment_scores(a, s)  # (n, C)
        if flow is not None:
            w = fuse_streams(w, class_segment_scores(flow_weights[v, real], s_flow[v]), theta=theta)
            s = fuse_streams(s, s_flow[v], theta=theta)
            a = fuse_streams(a, flow_weights[v, real], theta=theta)
        detections[video] = localize_video(w, s, segment_times=times, class_names=class_names, video=video,
                                           class_threshold=class_threshold, segment_threshold=segment_threshold,
                                           nms_iou=nms_iou)
        attention[video] = (a, times)
    return detections, attention


def localize_run(
    run_dir: str | Path,
    features: str | Path,
    *,
    out: str | Path,
    split: str | None = None,
    flow_run: str | Path | None = None,
    theta: float = 0.5,
    class_threshold: float = CLASS_THRESHOLD,
    segment_threshold: float | Sequence[float] = SEGMENT_THRESHOLD,
    nms_iou: float = NMS_IOU,
    export: str | Path | None = None,
    plot: str | Path | None = None,
    ground_truth: str | Path | None = None,
    plot_count: int = PLOT_COUNT,
    device: str = "cpu",
    batch_size: int = 64,
) -> dict:
    """Localize actions in the videos of a feature store with a trained head; write ActivityNet JSON.

    Args:
        run_dir: a `datp train-head` RUN_DIR (an attention head: its weights say when).
        features: the feature store (ragged stride-mode stores work: masks mark each video's segments).
        out: the results JSON to write.
        split: only the store's videos of this split (None: every done video).
        flow_run: a second run (the flow stream) on the same store; fused with weight `1 - theta`.
        theta: weight of `run_dir` in the fusion, in [0, 1] (ignored without `flow_run`).
        class_threshold: localize the classes whose video probability is at least this (the top class
            when none passes).
        segment_threshold: fraction of each class curve's peak at which it is cut into segments (one
            value or several).
        nms_iou: per-class NMS removes the lower-scored of two detections with a larger tIoU.
        export: also write the attention weights per video (`.json` or `.csv`, `export_weights`).
        plot: a folder for one PNG per video of the attention against the ground truth (`plot_videos`).
        ground_truth: ActivityNet JSON or THUMOS14 annotation folder shaded on the plots (optional; every
            subset of a JSON is read, a THUMOS14 folder must hold one subset).
        plot_count: plot at most this many videos, those with ground truth first.
        device: where the heads run.
        batch_size: videos per forward pass.

    Returns:
        The results dict written to `out` (`{"version", "results", "external_data"}`).
    """
    if ground_truth is not None and plot is None:
        raise ValueError(f"--ground-truth {ground_truth} is drawn on the attention plots; pass --plot DIR too "
                         "(datp eval-detection scores detections)")
    if plot is not None and plot_count < 1:
        raise ValueError(f"--plot-count {plot_count} must be >= 1")
    check_replaceable(out, what="detections")  # never overwrite what datp did not write
    if export is not None:
        check_replaceable(export, what="weights", option="--export")
    truth = read_ground_truth(ground_truth) if ground_truth is not None else None  # fail before the work
    with FeatureStore(features) as store:
        rows = store.indices(split)
        if not len(rows):
            where = f"split {split!r}" if split is not None else "any split"
            raise ValueError(f"{store.path.name} has no done videos of {where}; its splits are "
                             f"{sorted(set(store.splits.tolist()))}")
        p, class_names = _predict_rows(run_dir, store, rows, device=device, batch_size=batch_size)
        flow = None
        if flow_run is not None:
            q, flow_classes = _predict_rows(flow_run, store, rows, device=device, batch_size=batch_size)
            if flow_classes != class_names:
                raise ValueError(f"{flow_run} was trained on other classes than {run_dir}; fuse runs of one dataset")
            flow = (q["weights"], q["probs"])
        ids = [store.ids[i] for i in p["rows"]]
        num_frames, fps = store.num_frames[p["rows"]], store.fps[p["rows"]]
        frames = shown_frames(p["frame"], json.loads(store.attrs["new_length"]))
        summary = store_summary(store)
    detections, attention = localize_arrays(
        p["weights"], p["probs"], p["mask"], frames, ids=ids, num_frames=num_frames, fps=fps,
        class_names=class_names, flow=flow, theta=theta, class_threshold=class_threshold,
        segment_threshold=segment_threshold, nms_iou=nms_iou, scores_are_probs=True)
    settings = {"theta": theta if flow_run is not None else None, "class_threshold": class_threshold,
                "segment_threshold": segment_threshold, "nms_iou": nms_iou,
                "scores": "w_i^c = a_i * " + ("sigmoid" if p["loss"] == "bce" else "softmax") + "(logits)_c"}
    external = {"used": False, "details": "datp localize: attention weights of a head trained on video labels",
                "datp": {"run": str(Path(run_dir).resolve()), "head": p["head"], "stream": p["stream"],
                         "flow_run": None if flow_run is None else str(Path(flow_run).resolve()),
                         "features": summary["path"], "split": split, "videos": len(ids), "settings": settings,
                         "store": summary}}
    write_activitynet_json(detections, out, external_data=external)
    if export is not None:
        export_weights(attention, export)
    if plot is not None:
        curves = None
        if flow is not None:  # each stream's attention and the fused one
            curves = {v: {"rgb": p["weights"][i, p["mask"][i]], "flow": flow[0][i, p["mask"][i]],
                          "fused": attention[v][0]} for i, v in enumerate(ids)}
        plot_videos(attention, detections, plot, ground_truth=truth, count=plot_count, curves=curves,
                    title=f"{p['head']} ({p['stream']})" + (f" + flow run, theta {theta:g}" if flow else ""))
    return to_activitynet_json(detections, external_data=external)


def eval_detection(
    detections_path: str | Path,
    ground_truth_path: str | Path,
    *,
    evaluator: str,
    subset: str | None = None,
    tiou: Sequence[float] | None = None,
    annotated_only: bool = False,
) -> DetectionResult:
    """Mean AP of an ActivityNet results JSON against ground truth (format with `format_result`).

    Args:
        detections_path: results JSON (`datp localize` writes one).
        ground_truth_path: ActivityNet ground truth JSON, or a THUMOS14 annotation folder.
        evaluator: "anet" (tIoU 0.5:0.05:0.95 by default) or "thumos14" (0.1:0.1:0.7); see
            `datp.pool.detect.evaluators`.
        subset: the ground truth subset to evaluate ("validation" for ActivityNet JSON, "test" or
            "val" for THUMOS14 folders); None keeps every video (THUMOS14: the only subset present).
        tiou: tIoU thresholds; None uses the evaluator's defaults.
        annotated_only: leave out the detections on videos the ground truth (subset) does not list,
            and count them in `left_out`. Off by default: as in both official tools, such detections
            are false positives (THUMOS14's test set has background-only videos), so localize only
            the evaluated split (`datp localize --split`).

    Returns:
        The result, labelled with its evaluator, with the counts of videos, detections scored and
        detections left out.
    """
    truth = read_ground_truth(ground_truth_path, subset=subset)
    predictions = read_activitynet_predictions(detections_path)
    left_out = 0
    if annotated_only:
        listed = set(truth.videos)
        kept = [d for d in predictions if d.video in listed]
        left_out, predictions = len(predictions) - len(kept), kept
    result = evaluate_detection(predictions, truth, evaluator=evaluator, tiou_thresholds=tiou)
    return replace(result, videos=len(set(truth.videos)), detections=len(predictions), left_out=left_out)
