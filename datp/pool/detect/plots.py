"""Localization figures: attention over time against the ground truth, with detections (one PNG a video)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from datp.io.datasets import safe_name
from datp.pool.detect.formats import (
    Detection,
    GroundTruth,
    GroundTruthSet,
    checked_array,
)
from datp.pool.plots import new_figure, save_figure

# Curve colours of the weight plots: matplotlib's cycle without green (the ground truth shading) and
# red (the detections), so that neither can be mistaken for a curve.
CURVE_COLORS = ("tab:blue", "tab:orange", "tab:purple", "tab:brown", "tab:pink", "tab:gray", "tab:olive", "tab:cyan")

PLOT_COUNT = 8  # videos `localize_run` plots by default


def plot_weights_vs_ground_truth(
    weights,
    segment_times,
    ground_truth: Sequence[GroundTruth],
    path: str | Path,
    *,
    detections: Sequence[Detection] = (),
    title: str | None = None,
) -> Path:
    """Save a PNG of attention weights over time with the ground truth segments shaded.

    Args:
        weights: (N,) weights, or a mapping name -> (N,) to draw several curves (e.g. "rgb", "flow").
        segment_times: (N, 2) [start, end] seconds; each weight is drawn flat over its segment.
        ground_truth: the video's ground truth instances (shaded in green, labelled).
        path: the PNG file.
        detections: optional detections, drawn as red bars under the curves, one row per class,
            each labelled with its class and score.
        title: the plot title.

    Returns:
        The path written.
    """
    times = checked_array(segment_times, "segment_times", 2)
    curves = weights if isinstance(weights, Mapping) else {"weight": weights}
    fig, ax = new_figure(figsize=(10, 3))
    for g in ground_truth:
        ax.axvspan(g.start, g.end, color="tab:green", alpha=0.25, linewidth=0)
        ax.text((g.start + g.end) / 2, 1.0, g.label, transform=ax.get_xaxis_transform(), ha="center", va="bottom", fontsize=8)
    top = 0.0
    for k, (name, values) in enumerate(curves.items()):
        a = checked_array(values, f"weights {name!r}", 1)
        if len(a) != len(times):
            raise ValueError(f"weights {name!r} has {len(a)} values for {len(times)} segments")
        x = np.stack([times[:, 0], times[:, 1]], axis=1).ravel()  # each weight flat over its segment
        ax.plot(x, np.repeat(a, 2), label=name, color=CURVE_COLORS[k % len(CURVE_COLORS)])
        top = max(top, float(a.max(initial=0.0)))
    labels = sorted({d.label for d in detections})
    for d in detections:  # row r of class labels[r] sits at -(r + 1) * 8% of the highest weight
        y = -(labels.index(d.label) + 1) * 0.08 * (top or 1.0)
        ax.plot([d.start, d.end], [y, y], color="tab:red", linewidth=4, solid_capstyle="butt")
        ax.text(d.start, y, f" {d.label} {d.score:.2f}", fontsize=7, va="bottom", ha="left")
    if len(times):
        ax.set_xlim(times[:, 0].min(), times[:, 1].max())
    ax.set_xlabel("time (s)")
    ax.set_ylabel("attention weight")
    if len(curves) > 1:
        ax.legend(loc="upper right", fontsize=8)
    if title:
        ax.set_title(title, fontsize=9)
    return save_figure(fig, path)


def plot_videos(
    attention: Mapping[str, tuple[np.ndarray, np.ndarray]],
    detections: Mapping[str, Sequence[Detection]],
    folder: str | Path,
    *,
    ground_truth: GroundTruthSet | None = None,
    count: int = PLOT_COUNT,
    curves: Mapping[str, Mapping[str, np.ndarray]] | None = None,
    title: str = "",
) -> list[Path]:
    """One PNG per video, `<folder>/<safe_name(video)>.png`: attention over time, ground truth shaded,
    detections as bars (`plot_weights_vs_ground_truth`).

    Args:
        attention: video id -> (weights (n,), segment seconds (n, 2)), as `localize_arrays` returns.
        detections: video id -> its detections.
        folder: where the PNGs go (created).
        ground_truth: instances to shade; the videos that have some are plotted first.
        count: plot at most this many videos (>= 1), in `attention`'s order after that rule.
        curves: video id -> {name: (n,) weights} drawn instead of the single attention curve (e.g.
            "rgb", "flow" and "fused").
        title: text after the video id in each title.

    Returns:
        The PNGs written, in plotting order.
    """
    if count < 1:
        raise ValueError(f"--plot-count {count} must be >= 1")
    truth: dict[str, list] = {}
    for g in (ground_truth.instances if ground_truth is not None else ()):
        truth.setdefault(g.video, []).append(g)
    videos = sorted(attention, key=lambda v: v not in truth)[:count]  # stable: store order within each group
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for video in videos:
        a, times = attention[video]
        found = list(detections.get(video, ()))
        heading = f"{video}{': ' + title if title else ''}; {len(found)} detections"
        written.append(plot_weights_vs_ground_truth((curves or {}).get(video, a), times, truth.get(video, []),
                                                    folder / f"{safe_name(video)}.png", detections=found,
                                                    title=heading))
    return written
