"""The HDF5 flow store: its layout, its crash-safe writer, its reader, and merging.

Layout (schema 1), one file:
- file attrs: `datp_schema` = 1, `datp_kind` = "flow", `datp_version`, `created` (ISO time),
  `settings` (JSON of the FlowConfig and the flow algorithm's full parameters).
- `/videos/<safe name>/` one group per video (name from `datp.io.datasets.safe_name(id)`):
  - `flow`: uint8 (T-1, H, W, 2), x then y, quantized with `datp.flows.quantize` at `bound`;
    gzip-compressed, one chunk per frame pair. Pair i is the flow from frame i to frame i+1
    (0-based), so frame-numbered files agree with RGB frame i.
  - `timestamps`: float64 (T,) presentation time of every decoded frame, seconds.
  - attrs: `id`, `path`, `label`, `split`, `num_frames` (T, decoded, never the container's),
    `fps`, `height`, `width` (flow size), `source_height`, `source_width`, `rotation`, `scale`
    (flow size / upright source size, per axis (sy, sx)), `bound`, `algorithm`, `preset`, `codec`.
While a run is in progress (or after a kill), each finished video lives in its own part file
`<out>.parts/<safe name>.h5` (the group above at `/video`, fletcher32 checksums), and `<out>` is
a small index whose groups are external links to the parts, rewritten atomically; at the end the
parts are copied (raw chunks, no recompression) into one self-contained `<out>` and removed.
The store is the union of every run into it (see `write_store`).
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import Iterable

import h5py
import numpy as np

from datp.io.atomic import (
    atomic_path,
    commit,
    ensure_space,
    finished_parts,
    parts_dir,
    read_back,
    unique_tmp,
    write_bytes,
    write_error,
    writing,
)
from datp.io.datasets import Record, safe_name
from datp.io.h5header import StoreError, check_header, header, open_h5

SCHEMA = 1
KIND = "flow"


__all__ = ["KIND", "SCHEMA", "FlowPartWriter", "FlowStore", "StoreError", "done_ids", "check_part", "merge_stores",
           "open_for_update", "stored_settings", "write_store"]


def _file_attrs(settings: dict) -> dict:
    return {**header(KIND, SCHEMA), "settings": json.dumps(settings, sort_keys=True)}


class FlowPartWriter:
    """Receives a video's flow chunks from the runner and writes them to its part file.

    The part is written under a temporary name unique to this process, closed, checked
    (`check_part`) and only then renamed into place, so a part file that exists is whole. Every
    dataset carries HDF5's fletcher32 checksum, so a damaged block is found when it is read. A
    failed write (disk full, I/O error) raises an OSError naming the part.
    """

    def __init__(self, out: Path, on_first_done=None):
        self.folder = parts_dir(out)
        self.folder.mkdir(parents=True, exist_ok=True)
        self._open: dict[str, tuple[h5py.File, Path]] = {}
        self._on_first_done = on_first_done

    def part_path(self, record: Record) -> Path:
        return self.folder / f"{safe_name(record.id)}.h5"

    def chunk(self, record: Record, payload: np.ndarray) -> None:
        """Append quantized flow pairs (n, H, W, 2) uint8 of `record`."""
        tmp = unique_tmp(self.part_path(record))
        ensure_space(tmp, payload.nbytes)
        try:
            if record.id not in self._open:
                tmp.unlink(missing_ok=True)
                handle = h5py.File(tmp, "w")
                self._open[record.id] = (handle, tmp)
                h, w = payload.shape[1:3]
                handle.create_dataset("video/flow", shape=(0, h, w, 2), maxshape=(None, h, w, 2),
                                      dtype=np.uint8, chunks=(1, h, w, 2), compression="gzip",
                                      compression_opts=4, fletcher32=True)
            handle, _ = self._open[record.id]
            flow = handle["video/flow"]
            n = flow.shape[0]
            flow.resize(n + len(payload), axis=0)
            flow[n:] = payload
        except OSError as err:
            raise write_error(tmp, err) from err

    def done(self, record: Record, meta: dict) -> None:
        """Write the video's attributes and timestamps, close, check, and rename into place."""
        if record.id not in self._open:  # a video with no flow pairs never reaches done
            raise RuntimeError(f"{record.id}: done without flow")
        handle, tmp = self._open.pop(record.id)
        try:
            group = handle["video"]
            group.create_dataset("timestamps", data=np.asarray(meta.pop("timestamps"), np.float64),
                                 fletcher32=True, chunks=True)
            attrs = {"id": record.id, "path": str(record.path), "label": record.label,
                     "split": record.split, **meta}
            for key, value in attrs.items():
                group.attrs[key] = value
            if group["flow"].shape[0] != attrs["num_frames"] - 1:
                raise RuntimeError(f"{record.id}: {group['flow'].shape[0]} flow pairs for "
                                   f"{attrs['num_frames']} frames")
            handle.flush()
            handle.close()
            read_back(tmp, check_part)  # a close that failed without saying so is caught here
            if self._on_first_done is not None:
                self._on_first_done()
                self._on_first_done = None
            commit(tmp, self.part_path(record))
        except (OSError, RuntimeError) as err:
            _drop(handle, tmp)
            if isinstance(err, RuntimeError) and "flush" not in str(err).lower():
                raise
            raise write_error(tmp, err) from err
        except BaseException:
            _drop(handle, tmp)
            raise

    def fail(self, record: Record, reason: str) -> None:
        entry = self._open.pop(record.id, None)
        if entry is not None:
            _drop(*entry)

    def close(self) -> None:
        for record_id in list(self._open):
            _drop(*self._open.pop(record_id))


