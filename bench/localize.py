"""Weakly supervised localization on real extracted features, against chance (issue 7's last test).

Runs the user's commands on the untrimmed synthetic set (events at known times), each printed as it
runs, in a fresh process (`python -m datp`, what an installed `datp` runs):

    datp synth --untrimmed ...                      videos of 20-30 s with 1-3 events, ground_truth.json
    datp extract-features --stride S --streams rgb  random ResNet-18 at --input-size (a ragged store)
    datp train-head --head self-attn --attention sigmoid
    datp localize RUN FEATURES --split test --out detections.json --plot ... --ground-truth ...
    datp eval-detection detections.json ground_truth.json --evaluator anet|thumos14 --subset validation

and with --flow also `datp extract-flow` (TV-L1), flow features, a flow run and `localize --flow-run`
(fusion theta 0.5). Then it prints anet mAP at each tIoU (0.5:0.05:0.95) and the average, side by
side with chance computed from the same run's video scores:

- shuffled: each video's attention permuted over its segments (keeps the values, breaks the runs);
- rolled: each video's attention rotated by a random offset (keeps the runs and their lengths, moves
  them in time): a head that finds event-long stretches at random times;
- uniform: constant attention (one detection over the whole video per kept class).

Shuffled and rolled are the mean of --repeats draws. The whole pipeline runs once per seed of
--seeds (data, backbone and head seeded alike, in OUT/seed-K), then the table is averaged (with 3
classes and 12 test videos, one seed's mAP@0.5 ranged from 0.35 to 0.96). train-head trains on every
train video and keeps the last epoch (--val-fraction 0): with 0.2 of 24 train videos held out, the
5-video validation split once picked epoch 1, an untrained head (mAP 0). Stages whose output exists are reused (extract-* resume; a run folder with
metrics.json is not retrained), so a second call only re-scores.

Run: python bench/localize.py [--out /tmp/datp-localize] [--classes 4] [--train-per-class 12]
     [--test-per-class 6] [--size 64] [--fps 5] [--duration 8] [--event-fraction 0.25] [--stride 2]
     [--input-size 112] [--epochs 60] [--lr 1e-2] [--alpha 0] [--val-fraction 0] [--seeds 0,1,2]
     [--flow] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from datp.extract.store import FeatureStore  # noqa: E402
from datp.pool.detect.pipeline import eval_detection, localize_arrays, shown_frames  # noqa: E402
from datp.pool.detect.evaluators import ANET_THRESHOLDS, evaluate_detection
from datp.pool.detect.formats import read_activitynet_ground_truth# noqa: E402
from datp.pool.detect.localize import fuse_streams# noqa: E402
from datp.pool.predict import predict_run# noqa: E402


def datp(*args, log: list) -> str:
    """Run `datp ARGS` in a fresh process, echo the command and its output, record the seconds."""
    args = [str(a) for a in args]
    print("$ datp " + shlex.join(args), flush=True)
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "datp", *args], capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        sys.exit(f"datp {args[0]} failed (exit {done.returncode}):\n{done.stdout}{done.stderr}")
    lines = [line for line in done.stdout.splitlines() + done.stderr.splitlines() if line.strip()]
    print("\n".join(f"  {line}" for line in lines[-14:]))
    print(f"  ({seconds:.1f} s)", flush=True)
    log.append((args[0], seconds))
    return done.stdout


def scores(run: Path, store: Path, flow_run: Path | None) -> dict:
    """The test videos' attention (V, N), logits (V, C), mask, frames, ids, num_frames, fps, classes."""
    p = predict_run(run, features=store, split="test")
    q = predict_run(flow_run, features=store, split="test") if flow_run is not None else None
    with FeatureStore(store) as s:
        p["num_frames"], p["fps"] = s.num_frames[p["rows"]], s.fps[p["rows"]]
        p["frame"] = shown_frames(p["frame"], json.loads(s.attrs["new_length"]))  # as localize_run times them
    p["flow"] = (q["weights"], q["logits"]) if q is not None else None
    probs = softmax(p["logits"]) if q is None else fuse_streams(softmax(p["logits"]), softmax(q["logits"]))
    p["top1"] = float(np.mean(probs.argmax(1) == p["labels"]))  # of the video scores localize uses
    return p


