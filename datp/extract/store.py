"""The feature store: the contract between stage one and stage two (schema 1).

One HDF5 file (docs/architecture.md shows it with an example):
- file attrs: `datp_schema` = 1, `datp_kind` = "features", `layout` ("fixed" | "ragged"),
  `num_segments` (fixed) or `stride` (ragged), `new_length` (JSON {stream: L}), `backbone`,
  `weights` (file name or "random"), `weights_sha256`, `input_size`, `crop`, `flow` (JSON:
  algorithm, preset, bound, source), `class_names` (JSON list, may be empty), `datp_version`,
  `created`, `settings` (JSON of the whole FeatureConfig).
- `videos/id` (V,) utf-8, `videos/label` (V,) int64 (-1 unknown), `videos/split` (V,) utf-8,
  `videos/num_frames` (V,) int64, `videos/fps` (V,) float32.
- fixed layout: `segments/t` (V, N) float32 segment centre times in [0, 1], `segments/frame`
  (V, N) int64 first frame of each segment; `<stream>/conv` (V, N, Cf, h, w) float16, one video
  per chunk; `<stream>/logits` (V, N, C) float32; streams are `rgb` and/or `flow`.
- ragged layout (stride mode, a variable number of segments per video): `segments/offset` (V,)
  and `segments/length` (V,) int64 index flat arrays `segments/t` (S,), `segments/frame` (S,),
  `<stream>/conv` (S, Cf, h, w), `<stream>/logits` (S, C); video v owns rows
  offset[v] : offset[v] + length[v].
- `done` (V,) bool: the row is complete (rows of failed videos stay False and hold zeros).

Writing is crash-safe like the flow store (`datp.io.atomic`): each video goes to a part file
`<out>.parts/<safe id>.h5`; `build_store` assembles the store from the parts: during a run as
an index of virtual datasets over the parts (no copy), at the end as one self-contained file.
A rerun over a finished store (to add videos or retry failed ones) first moves it aside to
`<out>.parts/_store_base.hdf5`; its done rows are kept (linked into the index during the run,
copied at the end), so the store keeps opening and nothing finished is lost.
"""

from __future__ import annotations

import datetime
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import h5py
import numpy as np
import torch

import datp
from datp.flows.store import StoreError
from datp.io.atomic import atomic_path, finished_parts, parts_dir
from datp.io.datasets import safe_name

SCHEMA = 1
KIND = "features"
BASE_NAME = "_store_base.hdf5"  # a finished store moved aside by a rerun (parts end in .h5)
STREAMS = ("rgb", "flow")
_STR = h5py.string_dtype("utf-8")


@dataclass(frozen=True)
class VideoRow:
    """The per-video columns of `videos/`."""

    id: str
    label: int = -1
    split: str = "all"
    num_frames: int = 0
    fps: float = 0.0


@dataclass
class VideoFeatures:
    """One video's features, as a part file holds them.

    Attributes:
        t: (n,) float32 segment centre times in [0, 1].
        frame: (n,) int64 first frame index of each segment.
        streams: {stream: (conv (n, Cf, h, w), logits (n, C))}.
        num_frames, fps: the decoded video's, when known (override the VideoRow's).
    """

    t: np.ndarray
    frame: np.ndarray
    streams: dict[str, tuple[np.ndarray, np.ndarray]]
    num_frames: int = 0
    fps: float = 0.0


def base_attrs(*, layout: str, class_names: Sequence[str], new_length: dict, settings: dict,
               num_segments: int | None = None, stride: int | None = None, **extra) -> dict:
    """The file attributes of a store (see the module docstring); `extra` adds backbone etc."""
    if layout not in ("fixed", "ragged"):
        raise ValueError(f"layout {layout!r} must be fixed or ragged")
    attrs = {"datp_schema": SCHEMA, "datp_kind": KIND, "layout": layout,
             "class_names": json.dumps(list(class_names)), "new_length": json.dumps(new_length),
             "datp_version": datp.__version__,
             "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
             "settings": json.dumps(settings, sort_keys=True, default=str)}
    if layout == "fixed":
        attrs["num_segments"] = int(num_segments)
    else:
        attrs["stride"] = int(stride)
    for key, value in extra.items():
        attrs[key] = json.dumps(value) if isinstance(value, (dict, list)) else value
    return attrs


