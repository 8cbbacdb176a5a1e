"""Evaluate stage-two runs: metrics, late fusion of streams, and the DATP paper's testing schemes.

- `metrics(logits, labels, class_names)`: top-1, top-5, mean class accuracy, per-class accuracy.
- `write_predictions` / `read_predictions`: a run's per-video test scores (predictions.h5) and
  per-segment weights (weights.csv).
- `fuse_runs(runs, on="softmax")`: late fusion `sum_r w_r * softmax(logits_r)` of runs scored on
  the same test videos. Default weights by stream: rgb 1, flow 1.5 (TSN, DATP). Fusion is on
  softmax probabilities by default because heads put their logits on different scales (DATP's
  `S = sum_i w_i I_i / ||w||_2` grows with sqrt(N), attention heads' do not), so summing raw logits
  would weigh the streams by their heads' scales rather than by `w_r`; `on="logits"` sums raw
  logits as TSN's scripts do.
- `testing_schemes(run_dir, avg_run=...)`: the DATP paper's testing schemes (see its docstring).
- `evaluate(EvaluateConfig)`: what `datp evaluate` runs (fusion, schemes, plots, one JSON report).
"""

from __future__ import annotations

import csv
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Mapping, Sequence

import h5py
import numpy as np
import torch
from torch import Tensor, nn

from datp.io.atomic import atomic_path
from datp.pool.attention import JointAttnHead, SelfAttnHead
from datp.pool.segment_scores import pooled_features, resolve_mask

DEFAULT_STREAM_WEIGHTS = {"rgb": 1.0, "flow": 1.5, "both": 1.0}
FUSE_ON = ("softmax", "logits")
_STR = h5py.string_dtype("utf-8")


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


def segment_class_scores(head: nn.Module, x) -> Tensor | None:
    """Per-segment class scores (B, N, C) of a head, zero on masked segments, for plots.

    Score-pooling heads (avg, max, datp): their segment scores I_i. self-attn: its classifier applied
    to each segment's feature. joint-attn: the sum of its stream classifiers on each segment. lstm-attn
    has no per-segment classifier: None.
    """
    if getattr(head, "uses_scores", False):
        mask = resolve_mask(x)
        return head.scores(x, mask)
    if isinstance(head, SelfAttnHead):
        mask = resolve_mask(x)
        return head.classifier(pooled_features(x, mask)).masked_fill(~mask[..., None], 0.0)
    if isinstance(head, JointAttnHead):
        mask = resolve_mask(x[head.streams[0]])
        total = sum(head.classifiers[s](pooled_features(x[s], mask)) for s in head.streams)
        return total.masked_fill(~mask[..., None], 0.0)
    return None


# ---------------------------------------------------------------- predictions.h5 / weights.csv


def write_predictions(run_dir: str | Path, p: Mapping[str, np.ndarray], *, ids: Sequence[str],
                      class_names: Sequence[str], num_frames, fps, attrs: Mapping) -> None:
    """Write RUN_DIR/predictions.h5 and RUN_DIR/weights.csv (atomically).

    predictions.h5: `ids` (V,) utf-8, `labels` (V,), `logits` (V, C), `weights` (V, N), `mask` (V, N),
    `t` (V, N) segment centre times in [0, 1], `frame` (V, N) first frames, `num_frames` (V,),
    `fps` (V,), and `segment_scores` (V, N, C) when the head has per-segment class scores; attrs
    `class_names` (JSON) and `attrs` (head, stream, split).
    weights.csv: `video,segment,t,frame,weight`, one row per real segment.

    Args:
        run_dir: the run folder.
        p: `datp.pool.train.predict`'s arrays.
        ids, class_names, num_frames, fps: per video / per class, in the order of `p`.
        attrs: extra attributes to record.
    """
    run_dir = Path(run_dir)
    with atomic_path(run_dir / "predictions.h5") as tmp, h5py.File(tmp, "w") as f:
        f.attrs["class_names"] = json.dumps(list(class_names))
        for key, value in attrs.items():
            f.attrs[key] = value
        f["ids"] = np.array(list(ids), dtype=object).astype(_STR)
        f["labels"] = np.asarray(p["labels"], np.int64)
        for key, dtype in (("logits", np.float32), ("weights", np.float32), ("mask", bool), ("t", np.float32),
                           ("frame", np.int64), ("segment_scores", np.float32)):
            if key in p:
                f[key] = np.asarray(p[key], dtype)
        f["num_frames"] = np.asarray(num_frames, np.int64)
        f["fps"] = np.asarray(fps, np.float32)
    with atomic_path(run_dir / "weights.csv") as tmp, tmp.open("w", newline="") as out:
        writer = csv.writer(out)
        writer.writerow(["video", "segment", "t", "frame", "weight"])
        for v, video in enumerate(ids):
            for i in np.flatnonzero(p["mask"][v]):
                writer.writerow([video, int(i), repr(float(p["t"][v, i])), int(p["frame"][v, i]),
                                 repr(float(p["weights"][v, i]))])


