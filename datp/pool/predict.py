"""Scoring with a head: `predict` (a head over store rows -> logits, weights, masks, times),
`segment_class_scores` (per-segment class scores for plots), `run_data` (a store's rows checked
against a trained run) and `predict_run` (a run folder over a store's split).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from datp.extract.store import FeatureStore
from datp.pool.config import needs_conv
from datp.pool.data import SegmentData, dataset_classes, head_input
from datp.pool.heads import HEADS
from datp.pool.heads.attention import JointAttnHead, SelfAttnHead
from datp.pool.heads.base import pooled_features, resolve_mask
from datp.pool.runs import Run, load_run


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


@torch.no_grad()
def predict(head: nn.Module, data: SegmentData, rows: Sequence[int], *, batch_size: int,
            device: torch.device, segment_scores: bool = False) -> dict[str, np.ndarray]:
    """Run a head (in eval mode) over `rows`, on all of `data`'s streams.

    Returns:
        {"rows" (V,), "labels" (V,), "logits" (V, C), "weights" (V, N), "mask" (V, N), "t" (V, N),
        "frame" (V, N), and with `segment_scores` "segment_scores" (V, N, C) (absent for heads
        without per-segment class scores, see `segment_class_scores`)}; {} when `rows` is empty.
    """
    return predict_many([(head, data.streams)], data, rows, batch_size=batch_size, device=device,
                        segment_scores=segment_scores)[0]


@torch.no_grad()
def predict_many(heads: Sequence[tuple[nn.Module, Sequence[str]]], data: SegmentData, rows: Sequence[int], *,
                 batch_size: int, device: torch.device, segment_scores: bool = False) -> list[dict[str, np.ndarray]]:
    """`predict` for several (head, streams) pairs from one pass over the data: one dict per head."""
    for head, _ in heads:
        head.eval()
    rows = np.asarray(rows, np.int64)
    # The outputs are filled into arrays allocated once: small per-batch arrays kept until the end
    # land in the holes the large per-batch tensors leave in glibc's heap, which then cannot reuse
    # them; RSS grew by one batch of conv maps per batch (1.7 GiB over 2,000 videos) before.
    outs: list[dict[str, np.ndarray]] = [{} for _ in heads]
    start = 0
    for batch in data.batches(rows, batch_size):
        B = len(batch.label)
        for (head, streams), out in zip(heads, outs):
            x = head_input(batch, tuple(streams), device, isinstance(head, HEADS["joint-attn"]))
            result = head(x)
            values = {"rows": batch.index, "labels": batch.label, "logits": result.logits.float(),
                      "weights": result.weights.float(), "mask": batch.mask, "t": batch.t, "frame": batch.frame}
            if segment_scores:
                scores = segment_class_scores(head, x)
                if scores is not None:
                    values["segment_scores"] = scores.float()
            for key, value in values.items():
                value = value.cpu().numpy()
                if key not in out:
                    out[key] = np.empty((len(rows),) + value.shape[1:], value.dtype)
                out[key][start:start + B] = value
        start += B
    return outs


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


def predict_to_folder(run_dir: str | Path, out: str | Path, *, features: str | Path | None = None,
                      split: str = "test", batch_size: int = 64, device: str = "cpu",
                      max_ram_gb: float = 0.0) -> dict:
    """`datp predict`: score split `split` of a store with a trained run and write OUT as train-head
    writes its test predictions (predictions.h5, weights.csv, metrics.json, config.json), so that
    `datp evaluate` fuses and `datp localize`'s readers read it like a train-head run's.

    Returns:
        The metrics written to OUT/metrics.json.

    Raises:
        ValueError: a store or split the run cannot score, or an OUT that holds another kind of output.
    """
    import datp
    from datp.pool.metrics import metrics
    from datp.pool.runs import run_folder, write_json, write_predictions

    with run_folder(out, kind="predict") as folder:  # checked before any work
        run = load_run(run_dir, device=device)
        features = features or run.config["store"]["path"]
        with FeatureStore(features) as store:
            rows = store.indices(split)
            if not len(rows):
                raise ValueError(f"{store.path.name} has no done videos of split {split!r}; its splits are "
                                 f"{sorted(set(store.splits.tolist()))}")
            data = run_data(run, store, rows, max_ram_gb=max_ram_gb)
            p = predict(run.head, data, rows, batch_size=batch_size, device=run.device, segment_scores=True)
            data.close()
            write_predictions(folder, p, ids=[store.ids[i] for i in p["rows"]], class_names=run.class_names,
                              num_frames=store.num_frames[p["rows"]], fps=store.fps[p["rows"]],
                              attrs={"head": run.name, "stream": run.stream, "split": split})
            result = metrics(p["logits"], p["labels"], run.class_names)
            write_json(folder / "config.json", {"run": str(Path(run_dir).resolve()), "features": str(store.path.resolve()),
                                                "split": split, "head": run.name, "stream": run.stream,
                                                "versions": {"datp": datp.__version__, "torch": str(torch.__version__)}})
        write_json(folder / "metrics.json", result)
    return result
