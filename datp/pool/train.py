"""Stage two: `train_head(HeadConfig)` fits one pooling head on a feature store.

Trains on the store's split "train", picks the epoch on a validation part carved from it, and
evaluates the chosen state on split "test" (when the store has one). The test split is never read
before the chosen state is fixed.

- Validation: the store's videos of split "val" when it has any, else `val_fraction` of the train
  videos, drawn with `sklearn.model_selection.train_test_split(stratify=labels,
  random_state=seed)`; when stratification is impossible (a class with fewer than 2 videos, or fewer
  validation videos than classes) the split is seeded but not stratified (`split.stratified` in
  config.json says which). `val_fraction=0`: no validation, the last epoch is kept. Fewer than two
  validation videos per class make the choice noisy: the run then says so (stderr with progress,
  `split.warning` in config.json and metrics.json).
- Selection: the best validation top-1 accuracy, ties broken by the lower validation loss
  (cross-entropy without the attention regulariser).
- Data: the arrays the head needs (conv maps only when it reads them) are loaded once into RAM,
  conv maps as float16 (the store's own precision, so nothing is lost), when they need at most
  `max_ram_gb`; otherwise every batch is read from the HDF5 store with `FeatureStore.load`, the
  next batch in a background thread while the current one trains. Both give the same numbers.
- Standardisation (`standardize`, on by default): each conv channel is standardised with its mean and
  std over the training videos' real segments (`ChannelNorm`); the statistics go into the checkpoint
  and every later reader (`load_run`, `run_data`) applies them, so evaluate/localize see what
  training saw.
- Optimiser: Adam on `heads.param_groups(head, lr)` (DATP's auxiliary net gets a 10x smaller step),
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

RUN_DIR: config.json, checkpoint.pt, metrics.json, predictions.h5, weights.csv; the format is
`datp.pool.runs`'s, which alone reads and writes them.
"""

from __future__ import annotations

import json
import platform
import sys
import time
from contextlib import ExitStack
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import datp
from datp.extract.store import FeatureStore
from datp.io.device import resolve_device
from datp.io.splits import better_epoch
from datp.pool.config import HeadConfig, head_options, needs_conv
from datp.pool.data import (
    SegmentData,
    dataset_classes,
    head_input,
    split_rows,
    store_summary,
)
from datp.pool.heads import HEADS, param_groups
from datp.pool.metrics import metrics
from datp.pool.mmd import MAX_ROWS, cap_rows, segment_rows, transfer_loss
from datp.pool.predict import predict
from datp.pool.runs import (
    plain,
    rebuild_head,
    run_folder,
    write_checkpoint,
    write_json,
    write_predictions,
)
from datp.pool.standardize import fit_norms
from datp.pool.transfer import open_transfer

# ---------------------------------------------------------------- data


# ---------------------------------------------------------------- predictions


