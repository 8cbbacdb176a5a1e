"""Stage two: `train_head(HeadConfig)` fits one pooling head on a feature store; `train_heads([...])`
fits several (a study: heads and streams) from one read of each batch.

Trains on the store's split "train", picks the epoch on a validation part carved from it, and
evaluates the chosen state on split "test" (when the store has one). The test split is never read
before the chosen state is fixed.

- Validation: the store's videos of split "val" when it has any, else `val_fraction` of the train
  videos by the rule train-head and finetune share (`datp.io.splits.split_validation`: stratified by
  class and seeded; when stratification is impossible, seeded only; `split.stratified` in
  config.json says which). `val_fraction=0`: no validation, the last epoch is kept. Fewer than two
  validation videos per class make the choice noisy: the run then says so (stderr with progress,
  `split.warning` in config.json and metrics.json).
- Selection (`datp.io.splits.better_epoch`): the best validation top-1 accuracy, ties broken by the
  lower validation loss (cross-entropy without the attention regulariser).
- Data: the arrays the head needs (conv maps only when it reads them) are loaded once into RAM,
  conv maps as float16 (the store's own precision, so nothing is lost), when they need at most
  `max_ram_gb`; otherwise every batch is read from the HDF5 store, read ahead while the current one
  trains (`datp.pool.data.SegmentData`). Both give the same numbers.
- Standardisation (`standardize`, on by default): each conv channel is standardised with its mean and
  std over the training videos' real segments (`ChannelNorm`); the statistics go into the checkpoint
  and every later reader (`load_run`, `run_data`) applies them, so evaluate/localize see what
  training saw.
- Optimiser: Adam on `heads.param_groups(head, lr)` (DATP's auxiliary net steps at 0.3 x lr, reached
  linearly over the first 30% of the epochs: `heads.warm_up`),
  with `weight_decay`. Loss: cross-entropy, plus `alpha` (smoothness) and `beta` (sparsity) times
  `SelfAttnHead.regularizer` for self-attn. Heads without parameters (avg/max on cached scores) are
  only evaluated.
- Knowledge transfer (`transfer_from`, `mmd_weight`; TSRNet): every step also draws a batch of the
  trimmed store's split "train" (windows of a permutation seeded by seed and epoch) and adds
  `mmd_weight * transfer_loss(T, U, fc1)` on the pooled features of the real segments of the trimmed
  (T) and untrimmed (U) batches, at most `datp.pool.mmd.MAX_ROWS` rows per side (seeded draw); fc1
  is `head.transfer_layer()`. Off by default, and then nothing of it runs (docs/detection.md).
- Reproducible: the initialisation, epoch order and dropout derive from `seed` (the caller's global
  RNG state is left untouched); two runs with one seed on one machine give identical weights.
- A study (`train_heads`): the heads share the store, the split and the epoch order (one `seed`,
  `batch_size`, `val_fraction`, `standardize`, `device`, `max_ram_gb`), and each batch is read once
  for all of them; each head keeps its own random stream (initialisation and dropout, swapped in
  around its step), optimizer, epoch choice and run folder, so every head ends exactly as its own
  `train_head` run would (tests/pool/test_study.py). The data hold the union of the heads' streams.

RUN_DIR: config.json, checkpoint.pt, metrics.json, predictions.h5, weights.csv; the format is
`datp.pool.runs`'s, which alone reads and writes them.
"""

from __future__ import annotations

import json
import platform
import sys
import time
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import datp
from datp.extract.store import FeatureStore
from datp.io.device import resolve_device
from datp.io.splits import better_epoch
from datp.pool.config import HeadConfig, head_options, needs_conv
from datp.pool.data import SegmentData, dataset_classes, head_input, split_rows, store_summary
from datp.pool.heads import HEADS, param_groups, warm_up
from datp.pool.metrics import metrics, multilabel_metrics
from datp.pool.mmd import MAX_ROWS, cap_rows, segment_rows, transfer_loss
from datp.pool.predict import predict_many
from datp.pool.runs import plain, rebuild_head, run_folder, write_checkpoint, write_json, write_predictions
from datp.pool.standardize import fit_norms
from datp.pool.transfer import Transfer, open_transfer