def read_predictions(run_dir: str | Path) -> dict:
    """RUN_DIR/predictions.h5 as {"ids": list, arrays..., "class_names": list, "attrs": dict, "run": path}."""
    path = Path(run_dir) / "predictions.h5"
    if not path.is_file():
        raise ValueError(f"{run_dir} has no predictions.h5; it is written by datp train-head when the store has "
                         "a test split")
    with h5py.File(path, "r") as f:
        out = {k: f[k][:] for k in f if k != "ids"}
        out["ids"] = [v.decode() if isinstance(v, bytes) else str(v) for v in f["ids"][:]]
        out["class_names"] = json.loads(f.attrs["class_names"])
        out["attrs"] = {k: f.attrs[k] for k in f.attrs if k != "class_names"}
    out["run"] = str(run_dir)
    return out


# ---------------------------------------------------------------- fusion


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


# ---------------------------------------------------------------- DATP testing schemes


def random_mixture(num_videos: int, num_gaussians: int, *, seed: int) -> tuple[Tensor, Tensor, Tensor]:
    """Random mixtures for scheme P1, one per video: rho_k = u_k / sum_j u_j with u ~ U(0, 1),
    mu ~ U(0, 1), sigma^2 ~ U(0.01, 0.2) (0.2 is DATP's initial variance).

    Returns:
        rho, mu, sigma, each (num_videos, num_gaussians) float32; a pure function of the seed.
    """
    g = torch.Generator().manual_seed(seed)
    u = torch.rand(num_videos, num_gaussians, generator=g, dtype=torch.float64)
    mu = torch.rand(num_videos, num_gaussians, generator=g, dtype=torch.float64)
    var = 0.01 + 0.19 * torch.rand(num_videos, num_gaussians, generator=g, dtype=torch.float64)
    return (u / u.sum(dim=1, keepdim=True)).float(), mu.float(), var.sqrt().float()