def write_part(out: Path, video_id: str, features: VideoFeatures) -> Path:
    """Write one video's features to its part file, atomically (whole or absent)."""
    folder = parts_dir(out)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{safe_name(video_id)}.h5"
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        f.attrs["id"] = video_id
        f.attrs["num_frames"] = int(features.num_frames)
        f.attrs["fps"] = float(features.fps)
        f["t"] = np.asarray(features.t, np.float32)
        f["frame"] = np.asarray(features.frame, np.int64)
        for stream, (conv, logits) in features.streams.items():
            f.create_dataset(f"{stream}/conv", data=np.asarray(conv, np.float16))
            f.create_dataset(f"{stream}/logits", data=np.asarray(logits, np.float32))
    return path


def done_ids(out: Path) -> set[str]:
    """Videos already finished for the store `out`: its parts, or done rows of a final store."""
    out = Path(out)
    ids = set()
    for path in finished_parts(parts_dir(out)).values():
        with h5py.File(path, "r") as f:
            ids.add(str(f.attrs["id"]))
    for path in (parts_dir(out) / BASE_NAME, out):
        ids.update(_old_rows(path))
    return ids


def _is_final(path: Path) -> bool:
    """True when `path` is a self-contained feature store (not an index over parts)."""
    with h5py.File(path, "r") as f:
        return f.attrs.get("datp_kind") == KIND and not f.attrs.get("index_only", False)


def build_store(out: Path, videos: Sequence[VideoRow], attrs: dict, streams: Sequence[str], *,
                final: bool, features: dict[str, VideoFeatures] | None = None) -> int:
    """Assemble the store `out` from part files (and/or in-memory `features`), atomically.

    Args:
        out: the store file.
        videos: every video of the run, in store order (rows of unfinished ones stay not done).
        attrs: file attributes (`base_attrs`).
        streams: the streams the store holds.
        final: copy everything into one self-contained file and delete the parts; otherwise
            write virtual datasets over the parts (cheap; used during a run and after a kill).
        features: in-memory features by id (one-shot writes, e.g. tests and `datp synth`).

    Returns:
        The number of done videos.
    """
    out = Path(out)
    features = dict(features or {})
    base = parts_dir(out) / BASE_NAME
    if not final and not base.exists() and out.is_file() and _is_final(out):
        # A rerun over a finished store: the index about to replace it links into it instead.
        base.parent.mkdir(parents=True, exist_ok=True)
        os.replace(out, base)
    parts = finished_parts(parts_dir(out))
    old_rows = _old_rows(base if base.is_file() else out)
    # per video: ("mem", VideoFeatures) | ("part", path) | ("old", _OldRow) | (None, None)
    sources: list[tuple[str, object]] = []
    for row in videos:
        name = safe_name(row.id)
        if row.id in features:
            sources.append(("mem", features[row.id]))
        elif name in parts:
            sources.append(("part", parts[name]))
        elif row.id in old_rows:
            sources.append(("old", old_rows[row.id]))
        else:
            sources.append((None, None))
    lengths = np.array([_length(kind, src) for kind, src in sources], np.int64)
    videos = [_with_counts(row, kind, src) for row, (kind, src) in zip(videos, sources)]
    ragged = attrs["layout"] == "ragged"
    if not ragged:
        n = int(attrs["num_segments"])
        bad = [(row.id, int(m)) for row, m in zip(videos, lengths) if m not in (0, n)]
        if bad:
            raise StoreError(f"video {bad[0][0]!r} has {bad[0][1]} segments; the store has {n}")
    shapes = _shapes(sources, streams)
    with atomic_path(out) as tmp, h5py.File(tmp, "w") as f:
        f.attrs.update(attrs)
        f.attrs["index_only"] = not final
        _write_videos(f, videos)
        f["done"] = lengths > 0
        if ragged:
            offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
            f["segments/offset"], f["segments/length"] = offsets, lengths
            rows = [slice(o, o + m) for o, m in zip(offsets, lengths)]
            total = (int(lengths.sum()),)
        else:
            rows = list(range(len(videos)))
            total = (len(videos), int(attrs["num_segments"]))
        fields = [("segments/t", "t", (), np.float32), ("segments/frame", "frame", (), np.int64)]
        for stream in streams:
            fields += [(f"{stream}/conv", f"{stream}/conv", shapes[stream][0], np.float16),
                       (f"{stream}/logits", f"{stream}/logits", shapes[stream][1], np.float32)]
        for dest, key, tail, dtype in fields:
            shape = total + tuple(tail)
            if final:
                chunks = True  # h5py picks; conv: one video per chunk (a block of segments if ragged)
                if key.endswith("conv"):
                    chunks = ((max(1, min(int(lengths.max(initial=1)), 64)),) + tuple(tail)
                              if ragged else (1,) + shape[1:])
                ds = f.create_dataset(dest, shape=shape, dtype=dtype, chunks=chunks if all(shape) else None,
                                      compression="gzip" if key.endswith("conv") else None,
                                      compression_opts=1 if key.endswith("conv") else None)
                for (kind, src), row, m in zip(sources, rows, lengths):
                    if m:
                        ds[row] = _read(kind, src, key)
            else:
                layout = h5py.VirtualLayout(shape=shape, dtype=dtype)
                for (kind, src), row, m in zip(sources, rows, lengths):
                    if m and kind == "part":
                        # HDF5 reads '%' in source names as a printf field: escape it.
                        source = str(Path(src).resolve()).replace("%", "%%")
                        layout[row] = h5py.VirtualSource(source, key,
                                                         shape=(int(m),) + tuple(tail))
                    elif m and kind == "old":
                        source = str(Path(src.path).resolve()).replace("%", "%%")
                        whole = h5py.VirtualSource(source, dest, shape=src.shapes[dest])
                        layout[row] = whole[src.rows]
                    elif m:
                        raise StoreError("in-memory features need final=True")
                f.create_virtual_dataset(dest, layout, fillvalue=0)
    if final:
        shutil.rmtree(parts_dir(out), ignore_errors=True)
    return int((lengths > 0).sum())


