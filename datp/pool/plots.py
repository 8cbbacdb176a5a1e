"""PNG figures of stage-two runs (matplotlib, Agg backend; nothing is shown on screen).

- Figure 3 of the DATP paper: for chosen test videos, each segment's score for the true class
  (bars, softmax probability of the segment's class scores) and the learned segment weights (line)
  over the segment times, with ground-truth event intervals shaded when given
  (`segment_plot_data`, `plot_segment_weights`).
- Figure 4: the k classes whose accuracy rose most and the k whose accuracy fell most from one run
  to another, as horizontal bars (`accuracy_changes`, `plot_accuracy_changes`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from datp.io.atomic import atomic_path
from datp.io.datasets import safe_name
from datp.pool.runs import read_predictions


def new_figure(*, figsize: tuple[float, float], nrows: int = 1, ncols: int = 1, squeeze: bool = True):
    """A figure on matplotlib's Agg canvas and its axes (`Figure.subplots`).

    The one figure style of datp's PNGs (stage two and localization): the object-oriented API, so no
    pyplot global state, no backend switch and no display are needed, and figures need no closing.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, dpi=100)
    FigureCanvasAgg(fig)
    return fig, fig.subplots(nrows, ncols, squeeze=squeeze)


def save_figure(fig, path: str | Path) -> Path:
    """Lay `fig` out and write it as a PNG to `path` (atomically); returns the path.

    No `bbox_inches="tight"`: a PNG is exactly figsize x 100 dpi, so figures of one kind line up.
    """
    path = Path(path)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    return path


def read_events(path: str | Path) -> dict[str, list[tuple[float, float]]]:
    """Ground-truth events in seconds by video id, from `datp synth`'s events.json
    ({id: {"events": [{"start_s", "end_s"}, ...]}}) or a plain {id: [[start_s, end_s], ...]}."""
    raw = json.loads(Path(path).read_text())
    events = {}
    for video, value in raw.items():
        items = value["events"] if isinstance(value, dict) else value
        events[video] = [(float(e["start_s"]), float(e["end_s"])) if isinstance(e, dict) else (float(e[0]), float(e[1]))
                         for e in items]
    return events


def segment_plot_data(pred: Mapping, ids: Sequence[str]) -> list[dict]:
    """What Figure 3 draws for each video of `ids`, from `read_predictions`' dict.

    Returns:
        Per video: {"id", "label", "class_name", "t" (n,) segment centres in [0, 1], "seconds" (n,)
        (t * num_frames / fps; None when the store did not record fps), "true_score" (n,) softmax of
        the segment's class scores at the true class (None for heads without per-segment scores,
        e.g. lstm-attn), "weights" (n,)}; n = the video's real segments.
    """
    index = {v: i for i, v in enumerate(pred["ids"])}
    rows = []
    for video in ids:
        if video not in index:
            raise ValueError(f"video {video!r} is not among the run's {len(index)} test videos")
        i = index[video]
        real = np.asarray(pred["mask"][i], bool)
        label = int(pred["labels"][i])
        t = np.asarray(pred["t"][i], np.float64)[real]
        frames, fps = float(pred["num_frames"][i]), float(pred["fps"][i])
        true_score = None
        if "segment_scores" in pred and label >= 0:
            s = np.asarray(pred["segment_scores"][i], np.float64)[real]  # (n, C)
            s = np.exp(s - s.max(axis=1, keepdims=True))
            true_score = s[:, label] / s.sum(axis=1)
        rows.append({"id": video, "label": label,
                     "class_name": pred["class_names"][label] if label >= 0 else "unknown", "t": t,
                     "seconds": t * frames / fps if fps > 0 and frames > 0 else None,
                     "true_score": true_score, "weights": np.asarray(pred["weights"][i], np.float64)[real]})
    return rows


def _draw_video(ax, row: dict, events: Sequence[tuple[float, float]] | None) -> None:
    x = row["seconds"] if row["seconds"] is not None else row["t"]
    width = 0.8 * (np.min(np.diff(x)) if len(x) > 1 else 1.0)
    if row["true_score"] is not None:
        ax.bar(x, row["true_score"], width=width, color="tab:blue", alpha=0.6, label="true-class score")
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("true-class score")
    ax.set_xlabel("time (s)" if row["seconds"] is not None else "segment time (0-1)")
    for k, (start, end) in enumerate(events or ()):
        if row["seconds"] is None:  # events are in seconds; without fps they cannot be placed
            break
        ax.axvspan(start, end, color="tab:green", alpha=0.2, label="ground truth" if k == 0 else None)
    twin = ax.twinx()
    twin.plot(x, row["weights"], color="tab:red", marker="o", label="weight")
    twin.set_ylim(0, max(1e-9, float(row["weights"].max(initial=0))) * 1.1)
    twin.set_ylabel("segment weight")
    ax.set_title(f"{row['id']} ({row['class_name']})", fontsize=9)
    handles = ax.get_legend_handles_labels()[0] + twin.get_legend_handles_labels()[0]
    ax.legend(handles=handles, fontsize=7, loc="upper left")


