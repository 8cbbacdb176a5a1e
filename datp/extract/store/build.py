"""Writing a feature store: per-video part files, and assembling the store from them.

See `datp.extract.store` for the layout and the crash-safety rules.
"""

from __future__ import annotations

import io
import os
import shutil
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence

import h5py
import numpy as np

from datp.extract.store.schema import (
    BASE_NAME,
    STREAMS,
    StoreError,
    VideoFeatures,
    VideoRow,
    conv_filters,
    is_final,
    stored_attrs,
    write_videos,
)
from datp.io.atomic import (
    atomic_path,
    commit,
    ensure_space,
    finished_parts,
    parts_dir,
    read_back,
    unique_tmp,
    write_bytes,
    writing,
)
from datp.io.datasets import safe_name


def write_part(out: Path, video_id: str, features: VideoFeatures, *, label: int = -1,
               split: str = "all") -> Path:
    """Write one video's features to its part file: under a name unique to this process, closed,
    checked (`check_part`) and only then renamed into place (whole or absent). Every dataset
    carries HDF5's fletcher32 checksum, so damage is found when a rerun reuses the part.

    Raises:
        OSError: the write failed (disk full, I/O error); the message names the part.
    """
    folder = parts_dir(out)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{safe_name(video_id)}.h5"
    tmp = unique_tmp(path)
    ensure_space(tmp, sum(np.asarray(c).nbytes + np.asarray(g).nbytes
                          for c, g in features.streams.values()))
    image = io.BytesIO()  # built in memory: HDF5 never meets a failing disk (see write_bytes)
    try:
        with h5py.File(image, "w") as f:
            f.attrs["id"] = video_id
            f.attrs["label"] = int(label)
            f.attrs["split"] = str(split)
            f.attrs["num_frames"] = int(features.num_frames)
            f.attrs["fps"] = float(features.fps)
            data = {"t": np.asarray(features.t, np.float32),
                    "frame": np.asarray(features.frame, np.int64)}
            for stream, (conv, logits) in features.streams.items():
                data[f"{stream}/conv"] = np.asarray(conv, np.float16)
                data[f"{stream}/logits"] = np.asarray(logits, np.float32)
            for key, value in data.items():
                f.create_dataset(key, data=value, chunks=value.shape if value.size else None,
                                 fletcher32=bool(value.size))
        write_bytes(tmp, image.getbuffer())
        read_back(tmp, check_part)  # a close that failed without saying so is caught here
        with writing(tmp):
            commit(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def check_part(path: Path) -> str:
    """Check a part file as a rerun reuses it: it opens, every array has as many segments as
    `t`, and every byte reads back (fletcher32 checksums). Returns the video id.

    Raises:
        StoreError: the part is damaged (the message names it and says how).
    """
    try:
        with h5py.File(path, "r") as f:
            n = f["t"].shape[0]
            for key in ["t", "frame"] + [f"{s}/{k}" for s in STREAMS if s in f
                                         for k in ("conv", "logits")]:
                if f[key].shape[:1] != (n,):
                    raise StoreError(f"{key} has shape {f[key].shape} for {n} segments")
                f[key][()]
            return str(f.attrs["id"])
    except (OSError, KeyError, ValueError, RuntimeError) as err:
        raise StoreError(f"damaged part {path}: {err}") from None


def verified_parts(out: Path, report=None) -> dict[str, Path]:
    """The finished parts of `out` that pass `check_part`, by file stem; a damaged part is
    removed (its video is redone) and named through `report(message)`."""
    good = {}
    for stem, path in finished_parts(parts_dir(out)).items():
        try:
            check_part(path)
            good[stem] = path
        except StoreError as err:
            path.unlink(missing_ok=True)
            if report is not None:
                report(f"{err}; removed, its video is redone")
    return good


def done_ids(out: Path, report=None) -> set[str]:
    """Videos already finished for the store `out`: its parts (checked, `verified_parts`), or
    done rows of a finished store (moved aside as the base, or `out` itself)."""
    out = Path(out)
    ids = set()
    for path in verified_parts(out, report).values():
        with h5py.File(path, "r") as f:
            ids.add(str(f.attrs["id"]))
    for path in (parts_dir(out) / BASE_NAME, out):
        ids.update(_old_rows(path))
    return ids


def finished_attrs(out: Path) -> dict | None:
    """The attrs of the finished store of `out` (moved aside as the base, or `out` itself) when
    it has a done video; None otherwise (an index or a store of failures binds nothing)."""
    for path in (parts_dir(out) / BASE_NAME, Path(out)):
        if _old_rows(path):
            return stored_attrs(path)
    return None


def _union_rows(videos: Sequence[VideoRow], base: Path, parts: dict[str, Path]) -> list[VideoRow]:
    """Every video a store holds over its runs: the base store's rows in its order, then this
    run's `videos` it lacks, then parts of earlier interrupted runs of other lists (by id). A
    video of this run keeps this run's label and split."""
    ours = {row.id: row for row in videos}
    rows = []
    if base.is_file() and is_final(base):
        with h5py.File(base, "r") as f:
            v = f["videos"]
            for i, label, split in zip(v["id"][:], v["label"][:], v["split"][:]):
                vid = i.decode() if isinstance(i, bytes) else str(i)
                split = split.decode() if isinstance(split, bytes) else str(split)
                rows.append(ours.pop(vid, VideoRow(vid, int(label), split)))
    rows += list(ours.values())
    named = {safe_name(row.id) for row in rows}
    extra = []
    for stem, path in parts.items():
        if stem not in named:
            with h5py.File(path, "r") as f:
                a = f.attrs
                extra.append(VideoRow(str(a["id"]), int(a.get("label", -1)),
                                      str(a.get("split", "all"))))
    return rows + sorted(extra, key=lambda row: row.id)


def build_store(out: Path, videos: Sequence[VideoRow], attrs: dict, streams: Sequence[str], *,
                final: bool, features: dict[str, VideoFeatures] | None = None,
                union: bool = False) -> int:
    """Assemble the store `out` from part files (and/or in-memory `features`), atomically.

    Args:
        out: the store file.
        videos: every video of the run, in store order (rows of unfinished ones stay not done).
        attrs: file attributes (`base_attrs`).
        streams: the streams the store holds.
        final: copy everything into one self-contained file and delete the parts; otherwise
            write virtual datasets over the parts (cheap; used during a run and after a kill).
        features: in-memory features by id (one-shot writes, e.g. tests and `datp synth`).
        union: the store keeps every video of its earlier runs too (`_union_rows`: the finished
            store moved aside, parts of other lists), as extract-features does; otherwise it
            holds `videos` only.

    Returns:
        The number of done videos.
    """
    out = Path(out)
    features = dict(features or {})
    base = parts_dir(out) / BASE_NAME
    if not final and not base.exists() and out.is_file() and is_final(out):
        # A rerun over a finished store: the index about to replace it links into it instead.
        base.parent.mkdir(parents=True, exist_ok=True)
        os.replace(out, base)
    parts = finished_parts(parts_dir(out))
    if union:
        videos = _union_rows(videos, base, parts)
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
    need = [Path(src) for kind, src in sources if kind == "part"] + (
        [base] if base.is_file() and any(kind == "old" for kind, _ in sources) else [])
    ensure_space(out, sum(p.stat().st_size for p in need) if final else 0)
    image = None if final else io.BytesIO()  # the index is small: built in memory (write_bytes)
    with writing(out), atomic_path(out) as tmp:
        with h5py.File(tmp if final else image, "w") as f:
            f.attrs.update(attrs)
            f.attrs["index_only"] = not final
            write_videos(f, videos)
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
                    filters = conv_filters(attrs) if key.endswith("conv") else {}
                    ds = f.create_dataset(dest, shape=shape, dtype=dtype, chunks=chunks if all(shape) else None,
                                          **filters)
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
        if not final:
            write_bytes(tmp, image.getbuffer())
    if final:
        shutil.rmtree(parts_dir(out), ignore_errors=True)
    return int((lengths > 0).sum())


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
    return replace(row, num_frames=n, fps=fps)  # keeps `labels`


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
    if not path.is_file() or not is_final(path):
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
