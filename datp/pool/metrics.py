"""Classification metrics and late fusion of streams.

- `metrics(logits, labels, class_names)`: top-1, top-5, mean class accuracy, per-class accuracy.
- `multilabel_metrics(logits, targets)`: multi-label videos (THUMOS14): the classification mAP over
  classes (scikit-learn's average precision per class over the videos, mean over the classes that
  have a positive video) and top-1 counted as a hit when the top class is any of the video's labels.
- `fuse_runs(runs, on="softmax")`: late fusion `sum_r w_r * softmax(logits_r)` of runs scored on
  the same test videos. Default weights by stream: rgb 1, flow 1.5 (TSN, DATP). Fusion is on
  softmax probabilities by default because heads put their logits on different scales (DATP's
  `S = sum_i w_i I_i / ||w||_2` grows with sqrt(N), attention heads' do not), so summing raw logits
  would weigh the streams by their heads' scales rather than by `w_r`; `on="logits"` sums raw
  logits as TSN's scripts do.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from datp.pool.runs import read_predictions

DEFAULT_STREAM_WEIGHTS = {"rgb": 1.0, "flow": 1.5, "both": 1.0}


FUSE_ON = ("softmax", "logits")


def multilabel_metrics(logits, targets) -> dict:
    """Metrics of multi-label videos; rows without any label (background-only) are left out.

    Args:
        logits: (V, C) video scores (any monotone scale: logits, sigmoid or softmax).
        targets: (V, C) multi-hot labels (0/1).

    Returns:
        {"top1_any": share of labelled videos whose top class is one of their labels, "class_map": mean
        over classes with a positive video of the average precision, "map_classes": how many classes
        that is, "multilabel_videos": labelled videos}; the values are None without labelled videos.
    """
    from sklearn.metrics import average_precision_score

    scores = np.asarray(logits, np.float64)
    targets = np.asarray(targets) > 0
    if scores.shape != targets.shape or scores.ndim != 2:
        raise ValueError(f"multilabel metrics need (V, C) scores and targets, got {scores.shape} and {targets.shape}")
    keep = targets.any(axis=1)
    scores, targets = scores[keep], targets[keep]
    if not len(scores):
        return {"top1_any": None, "class_map": None, "map_classes": 0, "multilabel_videos": 0}
    top1 = float(targets[np.arange(len(scores)), scores.argmax(axis=1)].mean())
    present = np.flatnonzero(targets.any(axis=0))
    aps = [average_precision_score(targets[:, c], scores[:, c]) for c in present]
    return {"top1_any": top1, "class_map": float(np.mean(aps)), "map_classes": int(len(present)),
            "multilabel_videos": int(len(scores))}


def metrics(logits, labels, class_names: Sequence[str]) -> dict:
    """Classification metrics over the videos with a known label (label >= 0).

    top-k counts a video as correct when fewer than k classes score strictly higher than its true
    class (hand-written: sklearn's `top_k_accuracy_score` wants 1-D scores when there are two
    classes). The mean class accuracy is the mean of the per-class accuracies over the classes that
    have videos (sklearn's balanced accuracy); a class without videos has accuracy None.

    Args:
        logits: (V, C) scores (any monotone transform of the logits gives the same metrics).
        labels: (V,) int labels, -1 for unknown (left out).
        class_names: C names.

    Returns:
        {"top1", "top5" (top-min(5, C)), "mean_class_accuracy", "per_class_accuracy" {name: acc},
        "videos"}; the accuracies are None when no video has a known label.
    """
    scores = np.asarray(logits, np.float64)
    labels = np.asarray(labels, np.int64)
    C = len(class_names)
    if scores.ndim != 2 or scores.shape[1] != C or len(labels) != len(scores):
        raise ValueError(f"metrics need (V, {C}) scores and (V,) labels, got {scores.shape} and {labels.shape}")
    keep = labels >= 0
    scores, labels = scores[keep], labels[keep]
    if not len(labels):
        return {"top1": None, "top5": None, "mean_class_accuracy": None,
                "per_class_accuracy": {n: None for n in class_names}, "videos": 0}
    true = scores[np.arange(len(labels)), labels]
    rank = (scores > true[:, None]).sum(axis=1)  # classes scoring strictly above the true one
    correct = scores.argmax(axis=1) == labels
    count = np.bincount(labels, minlength=C)
    hits = np.bincount(labels, weights=correct, minlength=C)
    per_class = {name: (float(hits[c] / count[c]) if count[c] else None) for c, name in enumerate(class_names)}
    present = count > 0
    return {"top1": float(correct.mean()), "top5": float((rank < min(5, C)).mean()),
            "mean_class_accuracy": float((hits[present] / count[present]).mean()),
            "per_class_accuracy": per_class, "videos": int(len(labels))}


def _softmax(logits: np.ndarray) -> np.ndarray:
    return torch.from_numpy(np.asarray(logits, np.float64)).softmax(dim=1).numpy()


def fuse_runs(runs: Sequence, *, on: str = "softmax") -> dict:
    """Late fusion of runs scored on the same test videos: `sum_r w_r * f(logits_r)`.

    Args:
        runs: run folders, or (run folder, weight) pairs; a weight left out (or None) comes from the
            run's stream: rgb 1, flow 1.5, both 1 (TSN's and DATP's 1 : 1.5).
        on: f = "softmax" (default; see the module docstring) or "logits" (identity).

    Returns:
        {"on", "runs": [{"run", "head", "stream", "weight", metrics...}], "fused": metrics,
        "scores": (V, C) fused scores, "ids", "labels"}.

    Raises:
        ValueError: fewer than one run, or runs over other videos, orders, labels or classes.
    """
    if on not in FUSE_ON:
        raise ValueError(f"fusion on {on!r} is not one of {list(FUSE_ON)}")
    if not runs:
        raise ValueError("no run to fuse; pass RUN_DIRs written by datp train-head")
    pairs = [(r, None) if isinstance(r, (str, Path)) else (r[0], r[1]) for r in runs]
    preds = [read_predictions(r) for r, _ in pairs]
    first = preds[0]
    for p in preds[1:]:
        if p["ids"] != first["ids"]:
            where = next((i for i, (a, b) in enumerate(zip(p["ids"], first["ids"])) if a != b),
                         min(len(p["ids"]), len(first["ids"])))
            a = first["ids"][where] if where < len(first["ids"]) else "<end>"
            b = p["ids"][where] if where < len(p["ids"]) else "<end>"
            raise ValueError(f"{p['run']} covers other test videos than {first['run']} ({len(p['ids'])} vs "
                             f"{len(first['ids'])}; first difference at row {where}: {b!r} vs {a!r}); fuse runs "
                             "trained on stores with the same test videos in the same order")
        if p["class_names"] != first["class_names"]:
            raise ValueError(f"{p['run']} has other classes than {first['run']}; fuse runs of one dataset")
        if not np.array_equal(p["labels"], first["labels"]):
            raise ValueError(f"{p['run']} has other labels than {first['run']} for the same videos")
    names = first["class_names"]
    fused = np.zeros(first["logits"].shape, np.float64)
    report = []
    for (run, weight), p in zip(pairs, preds):
        stream = str(p["attrs"].get("stream", ""))
        if weight is None:
            if stream not in DEFAULT_STREAM_WEIGHTS:
                raise ValueError(f"{run} records no stream; give its fusion weight explicitly")
            weight = DEFAULT_STREAM_WEIGHTS[stream]
        fused += weight * (_softmax(p["logits"]) if on == "softmax" else p["logits"].astype(np.float64))
        report.append({"run": str(run), "head": str(p["attrs"].get("head", "")), "stream": stream,
                       "weight": float(weight), **metrics(p["logits"], p["labels"], names)})
    return {"on": on, "runs": report, "fused": metrics(fused, first["labels"], names), "scores": fused,
            "ids": first["ids"], "labels": first["labels"]}