@torch.no_grad()
def testing_schemes(run_dir: str | Path, *, avg_run: str | Path | None = None, features: str | Path | None = None,
                    split: str = "test", seed: int = 0, batch_size: int = 64, device: str = "cpu",
                    max_ram_gb: float = 0.0) -> dict:
    """The DATP paper's testing schemes on split `split` of the store.

    - "datp": the run's head as trained.
    - "P2": the same segment classifier (the run's segment scores I_i) with average pooling.
    - "P1": the run's segment scores pooled by DATP's Eq. 1 and 3 with random Gaussians
      (`random_mixture(seed)`) instead of the regressed ones (datp runs with the mog generator).
    - "P3": `avg_run`, a segment classifier trained with average pooling, evaluated with average
      pooling (its own head).
    The paper's claim, P2 > P3 (training with DATP improves the segment classifier itself), is
    checked when both are there; it is only meaningful when both runs train their segment
    classifier (score_source "linear"): on frozen cached scores P2 and P3 are the same numbers.

    Args:
        run_dir: a run of a score-pooling head (datp, or avg/max for P2 alone).
        avg_run: a run of the avg head on the same store and stream, for P3.
        features: the store (default: the one the run was trained on).
        split, seed, batch_size, device, max_ram_gb: what to score; P1's seed; batching; device;
            RAM for the data (0: read per batch).

    Returns:
        {"schemes": {name: metrics}, "p2_gt_p3": bool | None, "notes": [str]}.

    Raises:
        StoreError: the store lacks the run's stream.
        ValueError: a run that cannot be evaluated this way.
    """
    from datp.extract.store import FeatureStore
    from datp.pool.datp_head import l2_pool_log, mog_log_weights
    from datp.pool.train import head_input, load_run, predict, run_data

    run = load_run(run_dir, device=device)
    if not getattr(run.head, "uses_scores", False):
        raise ValueError(f"{run_dir} trained a {run.name} head; the testing schemes need a head that pools segment "
                         "scores (datp)")
    avg = None
    if avg_run is not None:
        avg = load_run(avg_run, device=device)
        if avg.name != "avg":
            raise ValueError(f"--avg-run {avg_run} trained a {avg.name} head; P3 needs an avg run")
        if avg.stream != run.stream:
            raise ValueError(f"--avg-run {avg_run} is a {avg.stream} run but {run_dir} is {run.stream}; use the same stream")
    notes = []
    head = run.head
    mog = run.name == "datp" and head.generator == "mog"
    with FeatureStore(features or run.config["store"]["path"]) as store:
        rows = store.indices(split)
        if not len(rows):
            raise ValueError(f"{store.path.name} has no videos of split {split!r}")
        data = run_data(run, store, rows, max_ram_gb=max_ram_gb)
        # filled in place (see `datp.pool.train.predict` on why not lists of per-batch arrays)
        V, C = len(rows), len(run.class_names)
        names = [run.name, "P2"] + (["P1"] if mog else [])  # run.name: the head as trained
        logits = {name: np.empty((V, C), np.float32) for name in names}
        labels = np.empty(V, np.int64)
        if mog:
            rho, mu, sigma = (v.to(run.device) for v in random_mixture(V, head.num_gaussians, seed=seed))
        start = 0
        for batch in data.batches(rows, batch_size):
            x = head_input(batch, run.streams, run.device, joint=False)
            mask = x.mask
            part = slice(start, start + len(batch.label))
            scores = head.scores(x, mask)  # (B, N, C) I_i, zero on masked segments
            count = mask.sum(dim=1, keepdim=True).clamp_min(1)
            logits[run.name][part] = head(x).logits.cpu().numpy()
            logits["P2"][part] = (scores.sum(dim=1) / count).cpu().numpy()
            if mog:
                log_w = mog_log_weights(x.t.masked_fill(~mask, 0.0), torch.log(rho[part]), mu[part],
                                        torch.log(sigma[part]))
                pooled = scores if head.pooled_scores == "logits" else torch.softmax(scores, dim=-1)
                logits["P1"][part] = l2_pool_log(pooled, log_w, mask)[0].cpu().numpy()
            labels[part] = batch.label.numpy()
            start = part.stop
        schemes = {k: metrics(v, labels, run.class_names) for k, v in logits.items()}
        if not mog:
            notes.append(f"P1 needs a datp run with the mog generator; {run_dir} is {run.name}"
                         + (f" ({head.generator})" if run.name == "datp" else ""))
        if avg is not None:
            avg_data = run_data(avg, store, rows, max_ram_gb=max_ram_gb)
            p = predict(avg.head, avg_data, rows, batch_size=batch_size, device=avg.device)
            schemes["P3"] = metrics(p["logits"], p["labels"], avg.class_names)
        else:
            notes.append("P3 needs --avg-run (a run of the avg head on the same store and stream)")
    p2_gt_p3 = None
    if "P3" in schemes:
        p2_gt_p3 = schemes["P2"]["top1"] > schemes["P3"]["top1"]
        if run.score_source == "cached" and avg.score_source == "cached":
            notes.append("both runs pool the store's frozen cached scores, so P2 and P3 are the same numbers; "
                         "train both with --score-source linear to test the paper's claim")
    return {"schemes": schemes, "p2_gt_p3": p2_gt_p3, "notes": notes, "split": split, "videos": int(len(labels))}


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
    if cfg.out:
        from datp.pool import plots as plotting

        out = Path(cfg.out)
        out.mkdir(parents=True, exist_ok=True)
        if cfg.plot_videos or cfg.videos:
            events = plotting.read_events(cfg.events) if cfg.events else None
            ids = list(cfg.videos) or None
            plots += plotting.plot_segment_weights(cfg.runs[0], out, ids=ids, count=cfg.plot_videos or 4,
                                                   events=events)
        if cfg.compare:
            plots.append(plotting.plot_accuracy_changes(cfg.compare, cfg.runs[0], out / "class_changes.png"))
    report = {"config": asdict(cfg), "fusion": fusion, "schemes": schemes, "plots": [str(p) for p in plots]}
    if cfg.out:
        with atomic_path(Path(cfg.out) / "evaluation.json") as tmp:
            tmp.write_text(json.dumps(report, indent=2))
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
