"""`datp import-features`: the community's precomputed per-video feature arrays -> a feature store.

Weakly supervised localization (STPN, W-TALC, BaS-Net, CO2-Net, DELU, DDG-Net) trains on I3D RGB and
flow features saved as one `.npy` (T, D) array per video and stream, row k covering the 16 frames
`offset + 16 k .. offset + 16 k + 15` at 25 fps. Two folder layouts are read:

- "streams": one array per stream, `<id>_rgb.npy` / `<id>_flow.npy` (v-iashin/video_features' i3d
  output: stack and step 16, `--extraction_fps 25`) or `rgb/<id>.npy` / `flow/<id>.npy`, also under a
  folder per split (`<split>/rgb/<id>.npy`: BaSNet-pytorch's `features/train|test/rgb|flow`);
- "joint": one array per video, `<id>.npy`, RGB and flow concatenated along D (W-TALC's and BaS-Net's
  (T, 2048) = rgb | flow files): `split_at` K gives columns [:K] to rgb and [K:] to flow (0: the whole
  array is one stream, `stream`). "auto" picks "streams" when any such file exists, else "joint".

The list says which videos, their labels and timing: a CSV with a header (`id`; `labels` or `label`,
class names separated by ";" or "|", empty for a background-only video; `split`; and optionally
`fps`, `frames_per_row`, `offset`, `num_frames`, else the config's), or an ActivityNet-style ground
truth JSON (`{"database": {id: {"subset", "annotations": [{"label", "segment"}], "duration"}}}`, as
BaSNet's gt.json and `datp synth --untrimmed` write): a video's labels are its annotations' classes,
its split comes from its subset through `splits`.

The store is ragged (one row per feature row), with `segments/frame` = `offset + k * frames_per_row`,
`new_length` = {stream: frames_per_row} and `stride` = frames_per_row, so each row shows its middle
frame and `datp localize` centres its span there (`datp.pool.detect.pipeline.shown_frames`). Arrays are
stored as float16 (the conv maps' dtype; relative rounding below 2^-11); the stored logits have zero
classes (nothing to cache: train-head fits its classifier, `--score-source linear`). Multi-label
videos fill the store's multi-hot `videos/labels` column. Arrays are read with `allow_pickle=False`
(W-TALC's one-file object arrays of all videos are refused with what to do).
"""

from __future__ import annotations

import csv
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from datp.extract.store import (
    VideoFeatures,
    VideoRow,
    base_attrs,
    build_store,
    write_part,
)
from datp.io.atomic import output_lock
from datp.io.h5header import StoreError, check_output

LAYOUTS = ("auto", "streams", "joint")
SPLITS = ("train", "val", "test", "all", "unused")
DEFAULT_SPLITS = "training=train,train=train,validation=val,val=val,testing=test,test=test"


@dataclass(frozen=True)
class ImportConfig:
    """Settings of `datp import-features` (recorded in the store's `settings`).

    Attributes:
        features: the folder of `.npy` arrays.
        out: the feature store to write.
        list: the CSV list or ActivityNet-style JSON (see the module docstring).
        layout: "streams", "joint" or "auto".
        split_at: joint arrays: columns [:K] are rgb, [K:] flow; 0 keeps the array as one stream.
        stream: the stream of an unsplit joint array ("rgb" or "flow").
        fps, frames_per_row, offset: each video's, where the list does not say.
        splits: JSON lists: "SUBSET=SPLIT,..." (THUMOS14 weak supervision trains on its validation
            videos: "validation=train,test=test").
        skip_missing: leave out listed videos without arrays (else an error).
    """

    features: str
    out: str
    list: str
    layout: str = "auto"
    split_at: int = 0
    stream: str = "rgb"
    fps: float = 25.0
    frames_per_row: int = 16
    offset: int = 0
    splits: str = DEFAULT_SPLITS
    skip_missing: bool = False

    def __post_init__(self):
        if self.layout not in LAYOUTS:
            raise ValueError(f"--layout {self.layout!r} is not one of {list(LAYOUTS)}")
        if self.stream not in ("rgb", "flow"):
            raise ValueError(f"--stream {self.stream!r} must be rgb or flow")
        if self.split_at < 0 or self.frames_per_row < 1 or self.offset < 0 or not self.fps > 0:
            raise ValueError(f"--split-at {self.split_at}, --frames-per-row {self.frames_per_row}, --offset "
                             f"{self.offset} and --fps {self.fps} must be >= 0, >= 1, >= 0 and > 0")
        subset_splits(self.splits)


@dataclass(frozen=True)
class Listed:
    """One video of the list."""

    id: str
    labels: tuple[str, ...]
    split: str
    fps: float
    frames_per_row: int
    offset: int
    num_frames: int = 0  # 0: unknown (offset + rows x frames_per_row)


def subset_splits(text: str) -> dict[str, str]:
    """"validation=train,test=test" -> {"validation": "train", "test": "test"}, checked."""
    out = {}
    for item in filter(None, (x.strip() for x in text.split(","))):
        subset, _, split = item.partition("=")
        if not subset or split not in SPLITS:
            raise ValueError(f"--splits item {item!r} must be SUBSET=SPLIT with SPLIT one of {list(SPLITS)}")
        out[subset.strip()] = split
    return out