def softmax(logits: np.ndarray) -> np.ndarray:
    return torch.from_numpy(np.asarray(logits, np.float64)).softmax(-1).numpy()


def anet_maps(p: dict, truth, weights: np.ndarray, flow_weights: np.ndarray | None) -> np.ndarray:
    """anet mAP at ANET_THRESHOLDS of `localize_arrays` (default settings) with these attention weights."""
    flow = None if p["flow"] is None else (flow_weights, p["flow"][1])
    found, _ = localize_arrays(weights, p["logits"], p["mask"], p["frame"], ids=p["ids"], num_frames=p["num_frames"],
                               fps=p["fps"], class_names=p["class_names"], flow=flow)
    result = evaluate_detection([d for ds in found.values() for d in ds], truth, evaluator="anet")
    return np.asarray(result.map)


def chance(p: dict, truth, *, how: str, repeats: int, seed: int = 0) -> np.ndarray:
    """Mean anet mAPs over `repeats` draws of each video's attention shuffled, rolled (or uniform, once).

    With a flow run both streams' weights get the same permutation or offset.
    """
    rng = np.random.default_rng(seed)
    streams = [p["weights"]] + ([p["flow"][0]] if p["flow"] is not None else [])
    if how == "uniform":
        ones = [np.where(p["mask"], 1.0, 0.0) for _ in streams]
        return anet_maps(p, truth, ones[0], ones[1] if len(ones) > 1 else None)
    maps = []
    for _ in range(repeats):
        moved = [w.copy() for w in streams]
        for i, real in enumerate(p["mask"]):
            n = int(real.sum())
            order = rng.permutation(n) if how == "shuffle" else np.roll(np.arange(n), rng.integers(1, max(n, 2)))
            for w in moved:
                w[i, real] = w[i, real][order]
        maps.append(anet_maps(p, truth, moved[0], moved[1] if len(moved) > 1 else None))
    return np.mean(maps, axis=0)


def pipeline(args: argparse.Namespace, seed: int, out: Path, log: list) -> list[tuple]:
    """Every command for one seed (data, backbone and head) in `out`; returns the table rows
    (setup name, top-1, thumos14 mAP@0.5, {"model", "shuffled", "rolled", "uniform": anet mAPs})."""
    out.mkdir(parents=True, exist_ok=True)
    synth, store, gt = out / "synth", out / "features.h5", out / "synth" / "ground_truth.json"
    datp("synth", "--out", synth, "--untrimmed", "--classes", args.classes, "--train-per-class", args.train_per_class,
         "--test-per-class", args.test_per_class, "--size", args.size, "--fps", args.fps, "--duration", args.duration,
         "--event-fraction", args.event_fraction, "--seed", seed, log=log)
    streams = "rgb"
    flow_source = []
    if args.flow:
        streams = "rgb,flow"
        datp("extract-flow", synth / "manifest.csv", "--out", out / "flow.h5", "--short-side", 0, "--workers", 2,
             "--quiet", log=log)
        flow_source = ["--flows", out / "flow.h5"]
    datp("extract-features", synth / "manifest.csv", "--out", store, "--backbone", "resnet18", "--weights", "random",
         "--streams", streams, *flow_source, "--stride", args.stride, "--resize", args.input_size,
         "--input-size", args.input_size, "--workers", 1, "--device", "cpu", "--seed", seed, "--quiet", log=log)
    runs = {}
    for stream in streams.split(","):
        runs[stream] = out / "runs" / f"self-attn-{stream}"
        if not (runs[stream] / "metrics.json").is_file():
            datp("train-head", store, "--head", "self-attn", "--attention", "sigmoid", "--stream", stream,
                 "--out", runs[stream], "--epochs", args.epochs, "--batch-size", 8, "--lr", args.lr,
                 "--attn-hidden", 64, "--alpha", args.alpha, "--val-fraction", args.val_fraction, "--seed", seed,
                 "--device", "cpu", "--quiet", log=log)
    setups = {stream: (run, None) for stream, run in runs.items()}
    if args.flow:
        setups["rgb+flow"] = (runs["rgb"], runs["flow"])
    truth = read_activitynet_ground_truth(gt, subset="validation")
    table = []
    for name, (run, flow_run) in setups.items():
        detections = out / f"detections-{name}.json"
        fusion = ["--flow-run", flow_run] if flow_run is not None else []
        datp("localize", run, store, "--out", detections, "--split", "test", *fusion, "--plot", out / f"plots-{name}",
             "--ground-truth", gt, "--plot-count", 4, log=log)
        for evaluator in ("anet", "thumos14"):
            datp("eval-detection", detections, gt, "--evaluator", evaluator, "--subset", "validation", log=log)
        p = scores(run, store, flow_run)
        thumos = eval_detection(detections, gt, evaluator="thumos14", subset="validation", tiou=[0.5])
        model = np.asarray(eval_detection(detections, gt, evaluator="anet", subset="validation").map)
        table.append((name, p["top1"], thumos.map[0], {"model": model,
                                                      "shuffled": chance(p, truth, how="shuffle", repeats=args.repeats),
                                                      "rolled": chance(p, truth, how="roll", repeats=args.repeats),
                                                      "uniform": chance(p, truth, how="uniform", repeats=1)}))
    print(f"\nseed {seed}: anet mAP on the {len(truth.videos)} test videos (validation subset), "
          f"{len(truth.instances)} events; chance: the same video scores with the attention moved")
    print_table(table)
    return table


