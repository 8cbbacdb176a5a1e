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

RUN_DIR (overwritten file by file, each written atomically):
- config.json: {"config": asdict(cfg), "resolved": chosen score source, head options, streams,
  num_classes, num_segments, data mode, device; "store": the store's path and attrs summary
  (backbone, weights, settings...); "split": sizes; "transfer": null, or the trimmed store's path,
  summary and videos, mmd_weight, bandwidth rule, row cap and fc1's name; "versions": datp, torch,
  python}.
- checkpoint.pt: {"datp_head_checkpoint": 1, "head", "head_options" (all constructor kwargs),
  "state_dict", "class_names", "stream", "config", "input_norm" ({stream: {"mean", "std"}} (Cf,)
  tensors of `ChannelNorm`, or None)}: plain types, `torch.load(weights_only=True)`.
- metrics.json: test top1, top5, mean_class_accuracy, per_class_accuracy {name: acc}, videos;
  best_epoch (1-based; 0 when nothing was trained), best_val, history (per epoch: train_loss,
  with transfer mmd (the mean unweighted transfer term), val_loss, val_top1), timing (seconds and
  videos/s per epoch, load time).
- predictions.h5 and weights.csv (test split only; see `datp.pool.evaluate.write_predictions`).
"""

from __future__ import annotations

import json
import math
import platform
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import datp
from datp.extract.store import Batch, FeatureStore
from datp.io.atomic import atomic_path
from datp.io.device import resolve_device
from datp.pool.attention import ATTENTIONS
from datp.pool.datp_head import DATP_INPUTS, GENERATORS, POOLED_SCORES
from datp.pool.evaluate import metrics, segment_class_scores, write_predictions
from datp.pool.heads import HEADS, SegmentBatch, build_head, param_groups
from datp.pool.mmd import DEFAULT_SCALES, MAX_ROWS, cap_rows, segment_rows, transfer_loss

CHECKPOINT_VERSION = 1
STREAM_CHOICES = ("rgb", "flow", "both")
SCORE_SOURCE_CHOICES = ("auto", "cached", "linear")
# Options that only some heads read: a non-default value for another head is a user error.
OPTION_HEADS = {
    "score_source": ("avg", "max", "datp"),
    "datp_input": ("datp",), "gaussians": ("datp",), "generator": ("datp",), "pooled_scores": ("datp",),
    "hidden": ("lstm-attn",),
    "attn_hidden": ("self-attn", "joint-attn"),
    "attention": ("self-attn",), "alpha": ("self-attn",), "beta": ("self-attn",),
}
LOAD_BLOCK = 64  # videos per read when filling RAM (bounds the float32 temporary of FeatureStore.load)


@dataclass(frozen=True)
class HeadConfig:
    """Settings of one `datp train-head` run; one field per CLI option, saved in config.json.

    Attributes:
        features: the feature store (HDF5) from `datp extract-features`.
        out: the run folder RUN_DIR.
        head: a name of `datp.pool.heads.HEADS`.
        stream: "rgb", "flow", or "both" (joint-attn only; other heads train one run per stream,
            fused with `datp evaluate`).
        epochs, batch_size: training epochs; videos per step.
        lr, weight_decay: Adam's (DATP's auxiliary net uses lr / 10).
        seed: seed of the initialisation, the validation split, the epoch order and dropout.
        val_fraction: share of the train videos held out to pick the epoch (0: keep the last).
        score_source: per-segment class scores of avg/max/datp: "cached" (the store's logits, frozen),
            "linear" (a trainable classifier on pooled conv features) or "auto" ("cached" only when
            the store says its logits are over the dataset's classes, `logits_match_labels`).
        datp_input: what DATP's auxiliary net reads: "conv" maps or "softmax" of the segment scores.
        gaussians: K Gaussians of DATP's "mog" generator.
        generator: DATP's weights generator, "mog" or "discrete".
        pooled_scores: what DATP pools: segment "logits" (default) or "probs".
        hidden: LSTM cells per layer (lstm-attn).
        attn_hidden: width of the attention MLP (self-attn, joint-attn).
        attention: self-attn's "softmax" or "sigmoid" attention.
        alpha, beta: self-attn's smoothness and sparsity weights (TSRNet's regulariser).
        dropout: dropout before the classifier(s).
        standardize: standardise each conv channel with its mean and std over the training videos'
            real segments before the head (`ChannelNorm`; saved in the checkpoint and applied to every
            later input). Off: the features as stored.
        device: "auto" (cuda when available), "cpu", "cuda" or "cuda:K".
        max_ram_gb: load the needed arrays into RAM when they need at most this many GiB, else
            stream batches from the store (0: always stream).
        transfer_from: a feature store of trimmed videos (its split "train") for TSRNet's knowledge
            transfer; None: no transfer.
        mmd_weight: weight of the transfer term `MMD^2(T, U) + MMD^2(fc1(T), fc1(U))` in the loss
            (> 0 exactly when `transfer_from` is given; see docs/detection.md).
    """

    features: str
    out: str
    head: str = "datp"
    stream: str = "rgb"
    epochs: int = 30
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.0
    seed: int = 0
    val_fraction: float = 0.2
    score_source: str = "auto"
    datp_input: str = "conv"
    gaussians: int = 2
    generator: str = "mog"
    pooled_scores: str = "logits"
    hidden: int = 512
    attn_hidden: int = 128
    attention: str = "softmax"
    alpha: float = 0.0
    beta: float = 0.0
    dropout: float = 0.0
    standardize: bool = True
    device: str = "auto"
    max_ram_gb: float = 8.0
    transfer_from: str | None = None
    mmd_weight: float = 0.0

    def __post_init__(self):
        if self.head not in HEADS:
            raise ValueError(f"unknown head {self.head!r}; choose from {sorted(HEADS)}")
        for name, value, choices in (("stream", self.stream, STREAM_CHOICES),
                                     ("score_source", self.score_source, SCORE_SOURCE_CHOICES),
                                     ("datp_input", self.datp_input, DATP_INPUTS),
                                     ("generator", self.generator, GENERATORS),
                                     ("pooled_scores", self.pooled_scores, POOLED_SCORES),
                                     ("attention", self.attention, ATTENTIONS)):
            if value not in choices:
                raise ValueError(f"--{_flag(name)} {value!r} is not one of {list(choices)}")
        if self.stream == "both" and self.head != "joint-attn":
            raise ValueError(f"--stream both is for the joint-attn head only; train one {self.head} run with "
                             "--stream rgb and one with --stream flow, then fuse them with datp evaluate")
        if self.head == "joint-attn" and self.stream != "both":
            raise ValueError(f"joint-attn pools rgb and flow together; use --stream both, not {self.stream!r}")
        for name in ("epochs", "batch_size", "gaussians", "hidden", "attn_hidden"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{_flag(name)} {getattr(self, name)} must be >= 1")
        for name in ("lr",):
            if not getattr(self, name) > 0:
                raise ValueError(f"--{_flag(name)} {getattr(self, name)} must be > 0")
        for name in ("weight_decay", "alpha", "beta", "max_ram_gb", "mmd_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{_flag(name)} {getattr(self, name)} must be >= 0")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"--val-fraction {self.val_fraction} must be in [0, 1)")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"--dropout {self.dropout} must be in [0, 1)")
        if self.transfer_from is not None and not self.mmd_weight > 0:
            raise ValueError(f"--transfer-from {self.transfer_from} needs --mmd-weight > 0 (got {self.mmd_weight:g}); "
                             "pass the weight of the transfer loss, e.g. --mmd-weight 1")
        if self.mmd_weight > 0 and self.transfer_from is None:
            raise ValueError(f"--mmd-weight {self.mmd_weight:g} needs --transfer-from TRIMMED.h5 (the trimmed videos' "
                             "feature store); pass it, or drop --mmd-weight")
        defaults = {f.name: f.default for f in fields(self)}
        for name, heads in OPTION_HEADS.items():
            if getattr(self, name) != defaults[name] and self.head not in heads:
                raise ValueError(f"--{_flag(name)} applies to {', '.join(heads)} only, not to {self.head}; "
                                 "drop it")


def _flag(name: str) -> str:
    return name.replace("_", "-")


# ---------------------------------------------------------------- data


def dataset_classes(store: FeatureStore) -> list[str]:
    """The dataset's class names: the store's, else "0", "1", ... up to the largest label."""
    if store.class_names:
        return list(store.class_names)
    known = store.labels[store.labels >= 0]
    if not len(known):
        raise ValueError(f"{store.path.name} has no class names and no labels; extract features of a "
                         "labelled dataset")
    return [str(i) for i in range(int(known.max()) + 1)]


def store_summary(store: FeatureStore) -> dict:
    """The store attributes a run records (what made the features)."""
    keep = ("backbone", "weights", "weights_sha256", "input_size", "crop", "layout", "num_segments", "stride",
            "new_length", "logits_match_labels", "datp_version", "created")
    summary = {"path": str(store.path.resolve()), "streams": list(store.streams)}
    for key in keep:
        if key in store.attrs:
            value = store.attrs[key]
            summary[key] = value.item() if isinstance(value, np.generic) else value
    try:
        summary["settings"] = json.loads(store.attrs.get("settings", "{}"))
    except (TypeError, json.JSONDecodeError):
        summary["settings"] = store.attrs.get("settings")
    return json.loads(json.dumps(summary, default=str))


def split_rows(store: FeatureStore, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict]:
    """Train, validation and test rows of the store (labelled, done videos), and a summary.

    See the module docstring for how validation is chosen; test rows are only split "test".
    """
    from sklearn.model_selection import train_test_split

    labelled = store.labels >= 0
    train = np.array([i for i in store.indices("train") if labelled[i]], np.int64)
    val = np.array([i for i in store.indices("val") if labelled[i]], np.int64)
    test = store.indices("test")
    if not len(train):
        raise ValueError(f"{store.path.name} has no labelled videos of split 'train'; extract features of a "
                         "dataset with a train split")
    info = {"val_from": "store split 'val'", "stratified": None}
    if not len(val) and val_fraction > 0:
        info["val_from"] = f"{val_fraction:g} of split 'train'"
        try:
            train, val = train_test_split(train, test_size=val_fraction, random_state=seed,
                                          stratify=store.labels[train])
            info["stratified"] = True
        except ValueError:  # a class with < 2 videos, or fewer validation videos than classes
            train, val = train_test_split(train, test_size=val_fraction, random_state=seed)
            info["stratified"] = False
        train, val = np.sort(train), np.sort(val)
    elif not len(val):
        info["val_from"] = "none (val_fraction 0: the last epoch is kept)"
    info.update(train=len(train), val=len(val), test=len(test))
    return train, val, test, info


class SegmentData:
    """Rows of a feature store served as padded `Batch`es, from RAM or read from the store per batch.

    Args:
        store: an open feature store.
        rows: the store rows this object serves.
        streams: streams to load.
        conv: load the conv maps (else only logits, times and masks).
        pad_to: N segment slots of every batch.
        max_ram_gb: hold everything in RAM (conv maps as float16) when it needs at most this.
        progress: show a bar while filling RAM.
        norm: {stream: ChannelNorm} standardising the conv maps of every served batch (None: as stored);
            may also be set later with `self.norm = ...` (train_head computes it from this data's rows).
    """

    def __init__(self, store: FeatureStore, rows: Sequence[int], *, streams: Sequence[str], conv: bool,
                 pad_to: int, max_ram_gb: float, progress: bool = False, norm: dict | None = None):
        self.store, self.streams, self.conv, self.pad_to = store, tuple(streams), conv, pad_to
        self.norm = norm
        self.rows = np.unique(np.asarray(rows, np.int64))
        self.nbytes = self.bytes_needed(store, len(self.rows), streams=streams, conv=conv, pad_to=pad_to)
        self.in_ram = self.nbytes <= max_ram_gb * 2**30
        self.load_seconds = 0.0
        if self.in_ram:
            started = time.perf_counter()
            self._fill(progress)
            self.load_seconds = time.perf_counter() - started

    @staticmethod
    def bytes_needed(store: FeatureStore, num_rows: int, *, streams: Sequence[str], conv: bool, pad_to: int) -> int:
        """RAM for `num_rows` videos: float16 conv maps, float32 logits and times, masks, labels."""
        per_segment = 4 + 8 + 1  # t, frame, mask
        for stream in streams:
            per_segment += 4 * store.num_classes + (2 * math.prod(store.conv_shape(stream)) if conv else 0)
        return int(num_rows * (pad_to * per_segment + 16))

    def _fill(self, progress: bool) -> None:
        from tqdm import tqdm

        R, N = len(self.rows), self.pad_to
        self._conv = {s: torch.empty((R, N) + self.store.conv_shape(s), dtype=torch.float16) for s in self.streams} \
            if self.conv else {s: None for s in self.streams}
        self._logits = {s: torch.empty(R, N, self.store.num_classes) for s in self.streams}
        self._t, self._frame = torch.empty(R, N), torch.empty(R, N, dtype=torch.int64)
        self._mask, self._label = torch.empty(R, N, dtype=torch.bool), torch.empty(R, dtype=torch.int64)
        bar = tqdm(total=R, desc="loading features into RAM", unit="video", disable=not progress,
                   dynamic_ncols=True, leave=False)
        for start in range(0, R, LOAD_BLOCK):
            part = slice(start, start + LOAD_BLOCK)
            batch = self.store.load(self.rows[part], streams=self.streams, conv=self.conv, pad_to=N)
            for s in self.streams:
                if self.conv:
                    self._conv[s][part] = batch.conv[s]  # float16: the store's own precision
                self._logits[s][part] = batch.logits[s]
            self._t[part], self._frame[part] = batch.t, batch.frame
            self._mask[part], self._label[part] = batch.mask, batch.label
            bar.update(len(batch.label))
        bar.close()

    def load(self, rows: Sequence[int]) -> Batch:
        """The videos `rows` (store rows, any order) as a float32 batch in that order, standardised
        with `self.norm` when it is set."""
        batch = self._load(rows)
        if self.norm is not None and self.conv:
            batch.conv = {s: self.norm[s](v) for s, v in batch.conv.items()}
        return batch

    def _load(self, rows: Sequence[int]) -> Batch:
        rows = np.asarray(rows, np.int64)
        if not self.in_ram:
            return self.store.load(rows, streams=self.streams, conv=self.conv, pad_to=self.pad_to)
        pos = np.searchsorted(self.rows, rows)
        if np.any(pos >= len(self.rows)) or np.any(self.rows[np.minimum(pos, len(self.rows) - 1)] != rows):
            raise KeyError(f"rows {rows.tolist()} are not all held by this SegmentData")
        pos = torch.from_numpy(pos)
        conv = {s: None if v is None else v[pos].float() for s, v in self._conv.items()}
        return Batch(conv, {s: v[pos] for s, v in self._logits.items()}, self._t[pos], self._frame[pos],
                     self._mask[pos], self._label[pos], torch.from_numpy(rows))

    def batches(self, rows: Sequence[int], batch_size: int) -> Iterator[Batch]:
        """`rows` in order, `batch_size` at a time; when streaming, the next batch is read in a
        background thread while the caller works on the current one."""
        chunks = [rows[i:i + batch_size] for i in range(0, len(rows), batch_size)]
        if self.in_ram or len(chunks) < 2:
            yield from (self.load(c) for c in chunks)
            return
        with ThreadPoolExecutor(max_workers=1) as pool:
            pending = pool.submit(self.load, chunks[0])
            for nxt in chunks[1:] + [None]:
                batch = pending.result()
                if nxt is not None:
                    pending = pool.submit(self.load, nxt)
                yield batch


@dataclass(frozen=True)
class ChannelNorm:
    """Per-channel standardisation of conv maps: `(x - mean[c]) / std[c]`, padded segments kept at 0.

    Frozen backbones give features whose channels differ in offset and scale, and the streams differ
    by orders of magnitude (a randomly initialised ResNet-18 on the demo's videos: rgb values 1.26 on
    average with channel means spread by 1.23, flow values 0.05 +- 0.07): the small class-dependent
    part is then slow to find for Adam on a few hundred videos (every demo head sat at chance). Standardising with the training videos' statistics, as any linear probe
    does, fixes that; the statistics are saved in the checkpoint and applied to every later input.

    Attributes:
        mean: (Cf,) float32 mean of each channel over the training videos' real segments and positions.
        std: (Cf,) float32 standard deviation of each channel (floored at 1e-6).
    """

    mean: torch.Tensor
    std: torch.Tensor

    def __call__(self, conv: torch.Tensor | None) -> torch.Tensor | None:
        """(B, N, Cf, ...) or (B, N, Cf) conv features -> standardised, same shape."""
        if conv is None:
            return None
        shape = (-1,) + (1,) * (conv.dim() - 3)  # broadcast over the spatial dims, if any
        return (conv - self.mean.view(shape)) / self.std.view(shape)

    def state(self) -> dict:
        return {"mean": self.mean.clone(), "std": self.std.clone()}

    @classmethod
    def from_state(cls, state: dict) -> ChannelNorm:
        return cls(state["mean"].float(), state["std"].float())


def fit_norms(data: SegmentData, rows: Sequence[int], *, batch_size: int = LOAD_BLOCK) -> dict[str, ChannelNorm]:
    """{stream: ChannelNorm} of the raw features: mean and std of each channel over the real segments
    (all positions) of `rows`, accumulated in float64 in one pass over the data for every stream."""
    rows = np.asarray(rows, np.int64)
    sums = {s: [0.0, 0.0, 0] for s in data.streams}  # sum, sum of squares, count per stream
    for start in range(0, len(rows), batch_size):
        batch = data._load(rows[start:start + batch_size])  # as stored: never through data.norm
        for stream, acc in sums.items():
            x = batch.conv[stream][batch.mask].double()  # (S, Cf, ...)
            x = x.transpose(0, 1).reshape(x.shape[1], -1)  # (Cf, S * positions)
            acc[0], acc[1], acc[2] = acc[0] + x.sum(1), acc[1] + (x * x).sum(1), acc[2] + x.shape[1]
    norms = {}
    for stream, (total, total_sq, count) in sums.items():
        if not count:
            raise ValueError(f"no real segments of stream {stream!r} to standardise with; extract features first")
        mean = total / count
        std = (total_sq / count - mean * mean).clamp_min(0).sqrt().clamp_min(1e-6)
        norms[stream] = ChannelNorm(mean.float(), std.float())
    return norms


def head_input(batch: Batch, streams: Sequence[str], device: torch.device, joint: bool):
    """A `SegmentBatch` on `device` (or {stream: SegmentBatch} for joint-attn) from a store Batch."""
    parts = {s: SegmentBatch(conv=batch.conv.get(s), logits=batch.logits[s], t=batch.t, mask=batch.mask).to(device)
             for s in streams}
    return parts if joint else parts[streams[0]]


def needs_conv(head: str, score_source: str, datp_input: str) -> bool:
    """Whether the head reads conv maps (everything but avg/max/softmax-datp on cached scores)."""
    if not HEADS[head].uses_scores:
        return True
    return score_source == "linear" or (head == "datp" and datp_input == "conv")


# ---------------------------------------------------------------- predictions


@torch.no_grad()
def predict(head: nn.Module, data: SegmentData, rows: Sequence[int], *, batch_size: int,
            device: torch.device, segment_scores: bool = False) -> dict[str, np.ndarray]:
    """Run a head (in eval mode) over `rows`.

    Returns:
        {"rows" (V,), "labels" (V,), "logits" (V, C), "weights" (V, N), "mask" (V, N), "t" (V, N),
        "frame" (V, N), and with `segment_scores` "segment_scores" (V, N, C) (absent for heads
        without per-segment class scores, see `segment_class_scores`)}; {} when `rows` is empty.
    """
    head.eval()
    joint = isinstance(head, HEADS["joint-attn"])
    rows = np.asarray(rows, np.int64)
    # The outputs are filled into arrays allocated once: small per-batch arrays kept until the end
    # land in the holes the large per-batch tensors leave in glibc's heap, which then cannot reuse
    # them; RSS grew by one batch of conv maps per batch (1.7 GiB over 2,000 videos) before.
    out: dict[str, np.ndarray] = {}
    start = 0
    for batch in data.batches(rows, batch_size):
        x = head_input(batch, data.streams, device, joint)
        result = head(x)
        values = {"rows": batch.index, "labels": batch.label, "logits": result.logits.float(),
                  "weights": result.weights.float(), "mask": batch.mask, "t": batch.t, "frame": batch.frame}
        if segment_scores:
            scores = segment_class_scores(head, x)
            if scores is not None:
                values["segment_scores"] = scores.float()
        B = len(batch.label)
        for key, value in values.items():
            value = value.cpu().numpy()
            if key not in out:
                out[key] = np.empty((len(rows),) + value.shape[1:], value.dtype)
            out[key][start:start + B] = value
        start += B
    return out


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


def _better(val: dict, best: dict | None) -> bool:
    """Higher val top-1 wins; equal top-1: lower val loss; no validation: the later epoch."""
    if best is None or val["val_top1"] is None:
        return True
    return (val["val_top1"], -val["val_loss"]) > (best["val_top1"], -best["val_loss"])


# ---------------------------------------------------------------- knowledge transfer


@dataclass
class Transfer:
    """TSRNet's trimmed-to-untrimmed transfer term of one run (docs/detection.md, "Knowledge transfer").

    Attributes:
        data: the trimmed store's videos of split "train", with conv maps.
        rows: those videos' rows in the trimmed store.
        seed: `HeadConfig.seed`.
        layer: fc1, the head's `transfer_layer()` (set once the head is built).
    """

    data: SegmentData
    rows: np.ndarray
    seed: int
    layer: nn.Module | None = None

    def batches(self, epoch: int, *, steps: int, batch_size: int) -> Iterator[Batch]:
        """`steps` batches of min(batch_size, videos) distinct trimmed videos for one epoch: consecutive
        windows over a permutation seeded by (seed, epoch), cycled when the epoch has more steps."""
        size = min(batch_size, len(self.rows))
        order = np.random.default_rng([self.seed, epoch, 2]).permutation(self.rows)
        return self.data.batches(order[np.arange(steps * size) % len(order)], size)


def open_transfer(cfg: HeadConfig, store: FeatureStore, trimmed: FeatureStore, *, streams: Sequence[str],
                  max_ram_gb: float, progress: bool = False) -> tuple[Transfer, dict]:
    """The trimmed store's training videos for `cfg`'s transfer term, checked against the untrimmed store.

    Returns:
        The `Transfer` (without its layer) and config.json's "transfer" entry.

    Raises:
        ValueError: the trimmed store lacks a stream, has another conv channel count, or has no done
            videos of split "train".
    """
    for stream in streams:
        if stream not in trimmed.streams:
            raise ValueError(f"--transfer-from {trimmed.path} has no '{stream}/conv' but {store.path} is trained on "
                             f"{stream}; extract the trimmed features with --streams {stream}")
        ours, theirs = store.conv_shape(stream)[0], trimmed.conv_shape(stream)[0]
        if ours != theirs:
            raise ValueError(f"--transfer-from {trimmed.path} has {theirs}-channel {stream} features but {store.path} "
                             f"has {ours}; extract both stores with the same backbone")
    rows = trimmed.indices("train")
    if not len(rows):
        raise ValueError(f"--transfer-from {trimmed.path} has no done videos of split 'train'; the transfer draws "
                         "its trimmed batches from that split")
    data = SegmentData(trimmed, rows, streams=streams, conv=True, pad_to=int(trimmed.lengths(rows).max()),
                       max_ram_gb=max_ram_gb, progress=progress)
    summary = {"from": str(trimmed.path.resolve()), "mmd_weight": cfg.mmd_weight, "videos": len(rows),
               "bandwidth": f"median heuristic x {list(DEFAULT_SCALES)} per batch and term", "max_rows": MAX_ROWS,
               "data": "ram" if data.in_ram else "streamed", "store": store_summary(trimmed)}
    return Transfer(data, rows, cfg.seed), summary


# ---------------------------------------------------------------- train_head


def head_options(cfg: HeadConfig, *, score_source: str, num_classes: int, num_segments: int,
                 in_channels, map_size: int | None = None) -> dict:
    """Every constructor keyword argument of the head `cfg.head` (what the checkpoint stores)."""
    opts = {"num_classes": num_classes, "num_segments": num_segments, "in_channels": in_channels,
            "dropout": cfg.dropout}
    if HEADS[cfg.head].uses_scores:
        opts["score_source"] = score_source
    if cfg.head == "datp":
        opts |= {"input": cfg.datp_input, "generator": cfg.generator, "num_gaussians": cfg.gaussians,
                 "pooled_scores": cfg.pooled_scores}
        if map_size is not None:
            opts["map_size"] = map_size
    elif cfg.head == "lstm-attn":
        opts["hidden"] = cfg.hidden
    elif cfg.head == "self-attn":
        opts |= {"attn_hidden": cfg.attn_hidden, "attention": cfg.attention}
    elif cfg.head == "joint-attn":
        opts |= {"attn_hidden": cfg.attn_hidden, "streams": ["rgb", "flow"]}
    return opts


def _build(name: str, options: dict) -> nn.Module:
    options = dict(options)
    if "streams" in options:
        options["streams"] = tuple(options["streams"])
    return build_head(name, **options)


def train_head(cfg: HeadConfig, *, progress: bool = True) -> dict:
    """Train, select on validation, test, and write RUN_DIR (see the module docstring).

    Returns:
        metrics.json's content plus "out" (the run folder).

    Raises:
        StoreError: the store is missing or lacks a stream the head needs.
        ValueError: settings that do not fit the store (e.g. cached scores over other classes).
    """
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
        config = json.loads(json.dumps(config, default=_plain))  # plain types: weights_only-safe
        out = Path(cfg.out)
        out.mkdir(parents=True, exist_ok=True)
        _write_json(out / "config.json", config)

        devices = [device] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(cfg.seed)
            head = _build(cfg.head, options).to(device)
            if transfer is not None:
                transfer.layer = head.transfer_layer()
                config["transfer"]["fc1"] = next(n for n, m in head.named_modules() if m is transfer.layer)
                _write_json(out / "config.json", config)
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
                if _better(val, best):
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

    checkpoint = {"datp_head_checkpoint": CHECKPOINT_VERSION, "head": cfg.head, "head_options": options,
                  "state_dict": {k: v.detach().cpu() for k, v in head.state_dict().items()},
                  "class_names": class_names, "stream": cfg.stream, "config": config,
                  "input_norm": None if norm is None else {s: n.state() for s, n in norm.items()}}
    with atomic_path(out / "checkpoint.pt") as tmp:
        torch.save(checkpoint, tmp)
    _write_json(out / "metrics.json", result)
    if progress:
        top1 = "no test split" if test["top1"] is None else f"test top-1 {test['top1']:.4f}"
        print(f"train-head {cfg.head} ({cfg.stream}): best epoch {best['epoch']}, {top1}; wrote {out}")
    return {**result, "out": str(out)}


def _write_json(path: Path, obj) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, default=_plain))


def _plain(value):
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


# ---------------------------------------------------------------- runs


@dataclass
class Run:
    """A trained head rebuilt from RUN_DIR/checkpoint.pt.

    Attributes:
        head: the module, in eval mode, on the requested device.
        name: head name; stream: "rgb" | "flow" | "both"; streams: the streams it reads.
        class_names, options (constructor kwargs), config (config.json's content), path (RUN_DIR),
        device (where the head is), norm ({stream: ChannelNorm} the head's inputs pass through, or None).
    """

    head: nn.Module
    name: str
    stream: str
    streams: tuple[str, ...]
    class_names: list[str]
    options: dict
    config: dict
    path: Path
    device: torch.device
    norm: dict | None = None

    @property
    def score_source(self) -> str | None:
        return self.options.get("score_source")


def load_run(run_dir: str | Path, *, device: str | torch.device = "cpu") -> Run:
    """Rebuild the head of a `train_head` run from its checkpoint (`torch.load(weights_only=True)`)."""
    path = Path(run_dir) / "checkpoint.pt"
    if not path.is_file():
        raise ValueError(f"{run_dir} has no checkpoint.pt; pass a RUN_DIR written by datp train-head")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # an unsafe or damaged file: say so in one line
        lines = str(err).splitlines() or [type(err).__name__]
        reason = next((line.strip() for line in lines if "Unsupported global" in line), lines[0].strip())
        raise ValueError(f"{path} cannot be loaded safely (weights_only=True): {reason}; train the run again "
                         "with this datp") from None
    if not isinstance(ckpt, dict) or ckpt.get("datp_head_checkpoint") != CHECKPOINT_VERSION:
        raise ValueError(f"{path} is not a datp head checkpoint (version {CHECKPOINT_VERSION})")
    head = _build(ckpt["head"], ckpt["head_options"])
    head.load_state_dict(ckpt["state_dict"])
    device = resolve_device(device) if isinstance(device, str) else device
    stream = ckpt["stream"]
    norm = ckpt.get("input_norm")
    norm = None if norm is None else {s: ChannelNorm.from_state(v) for s, v in norm.items()}
    return Run(head.to(device).eval(), ckpt["head"], stream, ("rgb", "flow") if stream == "both" else (stream,),
               list(ckpt["class_names"]), dict(ckpt["head_options"]), ckpt["config"], Path(run_dir), device, norm)


def run_data(run: Run, store: FeatureStore, rows: Sequence[int], *, max_ram_gb: float = 0.0) -> SegmentData:
    """The data a run's head reads for `rows` of `store`, checked against the run.

    Raises:
        StoreError: a stream the run needs is missing.
        ValueError: other classes, other conv shapes, or more segments than a datp head was built for.
    """
    for stream in run.streams:
        store.require(stream)
    classes = dataset_classes(store)
    if classes != run.class_names:
        raise ValueError(f"{store.path.name} has classes {classes[:3]}... ({len(classes)}) but the run "
                         f"{run.path} was trained on {run.class_names[:3]}... ({len(run.class_names)})")
    channels = run.options["in_channels"]
    for stream in run.streams:
        want = channels[stream] if isinstance(channels, dict) else channels
        if store.conv_shape(stream)[0] != want:
            raise ValueError(f"{store.path.name} has {store.conv_shape(stream)[0]}-channel {stream} features but "
                             f"the run was trained on {want}; use the store the run was trained on")
    pad_to = int(store.lengths(rows).max(initial=1))
    if run.name == "datp":
        if pad_to > run.options["num_segments"]:
            raise ValueError(f"{store.path.name} has videos of {pad_to} segments but the datp head was built for "
                             f"{run.options['num_segments']}")
        pad_to = run.options["num_segments"]
    conv = needs_conv(run.name, run.score_source or "linear", run.options.get("input", "conv"))
    return SegmentData(store, rows, streams=run.streams, conv=conv, pad_to=pad_to, max_ram_gb=max_ram_gb,
                       norm=run.norm)


def predict_run(run_dir: str | Path, *, features: str | Path | None = None, split: str = "test",
                batch_size: int = 64, device: str = "cpu", max_ram_gb: float = 0.0) -> dict:
    """Score split `split` of a store (default: the run's own store) with a trained run.

    Returns:
        `predict`'s arrays (with segment scores) plus "ids" and "class_names".
    """
    run = load_run(run_dir, device=device)
    features = features or run.config["store"]["path"]
    with FeatureStore(features) as store:
        rows = store.indices(split)
        if not len(rows):
            raise ValueError(f"{store.path.name} has no videos of split {split!r}")
        data = run_data(run, store, rows, max_ram_gb=max_ram_gb)
        p = predict(run.head, data, rows, batch_size=batch_size, device=run.device, segment_scores=True)
        p["ids"] = [store.ids[i] for i in p["rows"]]
    p["class_names"] = run.class_names
    return p