# Settings every head of a study shares: they fix the data, the split and the epoch order.
SHARED = ("features", "seed", "batch_size", "val_fraction", "standardize", "device", "max_ram_gb")


@dataclass
class _Member:
    """One head of a study: its settings, model, optimiser, random stream and record."""

    cfg: HeadConfig
    out: Path
    streams: tuple[str, ...]
    score_source: str = ""
    options: dict = field(default_factory=dict)
    conv: bool = False
    head: nn.Module | None = None
    optimizer: torch.optim.Optimizer | None = None
    epochs: int = 0
    rng: tuple = ()
    norm: dict | None = None
    config: dict = field(default_factory=dict)
    transfer: Transfer | None = None
    history: list = field(default_factory=list)
    best: dict | None = None
    best_state: dict | None = None
    loss: list = field(default_factory=lambda: [0.0, 0, 0.0, 0])  # loss sum, videos, mmd sum, mmd steps
    targets: torch.Tensor | None = None  # (V_store, C) float multi-hot labels, for --loss bce

    @property
    def joint(self) -> bool:
        return self.cfg.head == "joint-attn"


def check_study(cfgs: Sequence[HeadConfig]) -> None:
    """Raise ValueError unless the configs can train in one pass (see the module docstring)."""
    if not cfgs:
        raise ValueError("no head to train")
    for name in SHARED:
        values = {getattr(c, name) for c in cfgs}
        if len(values) > 1:
            raise ValueError(f"the heads of one study share --{name.replace('_', '-')}; got {sorted(map(str, values))}")
    outs = [str(Path(c.out).resolve()) for c in cfgs]
    if len(set(outs)) < len(outs):
        raise ValueError("two heads of the study write the same run folder; give each its own --out")
    if len(cfgs) > 1 and any(c.transfer_from is not None for c in cfgs):
        raise ValueError("--transfer-from trains one head at a time; train the transfer run on its own")


def train_head(cfg: HeadConfig, *, progress: bool = True) -> dict:
    """Train, select on validation, test, and write RUN_DIR (`cfg.out`; `datp.pool.runs` has the format).

    The run is written into a fresh folder that replaces `cfg.out` whole at the end
    (`datp.pool.runs.run_folder`): an interrupted run leaves an earlier run there untouched.

    Returns:
        metrics.json's content plus "out" (the run folder).

    Raises:
        StoreError: the store is missing or lacks a stream the head needs.
        ValueError: settings that do not fit the store (e.g. cached scores over other classes), or an
            `out` that holds something other than a train-head run.
    """
    return train_heads([cfg], progress=progress)[0]


def train_heads(cfgs: Sequence[HeadConfig], *, progress: bool = True) -> list[dict]:
    """Train several heads from one pass over the data (a study; see the module docstring); each ends
    as its own `train_head(cfg)` would, in its own run folder.

    Returns:
        One `train_head` result per config, in order.
    """
    cfgs = list(cfgs)
    check_study(cfgs)
    with ExitStack() as folders:  # every folder checked before any work; all put in place at the end
        outs = [folders.enter_context(run_folder(c.out, kind="train-head")) for c in cfgs]
        results = _train(cfgs, outs, progress=progress)
    for cfg, result in zip(cfgs, results):
        if progress:
            top1 = "no test split" if result["top1"] is None else f"test top-1 {result['top1']:.4f}"
            print(f"train-head {cfg.head} ({cfg.stream}): best epoch {result['best_epoch']}, {top1}; wrote {cfg.out}")
    return [{**r, "out": str(c.out)} for c, r in zip(cfgs, results)]


