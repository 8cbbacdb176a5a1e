"""Joining the shard stores of one extract-features run into one feature store."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import h5py
import numpy as np

from datp.extract.store.reader import FeatureStore
from datp.extract.store.schema import StoreError, VideoRow, write_videos
from datp.io.atomic import atomic_path, writing


def merge_feature_stores(inputs: Sequence[Path], out: Path, *, copy: bool = False) -> int:
    """Join the shard stores of one extract-features run into one store (rows in input order).

    Without `copy` the big arrays are virtual datasets over the inputs (nothing copied; the
    inputs must stay in place); with `copy` the merged file is self-contained.

    Returns:
        The number of done videos.
    """
    stores = [FeatureStore(p) for p in inputs]
    try:
        first = stores[0]
        skip = ("created", "settings", "index_only")
        for store in stores[1:]:
            a = {k: v for k, v in first.attrs.items() if k not in skip}
            b = {k: v for k, v in store.attrs.items() if k not in skip}
            if str(a) != str(b) or store.streams != first.streams:
                raise StoreError(f"{store.path} was made with other settings than {first.path}; "
                                 "only shards of one run can be merged")
        ids = [i for s in stores for i in s.ids]
        if len(set(ids)) != len(ids):
            raise StoreError("a video is in two of the inputs; merge the shards of one run")
        rows = [VideoRow(i, int(l), str(sp), int(n), float(f), tuple(np.flatnonzero(h).tolist()) if s.multi_label else ())
                for s in stores for i, l, sp, n, f, h in zip(s.ids, s.labels, s.splits, s.num_frames, s.fps,
                                                             s.multi_hot())]
        ragged = first.layout == "ragged"
        with writing(Path(out)), atomic_path(Path(out)) as tmp, h5py.File(tmp, "w") as f:
            f.attrs.update(first.attrs)
            f.attrs["index_only"] = False
            write_videos(f, rows)
            f["done"] = np.concatenate([s.done for s in stores])
            keys = ["segments/t", "segments/frame"] + [f"{st}/{k}" for st in first.streams
                                                        for k in ("conv", "logits")]
            if ragged:
                lengths = np.concatenate([s.length for s in stores])
                f["segments/length"] = lengths
                f["segments/offset"] = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
            for key in keys:
                parts = [s._file[key] for s in stores]
                # A shard whose videos all failed has no per-segment shape (conv (0, 0, 0)): take
                # the shape of a shard that has one; the failed rows are not done and stay zeros.
                tail = next((p.shape[1:] for p in parts if p.size), parts[0].shape[1:])
                model = next(p for p in parts if p.shape[1:] == tail)
                shape = (sum(p.shape[0] for p in parts),) + tail
                if copy:
                    ds = f.create_dataset(key, shape=shape, dtype=model.dtype,
                                          chunks=model.chunks if all(shape) else None,
                                          compression=model.compression)
                    start = 0
                    for p in parts:
                        if p.shape[1:] == tail:
                            for i in range(0, p.shape[0], 256):  # bounded memory per copy
                                ds[start + i:start + min(i + 256, p.shape[0])] = p[i:i + 256]
                        start += p.shape[0]
                else:
                    layout = h5py.VirtualLayout(shape=shape, dtype=model.dtype)
                    start = 0
                    for s, p in zip(stores, parts):
                        if p.shape[0] and p.shape[1:] == tail:
                            name = str(s.path.resolve()).replace("%", "%%")
                            layout[start:start + p.shape[0]] = h5py.VirtualSource(name, key, shape=p.shape)
                        start += p.shape[0]
                    f.create_virtual_dataset(key, layout, fillvalue=0)
        return int(sum(s.done.sum() for s in stores))
    finally:
        for store in stores:
            store.close()
