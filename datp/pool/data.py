"""What stage two reads from a feature store: the dataset's classes, the train/validation/test rows
(`split_rows`), and `SegmentData`, which serves padded batches of store rows from RAM or straight from
the HDF5 store, standardised with `ChannelNorm`.

Costs (`bench/heads.py`): in RAM, the conv maps are standardised once, in place, when the norm is
set, so a batch costs one gather and one float16 -> float32 conversion, as a bare training loop
over an in-memory tensor does; streamed, batches are read ahead by a worker process
(`datp.pool.stream.StoreReader`) when the data is larger than `PROCESS_READER_BYTES`, else by a
background thread. Both give the same numbers, bit for bit: `ChannelNorm` rounds what it returns
to float16, the store's precision, as the in-RAM copy holds it.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from datp.extract.store import Batch, FeatureStore
from datp.io.datasets import class_names_or_numbers
from datp.io.splits import split_validation
from datp.pool.heads import SegmentBatch

LOAD_BLOCK = 64  # videos per read when filling RAM (bounds the float32 temporary of FeatureStore.load)
# Streamed data above this size is read by a worker process; below it a thread is enough and starting a
# process (seconds: it imports torch) would cost more than it saves. Measured on the 2-core box
# (bench/heads.py, 2,000 videos of 512x7x7): the thread reader took 4.0x the bare epoch.
PROCESS_READER_BYTES = 256 << 20


def dataset_classes(store: FeatureStore) -> list[str]:
    """The dataset's class names: the store's, else "0", "1", ... up to the largest label."""
    names = class_names_or_numbers(store.class_names or [], store.labels)
    if not names:
        raise ValueError(f"{store.path.name} has no class names and no labels; extract features of a "
                         "labelled dataset")
    return names


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

    Validation: the store's videos of split "val" when it has any, else `val_fraction` of the train
    videos by the one rule of train-head and finetune, `datp.io.splits.split_validation` (stratified
    by label when possible; `info["stratified"]` says whether it was). Test rows are split "test" only.
    """

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
        keep, held, info["stratified"] = split_validation(store.labels[train], val_fraction, seed)
        train, val = np.sort(train[keep]), np.sort(train[held])
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
            may also be set once later with `self.norm = ...` (train_head computes it from this data's
            raw rows with `fit_norms`, which reads them through `_load` before the norm is set).
    """

    def __init__(self, store: FeatureStore, rows: Sequence[int], *, streams: Sequence[str], conv: bool,
                 pad_to: int, max_ram_gb: float, progress: bool = False, norm: dict | None = None):
        self.store, self.streams, self.conv, self.pad_to = store, tuple(streams), conv, pad_to
        self._norm, self._reader = None, None
        self.rows = np.unique(np.asarray(rows, np.int64))
        self.nbytes = self.bytes_needed(store, len(self.rows), streams=streams, conv=conv, pad_to=pad_to)
        self.in_ram = self.nbytes <= max_ram_gb * 2**30
        self.load_seconds = 0.0
        if self.in_ram:
            started = time.perf_counter()
            self._fill(progress)
            self.load_seconds = time.perf_counter() - started
        elif self.nbytes > PROCESS_READER_BYTES:
            from datp.pool.stream import StoreReader

            # started now, so the worker's start (seconds) overlaps the caller's statistics pass
            self._reader = StoreReader(store.path, streams=self.streams, conv=conv, pad_to=pad_to)
        self.norm = norm

    @property
    def norm(self) -> dict | None:
        return self._norm

    @norm.setter
    def norm(self, norm: dict | None) -> None:
        if norm is None:
            return
        if self._norm is not None:
            raise RuntimeError("SegmentData.norm is set once: the in-RAM copy is standardised in place")
        self._norm = norm
        if self.in_ram and self.conv:
            for stream, conv in self._conv.items():  # once, in place, a block at a time
                for start in range(0, len(conv), LOAD_BLOCK):
                    conv[start:start + LOAD_BLOCK] = norm[stream].half(conv[start:start + LOAD_BLOCK])

    def close(self) -> None:
        """Stop the read-ahead worker process, if one was started (also done on garbage collection)."""
        if getattr(self, "_reader", None) is not None:
            self._reader.close()
            self._reader = None

    __del__ = close

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
        if self.norm is not None and self.conv and not self.in_ram:  # the RAM copy is standardised already
            batch.conv = {s: self.norm[s](v) for s, v in batch.conv.items()}
        return batch

    def _load(self, rows: Sequence[int]) -> Batch:
        """`load` without standardising streamed batches (the RAM copy is as `norm` left it)."""
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
        """`rows` in order, `batch_size` at a time; when streaming, the next batches are read ahead (by a
        worker process for data over `PROCESS_READER_BYTES`, else by a thread) while the caller works."""
        chunks = [np.asarray(rows[i:i + batch_size], np.int64) for i in range(0, len(rows), batch_size)]
        if self.in_ram or len(chunks) < 2:
            yield from (self.load(c) for c in chunks)
            return
        if self._reader is not None:
            yield from self._reader.batches(chunks, self.norm if self.conv else None)
            return
        with ThreadPoolExecutor(max_workers=1) as pool:
            pending = pool.submit(self.load, chunks[0])
            for nxt in chunks[1:] + [None]:
                batch = pending.result()
                if nxt is not None:
                    pending = pool.submit(self.load, nxt)
                yield batch


def head_input(batch: Batch, streams: Sequence[str], device: torch.device, joint: bool):
    """A `SegmentBatch` on `device` (or {stream: SegmentBatch} for joint-attn) from a store Batch."""
    parts = {s: SegmentBatch(conv=batch.conv.get(s), logits=batch.logits[s], t=batch.t, mask=batch.mask).to(device)
             for s in streams}
    return parts if joint else parts[streams[0]]