def _drop(handle: h5py.File, tmp: Path) -> None:
    """Close (errors ignored: the file is thrown away) and remove a temporary part."""
    try:
        handle.close()
    except (OSError, RuntimeError, ValueError):
        pass
    tmp.unlink(missing_ok=True)


def check_part(path: Path) -> str:
    """Check a part file as a rerun reuses it: it opens, its shapes are those its attrs record,
    and every chunk reads back (fletcher32 checksums). Returns the video id.

    Raises:
        StoreError: the part is damaged (the message says how).
    """
    try:
        with h5py.File(path, "r") as f:
            group = f["video"]
            a = group.attrs
            T = int(a["num_frames"])
            want = (T - 1, int(a["height"]), int(a["width"]), 2)
            if group["flow"].shape != want or group["timestamps"].shape != (T,):
                raise StoreError(f"flow {group['flow'].shape} / timestamps "
                                 f"{group['timestamps'].shape} for {T} frames")
            flow = group["flow"]
            for i in range(0, want[0], 64):
                flow[i:i + 64]
            group["timestamps"][:]
            return str(a["id"])
    except (OSError, KeyError, ValueError, RuntimeError) as err:
        raise StoreError(f"damaged part {path}: {err}") from None


BASE_NAME = "_store_base.hdf5"  # not a per-video part (those end in .h5)


def _is_link(group: h5py.Group, name: str) -> bool:
    return isinstance(group.get(name, getlink=True), h5py.ExternalLink)


def _is_final(out: Path) -> bool:
    """True when `out` is a self-contained flow store (no links into parts)."""
    with h5py.File(out, "r") as f:
        return f.attrs.get("datp_kind") == KIND and not any(
            _is_link(f["videos"], n) for n in f.get("videos", {}))


def done_ids(out: Path, report=None) -> set[str]:
    """Ids of videos already finished for the store `out` (in its parts, base or final file).
    Each part is checked (`check_part`): a damaged one is removed (its video is redone) and named
    through `report(message)`."""
    out = Path(out)
    ids = set()
    for path in finished_parts(parts_dir(out)).values():
        try:
            ids.add(check_part(path))
        except StoreError as err:
            path.unlink(missing_ok=True)
            if report is not None:
                report(f"{err}; removed, its video is redone")
    for path in (parts_dir(out) / BASE_NAME, out):
        if path.is_file() and (path != out or _is_final(out)):
            with h5py.File(path, "r") as f:
                ids.update(str(f["videos"][n].attrs["id"]) for n in f["videos"])
    return ids


