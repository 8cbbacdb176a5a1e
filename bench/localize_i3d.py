"""Weakly supervised localization in the field's shape: I3D-style .npy features in, THUMOS14 mAP out.

A synthetic untrimmed set is written as W-TALC / BaS-Net write THUMOS14: one (T, 2D) float32 array per
video, RGB | flow concatenated, one row per 16 frames at 25 fps, with several events per video, several
classes in some videos, and background-only test videos that the ground truth does not list (as in
THUMOS14's test set). Then the user's commands run, each printed, in a fresh `python -m datp` process:

    datp import-features FEATURES --list videos.csv --out features.h5 --layout joint --split-at D
    datp train-head features.h5 --head self-attn --attention sigmoid --loss bce --stream rgb|flow ...
    datp train-head features.h5 --head datp --loss bce --stream rgb|flow ...
    datp localize runs/H-rgb features.h5 [--flow-run runs/H-flow] --split test --out detections-H.json
    datp eval-detection detections-H.json gt.json --evaluator thumos14 --subset test

and the table gives thumos14 mAP at tIoU 0.1:0.1:0.7 per head, of the rgb run alone and of the rgb and
flow runs fused (theta 0.5),
beside two baselines from the same run's video scores: the attention of each test video shuffled over
its rows (mean of --repeats draws) and uniform attention; and mAP@0.5 with the background videos'
detections left out (`--annotated-only`), which the official rule counts as false positives.

Data (per seed): --classes prototypes per stream (random unit vectors x --strength, flow at 0.7 of it)
added to rows of unit-variance noise (a moving average of N(0, 1) over 4 rows, plus a per-video offset
of N(0, 0.25)) in proportion to each row's overlap with an event; 1-2 classes per video (a
second class in --multi of them), 1-2 events per class of 4-12 rows (2.6-7.7 s) at any frame; in the
other rows a faint other-class prototype (0.4 x strength) in 15% of rows. Train: --train-per-class
videos per first class ("validation" subset, as THUMOS14 weak supervision trains on its validation
videos); test: --test-per-class per class plus --background background-only videos.

Seed 0 chose the settings, which are therefore not reported: the learning rate (0.01 over 0.001, by
the test class mAP of self-attn and datp on rgb, and by self-attn's mAP), --strength 5 over 3 and noise
correlated over 4 rows (with i.i.d. noise at strength 3, self-attn's attention spiked on single noise
rows: thumos14 mAP@0.5 0.00 with class mAP 0.91 on seed 1, a look that informed this data design).
The default seeds are 1, 2, 3; docs/detection.md has the table.

Run: python bench/localize_i3d.py [--out /tmp/datp-i3d] [--seeds 1,2,3] [--epochs 40] [--lr 0.01] [--dim 64]
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.localize import datp
from datp.extract.store import FeatureStore
from datp.pool.detect.evaluators import THUMOS14_THRESHOLDS, evaluate_detection
from datp.pool.detect.formats import read_activitynet_ground_truth
from datp.pool.detect.pipeline import eval_detection, localize_arrays, shown_frames
from datp.pool.predict import predict_run

FPS, FPR = 25.0, 16  # I3D on THUMOS14: 25 fps, one feature row per 16 frames
SMOOTH = 4  # rows of the moving average that correlates the noise in time
HEADS = ("self-attn", "datp")


def make_video(rng, protos, classes: list[int], T: int, strength: float, C: int):
    """(T, 2D) rgb | flow features and the events [(class, start s, end s)]."""
    D = protos.shape[-1]
    # I3D rows of a video are correlated in time (overlapping content, one scene): a per-video offset plus
    # noise smoothed over --smooth rows (moving average, rescaled to unit variance).
    w = SMOOTH
    noise = rng.normal(size=(T + w - 1, 2, D))
    noise = np.stack([noise[k:k + w].sum(0) for k in range(T)]) / np.sqrt(w)
    x = noise + 0.5 * rng.normal(size=(1, 2, D))
    busy = np.zeros(T * FPR, bool)
    events = []
    for c in classes:
        for _ in range(int(rng.integers(1, 3))):
            for _attempt in range(20):
                length = int(rng.integers(4 * FPR, 12 * FPR))
                start = int(rng.integers(0, T * FPR - length))
                if not busy[max(0, start - FPR):start + length + FPR].any():
                    break
            else:
                continue
            busy[start:start + length] = True
            events.append((c, start / FPS, (start + length) / FPS))
            cover = np.array([np.clip(min(start + length, (k + 1) * FPR) - max(start, k * FPR), 0, FPR) / FPR
                              for k in range(T)])
            x += cover[:, None, None] * strength * protos[c][None] * np.array([1.0, 0.7])[None, :, None]
    quiet = ~busy.reshape(T, FPR).any(1)
    for k in np.flatnonzero(quiet & (rng.random(T) < 0.15)):  # confusers: a faint other class
        other = int(rng.integers(C))
        if other not in classes:
            x[k] += 0.4 * strength * protos[other]
    return x.reshape(T, 2 * D).astype(np.float32), events


def write_set(out: Path, args, seed: int) -> tuple[Path, Path, Path]:
    """features/<id>.npy, videos.csv (the import list) and gt.json (annotated videos only)."""
    rng = np.random.default_rng([seed, 15])
    C, D = args.classes, args.dim
    protos = rng.normal(size=(C, 2, D))
    protos /= np.linalg.norm(protos, axis=-1, keepdims=True)
    folder = out / "features"
    folder.mkdir(parents=True, exist_ok=True)
    names = [f"class{c}" for c in range(C)]
    rows, database = [], {}
    plan = [("validation", "train", c, args.train_per_class) for c in range(C)]
    plan += [("test", "test", c, args.test_per_class) for c in range(C)] + [("test", "test", None, args.background)]
    for subset, split, first, count in plan:
        for _ in range(count):
            vid = f"video_{subset}_{len(rows):05d}"
            classes = [] if first is None else [first]
            if first is not None and rng.random() < args.multi:
                classes.append(int(rng.choice([c for c in range(C) if c != first])))
            T = int(rng.integers(60, 121))
            x, events = make_video(rng, protos, classes, T, args.strength, C)
            np.save(folder / f"{vid}.npy", x)
            found = sorted({names[c] for c, _, _ in events})
            rows.append((vid, ";".join(found), split, FPS, FPR, 0, T * FPR))
            if found:  # background-only videos are not in the ground truth (THUMOS14's test set)
                database[vid] = {"subset": subset, "duration": T * FPR / FPS,
                                 "annotations": [{"label": names[c], "segment": [s, e]} for c, s, e in events]}
    with open(out / "videos.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["id", "labels", "split", "fps", "frames_per_row", "offset", "num_frames"])
        w.writerows(rows)
    (out / "gt.json").write_text(json.dumps({"version": "synthetic i3d-style", "database": database}))
    return folder, out / "videos.csv", out / "gt.json"


def scored(run: Path, store: Path, flow_run: Path | None) -> dict:
    """Test rows' attention and sigmoid class probabilities of the rgb (and flow) run, timed as localize does."""
    p = predict_run(run, features=store, split="test")
    with FeatureStore(store) as s:
        p["num_frames"], p["fps"] = s.num_frames[p["rows"]], s.fps[p["rows"]]
        p["frame"] = shown_frames(p["frame"], json.loads(s.attrs["new_length"]))
    sig = lambda x: torch.from_numpy(np.asarray(x, np.float64)).sigmoid().numpy()
    p["probs"], p["flow"] = sig(p["logits"]), None
    if flow_run is not None:
        q = predict_run(flow_run, features=store, split="test")
        p["flow"] = (q["weights"], sig(q["logits"]))
    return p