def _write_videos(f: h5py.File, rows: Sequence[VideoRow]) -> None:
    """The `videos/` columns of a store."""
    v = f.create_group("videos")
    v["id"] = np.array([r.id for r in rows], dtype=object).astype(_STR)
    v["label"] = np.array([r.label for r in rows], np.int64)
    v["split"] = np.array([r.split for r in rows], dtype=object).astype(_STR)
    v["num_frames"] = np.array([r.num_frames for r in rows], np.int64)
    v["fps"] = np.array([r.fps for r in rows], np.float32)


def _with_counts(row: VideoRow, kind, src) -> VideoRow:
    """The row with num_frames / fps from its features when they carry them."""
    if kind is None:
        return row
    if kind in ("mem", "old"):
        n, fps = src.num_frames, src.fps
    else:
        with h5py.File(src, "r") as f:
            n, fps = int(f.attrs.get("num_frames", 0)), float(f.attrs.get("fps", 0.0))
    if not n:
        return row
    return VideoRow(row.id, row.label, row.split, n, fps)


def _length(kind, src) -> int:
    if kind is None:
        return 0
    if kind == "mem":
        return len(src.t)
    if kind == "old":
        return src.length
    with h5py.File(src, "r") as f:
        return int(f["t"].shape[0])


def _read(kind, src, key: str) -> np.ndarray:
    if kind == "mem":
        if key in ("t", "frame"):
            return getattr(src, key)
        stream, field = key.split("/")
        return src.streams[stream][0 if field == "conv" else 1]
    if kind == "old":
        with h5py.File(src.path, "r") as f:
            return f[f"segments/{key}" if key in ("t", "frame") else key][src.rows]
    with h5py.File(src, "r") as f:
        return f[key][:]


def _shapes(sources, streams) -> dict[str, tuple[tuple, tuple]]:
    """Per-segment shapes (conv (Cf, h, w), logits (C,)) of each stream, from any done video."""
    shapes = {}
    for stream in streams:
        for kind, src in sources:
            if kind is not None and _length(kind, src):
                shapes[stream] = (_read(kind, src, f"{stream}/conv").shape[1:],
                                  _read(kind, src, f"{stream}/logits").shape[1:])
                break
        else:
            shapes[stream] = ((0, 0, 0), (0,))
    return shapes


@dataclass(frozen=True)
class _OldRow:
    """A done row of a finished store (`path`): its rows selector and dataset shapes."""

    path: Path
    rows: int | slice
    length: int
    num_frames: int
    fps: float
    shapes: dict


