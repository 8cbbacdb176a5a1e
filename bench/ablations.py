"""The DATP paper's ablations on one feature store, over several seeds: one command, three tables.

- Table 1 (input of the auxiliary net): DATP mog K=2 on softmax scores vs on conv maps.
- Table 3 (weight generator): discrete vs mog K=1, 2, 3 (conv input).
- Table 4 (testing schemes, `datp.pool.schemes`): P1 (the DATP run's segment classifier pooled with
  random Gaussians), P2 (the same classifier with average pooling), P3 (a classifier trained and
  tested with average pooling: the avg run), DATP (the run as trained; mog K=2, conv input).
- Extra rows: max pooling, lstm-attn, self-attn (and avg, which is P3).

Every row is trained per stream (rgb, flow: whatever the store holds) and fused late (softmax, rgb 1 :
flow 1.5, `datp.pool.metrics`'s weights; schemes fused the same way). Per seed, every head of every
stream trains in one study (`train_heads`: one read of each batch, each head as its own run); the seed
sets initialisation, validation split and epoch order. Cells are test top-1, mean +- std (sample std)
over the seeds.

Training settings are train-head's defaults unless given: the demo's store is run with the demo's
(`--epochs 100 --lr 3e-3 --batch-size 16`, lstm-attn with 128 cells: `--lstm-hidden 128`).
`--datp KEY=VALUE` sets a HeadConfig field on every DATP row (e.g. `--datp min_sigma=0.05`);
`--extra NAME=KEY:VALUE,...` adds a DATP row with those fields (mog K=2 unless given), printed in a
table of its own ("min_sigma:half" is half the segment spacing, 0.5 / N, of the store).

A key-moment construction of bench/sweep.py instead of a store: `--construction NAME` writes, for each
seed, that construction's store with that seed (data and training seed vary together, as in the sweep;
`--videos TRAIN TEST`, default 300 100) and, for the fused column, with both streams (`--two-streams`:
rgb shows the content, flow the content and the cue).

Run: python bench/ablations.py STORE [--seeds 0 1 2] [--epochs N] [--lr LR] [--batch-size B]
     [--lstm-hidden H] [--rows NAME ...]
     python bench/ablations.py --construction NAME [--two-streams] [--videos 300 100] [--seeds 10 11 12] ...
     [--lstm-hidden H] [--rows NAME ...] [--datp KEY=VALUE ...] [--work DIR] [--json OUT.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import fields
from pathlib import Path

import numpy as np

from datp.extract.store import FeatureStore
from datp.pool.config import HeadConfig
from datp.pool.metrics import DEFAULT_STREAM_WEIGHTS, metrics
from datp.pool.runs import read_predictions
from datp.pool.schemes import testing_schemes
from datp.pool.train import train_heads
from datp.synth.keymoments import KeyMomentConfig, write_store

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sweep import CONSTRUCTIONS, field_value, head_fields  # noqa: E402  (bench/ is not a package)

# row -> (head, HeadConfig overrides). "datp" is the paper's full model (mog K=2, conv input).
ROWS = {
    "avg": ("avg", {}),
    "max": ("max", {}),
    "datp": ("datp", {}),
    "datp-softmax": ("datp", {"datp_input": "softmax"}),
    "datp-K1": ("datp", {"gaussians": 1}),
    "datp-K3": ("datp", {"gaussians": 3}),
    "datp-discrete": ("datp", {"generator": "discrete"}),
    "lstm-attn": ("lstm-attn", {}),
    "self-attn": ("self-attn", {}),
}
TABLES = {  # table -> [(label, row or row:scheme)]
    "Table 1: input of the auxiliary net (mog K=2)": [("softmax", "datp-softmax"), ("conv", "datp")],
    "Table 3: weight generator (conv input)": [("discrete", "datp-discrete"), ("mog K=1", "datp-K1"),
                                               ("mog K=2", "datp"), ("mog K=3", "datp-K3")],
    "Table 4: testing schemes (mog K=2, conv input)": [("P1 (random Gaussians)", "datp:P1"),
                                                      ("P2 (DATP's classifier, avg pooling)", "datp:P2"),
                                                      ("P3 (avg-trained, avg pooling)", "avg"), ("DATP", "datp")],
    "Extra rows": [("max pooling", "max"), ("lstm-attn", "lstm-attn"), ("self-attn", "self-attn")],
}


def _fuse(logits: dict[str, np.ndarray], labels: np.ndarray, class_names) -> float:
    fused = sum(DEFAULT_STREAM_WEIGHTS[s] * _softmax(v) for s, v in logits.items())
    return metrics(fused, labels, class_names)["top1"]


def _softmax(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    e = np.exp(x - x.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def run_seed(store: str, seed: int, work: Path, rows: list[str], *, train: dict, datp: dict,
             extra: dict[str, dict] | None = None, streams: list[str] | None = None) -> dict:
    """{cell: {stream or "fused": test top-1}} for one seed; cells are rows and "datp:P1", "datp:P2"."""
    with FeatureStore(store) as s:
        streams = [x for x in ("rgb", "flow") if x in s.streams and (streams is None or x in streams)]
        half = 0.5 / int(s.attrs["num_segments"])
    table = {row: ROWS[row] for row in rows} | {name: ("datp", opts) for name, opts in (extra or {}).items()}
    rows = list(table)
    cfgs, where = [], {}
    for row in rows:
        head, options = table[row]
        options = {**(datp if head == "datp" else {}), **options, **train.get(head, {})}
        if options.get("min_sigma") == "half":
            options["min_sigma"] = half
        for stream in streams:
            out = work / f"seed{seed}" / f"{row}-{stream}"
            where[row, stream] = out
            cfgs.append(HeadConfig(features=store, out=str(out), head=head, stream=stream, seed=seed, device="cpu",
                                   **train["all"], **options))
    train_heads(cfgs, progress=False)
    cells: dict[str, dict] = {}
    logits: dict[str, dict] = {}
    labels = names = None
    for row in rows:
        for stream in streams:
            p = read_predictions(where[row, stream])
            labels, names = p["labels"], p["class_names"]
            logits.setdefault(row, {})[stream] = p["logits"]
    if "datp" in rows:
        for stream in streams:
            avg = where["avg", stream] if "avg" in rows else None
            schemes = testing_schemes(where["datp", stream], avg_run=avg, seed=seed, keep_logits=True)
            assert np.array_equal(schemes["labels"], labels)
            for name in ("P1", "P2"):
                logits.setdefault(f"datp:{name}", {})[stream] = schemes["logits"][name]
    for cell, by_stream in logits.items():
        cells[cell] = {s: metrics(v, labels, names)["top1"] for s, v in by_stream.items()}
        if len(by_stream) > 1:
            cells[cell]["fused"] = _fuse(by_stream, labels, names)
    return cells


def _cell(values: list[float]) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} +- {statistics.stdev(values):.2f}"


def format_tables(per_seed: list[dict], extra: dict[str, dict] | None = None) -> str:
    """Markdown tables: label x (streams, fused), mean +- std over the seeds."""
    tables = dict(TABLES)
    if extra:
        tables["Extra DATP settings"] = [(f"{name} ({', '.join(f'{k}={v}' for k, v in opts.items())})", name)
                                         for name, opts in extra.items()]
    columns = [c for c in ("rgb", "flow", "fused") if any(c in v for seed in per_seed for v in seed.values())]
    lines = []
    for title, entries in tables.items():
        entries = [(label, cell) for label, cell in entries if all(cell in seed for seed in per_seed)]
        if not entries:
            continue
        lines += [f"{title}", "", "| | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
        for label, cell in entries:
            lines.append(f"| {label} | " + " | ".join(_cell([seed[cell][c] for seed in per_seed if c in seed[cell]])
                                                     for c in columns) + " |")
        lines.append("")
    return "\n".join(lines)


def construction(args, seed: int | None) -> KeyMomentConfig:
    """The key-moment config of `--construction` for one seed (None: seed 0, for the record)."""
    overrides = dict(CONSTRUCTIONS[args.construction])
    if args.two_streams:
        overrides["streams"] = ("rgb", "flow")
    return KeyMomentConfig(**overrides, n_train=args.videos[0], n_test=args.videos[1], seed=seed or 0)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("store", nargs="?", help="a feature store (both streams for the fused column)")
    parser.add_argument("--construction", choices=sorted(CONSTRUCTIONS), help="a key-moment construction instead")
    parser.add_argument("--two-streams", action="store_true", help="the construction with rgb and flow")
    parser.add_argument("--videos", type=int, nargs=2, default=[300, 100], metavar=("TRAIN", "TEST"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    defaults = {f.name: f.default for f in fields(HeadConfig)}
    parser.add_argument("--epochs", type=int, default=defaults["epochs"])
    parser.add_argument("--lr", type=float, default=defaults["lr"])
    parser.add_argument("--batch-size", type=int, default=defaults["batch_size"])
    parser.add_argument("--lstm-hidden", type=int, default=defaults["hidden"], help="lstm-attn's cells")
    parser.add_argument("--rows", nargs="+", choices=list(ROWS), default=list(ROWS))
    parser.add_argument("--datp", nargs="*", default=[], metavar="KEY=VALUE",
                        help="HeadConfig fields for every DATP row, e.g. min_sigma=0.05 aux_lr_scale=1")
    parser.add_argument("--extra", nargs="*", default=[], metavar="NAME=KEY:VALUE,...",
                        help="extra DATP rows, e.g. km=min_sigma:half,aux_lr_scale:1,aux_max_lr:0.001")
    parser.add_argument("--streams", nargs="+", choices=["rgb", "flow"], help="streams to train (default: all)")
    parser.add_argument("--work", help="keep the run folders here (default: a temporary folder, removed)")
    parser.add_argument("--json", help="write every seed's numbers and the settings here")
    parser.add_argument("--tables-from", nargs="+", metavar="JSON",
                        help="print the tables of earlier --json outputs (their seeds together) and exit")
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(1)  # as the demo and the sweep train heads: the same floating-point order, the same cells
    if args.tables_from:
        saved = [json.loads(Path(p).read_text()) for p in args.tables_from]
        print(f"{', '.join(args.tables_from)}: seeds {[s for x in saved for s in x['settings']['seeds']]}; "
              f"settings {json.dumps({k: v for k, v in saved[0]['settings'].items() if k != 'seeds'})}\n")
        print(format_tables([seed for x in saved for seed in x["per_seed"]], saved[0]["settings"].get("extra")))
        return 0
    if (args.store is None) == (args.construction is None):
        parser.error("give a STORE or --construction NAME (one of them)")
    datp = head_fields(args.datp, "--datp", parser.error)
    extra = {}
    for item in args.extra:
        name, sep, text = item.partition("=")
        pairs = [p.partition(":") for p in text.split(",") if p]
        if not sep or name in ROWS or any(not c or k not in defaults for k, c, _ in pairs):
            parser.error(f"--extra {item!r}: give NAME=KEY:VALUE,... with a new NAME and HeadConfig fields")
        extra[name] = {k: field_value(v) for k, _, v in pairs}
    train = {"all": {"epochs": args.epochs, "lr": args.lr, "batch_size": args.batch_size},
             "lstm-attn": {"hidden": args.lstm_hidden}}
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="datp-ablations-"))
    per_seed, seconds = [], []
    try:
        for seed in args.seeds:
            started = time.perf_counter()
            store = args.store
            if args.construction:
                store = str(work / f"{args.construction}-seed{seed}.h5")
                write_store(construction(args, seed), store)
            per_seed.append(run_seed(store, seed, work, args.rows, train=train, datp=datp, extra=extra,
                                     streams=args.streams))
            seconds.append(time.perf_counter() - started)
            print(f"seed {seed}: {seconds[-1]:.0f} s", file=sys.stderr, flush=True)
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    what = args.store or f"{args.construction}{' (rgb + flow)' if args.two_streams else ''}, {args.videos[0]}/{args.videos[1]} videos"
    settings = {"store": args.store, "construction": None if not args.construction else
                dataclasses.asdict(construction(args, None)), "seeds": args.seeds, "train": train, "datp": datp, "rows": args.rows,
                "extra": extra, "streams": args.streams}
    print(f"{what}: test top-1, mean +- std over seeds {args.seeds}; {json.dumps(settings['train'])}"
          + (f"; datp {json.dumps(datp)}" if datp else ""))
    print()
    print(format_tables(per_seed, extra))
    if args.json:
        Path(args.json).write_text(json.dumps({"settings": settings, "seconds": seconds, "per_seed": per_seed},
                                              indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
