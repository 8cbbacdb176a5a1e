"""`datp evaluate`: fusion of runs, the DATP testing schemes and the figures, as one report.

`evaluate(EvaluateConfig)` calls `datp.pool.metrics.fuse_runs`, `datp.pool.schemes.testing_schemes`
and `datp.pool.plots`; `format_report` prints the report in a few lines.
"""

from __future__ import annotations

import contextlib

from dataclasses import asdict, dataclass
from pathlib import Path

from datp.pool.metrics import FUSE_ON, fuse_runs
from datp.pool.runs import run_folder, write_json
from datp.pool.schemes import testing_schemes

# ---------------------------------------------------------------- predictions.h5 / weights.csv


# ---------------------------------------------------------------- fusion


# ---------------------------------------------------------------- DATP testing schemes


# ---------------------------------------------------------------- datp evaluate


@dataclass(frozen=True)
class EvaluateConfig:
    """Settings of `datp evaluate`; one field per CLI option.

    Attributes:
        runs: RUN_DIRs of `datp train-head`; two or more are fused.
        weights: fusion weight per run (same order); empty: by stream (rgb 1, flow 1.5).
        on: fuse "softmax" probabilities (default) or raw "logits".
        schemes: run the DATP testing schemes on the first run (P1, P2; P3 with `avg_run`).
        avg_run: an avg run for scheme P3.
        features: the store for the schemes (default: the first run's).
        seed: seed of P1's random Gaussians.
        out: folder for evaluation.json and the PNGs (None: nothing written).
        plot_videos: Figure 3 for this many test videos of the first run (0: none).
        videos: Figure 3 for these video ids instead.
        events: a JSON of ground-truth events to shade in Figure 3 (`datp synth`'s events.json).
        compare: a run to compare the first run with, per class (Figure 4: first run minus this).
        device: for the schemes.
    """

    runs: tuple[str, ...]
    weights: tuple[float, ...] = ()
    on: str = "softmax"
    schemes: bool = False
    avg_run: str | None = None
    features: str | None = None
    seed: int = 0
    out: str | None = None
    plot_videos: int = 0
    videos: tuple[str, ...] = ()
    events: str | None = None
    compare: str | None = None
    device: str = "cpu"

    def __post_init__(self):
        if not self.runs:
            raise ValueError("no RUN_DIR given; pass the folders written by datp train-head")
        if self.weights and len(self.weights) != len(self.runs):
            raise ValueError(f"--weights gives {len(self.weights)} weights for {len(self.runs)} runs; give one per run")
        if self.on not in FUSE_ON:
            raise ValueError(f"--on {self.on!r} is not one of {list(FUSE_ON)}")
        if self.avg_run and not self.schemes:
            raise ValueError("--avg-run is for the testing schemes; add --schemes")
        if (self.plot_videos or self.videos or self.compare) and not self.out:
            raise ValueError("plots need --out FOLDER to write the PNGs into")
        if self.plot_videos < 0:
            raise ValueError(f"--plot-videos {self.plot_videos} must be >= 0")


def parse_floats(text: str, *, what: str = "--weights") -> tuple[float, ...]:
    """"1,1.5" -> (1.0, 1.5); "" -> () (for `--weights`)."""
    try:
        return tuple(float(v) for v in text.replace(" ", "").split(",") if v)
    except ValueError:
        raise ValueError(f"{what} {text!r} must be comma-separated numbers, e.g. 1,1.5") from None


def evaluate(cfg: EvaluateConfig) -> dict:
    """Fuse the runs (or score the single run), run the testing schemes and draw the plots.

    Returns:
        {"config", "fusion" (`fuse_runs` without arrays), "schemes" (or None), "plots": [paths]};
        also written to OUT/evaluation.json when `out` is set.
    """
    # The output folder is checked (and staged) before any work: see `datp.pool.runs.run_folder`.
    staged = run_folder(cfg.out, kind="evaluate") if cfg.out else contextlib.nullcontext()
    with staged as folder:
        return _evaluate(cfg, folder)


def _evaluate(cfg: EvaluateConfig, folder: Path | None) -> dict:
    """`evaluate`'s work; PNGs and evaluation.json go into `folder` (the staged `cfg.out`), named as in `cfg.out`."""
    pairs = [(r, cfg.weights[i] if cfg.weights else None) for i, r in enumerate(cfg.runs)]
    fusion = fuse_runs(pairs, on=cfg.on)
    fusion = {k: v for k, v in fusion.items() if k not in ("scores", "ids", "labels")}
    if len(cfg.runs) == 1:
        fusion["fused"] = None
    schemes = None
    if cfg.schemes:
        schemes = testing_schemes(cfg.runs[0], avg_run=cfg.avg_run, features=cfg.features, seed=cfg.seed,
                                  device=cfg.device)
    plots = []
    if folder is not None:
        from datp.pool import plots as plotting

        if cfg.plot_videos or cfg.videos:
            events = plotting.read_events(cfg.events) if cfg.events else None
            ids = list(cfg.videos) or None
            plots += plotting.plot_segment_weights(cfg.runs[0], folder, ids=ids, count=cfg.plot_videos or 4,
                                                   events=events)
        if cfg.compare:
            plots.append(plotting.plot_accuracy_changes(cfg.compare, cfg.runs[0], folder / "class_changes.png"))
    plots = [str(Path(cfg.out) / Path(p).name) for p in plots]  # where they are once the folder is in place
    report = {"config": asdict(cfg), "fusion": fusion, "schemes": schemes, "plots": plots}
    if folder is not None:
        write_json(folder / "evaluation.json", report)
    return report


def format_report(report: dict) -> str:
    """A few lines for the terminal: each run, the fusion, the schemes."""
    def fmt(m):
        if m is None or m["top1"] is None:
            return "no labelled test videos"
        return f"top-1 {m['top1']:.4f}  top-5 {m['top5']:.4f}  mean class {m['mean_class_accuracy']:.4f}"

    lines = [f"{r['run']} ({r['head']}, {r['stream']}, weight {r['weight']:g}): {fmt(r)}" for r in report["fusion"]["runs"]]
    if report["fusion"]["fused"] is not None:
        lines.append(f"fused on {report['fusion']['on']}: {fmt(report['fusion']['fused'])}")
    if report["schemes"]:
        for name, m in report["schemes"]["schemes"].items():
            lines.append(f"scheme {name}: {fmt(m)}")
        if report["schemes"]["p2_gt_p3"] is not None:
            lines.append(f"P2 > P3 (DATP training improves the segment classifier): {report['schemes']['p2_gt_p3']}")
        lines += [f"note: {n}" for n in report["schemes"]["notes"]]
    lines += [f"wrote {p}" for p in report["plots"]]
    return "\n".join(lines)