def _old_rows(path: Path) -> dict[str, _OldRow]:
    """Done rows of a finished store (kept when a rerun adds or retries videos), by id."""
    path = Path(path)
    if not path.is_file() or not _is_final(path):
        return {}
    with h5py.File(path, "r") as f:
        ids = [v.decode() if isinstance(v, bytes) else str(v) for v in f["videos/id"][:]]
        done, frames, fps = f["done"][:], f["videos/num_frames"][:], f["videos/fps"][:]
        shapes = {k: f[k].shape for k in ("segments/t", "segments/frame")}
        shapes.update({f"{s}/{k}": f[f"{s}/{k}"].shape for s in STREAMS if s in f
                       for k in ("conv", "logits")})
        if f.attrs["layout"] == "ragged":
            offset, length = f["segments/offset"][:], f["segments/length"][:]
            rows = [slice(int(o), int(o + m)) for o, m in zip(offset, length)]
        else:
            rows, length = list(range(len(ids))), np.full(len(ids), int(f.attrs["num_segments"]))
    return {ids[i]: _OldRow(path, rows[i], int(length[i]), int(frames[i]), float(fps[i]), shapes)
            for i in np.flatnonzero(done)}


def write_features(out: Path, videos: Sequence[VideoRow], features: dict[str, VideoFeatures],
                   attrs: dict) -> None:
    """Write a whole store at once from in-memory features (tests, synthetic stores)."""
    streams = sorted({s for feats in features.values() for s in feats.streams})
    build_store(out, videos, attrs, streams, final=True, features=features)


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

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise StoreError(f"{self.path}: no such feature store; run datp extract-features first")
        self._file = h5py.File(self.path, "r")
        a = self._file.attrs
        if a.get("datp_kind") != KIND:
            raise StoreError(f"{self.path} is not a feature store (datp_kind={a.get('datp_kind')!r})")
        if a.get("datp_schema") != SCHEMA:
            raise StoreError(f"{self.path} has feature store schema {a.get('datp_schema')}; this "
                             f"datp reads schema {SCHEMA}: re-extract or use a matching datp")
        for key in ("videos/id", "videos/label", "videos/split", "done", "segments/t"):
            if key not in self._file:
                raise StoreError(f"{self.path} lacks {key!r}; the file is incomplete")
        self.layout = str(a["layout"])
        self.num_segments = int(a["num_segments"]) if self.layout == "fixed" else None
        self.class_names = json.loads(a["class_names"])
        self.attrs = {k: (v.item() if isinstance(v, np.generic) else v) for k, v in a.items()}
        self.streams = [s for s in STREAMS if f"{s}/conv" in self._file]
        self.ids = [v.decode() if isinstance(v, bytes) else str(v) for v in self._file["videos/id"][:]]
        self.labels = self._file["videos/label"][:]
        self.splits = np.array([v.decode() if isinstance(v, bytes) else str(v)
                                for v in self._file["videos/split"][:]])
        self.num_frames = self._file["videos/num_frames"][:]
        self.fps = self._file["videos/fps"][:]
        self.done = self._file["done"][:]
        if self.layout == "ragged":
            self.offset = self._file["segments/offset"][:]
            self.length = self._file["segments/length"][:]

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

    def conv_shape(self, stream: str) -> tuple[int, ...]:
        self.require(stream)
        return tuple(self._file[f"{stream}/conv"].shape[-3:])

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
             conv: bool = True, pad_to: int | None = None) -> Batch:
        """Load videos as a padded batch of float32 tensors.

        Args:
            indices: store rows (e.g. from `indices("train")`).
            streams: streams to load; each must exist.
            conv: load the conv maps too (the largest part); logits are always loaded.
            pad_to: pad to this many segments (default: the longest video of the batch).
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
            cshape = self._file[f"{stream}/conv"].shape[-3:]
            C = self._file[f"{stream}/logits"].shape[-1]
            convs[stream] = torch.zeros((B, n) + tuple(cshape)) if conv else None
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
                    row = np.empty(dataset.shape[1:], dataset.dtype)
                    for b, i in enumerate(idx):
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
                        convs[stream][b, :m] = torch.from_numpy(
                            self._file[f"{stream}/conv"][rows].astype(np.float32))
                    logits[stream][b, :m] = torch.from_numpy(self._file[f"{stream}/logits"][rows])
        return Batch(convs, logits, t, frame, mask, torch.from_numpy(self.labels[idx]),
                     torch.from_numpy(idx))


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
        rows = [VideoRow(i, int(l), str(sp), int(n), float(f)) for s in stores
                for i, l, sp, n, f in zip(s.ids, s.labels, s.splits, s.num_frames, s.fps)]
        ragged = first.layout == "ragged"
        with atomic_path(Path(out)) as tmp, h5py.File(tmp, "w") as f:
            f.attrs.update(first.attrs)
            f.attrs["index_only"] = False
            _write_videos(f, rows)
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