def plot_segment_weights(run_dir: str | Path, out: str | Path, *, ids: Sequence[str] | None = None, count: int = 4,
                         events: Mapping[str, Sequence[tuple[float, float]]] | None = None,
                         grid: bool = False) -> list[Path]:
    """Figure 3: per-segment true-class score and learned weights of test videos of a run.

    Args:
        run_dir: a `train_head` run folder (reads its predictions.h5).
        out: folder for the PNGs: `segments_<id>.png` per video, or one `segments.png` with `grid`.
        ids: the videos; None: the first `count` test videos.
        events: ground-truth event intervals in seconds by video id (shaded).
        grid: one figure with a panel per video instead of one file per video.

    Returns:
        The PNG paths written.
    """
    pred = read_predictions(run_dir)
    ids = list(ids) if ids else pred["ids"][:count]
    rows = segment_plot_data(pred, ids)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    events = events or {}
    if grid:
        cols = min(2, len(rows))
        lines = -(-len(rows) // cols)
        fig, axes = new_figure(nrows=lines, ncols=cols, figsize=(6 * cols, 3 * lines), squeeze=False)
        for ax, row in zip(axes.flat, rows):
            _draw_video(ax, row, events.get(row["id"]))
        for ax in list(axes.flat)[len(rows):]:
            ax.axis("off")
        return [save_figure(fig, out / "segments.png")]
    paths = []
    for row in rows:
        fig, ax = new_figure(figsize=(6, 3))
        _draw_video(ax, row, events.get(row["id"]))
        paths.append(save_figure(fig, out / f"segments_{safe_name(row['id'])}.png"))
    return paths


def accuracy_changes(before: Mapping[str, float | None], after: Mapping[str, float | None], *,
                     k: int = 5) -> tuple[list[tuple[str, float]], list[tuple[str, float]]]:
    """The k largest and the k smallest per-class accuracy changes `after - before`.

    Only classes with an accuracy in both are compared. Ties are ordered by class name. With fewer
    than 2k classes, the bottom list leaves out the classes already in the top list.

    Returns:
        (top: [(class, change)] from the largest change down, bottom: [(class, change)] from the
        smallest change up).
    """
    deltas = [(name, float(after[name]) - float(before[name])) for name in before
              if name in after and before[name] is not None and after[name] is not None]
    order = sorted(deltas, key=lambda item: (-item[1], item[0]))
    top = order[:k]
    rest = order[len(top):]
    bottom = sorted(rest, key=lambda item: (item[1], item[0]))[:k]
    return top, bottom


def _per_class(run_or_metrics) -> dict:
    if isinstance(run_or_metrics, Mapping):
        return dict(run_or_metrics.get("per_class_accuracy", run_or_metrics))
    path = Path(run_or_metrics) / "metrics.json"
    if not path.is_file():
        raise ValueError(f"{run_or_metrics} has no metrics.json; pass a RUN_DIR written by datp train-head")
    per_class = json.loads(path.read_text()).get("per_class_accuracy")
    if per_class is None:
        raise ValueError(f"{path} has no per-class accuracy (the store had no test split)")
    return per_class


def plot_accuracy_changes(before, after, out: str | Path, *, k: int = 5,
                          labels: tuple[str, str] | None = None) -> Path:
    """Figure 4: horizontal bars of the top-k and bottom-k per-class accuracy changes.

    Args:
        before, after: run folders (their metrics.json) or {class: accuracy} dicts.
        out: the PNG file.
        k: classes per side.
        labels: names of the two runs for the title (default: the folder names).

    Returns:
        `out`.
    """
    top, bottom = accuracy_changes(_per_class(before), _per_class(after), k=k)
    if labels is None:
        labels = tuple(name if isinstance(run, Mapping) else Path(run).name
                       for run, name in ((before, "before"), (after, "after")))
    items = top + bottom[::-1]  # largest gain at the top, largest loss at the bottom
    fig, ax = new_figure(figsize=(6, 0.35 * max(len(items), 2) + 1))
    y = np.arange(len(items))[::-1]
    changes = [100 * c for _, c in items]
    ax.barh(y, changes, color=["tab:green" if c >= 0 else "tab:red" for c in changes])
    ax.set_yticks(y, [name for name, _ in items], fontsize=8)
    ax.axvline(0, color="black", linewidth=0.8)
    ax.set_xlabel("per-class accuracy change (points)")
    ax.set_title(f"{labels[1]} minus {labels[0]}: top-{k} and bottom-{k} classes", fontsize=9)
    return save_figure(fig, out)