def _members(cfgs, outs, store: FeatureStore, class_names: list[str], pad_to: int) -> list[_Member]:
    members = []
    for cfg, out in zip(cfgs, outs):
        m = _Member(cfg, Path(out), ("rgb", "flow") if cfg.stream == "both" else (cfg.stream,))
        for stream in m.streams:
            store.require(stream)
            store.require(stream, "logits")
        m.score_source = cfg.score_source
        if m.score_source == "auto":
            m.score_source = "cached" if store.attrs.get("logits_match_labels") else "linear"
        if HEADS[cfg.head].uses_scores and m.score_source == "cached" and store.num_classes != len(class_names):
            raise ValueError(f"{store.path.name} holds logits over {store.num_classes} classes but the dataset has "
                             f"{len(class_names)}; use --score-source linear (a classifier trained on the conv "
                             "features)")
        in_channels = {s: store.conv_shape(s)[0] for s in m.streams}
        shape = store.conv_shape(m.streams[0])
        m.options = head_options(cfg, score_source=m.score_source, num_classes=len(class_names), num_segments=pad_to,
                                 in_channels=in_channels if m.joint else in_channels[m.streams[0]],
                                 map_size=int(shape[-1]) if len(shape) == 3 else 1)  # 1: feature vectors
        m.conv = needs_conv(cfg.head, m.score_source, cfg.datp_input)
        members.append(m)
    return members


def _step(m: _Member, batch, device: torch.device, trimmed=None, rng=None) -> None:
    """One optimiser step of member `m` on `batch` (and the transfer term on a trimmed batch)."""
    cfg = m.cfg
    x = head_input(batch, m.streams, device, m.joint)
    y = batch.label.to(device)
    out = m.head(x)
    if cfg.loss == "bce":  # a sigmoid per class against the video's multi-hot labels
        loss = F.binary_cross_entropy_with_logits(out.logits, m.targets[batch.index].to(device))
    else:
        loss = F.cross_entropy(out.logits, y)
    if cfg.head == "self-attn" and (cfg.alpha or cfg.beta):
        loss = loss + m.head.regularizer(out.weights, batch.mask.to(device), alpha=cfg.alpha, beta=cfg.beta)
    if trimmed is not None:
        T = segment_rows(head_input(next(trimmed), m.streams, device, m.joint))  # (R_t, D)
        U = segment_rows(x)  # (R_u, D)
        if len(T) and len(U):
            term = transfer_loss(cap_rows(T, MAX_ROWS, rng), cap_rows(U, MAX_ROWS, rng), m.transfer.layer)
            loss = loss + cfg.mmd_weight * term
            m.loss[2], m.loss[3] = m.loss[2] + term.item(), m.loss[3] + 1
    m.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    m.optimizer.step()
    m.loss[0], m.loss[1] = m.loss[0] + loss.item() * len(y), m.loss[1] + len(y)


def _rng_state(device: torch.device) -> tuple:
    return (torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None)