def _epoch_loss(head, data, rows, cfg, optimizer, device, joint, bar, transfer=None,
                epoch: int = 0) -> tuple[float, float | None]:
    """One training epoch over `rows` (in this order); returns the mean loss and, with `transfer`, the
    mean unweighted transfer term (else None)."""
    head.train()
    total, count = 0.0, 0
    if transfer is not None:
        trimmed = transfer.batches(epoch, steps=-(-len(rows) // cfg.batch_size), batch_size=cfg.batch_size)
        rng = np.random.default_rng([cfg.seed, epoch, 3])  # which segment rows enter the MMD
        mmd_total, mmd_steps = 0.0, 0
    for batch in data.batches(rows, cfg.batch_size):
        x = head_input(batch, data.streams, device, joint)
        y = batch.label.to(device)
        out = head(x)
        loss = F.cross_entropy(out.logits, y)
        if cfg.head == "self-attn" and (cfg.alpha or cfg.beta):
            loss = loss + head.regularizer(out.weights, batch.mask.to(device), alpha=cfg.alpha, beta=cfg.beta)
        if transfer is not None:
            T = segment_rows(head_input(next(trimmed), data.streams, device, joint))  # (R_t, D)
            U = segment_rows(x)  # (R_u, D)
            if len(T) and len(U):
                term = transfer_loss(cap_rows(T, MAX_ROWS, rng), cap_rows(U, MAX_ROWS, rng), transfer.layer)
                loss = loss + cfg.mmd_weight * term
                mmd_total, mmd_steps = mmd_total + term.item(), mmd_steps + 1
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total += loss.item() * len(y)
        count += len(y)
        bar.update(len(y))
    if transfer is None:
        return total / max(count, 1), None
    trimmed.close()
    return total / max(count, 1), mmd_total / max(mmd_steps, 1)


@torch.no_grad()
def _validate(head, data, rows, cfg, device) -> dict:
    if not len(rows):
        return {"val_loss": None, "val_top1": None}
    p = predict(head, data, rows, batch_size=cfg.batch_size, device=device)
    logits, labels = torch.from_numpy(p["logits"]).double(), torch.from_numpy(p["labels"])
    return {"val_loss": F.cross_entropy(logits, labels).item(),
            "val_top1": (logits.argmax(1) == labels).double().mean().item()}


# ---------------------------------------------------------------- knowledge transfer


# ---------------------------------------------------------------- train_head


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
    with run_folder(cfg.out, kind="train-head") as folder:
        result = _train(cfg, folder, progress=progress)
    if progress:
        top1 = "no test split" if result["top1"] is None else f"test top-1 {result['top1']:.4f}"
        print(f"train-head {cfg.head} ({cfg.stream}): best epoch {result['best_epoch']}, {top1}; wrote {cfg.out}")
    return {**result, "out": str(cfg.out)}


def _train(cfg: HeadConfig, out: Path, *, progress: bool) -> dict:
    """`train_head`'s work, writing the run's files into the folder `out`; returns metrics.json's content."""
    from tqdm import tqdm

    device = resolve_device(cfg.device)
    streams = ("rgb", "flow") if cfg.stream == "both" else (cfg.stream,)
    with FeatureStore(cfg.features) as store, ExitStack() as stack:
        for stream in streams:
            store.require(stream)
            store.require(stream, "logits")
        class_names = dataset_classes(store)
        C = len(class_names)
        score_source = cfg.score_source
        if score_source == "auto":
            score_source = "cached" if store.attrs.get("logits_match_labels") else "linear"
        if HEADS[cfg.head].uses_scores and score_source == "cached" and store.num_classes != C:
            raise ValueError(f"{store.path.name} holds logits over {store.num_classes} classes but the dataset has "
                             f"{C}; use --score-source linear (a classifier trained on the conv features)")
        train_rows, val_rows, test_rows, split_info = split_rows(store, cfg.val_fraction, cfg.seed)
        if 0 < len(val_rows) < 2 * C:
            # A handful of validation videos make the chosen epoch a coin toss (an untrained epoch 1
            # was picked on 5 videos of 3 classes, docs/detection.md); say so where it is decided.
            split_info["warning"] = (f"only {len(val_rows)} validation videos for {C} classes: the chosen epoch is "
                                     "noisy; use --val-fraction 0 (keep the last epoch) or a larger fraction")
            if progress:
                print(f"train-head: warning: {split_info['warning']}", file=sys.stderr)
        every = np.concatenate([train_rows, val_rows, test_rows])
        pad_to = int(store.lengths(every).max())
        in_channels = {s: store.conv_shape(s)[0] for s in streams}
        shape = store.conv_shape(streams[0])
        options = head_options(cfg, score_source=score_source, num_classes=C, num_segments=pad_to,
                               in_channels=in_channels if cfg.head == "joint-attn" else in_channels[streams[0]],
                               map_size=int(shape[-1]) if len(shape) == 3 else None)
        conv = needs_conv(cfg.head, score_source, cfg.datp_input)
        # Test rows join the RAM copy only so that the final test does not read the store again.
        data = SegmentData(store, every, streams=streams, conv=conv, pad_to=pad_to, max_ram_gb=cfg.max_ram_gb,
                           progress=progress)
        transfer, transfer_info = None, None
        if cfg.transfer_from is not None:
            if HEADS[cfg.head].uses_scores and score_source == "cached":
                raise ValueError(f"--mmd-weight needs a layer on the pooled conv features, but {cfg.head} on cached "
                                 "scores has none; use --score-source linear")
            left = max(cfg.max_ram_gb - (data.nbytes / 2**30 if data.in_ram else 0.0), 0.0)  # one RAM budget
            trimmed = stack.enter_context(FeatureStore(cfg.transfer_from))
            transfer, transfer_info = open_transfer(cfg, store, trimmed, streams=streams, max_ram_gb=left,
                                                    progress=progress)
        norm = None
        if conv and cfg.standardize:
            norm = data.norm = fit_norms(data, train_rows)
            if transfer is not None:  # the trimmed features pass through the same standardisation
                transfer.data.norm = norm
        resolved = {"score_source": score_source, "head_options": options, "streams": list(streams),
                    "num_classes": C, "num_segments": pad_to, "conv_loaded": conv,
                    "standardized": None if norm is None else "per conv channel, statistics of the train rows",
                    "data": "ram" if data.in_ram else "streamed", "data_gib": data.nbytes / 2**30,
                    "device": str(device)}
        config = {"config": asdict(cfg), "resolved": resolved, "store": store_summary(store), "split": split_info,
                  "transfer": transfer_info, "versions": {"datp": datp.__version__, "torch": str(torch.__version__),
                               "python": platform.python_version()}}
        config = json.loads(json.dumps(config, default=plain))  # plain types: weights_only-safe
        write_json(out / "config.json", config)

        devices = [device] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(cfg.seed)
            head = rebuild_head(cfg.head, options).to(device)
            if transfer is not None:
                transfer.layer = head.transfer_layer()
                config["transfer"]["fc1"] = next(n for n, m in head.named_modules() if m is transfer.layer)
                write_json(out / "config.json", config)
            groups = param_groups(head, cfg.lr)
            optimizer = torch.optim.Adam(groups, weight_decay=cfg.weight_decay) if groups else None
            epochs = cfg.epochs if optimizer is not None else 0
            joint = cfg.head == "joint-attn"
            history, timing = [], {"load_seconds": data.load_seconds, "data": resolved["data"], "epochs": []}
            best, best_state = None, None
            bar = tqdm(total=epochs * len(train_rows), unit="video", disable=not progress, dynamic_ncols=True)
            for epoch in range(epochs):
                torch.manual_seed(int(np.random.default_rng([cfg.seed, epoch]).integers(2**62)))  # dropout
                order = np.random.default_rng([cfg.seed, epoch, 1]).permutation(train_rows)
                bar.set_description(f"epoch {epoch + 1}/{epochs}")
                started = time.perf_counter()
                loss, mmd = _epoch_loss(head, data, order, cfg, optimizer, device, joint, bar, transfer, epoch)
                trained = time.perf_counter()
                val = _validate(head, data, val_rows, cfg, device)
                history.append({"epoch": epoch + 1, "train_loss": loss, **({} if mmd is None else {"mmd": mmd}), **val})
                timing["epochs"].append({"train_seconds": trained - started,
                                         "val_seconds": time.perf_counter() - trained,
                                         "videos_per_s": len(train_rows) / max(trained - started, 1e-9)})
                if better_epoch(val["val_top1"], val["val_loss"], None if best is None else (best["val_top1"], best["val_loss"])):
                    best = {"epoch": epoch + 1, **val}
                    best_state = {k: v.detach().cpu().clone() for k, v in head.state_dict().items()}
                if val["val_top1"] is not None:
                    bar.set_postfix(loss=f"{loss:.3f}", val_top1=f"{val['val_top1']:.3f}",
                                    best=best["epoch"])
            bar.close()
            if best_state is not None:
                head.load_state_dict(best_state)
            else:  # nothing to train: the head is evaluated as built
                best = {"epoch": 0, **_validate(head, data, val_rows, cfg, device)}
                history.append(dict(best))

        result = {"best_epoch": best["epoch"], "best_val": {k: v for k, v in best.items() if k != "epoch"},
                  "history": history, "timing": timing, "split": split_info}
        test = {"top1": None, "top5": None, "mean_class_accuracy": None, "per_class_accuracy": None, "videos": 0}
        if len(test_rows):
            p = predict(head, data, test_rows, batch_size=cfg.batch_size, device=device, segment_scores=True)
            test = metrics(p["logits"], p["labels"], class_names)
            write_predictions(out, p, ids=[store.ids[i] for i in p["rows"]], class_names=class_names,
                              num_frames=store.num_frames[p["rows"]], fps=store.fps[p["rows"]],
                              attrs={"head": cfg.head, "stream": cfg.stream, "split": "test"})
        result = {**test, **result}

    write_checkpoint(out, head=head, name=cfg.head, options=options, class_names=class_names, stream=cfg.stream,
                     config=config, norm=norm)
    write_json(out / "metrics.json", result)
    return result


# ---------------------------------------------------------------- runs