def read_list(path: str | Path, cfg: ImportConfig) -> list[Listed]:
    """The videos of a CSV list or an ActivityNet-style JSON (module docstring), in file order."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"--list {path}: no such file")
    if path.suffix.lower() == ".json":
        try:
            database = json.loads(path.read_text())["database"]
        except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError):
            raise ValueError(f"{path} is not ActivityNet-style JSON with a 'database'") from None
        splits = subset_splits(cfg.splits)
        out = []
        for vid, entry in database.items():
            subset = str(entry.get("subset", ""))
            if subset not in splits:
                raise ValueError(f"{path}: video {vid!r} has subset {subset!r}, which --splits {cfg.splits!r} does not "
                                 "map; pass e.g. --splits validation=train,test=test")
            fps = float(entry.get("fps", cfg.fps))
            labels = tuple(sorted({str(a["label"]) for a in entry.get("annotations", [])}))
            frames = int(round(float(entry["duration"]) * fps)) if entry.get("duration") else 0
            out.append(Listed(str(vid), labels, splits[subset], fps, cfg.frames_per_row, cfg.offset, frames))
        return out
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        if not reader.fieldnames or "id" not in reader.fieldnames:
            raise ValueError(f"{path} needs a header line with an 'id' column (and labels, split, fps, "
                             "frames_per_row, offset, num_frames)")
        out = []
        for line, row in enumerate(reader, start=2):
            try:
                text = (row.get("labels") if row.get("labels") is not None else row.get("label")) or ""
                labels = tuple(x.strip() for x in text.replace("|", ";").split(";") if x.strip())
                split = (row.get("split") or "all").strip()
                if split not in SPLITS:
                    raise ValueError(f"split {split!r} is not one of {list(SPLITS)}")
                out.append(Listed(row["id"].strip(), labels, split, float(row.get("fps") or cfg.fps),
                                  int(row.get("frames_per_row") or cfg.frames_per_row),
                                  int(row.get("offset") or cfg.offset), int(row.get("num_frames") or 0)))
            except (ValueError, AttributeError) as err:
                raise ValueError(f"{path} line {line}: {err}") from None
    return out


def _load(path: Path) -> np.ndarray:
    try:
        x = np.load(path, allow_pickle=False)
    except ValueError as err:
        if "allow_pickle" in str(err):
            raise ValueError(f"{path} holds Python objects (e.g. W-TALC's one file of all videos); datp never "
                             "unpickles files: save one (T, D) float array per video as <id>.npy") from None
        raise ValueError(f"{path}: not a readable .npy array ({err})") from None
    if x.ndim != 2 or not np.issubdtype(x.dtype, np.number):
        raise ValueError(f"{path} has shape {x.shape} ({x.dtype}); import-features needs (T, D) numbers")
    return x


def _stream_file(folder: Path, video: Listed, stream: str) -> Path | None:
    for path in (folder / f"{video.id}_{stream}.npy", folder / stream / f"{video.id}.npy",
                 folder / video.split / stream / f"{video.id}.npy"):
        if path.is_file():
            return path
    return None


def video_arrays(folder: Path, video: Listed, cfg: ImportConfig, layout: str) -> dict[str, np.ndarray] | None:
    """{stream: (T, D)} of one video, or None when its files are absent."""
    if layout == "streams":
        paths = {s: _stream_file(folder, video, s) for s in ("rgb", "flow")}
        arrays = {s: _load(p) for s, p in paths.items() if p is not None}
        if len(arrays) == 2 and len(arrays["rgb"]) != len(arrays["flow"]):
            raise ValueError(f"video {video.id!r}: rgb has {len(arrays['rgb'])} rows but flow {len(arrays['flow'])}; "
                             "both streams need one row per feature unit")
        return arrays or None
    path = next((p for p in (folder / f"{video.id}.npy", folder / video.split / f"{video.id}.npy") if p.is_file()),
                None)
    if path is None:
        return None
    x = _load(path)
    if not cfg.split_at:
        return {cfg.stream: x}
    if not 0 < cfg.split_at < x.shape[1]:
        raise ValueError(f"{path} has width {x.shape[1]}; --split-at {cfg.split_at} must be inside it "
                         "(1024 for I3D rgb | flow arrays of width 2048)")
    return {"rgb": x[:, :cfg.split_at], "flow": x[:, cfg.split_at:]}


def _layout(folder: Path, cfg: ImportConfig) -> str:
    if cfg.layout != "auto":
        return cfg.layout
    if any(folder.glob("*_rgb.npy")) or any(folder.glob("*_flow.npy")) or any(folder.glob("rgb/*.npy")) \
            or any(folder.glob("*/rgb/*.npy")) or any(folder.glob("flow/*.npy")) or any(folder.glob("*/flow/*.npy")):
        return "streams"
    return "joint"


def import_features(cfg: ImportConfig, *, progress: bool = True) -> dict:
    """Write the store `cfg.out` from the arrays of `cfg.features` and the videos of `cfg.list`.

    Returns:
        {"videos", "rows", "streams", "widths", "classes", "layout", "missing", "not_listed"}.

    Raises:
        ValueError: a bad list, a missing array, or arrays whose widths or lengths disagree with the
            list or each other (one line naming the video and the fix).
        StoreError: `out` is something datp does not overwrite.
    """
    folder, out = Path(cfg.features), Path(cfg.out)
    if not folder.is_dir():
        raise ValueError(f"--features {folder}: no such folder")
    check_output(out, kind="features", noun="feature store")
    if out.exists():
        raise StoreError(f"{out} exists; import-features writes a new store: choose another --out or remove it")
    listed = read_list(cfg.list, cfg)
    if not listed:
        raise ValueError(f"{cfg.list} lists no videos")
    if len({v.id for v in listed}) != len(listed):
        raise ValueError(f"{cfg.list} lists a video twice")
    fpr = {v.frames_per_row for v in listed}
    if len(fpr) != 1:
        raise ValueError(f"{cfg.list} has frames_per_row {sorted(fpr)}; one store holds one value: import each "
                         "value into its own store")
    fpr = fpr.pop()
    layout = _layout(folder, cfg)
    class_names = sorted({c for v in listed for c in v.labels})
    index = {c: i for i, c in enumerate(class_names)}
    widths: dict[str, int] = {}
    streams: tuple[str, ...] | None = None
    rows, missing, total = [], [], 0
    with output_lock(out):
        for v in listed:
            arrays = video_arrays(folder, v, cfg, layout)
            if arrays is None:
                missing.append(v.id)
                continue
            if streams is None:
                streams = tuple(sorted(arrays))
            if tuple(sorted(arrays)) != streams:
                raise ValueError(f"video {v.id!r} has streams {sorted(arrays)}, the first video {list(streams)}; "
                                 "every video needs the same streams")
            T = len(next(iter(arrays.values())))
            for stream, x in arrays.items():
                widths.setdefault(stream, x.shape[1])
                if x.shape[1] != widths[stream]:
                    raise ValueError(f"video {v.id!r}: {stream} width {x.shape[1]}, other videos {widths[stream]}; "
                                     "every video needs features of one width per stream")
            if T == 0:
                raise ValueError(f"video {v.id!r} has no feature rows; drop it from the list")
            frames = v.num_frames or v.offset + T * fpr
            units = (frames - v.offset) / fpr
            if v.num_frames and not np.floor(units) <= T <= np.ceil(units):
                raise ValueError(f"video {v.id!r}: {T} feature rows, but the list's num_frames {v.num_frames} "
                                 f"(offset {v.offset}, {fpr} frames per row) gives {units:.1f}; fix num_frames, "
                                 "frames_per_row or offset in the list")
            frame = v.offset + np.arange(T, dtype=np.int64) * fpr
            frames = max(frames, int(frame[-1]) + fpr // 2 + 1)  # the last row's shown frame is in the video
            feats = VideoFeatures(t=((frame + fpr / 2) / frames).astype(np.float32), frame=frame,
                                  streams={s: (x, np.zeros((T, 0), np.float32)) for s, x in arrays.items()},
                                  num_frames=int(frames), fps=v.fps)
            labels = tuple(index[c] for c in v.labels)
            row = VideoRow(v.id, labels[0] if labels else -1, v.split, int(frames), v.fps,
                           labels if len(labels) > 1 else ())
            write_part(out, v.id, feats, label=row.label, split=row.split)
            rows.append(row)
            total += T
            if progress and len(rows) % 100 == 0:
                print(f"import-features: {len(rows)} videos", flush=True)
        if missing and not cfg.skip_missing:
            raise ValueError(f"{len(missing)} listed videos have no arrays in {folder} (first {missing[0]!r}, layout "
                             f"{layout}); add them, or pass --skip-missing")
        if not rows:
            raise ValueError(f"no listed video has arrays in {folder} (layout {layout})")
        attrs = base_attrs(layout="ragged", class_names=class_names, new_length={s: fpr for s in streams},
                           settings=asdict(cfg), stride=fpr, backbone="imported", weights="imported",
                           logits_match_labels=False, logit_classes=0,
                           imported={"layout": layout, "widths": widths, "frames_per_row": fpr})
        build_store(out, rows, attrs, streams, final=True)
    known = {v.id for v in listed}
    stems = {p.stem for p in folder.rglob("*.npy")}
    not_listed = {s.rsplit("_", 1)[0] if s.endswith(("_rgb", "_flow")) else s for s in stems} - known
    return {"videos": len(rows), "rows": total, "streams": list(streams), "widths": widths,
            "classes": len(class_names), "multi_label": sum(len(r.labels) > 1 for r in rows),
            "background": sum(r.label < 0 for r in rows), "layout": layout, "missing": missing,
            "not_listed": len(not_listed)}