def _set_rng_state(state: tuple, device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


@torch.no_grad()
def _validate(members: Sequence[_Member], data: SegmentData, rows, batch_size: int, device) -> list[dict]:
    if not len(rows):
        return [{"val_loss": None, "val_top1": None} for _ in members]
    out = []
    for m, p in zip(members, predict_many([(m.head, m.streams) for m in members], data, rows, batch_size=batch_size,
                                          device=device)):
        logits, labels = torch.from_numpy(p["logits"]).double(), torch.from_numpy(p["labels"])
        if m.cfg.loss == "bce":  # top-1 is a hit when the top class is any of the video's labels
            target = m.targets[torch.from_numpy(np.asarray(p["rows"], np.int64))].double()
            out.append({"val_loss": F.binary_cross_entropy_with_logits(logits, target).item(),
                        "val_top1": target[torch.arange(len(target)), logits.argmax(1)].mean().item()})
            continue
        out.append({"val_loss": F.cross_entropy(logits, labels).item(),
                    "val_top1": (logits.argmax(1) == labels).double().mean().item()})
    return out


def _train(cfgs: Sequence[HeadConfig], outs: Sequence[Path], *, progress: bool) -> list[dict]:
    """`train_heads`' work, writing each run's files into its folder; returns each metrics.json's content."""
    from tqdm import tqdm

    first = cfgs[0]
    device = resolve_device(first.device)
    with FeatureStore(first.features) as store, ExitStack() as stack:
        class_names = dataset_classes(store)
        C = len(class_names)
        train_rows, val_rows, test_rows, split_info = split_rows(store, first.val_fraction, first.seed)
        if 0 < len(val_rows) < 2 * C:
            # A handful of validation videos make the chosen epoch a coin toss (an untrained epoch 1
            # was picked on 5 videos of 3 classes, docs/detection.md); say so where it is decided.
            split_info["warning"] = (f"only {len(val_rows)} validation videos for {C} classes: the chosen epoch is "
                                     "noisy; use --val-fraction 0 (keep the last epoch) or a larger fraction")
            if progress:
                print(f"train-head: warning: {split_info['warning']}", file=sys.stderr)
        every = np.concatenate([train_rows, val_rows, test_rows])
        pad_to = int(store.lengths(every).max())
        members = _members(cfgs, outs, store, class_names, pad_to)
        targets = torch.from_numpy(store.multi_hot(C)).float()  # (V, C); one-hot for single-label stores
        if targets.shape[1] != C:
            raise ValueError(f"{store.path.name} has multi-hot labels over {targets.shape[1]} classes but {C} class "
                             "names; re-import it")
        for m in members:
            m.targets = targets
        streams = tuple(dict.fromkeys(s for m in members for s in m.streams))  # the union, in order
        conv = any(m.conv for m in members)
        # Test rows join the RAM copy only so that the final test does not read the store again.
        data = SegmentData(store, every, streams=streams, conv=conv, pad_to=pad_to, max_ram_gb=first.max_ram_gb,
                           progress=progress)
        stack.callback(data.close)
        transfer_info = None
        if first.transfer_from is not None:  # a study of one (check_study)
            m = members[0]
            if HEADS[first.head].uses_scores and m.score_source == "cached":
                raise ValueError(f"--mmd-weight needs a layer on the pooled conv features, but {first.head} on cached "
                                 "scores has none; use --score-source linear")
            left = max(first.max_ram_gb - (data.nbytes / 2**30 if data.in_ram else 0.0), 0.0)  # one RAM budget
            trimmed = stack.enter_context(FeatureStore(first.transfer_from))
            m.transfer, transfer_info = open_transfer(first, store, trimmed, streams=streams, max_ram_gb=left,
                                                      progress=progress)
            stack.callback(m.transfer.data.close)
        norm = None
        if conv and first.standardize:
            norm = data.norm = fit_norms(data, train_rows)
            if members[0].transfer is not None:  # the trimmed features pass through the same standardisation
                members[0].transfer.data.norm = norm
        summary = store_summary(store)
        versions = {"datp": datp.__version__, "torch": str(torch.__version__), "python": platform.python_version()}
        for m in members:
            m.norm = {s: norm[s] for s in m.streams} if norm is not None and m.conv else None
            resolved = {"score_source": m.score_source, "head_options": m.options, "streams": list(m.streams),
                        "num_classes": C, "num_segments": pad_to, "conv_loaded": conv,
                        "standardized": None if m.norm is None else "per conv channel, statistics of the train rows",
                        "data": "ram" if data.in_ram else "streamed", "data_gib": data.nbytes / 2**30,
                        "device": str(device), "study": [c.head + ":" + c.stream for c in cfgs] if len(cfgs) > 1 else None}
            m.config = json.loads(json.dumps({"config": asdict(m.cfg), "resolved": resolved, "store": summary,
                                              "split": split_info, "transfer": transfer_info, "versions": versions},
                                             default=plain))  # plain types: weights_only-safe
            write_json(m.out / "config.json", m.config)

        devices = [device] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            for m in members:  # each head built from the seed, as if alone
                torch.manual_seed(m.cfg.seed)
                m.head = rebuild_head(m.cfg.head, m.options).to(device)
                if m.transfer is not None:
                    m.transfer.layer = m.head.transfer_layer()
                    m.config["transfer"]["fc1"] = next(n for n, x in m.head.named_modules() if x is m.transfer.layer)
                    write_json(m.out / "config.json", m.config)
                groups = param_groups(m.head, m.cfg.lr)
                m.optimizer = torch.optim.Adam(groups, weight_decay=m.cfg.weight_decay) if groups else None
                m.epochs = m.cfg.epochs if m.optimizer is not None else 0
            timing = {"load_seconds": data.load_seconds, "data": "ram" if data.in_ram else "streamed", "epochs": []}
            bar = tqdm(total=sum(m.epochs for m in members) * len(train_rows), unit="video", disable=not progress,
                       dynamic_ncols=True)
            for epoch in range(max(m.epochs for m in members)):
                active = [m for m in members if epoch < m.epochs]
                torch.manual_seed(int(np.random.default_rng([first.seed, epoch]).integers(2**62)))  # dropout
                start_state = _rng_state(device)
                order = np.random.default_rng([first.seed, epoch, 1]).permutation(train_rows)
                bar.set_description(f"epoch {epoch + 1}/{max(m.epochs for m in members)}")
                trims = {}
                for m in active:
                    m.head.train()
                    warm_up(m.optimizer, epoch, m.epochs)  # DATP's auxiliary net (param_groups)
                    m.rng, m.loss = start_state, [0.0, 0, 0.0, 0]
                    if m.transfer is not None:
                        trims[id(m)] = (m.transfer.batches(epoch, steps=-(-len(order) // first.batch_size),
                                                           batch_size=first.batch_size),
                                        np.random.default_rng([first.seed, epoch, 3]))  # rows entering the MMD
                started = time.perf_counter()
                for batch in data.batches(order, first.batch_size):
                    for m in active:  # each head on its own random stream
                        _set_rng_state(m.rng, device)
                        _step(m, batch, device, *trims.get(id(m), (None, None)))
                        m.rng = _rng_state(device)
                    bar.update(len(batch.label) * len(active))
                for trimmed, _ in trims.values():
                    trimmed.close()
                trained = time.perf_counter()
                vals = _validate(active, data, val_rows, first.batch_size, device)
                timing["epochs"].append({"train_seconds": trained - started, "val_seconds": time.perf_counter() - trained,
                                         "videos_per_s": len(train_rows) / max(trained - started, 1e-9),
                                         "heads": len(active)})
                for m, val in zip(active, vals):
                    loss = m.loss[0] / max(m.loss[1], 1)
                    mmd = {} if m.transfer is None else {"mmd": m.loss[2] / max(m.loss[3], 1)}
                    m.history.append({"epoch": epoch + 1, "train_loss": loss, **mmd, **val})
                    best = None if m.best is None else (m.best["val_top1"], m.best["val_loss"])
                    if better_epoch(val["val_top1"], val["val_loss"], best):
                        m.best = {"epoch": epoch + 1, **val}
                        m.best_state = {k: v.detach().cpu().clone() for k, v in m.head.state_dict().items()}
                if len(active) == 1 and vals[0]["val_top1"] is not None:
                    bar.set_postfix(loss=f"{active[0].history[-1]['train_loss']:.3f}",
                                    val_top1=f"{vals[0]['val_top1']:.3f}", best=active[0].best["epoch"])
            bar.close()
            untrained = [m for m in members if m.best_state is None]  # nothing to train: evaluated as built
            for m, val in zip(untrained, _validate(untrained, data, val_rows, first.batch_size, device)):
                m.best = {"epoch": 0, **val}
                m.history.append(dict(m.best))
            for m in members:
                if m.best_state is not None:
                    m.head.load_state_dict(m.best_state)

        results = []
        tests = [None] * len(members)
        if len(test_rows):
            tests = predict_many([(m.head, m.streams) for m in members], data, test_rows, batch_size=first.batch_size,
                                 device=device, segment_scores=True)
        for m, p in zip(members, tests):
            test = {"top1": None, "top5": None, "mean_class_accuracy": None, "per_class_accuracy": None, "videos": 0}
            if p is not None:
                test = metrics(p["logits"], p["labels"], class_names)
                if store.multi_label or m.cfg.loss == "bce":
                    test |= multilabel_metrics(p["logits"], targets[p["rows"]].numpy())
                write_predictions(m.out, p, ids=[store.ids[i] for i in p["rows"]], class_names=class_names,
                                  num_frames=store.num_frames[p["rows"]], fps=store.fps[p["rows"]],
                                  attrs={"head": m.cfg.head, "stream": m.cfg.stream, "split": "test"})
            results.append({**test, "best_epoch": m.best["epoch"],
                            "best_val": {k: v for k, v in m.best.items() if k != "epoch"},
                            "history": m.history, "timing": timing, "split": split_info})

    for m, result in zip(members, results):
        write_checkpoint(m.out, head=m.head, name=m.cfg.head, options=m.options, class_names=class_names,
                         stream=m.cfg.stream, config=m.config, norm=m.norm)
        write_json(m.out / "metrics.json", result)
    return results