def stored_settings(out: Path) -> dict:
    """The settings recorded in the file `out` when it holds at least one video; {} otherwise
    (an index written before any video finished records nothing binding)."""
    with h5py.File(out, "r") as f:
        if not len(f.get("videos", {})):
            return {}
        return json.loads(f.attrs.get("settings", "{}"))


def open_for_update(out: Path) -> None:
    """Before adding videos to a finished store, move it aside as the base of the new parts.

    The index written next links into it, so the store keeps opening while the run goes on.
    """
    out = Path(out)
    base = parts_dir(out) / BASE_NAME
    if out.is_file() and _is_final(out) and not base.exists():
        base.parent.mkdir(parents=True, exist_ok=True)
        os.replace(out, base)


def write_store(out: Path, records: Iterable[Record], settings: dict, *, final: bool) -> int:
    """(Re)build the store `out` from every finished video it has, atomically.

    The store is the union of all its runs: every video of the base (the finished store moved
    aside by `open_for_update`) and every finished part, whichever run or list made it; a video in
    both is taken from its part (the newer).

    Args:
        out: the store file.
        records: this run's videos (unused: every finished video is kept; kept for callers).
        settings: run settings recorded in the file attrs.
        final: copy everything into one self-contained file and delete the parts; otherwise
            write an index of external links (cheap; used during a run and after an interruption).

    Returns:
        The number of videos in the store.
    """
    import shutil

    out = Path(out)
    folder = parts_dir(out)
    parts = finished_parts(folder)
    base_path = folder / BASE_NAME
    base = h5py.File(base_path, "r") if base_path.is_file() else None
    # HDF5 lists a group's members by name, so the order of the union needs no care here
    names = sorted(set(parts) | set(base["videos"] if base is not None else ()))
    # final: the parts' and the base's chunks are copied as they are; an index is small
    ensure_space(out, sum(p.stat().st_size for p in parts.values())
                 + (base_path.stat().st_size if base is not None else 0) if final else 0)
    image = None if final else io.BytesIO()  # an index is built in memory (write_bytes)
    count = 0
    try:
        with writing(out), atomic_path(out) as tmp:
            with h5py.File(tmp if final else image, "w") as f:
                f.attrs.update(_file_attrs(settings))
                f.attrs["index_only"] = not final  # readers other than the run itself refuse an index
                videos = f.create_group("videos")
                for name in names:
                    if name in parts:
                        source, file, path = parts[name], None, "/video"
                    else:
                        source, file, path = base_path, base, f"/videos/{name}"
                    if not final:
                        videos[name] = h5py.ExternalLink(os.path.relpath(source, out.parent), path)
                    elif file is not None:
                        file.copy(file[path], videos, name=name)
                    else:
                        with h5py.File(source, "r") as part:
                            part.copy(part[path], videos, name=name)
                    count += 1
            if not final:
                write_bytes(tmp, image.getbuffer())
    finally:
        if base is not None:
            base.close()
    if final:
        shutil.rmtree(folder, ignore_errors=True)
    return count