def thumos_maps(p: dict, truth, weights, flow_weights) -> np.ndarray:
    flow = None if p["flow"] is None else (flow_weights, p["flow"][1])
    found, _ = localize_arrays(weights, p["probs"], p["mask"], p["frame"], ids=p["ids"], num_frames=p["num_frames"],
                               fps=p["fps"], class_names=p["class_names"], flow=flow, scores_are_probs=True)
    return np.asarray(evaluate_detection([d for ds in found.values() for d in ds], truth, evaluator="thumos14").map)


def baselines(p: dict, truth, repeats: int, seed: int) -> dict:
    rng = np.random.default_rng([seed, 7])
    maps = []
    for _ in range(repeats):
        a = p["weights"].copy()
        b = None if p["flow"] is None else p["flow"][0].copy()
        for i, real in enumerate(p["mask"]):
            order = rng.permutation(int(real.sum()))
            a[i, real] = a[i, real][order]
            if b is not None:
                b[i, real] = b[i, real][order]
        maps.append(thumos_maps(p, truth, a, b))
    ones = np.where(p["mask"], 1.0, 0.0)
    return {"shuffled": np.mean(maps, axis=0), "uniform": thumos_maps(p, truth, ones, ones)}


def pipeline(args, seed: int, out: Path, log: list) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    folder, listing, gt = write_set(out, args, seed)
    store, runs = out / "features.h5", out / "runs"
    if not store.is_file():
        datp("import-features", folder, "--list", listing, "--out", store, "--layout", "joint", "--split-at", args.dim,
             "--quiet", log=log)
    for head in HEADS:  # one run each: on this box 4x faster than one study of the four (8 s vs 2 s an epoch)
        own = ["--attention", "sigmoid", "--attn-hidden", 64] if head == "self-attn" else []
        for stream in ("rgb", "flow"):
            if not (runs / f"{head}-{stream}" / "metrics.json").is_file():
                datp("train-head", store, "--head", head, "--stream", stream, *own, "--loss", "bce",
                     "--out", runs / f"{head}-{stream}", "--epochs", args.epochs, "--batch-size", 8, "--lr", args.lr,
                     "--val-fraction", 0, "--seed", seed, "--device", "cpu", "--quiet", log=log)
    truth = read_activitynet_ground_truth(gt, subset="test")
    table = {}
    for head in HEADS:
        metrics = {s: json.loads((runs / f"{head}-{s}" / "metrics.json").read_text()) for s in ("rgb", "flow")}
        for name, fusion in ((f"{head} rgb", []), (f"{head} rgb+flow", ["--flow-run", runs / f"{head}-flow"])):
            detections = out / f"detections-{name.replace(' ', '-')}.json"
            datp("localize", runs / f"{head}-rgb", store, *fusion, "--split", "test", "--out", detections, log=log)
            datp("eval-detection", detections, gt, "--evaluator", "thumos14", "--subset", "test", log=log)
            model = np.asarray(eval_detection(detections, gt, evaluator="thumos14", subset="test").map)
            annotated = eval_detection(detections, gt, evaluator="thumos14", subset="test", tiou=[0.5],
                                       annotated_only=True)
            p = scored(runs / f"{head}-rgb", store, runs / f"{head}-flow" if fusion else None)
            table[name] = {"model": model, **baselines(p, truth, args.repeats, seed),
                           "annotated_only@0.5": annotated.map[0], "left_out": annotated.left_out,
                           "class_map": {s: m["class_map"] for s, m in metrics.items()}}
    print(f"\nseed {seed}: thumos14 mAP on {len(truth.videos)} annotated test videos ({len(truth.instances)} events) "
          f"+ {args.background} background-only ones")
    print_table(table)
    return table


