"""Reading a feature store: `FeatureStore` and the padded `Batch` it serves (stage two's input).

See `datp.extract.store` for the layout.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import h5py
import numpy as np
import torch

from datp.extract.store.schema import KIND, SCHEMA, STREAMS, StoreError, plain_attrs
from datp.io.h5header import check_header, open_h5


@dataclass
class Batch:
    """A padded batch of videos (stage two's input).

    Attributes:
        conv: {stream: (B, N, Cf, h, w) float32}.
        logits: {stream: (B, N, C) float32}.
        t: (B, N) segment centre times; frame: (B, N) first frame indices.
        mask: (B, N) bool, True for real segments.
        label: (B,) int64; index: (B,) rows in the store.
    """

    conv: dict[str, torch.Tensor]
    logits: dict[str, torch.Tensor]
    t: torch.Tensor
    frame: torch.Tensor
    mask: torch.Tensor
    label: torch.Tensor
    index: torch.Tensor

    def softmax(self, stream: str) -> torch.Tensor:
        """(B, N, C) class probabilities derived from the stored logits."""
        return self.logits[stream].softmax(-1)


class FeatureStore:
    """Read a feature store, checking its schema.

    Example:
        >>> store = FeatureStore("features.h5")
        >>> batch = store.load(store.indices("train")[:8], streams=["rgb"])
    """

    def __init__(self, path: str | Path, *, allow_unfinished: bool = False):
        """Open and check the store at `path`.

        Args:
            allow_unfinished: also open the index an interrupted (or running) extract-features
                leaves (`index_only`), e.g. to look at it; stage two never does.

        Raises:
            StoreError: not a readable feature store, unfinished, data it links to missing, or
                shapes that disagree with its attrs (the message says what to run).
        """
        self.path = Path(path)
        if not self.path.is_file():
            raise StoreError(f"{self.path}: no such feature store; run datp extract-features first")
        self._file = open_h5(self.path, "feature store")
        try:
            self._open(allow_unfinished)
        except BaseException:
            self._file.close()
            raise

    def _open(self, allow_unfinished: bool) -> None:
        a = self._file.attrs
        check_header(a, self.path, kind=KIND, schema=SCHEMA, noun="feature store",
                     fix="re-extract or use a matching datp")
        if a.get("index_only", False) and not allow_unfinished:
            raise StoreError(f"{self.path} is unfinished: an index over {self.path.name}.parts/ "
                             "left by an interrupted or running datp extract-features; rerun the "
                             "same extract-features command to finish it")
        for key in ("videos/id", "videos/label", "videos/split", "done", "segments/t"):
            if key not in self._file:
                raise StoreError(f"{self.path} lacks {key!r}; the file is incomplete")
        check_sources(self._file, self.path)
        self.layout = str(a["layout"])
        self.num_segments = int(a["num_segments"]) if self.layout == "fixed" else None
        self.class_names = json.loads(a["class_names"])
        self.attrs = plain_attrs(a)
        self.streams = [s for s in STREAMS if f"{s}/conv" in self._file]
        self.ids = [v.decode() if isinstance(v, bytes) else str(v) for v in self._file["videos/id"][:]]
        self.labels = self._file["videos/label"][:]
        self.splits = np.array([v.decode() if isinstance(v, bytes) else str(v)
                                for v in self._file["videos/split"][:]])
        self.num_frames = self._file["videos/num_frames"][:]
        self.fps = self._file["videos/fps"][:]
        self.done = self._file["done"][:]
        self.multi_label = "videos/labels" in self._file  # the optional multi-hot column
        if self.layout == "ragged":
            self.offset = self._file["segments/offset"][:]
            self.length = self._file["segments/length"][:]
        check_shapes(self)

    def __enter__(self) -> "FeatureStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._file.close()

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def num_classes(self) -> int:
        """Classes of the stored logits (the backbone's classifier)."""
        return int(self._file[f"{self.streams[0]}/logits"].shape[-1]) if self.streams else 0

    def multi_hot(self, num_classes: int | None = None) -> np.ndarray:
        """(V, C) uint8 labels: the store's multi-hot `videos/labels` column (imported multi-label
        videos, e.g. THUMOS14), else one-hot of `videos/label` (-1: a row of zeros). C is the
        column's width, else `num_classes` (default: the class names, or the largest label + 1)."""
        if self.multi_label:
            return self._file["videos/labels"][:].astype(np.uint8)
        C = num_classes or len(self.class_names) or int(self.labels.max(initial=-1)) + 1
        out = np.zeros((len(self.ids), C), np.uint8)
        known = np.flatnonzero(self.labels >= 0)
        out[known, self.labels[known]] = 1
        return out

    def conv_shape(self, stream: str) -> tuple[int, ...]:
        """The shape of one segment's features: (Cf, h, w) conv maps, or (D,) feature vectors."""
        self.require(stream)
        shape = self._file[f"{stream}/conv"].shape
        return tuple(shape[2:] if self.layout == "fixed" else shape[1:])

    def require(self, stream: str, field: str = "conv") -> None:
        """Raise a clear StoreError if `<stream>/<field>` is missing."""
        if f"{stream}/{field}" not in self._file:
            raise StoreError(f"{self.path.name} has no '{stream}/{field}'; run datp "
                             f"extract-features --streams {stream} first (it has: "
                             f"{', '.join(self.streams) or 'no streams'})")

    def indices(self, split: str | None = None) -> np.ndarray:
        """Rows that are done (and in `split`, when given)."""
        keep = self.done.copy()
        if split is not None:
            keep &= self.splits == split
        return np.flatnonzero(keep)

    def lengths(self, indices: Iterable[int]) -> np.ndarray:
        idx = np.asarray(list(indices), np.int64)
        return self.length[idx] if self.layout == "ragged" else np.full(len(idx), self.num_segments)

    def _rows(self, i: int):
        if self.layout == "ragged":
            return slice(int(self.offset[i]), int(self.offset[i] + self.length[i]))
        return int(i)

    def load(self, indices: Iterable[int], *, streams: Sequence[str] = ("rgb",),
             conv: bool = True, pad_to: int | None = None, conv_dtype: torch.dtype = torch.float32) -> Batch:
        """Load videos as a padded batch of float32 tensors (conv maps in `conv_dtype`).

        Args:
            indices: store rows (e.g. from `indices("train")`).
            streams: streams to load; each must exist.
            conv: load the conv maps too (the largest part); logits are always loaded.
            pad_to: pad to this many segments (default: the longest video of the batch).
            conv_dtype: float32, or float16 (the stored precision: read straight into the batch,
                without a conversion pass; what stage two's streaming reader asks for).
        """
        idx = np.asarray(list(indices), np.int64)
        for stream in streams:
            self.require(stream)
        lengths = self.lengths(idx)
        n = int(pad_to or (lengths.max(initial=0)))
        B = len(idx)
        mask = torch.zeros(B, n, dtype=torch.bool)
        t = torch.zeros(B, n)
        frame = torch.zeros(B, n, dtype=torch.int64)
        convs, logits = {}, {}
        for stream in streams:
            cshape = self.conv_shape(stream)
            C = self._file[f"{stream}/logits"].shape[-1]
            convs[stream] = torch.zeros((B, n) + tuple(cshape), dtype=conv_dtype) if conv else None
            logits[stream] = torch.zeros(B, n, C)
        if self.layout == "fixed" and B:
            order = np.argsort(idx)  # h5py fancy indexing needs increasing indices
            sorted_idx = idx[order]
            inv = np.argsort(order)
            t[:, :self.num_segments] = torch.from_numpy(self._file["segments/t"][sorted_idx][inv])
            frame[:, :self.num_segments] = torch.from_numpy(
                self._file["segments/frame"][sorted_idx][inv])
            mask[:, :self.num_segments] = True
            for stream in streams:
                if conv:
                    # one chunk (= one video) per read: h5py's fancy indexing over the first axis
                    # is 6-8x slower than reading the rows one by one (bench/heads.py)
                    dataset = self._file[f"{stream}/conv"]
                    direct = conv_dtype == torch.float16 and dataset.dtype == np.float16 and n == self.num_segments
                    row = None if direct else np.empty(dataset.shape[1:], dataset.dtype)
                    for b, i in enumerate(idx):
                        if direct:  # straight into the batch's memory
                            dataset.read_direct(convs[stream][b].numpy(), np.s_[int(i)])
                        else:
                            dataset.read_direct(row, np.s_[int(i)])
                            convs[stream][b, :self.num_segments] = torch.from_numpy(row)
                logits[stream][:, :self.num_segments] = torch.from_numpy(
                    self._file[f"{stream}/logits"][sorted_idx][inv])
        else:
            for b, i in enumerate(idx):
                rows, m = self._rows(i), int(lengths[b])
                mask[b, :m] = True
                t[b, :m] = torch.from_numpy(self._file["segments/t"][rows])
                frame[b, :m] = torch.from_numpy(self._file["segments/frame"][rows])
                for stream in streams:
                    if conv:
                        convs[stream][b, :m] = torch.from_numpy(self._file[f"{stream}/conv"][rows]).to(conv_dtype)
                    logits[stream][b, :m] = torch.from_numpy(self._file[f"{stream}/logits"][rows])
        return Batch(convs, logits, t, frame, mask, torch.from_numpy(self.labels[idx]),
                     torch.from_numpy(idx))


def check_sources(f: h5py.File, path: Path) -> None:
    """Raise StoreError when a virtual dataset of `f` reads a file that is gone (a moved or
    deleted parts folder or shard store would read as zeros)."""
    for key in [k for s in STREAMS for k in (f"{s}/conv", f"{s}/logits") if k in f] + [
            "segments/t", "segments/frame"]:
        if key in f and f[key].is_virtual:
            for source in f[key].virtual_sources():
                name = source.file_name.replace("%%", "%")
                if name != "." and not Path(name).is_file():
                    raise StoreError(f"{path}: {key} reads {name}, which is missing (a parts "
                                     "folder or shard store moved or deleted); rerun the "
                                     "extract-features (or merge) that wrote it")


def check_shapes(store: FeatureStore) -> None:
    """Raise StoreError when the arrays of `store` disagree with its attrs and with each other."""
    f, V = store._file, len(store.ids)

    def bad(what: str) -> StoreError:
        return StoreError(f"{store.path} is damaged or inconsistent: {what}; re-extract it")

    for key in ("videos/label", "videos/split", "videos/num_frames", "videos/fps", "done"):
        if key in f and f[key].shape != (V,):
            raise bad(f"{key} has shape {f[key].shape} for {V} videos")
    if "videos/labels" in f and (f["videos/labels"].ndim != 2 or f["videos/labels"].shape[0] != V):
        raise bad(f"videos/labels has shape {f['videos/labels'].shape}, not ({V}, classes)")
    streams = [(k, f[k]) for s in store.streams for k in (f"{s}/conv", f"{s}/logits")]
    if store.layout == "fixed":
        N = store.num_segments
        for key in ("segments/t", "segments/frame"):
            if f[key].shape != (V, N):
                raise bad(f"{key} has shape {f[key].shape}, not ({V}, {N})")
        for key, ds in streams:
            conv_ndim = (5, 3)  # conv: (V, N, Cf, h, w) maps or (V, N, D) feature vectors
            if ds.shape[:2] != (V, N) or ds.ndim not in (conv_ndim if key.endswith("conv") else (3,)):
                raise bad(f"{key} has shape {ds.shape} for {V} videos of {N} segments")
        return
    S = int(f["segments/t"].shape[0])
    offset, length = store.offset, store.length
    if offset.shape != (V,) or length.shape != (V,):
        raise bad(f"segments/offset {offset.shape} and segments/length {length.shape} for {V} videos")
    starts = np.concatenate([[0], np.cumsum(length)[:-1]]) if V else offset
    if (length < 0).any() or not np.array_equal(offset, starts) or int(length.sum()) != S:
        raise bad(f"segments/offset and segments/length do not tile the {S} segment rows")
    for key, ds in [("segments/frame", f["segments/frame"])] + streams:
        want = (4, 2) if key.endswith("conv") else (2,) if key.endswith("logits") else (1,)  # maps or vectors
        if ds.shape[0] != S or ds.ndim not in want:
            raise bad(f"{key} has shape {ds.shape} for {S} segment rows")