class FlowStore:
    """Read a flow store (one file or a merged store; a run's index, attr `index_only`, only with
    `unfinished=True`), e.g. `FlowStore("flows.h5").flow("ApplyEyeMakeup/v_..._g08_c01", dequantize=True)`."""

    def __init__(self, path: str | Path, *, unfinished: bool = False):
        self.path = Path(path)
        if not self.path.is_file():
            raise StoreError(f"{self.path}: no such flow store; run datp extract-flow first")
        self._file = open_h5(self.path, "flow store")
        try:
            check_header(self._file.attrs, self.path, kind=KIND, schema=SCHEMA, noun="flow store",
                         fix="re-run datp extract-flow or use a matching datp")
            self.settings = json.loads(self._file.attrs["settings"])
            videos = self._file["videos"]
            index = bool(self._file.attrs.get("index_only", False))
            for name in videos:  # an index whose parts moved: name the missing file now
                link = videos.get(name, getlink=True)
                if isinstance(link, h5py.ExternalLink) and not (self.path.parent / link.filename).is_file():
                    raise StoreError(f"{self.path}: video {name} links to {link.filename}, which "
                                     "is missing; rerun the extract-flow (or merge) that wrote it")
                index = index or (isinstance(link, h5py.ExternalLink) and link.path == "/video")  # a part
            if index and not unfinished:
                raise StoreError(f"{self.path} is an unfinished flow store (an extract-flow run into it was "
                                 "interrupted or is still running); rerun that datp extract-flow to finish it")
            self._names = {videos[n].attrs["id"]: n for n in videos}
        except BaseException:
            self._file.close()
            raise

    def __enter__(self) -> "FlowStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._file.close()

    def ids(self) -> list[str]:
        return list(self._names)

    def __contains__(self, video_id: str) -> bool:
        return video_id in self._names

    def _group(self, video_id: str) -> h5py.Group:
        if video_id not in self._names:
            raise KeyError(f"{self.path} has no flow for video {video_id!r}")
        return self._file["videos"][self._names[video_id]]

    def meta(self, video_id: str) -> dict:
        """The video's attributes (see the module docstring) as plain Python values."""
        return {k: (v.item() if isinstance(v, np.generic) else v)
                for k, v in self._group(video_id).attrs.items()}

    def timestamps(self, video_id: str) -> np.ndarray:
        return self._group(video_id)["timestamps"][:]

    def flow(self, video_id: str, pairs=slice(None), *, dequantize: bool = False) -> np.ndarray:
        """Flow pairs of a video: uint8 (n, H, W, 2), or float32 pixels with `dequantize`.

        Args:
            video_id: the video.
            pairs: a slice or sorted index array of pair indices (pair i: frame i -> i+1).
            dequantize: undo the quantization (`datp.flows.quantize.dequantize`).
        """
        group = self._group(video_id)
        data = group["flow"][pairs]
        if dequantize:
            from datp.flows.quantize import dequantize as _dequantize

            data = _dequantize(data, bound=float(group.attrs["bound"]))
        return data


def merge_stores(inputs: list[Path], out: Path, *, copy: bool = False) -> int:
    """Join shard stores into one store.

    Without `copy` the merged file holds external links into the shard files (no data is copied,
    the shards must stay where they are); with `copy` it is self-contained.

    Returns:
        The number of videos in the merged store.
    """
    settings = None
    count = 0
    with writing(Path(out)), atomic_path(Path(out)) as tmp, h5py.File(tmp, "w") as f:
        videos = f.create_group("videos")
        for path in inputs:
            with FlowStore(path) as store:
                if settings is None:
                    settings = store.settings
                elif _comparable(store.settings) != _comparable(settings):
                    raise StoreError(f"{path} was made with other settings than {inputs[0]}; "
                                     "only shards of one run can be merged")
                for vid, name in store._names.items():
                    if name in videos:
                        raise StoreError(f"video {vid!r} is in two inputs (again in {path})")
                    if copy:
                        store._file.copy(store._file["videos"][name], videos, name=name)
                    else:
                        target = os.path.relpath(Path(path).resolve(), Path(out).resolve().parent)
                        videos[name] = h5py.ExternalLink(target, f"/videos/{name}")
                    count += 1
        f.attrs.update(_file_attrs(settings or {}))
    return count


def _comparable(settings: dict) -> dict:
    return {k: v for k, v in settings.items() if k not in ("shard", "workers", "out")}