def print_table(table: dict) -> None:
    print(f"{'':28}" + "".join(f"{t:>6.1f}" for t in THUMOS14_THRESHOLDS) + "  average")
    for head, rows in table.items():
        for what in ("model", "shuffled", "uniform"):
            maps = rows[what]
            print(f"{head + ' ' + what:28}" + "".join(f"{m:6.3f}" for m in maps) + f"  {maps.mean():.3f}")
        print(f"{head:28}mAP@0.5 {rows['model'][4]:.3f} counting the background videos' detections, "
              f"{rows['annotated_only@0.5']:.3f} with them left out ({rows['left_out']:.0f}); "
              f"class mAP rgb {rows['class_map']['rgb']:.3f}, flow {rows['class_map']['flow']:.3f}\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("/tmp/datp-i3d"))
    parser.add_argument("--seeds", default="1,2,3", help="seed 0 chose --lr (0.01 over 0.001): not reported")
    parser.add_argument("--classes", type=int, default=4)
    parser.add_argument("--dim", type=int, default=64, help="feature width per stream (I3D: 1024)")
    parser.add_argument("--train-per-class", type=int, default=20)
    parser.add_argument("--test-per-class", type=int, default=8)
    parser.add_argument("--background", type=int, default=8, help="background-only test videos")
    parser.add_argument("--multi", type=float, default=0.3, help="share of videos with a second class")
    parser.add_argument("--strength", type=float, default=5.0)
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    started, log, tables = time.perf_counter(), [], []
    for seed in seeds:
        tables.append(pipeline(args, seed, args.out / f"seed-{seed}", log))
    if len(seeds) > 1:
        mean = {h: {k: (np.mean([t[h][k] for t in tables], axis=0) if k != "class_map" else
                        {s: float(np.mean([t[h][k][s] for t in tables])) for s in ("rgb", "flow")})
                    for k in tables[0][h]} for h in tables[0]}
        print(f"mean over seeds {args.seeds}")
        print_table(mean)
    stages: dict[str, float] = {}
    for stage, seconds in log:
        stages[stage] = stages.get(stage, 0.0) + seconds
    print("seconds: " + ", ".join(f"{s} {v:.0f}" for s, v in stages.items())
          + f"; total {time.perf_counter() - started:.0f}")


if __name__ == "__main__":
    main()
