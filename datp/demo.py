"""`datp demo`: the whole pipeline on the synthetic key-moment benchmark, on a laptop CPU.

synth -> extract-flow -> extract-features (rgb and flow) -> train-head for each head and stream (one
study: `datp.pool.train.train_heads` reads each batch once for all of them) -> two-stream fusion -> a table (head x stream: top-1), `results.json`, and plots (learned weights
over segments for test videos with the true event shaded; per-class accuracy changes datp vs avg).

Each stage writes into the output folder and is reused on rerun (the long ones resume themselves;
a head whose run folder holds metrics.json is not retrained).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

# (run name, head, options): the demo's heads; `datp` variants differ in their weight generator.
DEMO_HEADS = (
    ("avg", "avg", {}),
    ("max", "max", {}),
    ("datp-mog1", "datp", {"gaussians": 1}),
    ("datp-mog2", "datp", {"gaussians": 2}),
    ("datp-discrete", "datp", {"generator": "discrete"}),
    ("lstm-attn", "lstm-attn", {"hidden": 128}),  # 512 cells: ~16x the FLOPs; keeps the 10-min budget
    ("self-attn", "self-attn", {}),
)


@dataclass(frozen=True)
class DemoConfig:
    """Settings of the demo (the defaults fit about 10 minutes on 2 CPU cores).

    Attributes:
        out: output folder.
        num_classes, train_per_class, test_per_class, size, duration_s, fps: the synthetic data.
        backbone: torchvision ResNet with random (seeded) weights: the demo downloads nothing.
        input_size: frames are resized to this and fed whole (112 gives 4x4 conv maps, 4x cheaper
            than 224's 7x7; the synthetic frames are 64 px, so 224 adds no detail).
        segments: N segments per video.
        epochs, batch_size, lr: head training (train-head standardises the features; the few hundred
            videos need a few hundred Adam steps at 3e-3).
        heads: run names of DEMO_HEADS to train ("all" for every one).
        workers: processes for flow and decoding.
        head_threads: torch threads while training the heads. 1 by default: the heads' small matrix
            products gain 2x from a second idle core, but with 2 threads a datp run took 6.5x longer
            (50 s instead of 7.7 s) when another process held one of the two cores.
        seed: seed of everything.
    """

    out: str = "datp-demo"
    num_classes: int = 5
    train_per_class: int = 40
    test_per_class: int = 20
    size: int = 64
    duration_s: float = 3.0
    fps: int = 10
    backbone: str = "resnet18"
    input_size: int = 112
    segments: int = 10
    epochs: int = 100
    batch_size: int = 16
    lr: float = 3e-3
    heads: tuple[str, ...] = tuple(name for name, _, _ in DEMO_HEADS)
    workers: int = 2
    head_threads: int = 1
    seed: int = 0


def _stage(name: str, log) -> float:
    log(f"== {name}")
    return time.perf_counter()


def run_demo(cfg: DemoConfig, *, progress: bool = True, log=print) -> dict:
    """Run every stage (reusing finished ones) and return the results written to results.json."""
    import torch

    from datp.extract.features import FeatureConfig, extract_features
    from datp.flows.extract import FlowConfig, extract_flow
    from datp.io.datasets import load_dataset
    from datp.pool.metrics import fuse_runs
    from datp.pool.config import HeadConfig
    from datp.pool.train import train_heads
    from datp.synth import SynthConfig, generate

    unknown = set(cfg.heads) - {name for name, _, _ in DEMO_HEADS}
    if unknown:
        raise ValueError(f"unknown demo heads {sorted(unknown)}; choose from "
                         f"{[name for name, _, _ in DEMO_HEADS]}")
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; give a folder for the demo's data, runs and plots")
    out.mkdir(parents=True, exist_ok=True)
    timings = {}
    started = time.perf_counter()

    t = _stage("synth: key-moment videos", log)
    synth = SynthConfig(seed=cfg.seed, num_classes=cfg.num_classes,
                        videos_per_class_train=cfg.train_per_class,
                        videos_per_class_test=cfg.test_per_class, size=cfg.size,
                        duration_s=cfg.duration_s, fps=cfg.fps)
    generate(synth, out / "synth", progress=progress)
    dataset = load_dataset(out / "synth" / "manifest.csv")
    timings["synth"] = time.perf_counter() - t

    t = _stage("extract-flow: TV-L1", log)
    flow_cfg = FlowConfig(out=str(out / "flow.h5"), short_side=0, workers=cfg.workers)
    summary = extract_flow(dataset, flow_cfg, progress=progress)
    _check(summary, "extract-flow")
    timings["extract_flow"] = time.perf_counter() - t

    t = _stage("extract-features: rgb and flow", log)
    feat_cfg = FeatureConfig(out=str(out / "features.h5"), backbone=cfg.backbone,
                             flows=str(out / "flow.h5"), num_segments=cfg.segments,
                             resize=cfg.input_size, input_size=cfg.input_size, workers=min(cfg.workers, 1),
                             seed=cfg.seed)
    summary = extract_features(dataset, feat_cfg, progress=progress)
    _check(summary, "extract-features")
    timings["extract_features"] = time.perf_counter() - t

    t = _stage("train-head: every head on each stream, one study", log)
    options = {name: (head, opts) for name, head, opts in DEMO_HEADS}
    runs, todo = {}, []
    for name in cfg.heads:
        head, opts = options[name]
        for stream in ("rgb", "flow"):
            runs[name, stream] = run = out / "runs" / f"{name}-{stream}"
            if not (run / "metrics.json").is_file():  # finished runs are reused
                todo.append(HeadConfig(features=str(out / "features.h5"), out=str(run), head=head, stream=stream,
                                       epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr, seed=cfg.seed,
                                       **opts))
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.head_threads)
    try:
        if todo:  # every head and stream from one read of each batch (`train_heads`)
            train_heads(todo, progress=progress)
    finally:
        torch.set_num_threads(threads)
    timings["train_heads"] = time.perf_counter() - t

    t = _stage("fusion, table and plots", log)
    table = {}
    for name in cfg.heads:
        rgb = json.loads((runs[name, "rgb"] / "metrics.json").read_text())["top1"]
        flow = json.loads((runs[name, "flow"] / "metrics.json").read_text())["top1"]
        fused = fuse_runs([runs[name, "rgb"], runs[name, "flow"]])["fused"]["top1"]
        table[name] = {"rgb": rgb, "flow": flow, "fused": fused}
    mass = event_weight_mass(out / "synth" / "events.json", runs, cfg.heads)
    plots = _plots(out, runs, cfg.heads)
    timings["evaluate"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - started
    results = {"table": table, "event_weight_mass": mass, "plots": plots,
               "seconds": {k: round(v, 1) for k, v in timings.items()},
               "config": asdict(cfg), "synth": asdict(synth)}
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str))
    log(format_table(table, mass))
    log(f"results: {out / 'results.json'}; plots: {out / 'plots'}")
    return results


def _check(summary, what: str) -> None:
    if summary.failed or summary.interrupted:
        raise RuntimeError(f"{what}: {len(summary.failed)} synthetic videos failed "
                           f"({summary.failed[:1]}); this is a bug, please report it")


def event_weight_mass(events_path: Path, runs: dict, heads) -> dict:
    """Mean share of each head's weight on segments that overlap the event, per stream.

    Weights are normalised to sum 1 over a video's segments; uniform weights would give
    (segments overlapping the event) / N on average, reported as `uniform`.
    """
    from datp.pool.runs import read_predictions

    events = json.loads(Path(events_path).read_text())
    result = {}
    for (name, stream), run in runs.items():
        pred = read_predictions(run)
        shares, uniform = [], []
        for i, vid in enumerate(pred["ids"]):
            ev = events[vid]["events"][0]
            T = events[vid]["num_frames"]
            mask = pred["mask"][i].astype(bool)
            starts = pred["frame"][i][mask]
            length = 5 if "flow" in pred["attrs"].get("stream", "rgb") else 1
            on = (starts < ev["end_frame"]) & (starts + max(length, T / len(starts)) > ev["start_frame"])
            w = np.clip(pred["weights"][i][mask], 0, None)
            if w.sum() <= 0:
                continue
            shares.append(float((w / w.sum())[on].sum()))
            uniform.append(float(on.mean()))
        result[f"{name}-{stream}"] = {"event_mass": float(np.mean(shares)) if shares else None,
                                      "uniform": float(np.mean(uniform)) if uniform else None}
    return result


def _plots(out: Path, runs: dict, heads) -> list[str]:
    from datp.pool.plots import plot_accuracy_changes, plot_segment_weights, read_events

    events = read_events(out / "synth" / "events.json")
    plots = out / "plots"
    written = []
    for name in heads:
        if name.startswith("datp") or name.endswith("attn"):
            written += [str(p) for p in plot_segment_weights(
                runs[name, "flow"], plots / f"{name}-flow", count=4, events=events, grid=True)]
    datp = next((n for n in ("datp-mog2", "datp-mog1") if n in heads), None)
    if "avg" in heads and datp is not None:
        written.append(str(plot_accuracy_changes(runs["avg", "flow"], runs[datp, "flow"],
                                                 plots / "class-changes-avg-to-datp-flow.png",
                                                 labels=("avg (flow)", f"{datp} (flow)"))))
    return written


def format_table(table: dict, mass: dict) -> str:
    lines = ["| head | rgb top-1 | flow top-1 | fused top-1 | flow weight on event (uniform) |",
             "|---|---|---|---|---|"]
    for name, row in table.items():
        m = mass.get(f"{name}-flow", {})
        share = (f"{m['event_mass']:.2f} ({m['uniform']:.2f})"
                 if m.get("event_mass") is not None else "-")
        lines.append(f"| {name} | {row['rgb']:.3f} | {row['flow']:.3f} | {row['fused']:.3f} | {share} |")
    return "\n".join(lines)


def reduced(cfg: DemoConfig) -> DemoConfig:
    """A smaller demo for CI: fewer videos, the baseline and one DATP head only."""
    return replace(cfg, train_per_class=20, test_per_class=8, heads=("avg", "datp-mog1"))
