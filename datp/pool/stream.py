"""Batches of a feature store read ahead in a worker process, for training on stores larger than RAM.

`SegmentData` streams from the store when its arrays do not fit `max_ram_gb`. Reading a batch is
mostly HDF5 reads and decompression, which a thread of the training process cannot overlap with
training well (h5py serialises its calls under one lock, and the reads compete with the training
thread for the interpreter), so large stores are read by one `torch.utils.data.DataLoader` worker
process with its own h5py handle: it reads and standardises batch k+1..k+`PREFETCH` while the
training process steps on batch k. The worker persists for the life of the `StoreReader` (starting
a Python process with torch costs seconds; `SegmentData` starts it as soon as it knows it streams,
so the start overlaps the statistics pass), exits when its parent dies (DataLoader's watchdog), and
returns exactly what `FeatureStore.load` + `ChannelNorm` give in the training process (tested).

The hand-over is a ring of `SLOTS` batch buffers in shared memory that the worker allocates once
and writes into, sending only the slot number per batch. DataLoader's own hand-over puts every
tensor of every batch in a fresh shared-memory segment (an fd sent over a socket, an mmap and its
page faults in the receiver): measured on the 2-core box at 2,000 videos x 10 x 512x7x7, that cost
the training process 15 ms per batch of 32, the difference between 1.54x and ~1.1x of bare compute.
A slot is rewritten only after the training process has copied it out: the loader asks for batch
k + PREFETCH when it hands over batch k, so the worker writes at most PREFETCH batches ahead and
`SLOTS = PREFETCH + 2` buffers never overlap one still in use.

Like any spawned worker it re-imports the main module of a script: call `train_head` from a script
under `if __name__ == "__main__":` (the `datp` command needs nothing).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

PREFETCH = 4  # batches read ahead by the worker
SLOTS = PREFETCH + 2  # shared batch buffers (see the module docstring for why this is enough)

_FIELDS = ("t", "frame", "mask", "label", "index")


def _norm_payload(norm: Mapping | None) -> dict | None:
    """{stream: (mean, std)} as numpy arrays: pickled by value with each request (a few KB), where
    tensors would each travel as a shared-memory segment."""
    return None if norm is None else {s: (n.mean.numpy(), n.std.numpy()) for s, n in norm.items()}


class _StoreRows(Dataset):
    """Item = (rows, norm payload) -> (slot, generation, n, buffers or None); see `StoreReader`."""

    def __init__(self, path: Path, *, streams: Sequence[str], conv: bool, pad_to: int):
        self.path, self.streams, self.conv, self.pad_to = path, tuple(streams), conv, pad_to
        self._store, self._slots, self._sent, self._count, self._generation = None, [], set(), 0, 0

    def __getitem__(self, item):
        from datp.extract.store import FeatureStore
        from datp.pool.standardize import ChannelNorm

        rows, norm = item
        if self._store is None:
            self._store = FeatureStore(self.path)
        # float16 from the file straight into the batch, standardised in float16 (`ChannelNorm.half`):
        # half the bytes to copy; the training process converts to float32 as it does for its in-RAM
        # copy, so the numbers are the same.
        batch = self._store.load(np.asarray(rows, np.int64), streams=self.streams, conv=self.conv,
                                 pad_to=self.pad_to, conv_dtype=torch.float16)
        if norm is not None and self.conv:
            batch.conv = {s: ChannelNorm(torch.from_numpy(m), torch.from_numpy(d)).half(batch.conv[s])
                          for s, (m, d) in norm.items()}
        parts = self._parts(batch)
        slot = self._count % SLOTS
        self._count += 1
        if not self._slots or any(parts[k].shape[1:] != v.shape[1:] or len(parts[k]) > len(v)
                                  for k, v in self._slots[slot].items()):
            self._allocate(parts)
        buffers = self._slots[slot]
        n = len(batch.label)
        for key, value in parts.items():
            buffers[key][:n].copy_(value)
        first = (slot, self._generation) not in self._sent
        self._sent.add((slot, self._generation))
        return slot, self._generation, n, buffers if first else None

    def _parts(self, batch) -> dict[str, torch.Tensor]:
        parts = {f"logits/{s}": v for s, v in batch.logits.items()}
        parts.update({f"conv/{s}": v for s, v in batch.conv.items() if v is not None})
        parts.update({f: getattr(batch, f) for f in _FIELDS})
        return parts

    def _allocate(self, parts: Mapping[str, torch.Tensor]) -> None:
        """A new ring sized for `parts` (at least the biggest batch seen), in shared memory."""
        rows = max([len(next(iter(parts.values())))] + [len(v) for s in self._slots[:1] for v in s.values()])
        self._slots = [{k: torch.empty((rows,) + v.shape[1:], dtype=v.dtype).share_memory_()
                        for k, v in parts.items()} for _ in range(SLOTS)]
        self._generation += 1

    def __getstate__(self):  # the h5py handle and the ring stay in the worker
        return {**self.__dict__, "_store": None, "_slots": [], "_sent": set()}


class _Chunks(Sampler):
    """The requests of the next pass, (rows, norm payload); set before each pass (the worker persists)."""

    def __init__(self):
        self.items: list = []

    def __iter__(self):
        return iter(self.items)

    def __len__(self):
        return len(self.items)


def _one_thread(worker_id: int) -> None:
    torch.set_num_threads(1)  # the conversion ops are small; leave the cores to the training process


def _as_is(batch):
    return batch


class StoreReader:
    """Reads row chunks of a store in one persistent worker process, `PREFETCH` batches ahead."""

    def __init__(self, path: str | Path, *, streams: Sequence[str], conv: bool, pad_to: int):
        self.streams = tuple(streams)
        self._chunks = _Chunks()
        self._buffers: dict = {}  # (slot, generation) -> the worker's shared buffers, mapped once
        self._loader = DataLoader(
            _StoreRows(Path(path), streams=streams, conv=conv, pad_to=pad_to), sampler=self._chunks,
            batch_size=None, collate_fn=_as_is, num_workers=1, persistent_workers=True, prefetch_factor=PREFETCH,
            worker_init_fn=_one_thread, multiprocessing_context="spawn")
        iter(self._loader)  # starts the worker now (it imports torch and h5py while the caller goes on)

    def batches(self, chunks: Sequence[np.ndarray], norm: Mapping | None = None) -> Iterator:
        """The batches of `chunks`, in order, standardised with `norm` ({stream: ChannelNorm}) if given."""
        from datp.extract.store import Batch

        payload = _norm_payload(norm)
        self._chunks.items = [(np.asarray(c, np.int64), payload) for c in chunks]
        for slot, generation, n, buffers in iter(self._loader):  # persistent: the same worker each pass
            if buffers is not None:
                self._buffers = {k: v for k, v in self._buffers.items() if k[1] == generation}
                self._buffers[slot, generation] = buffers
            got = self._buffers[slot, generation]
            # copied out before the next request can reach this slot (float32 for the head, as in RAM)
            out = {k: (v[:n].float() if k.startswith("conv/") else v[:n].clone()) for k, v in got.items()}
            yield Batch({s: out.get(f"conv/{s}") for s in self.streams}, {s: out[f"logits/{s}"] for s in self.streams},
                        *(out[f] for f in _FIELDS))

    def close(self) -> None:
        """Stop the worker (also done when the reader is garbage collected)."""
        iterator = getattr(self._loader, "_iterator", None)
        if iterator is not None:
            iterator._shutdown_workers()
            self._loader._iterator = None
        self._buffers = {}