def print_table(table: list[tuple]) -> None:
    print(f"{'':22}" + "".join(f"{t:>6.2f}" for t in ANET_THRESHOLDS) + "  average")
    for name, top1, thumos, rows in table:
        for what, maps in rows.items():
            print(f"{name + ' ' + what:22}" + "".join(f"{m:6.3f}" for m in maps) + f"  {maps.mean():.3f}")
        print(f"{name + ' top-1':22}{top1:6.3f}   thumos14 mAP@0.5 {thumos:.3f}\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("/tmp/datp-localize"))
    parser.add_argument("--classes", type=int, default=4)
    parser.add_argument("--train-per-class", type=int, default=12)
    parser.add_argument("--test-per-class", type=int, default=6)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--fps", type=int, default=5)
    parser.add_argument("--duration", type=float, default=8.0, help="sets the event length with --event-fraction")
    parser.add_argument("--event-fraction", type=float, default=0.25)
    parser.add_argument("--stride", type=int, default=2)
    parser.add_argument("--input-size", type=int, default=112)
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--alpha", type=float, default=0.0, help="self-attn smoothness weight")
    parser.add_argument("--val-fraction", type=float, default=0.0,
                        help="train-head's held-out share; 0 trains on every train video and keeps the last epoch")
    parser.add_argument("--seeds", default="0,1,2", help="one whole pipeline per seed (data, backbone, head)")
    parser.add_argument("--flow", action="store_true", help="also the flow stream (TV-L1) and the fusion")
    parser.add_argument("--repeats", type=int, default=5, help="draws of the shuffled and rolled baselines")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    started, log, tables = time.perf_counter(), [], []
    for seed in seeds:
        tables.append(pipeline(args, seed, args.out / f"seed-{seed}", log))
    total = time.perf_counter() - started
    if len(seeds) > 1:  # the same setups in the same order for every seed
        mean = [(name, np.mean([t[i][1] for t in tables]), np.mean([t[i][2] for t in tables]),
                 {what: np.mean([t[i][3][what] for t in tables], axis=0) for what in rows})
                for i, (name, _, _, rows) in enumerate(tables[0])]
        print(f"mean over seeds {args.seeds}")
        print_table(mean)
    stages: dict[str, float] = {}
    for stage, seconds in log:
        stages[stage] = stages.get(stage, 0.0) + seconds
    print("seconds: " + ", ".join(f"{stage} {s:.0f}" for stage, s in stages.items()) + f"; total {total:.0f}")


if __name__ == "__main__":
    main()
