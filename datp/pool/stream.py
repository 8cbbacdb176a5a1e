"""Batches of a feature store read ahead in a worker process, for training on stores larger than RAM.

`SegmentData` streams from the store when its arrays do not fit `max_ram_gb`. Reading a batch is
mostly HDF5 decompression, which a thread of the training process cannot overlap with training well
(h5py serialises its calls under one lock, and the reads compete with the training thread for the
interpreter), so large stores are read by one `torch.utils.data.DataLoader` worker process with its
own h5py handle: it reads, converts and standardises batch k+1..k+`PREFETCH` while the training
process steps on batch k, and hands them over in shared memory. The worker persists for the life of
the `StoreReader` (starting a Python process with torch costs seconds), exits when its parent dies
(DataLoader's watchdog), and returns exactly what `FeatureStore.load` + `ChannelNorm` give in the
training process (tested). Like any spawned worker it re-imports the main module of a script: call
`train_head` from a script under `if __name__ == "__main__":` (the `datp` command needs nothing).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

PREFETCH = 4  # batches read ahead by the worker


class _StoreRows(Dataset):
    """Item = a batch: `self[rows]` is `FeatureStore.load(rows)`, standardised; opened lazily in the worker."""

    def __init__(self, path: Path, *, streams: Sequence[str], conv: bool, pad_to: int, norm: Mapping | None):
        self.path, self.streams, self.conv, self.pad_to, self.norm = path, tuple(streams), conv, pad_to, norm
        self._store = None

    def __getitem__(self, rows):
        from datp.extract.store import FeatureStore

        if self._store is None:
            self._store = FeatureStore(self.path)
        # float16 from the file straight into the batch, standardised in float16 (`ChannelNorm.half`):
        # half the bytes to hand over, no conversion pass here; the training process converts to float32
        # as it does for its in-RAM copy, so the numbers are the same.
        batch = self._store.load(np.asarray(rows, np.int64), streams=self.streams, conv=self.conv, pad_to=self.pad_to,
                                 conv_dtype=torch.float16)
        if self.norm is not None and self.conv:
            batch.conv = {s: self.norm[s].half(v) for s, v in batch.conv.items()}
        return batch

    def __getstate__(self):  # the h5py handle stays in the process that opened it
        return {**self.__dict__, "_store": None}


class _Chunks(Sampler):
    """The row chunks of the next pass; set before each pass (the loader's workers persist)."""

    def __init__(self):
        self.chunks: list[np.ndarray] = []

    def __iter__(self):
        return iter(self.chunks)

    def __len__(self):
        return len(self.chunks)


def _one_thread(worker_id: int) -> None:
    torch.set_num_threads(1)  # the conversion ops are small; leave the cores to the training process


def _as_is(batch):
    return batch


class StoreReader:
    """Reads row chunks of a store in one persistent worker process, `PREFETCH` batches ahead."""

    def __init__(self, path: str | Path, *, streams: Sequence[str], conv: bool, pad_to: int, norm: Mapping | None):
        self._chunks = _Chunks()
        self._loader = DataLoader(
            _StoreRows(Path(path), streams=streams, conv=conv, pad_to=pad_to, norm=norm), sampler=self._chunks,
            batch_size=None, collate_fn=_as_is, num_workers=1, persistent_workers=True, prefetch_factor=PREFETCH,
            worker_init_fn=_one_thread, multiprocessing_context="spawn")

    def batches(self, chunks: Sequence[np.ndarray]) -> Iterator:
        """The batches of `chunks`, in order."""
        self._chunks.chunks = list(chunks)
        for batch in self._loader:
            batch.conv = {s: None if v is None else v.float() for s, v in batch.conv.items()}
            yield batch

    def close(self) -> None:
        """Stop the worker (also done when the reader is garbage collected)."""
        iterator = getattr(self._loader, "_iterator", None)
        if iterator is not None:
            iterator._shutdown_workers()
            self._loader._iterator = None
