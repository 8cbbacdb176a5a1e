"""The feature store's schema: its constants, file attrs, per-video rows and the `videos/` columns.

See `datp.extract.store` for the layout.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import h5py
import numpy as np

from datp.io.h5header import StoreError, header

SCHEMA = 1
KIND = "features"
BASE_NAME = "_store_base.hdf5"  # a finished store moved aside by a rerun (parts end in .h5)
STREAMS = ("rgb", "flow")
STR_DTYPE = h5py.string_dtype("utf-8")

# HDF5 filters of the conv maps in final stores, by the name recorded in the `conv_compression` attr.
# Chosen by measurement (`python bench/heads.py`, docs/stage-two.md): reading is what stage two pays
# for every head and epoch, writing happens once. On the demo's real float16 maps, one video per
# chunk, read a video at a time on one core: gzip level 1 keeps 0.70 of the raw bytes at ~500
# videos/s, lzf 0.83 at ~950, none 1.00 at 7,000-11,000 (4x4 maps); at 512x7x7, 138 / 426 / 1,573
# videos/s, and only "none" keeps a streamed epoch within 1.2x of the heads' compute on two cores.
# So "none" is the default and the others are there for disks that matter more than time.
CONV_COMPRESSION = {"none": {}, "lzf": {"compression": "lzf"},
                    "gzip": {"compression": "gzip", "compression_opts": 1}}
DEFAULT_CONV_COMPRESSION = "none"

__all__ = ["BASE_NAME", "KIND", "SCHEMA", "STREAMS", "StoreError", "VideoFeatures", "VideoRow",
           "CONV_COMPRESSION", "DEFAULT_CONV_COMPRESSION", "base_attrs", "conv_filters", "is_final", "multi_hot",
           "plain_attrs", "stored_attrs", "write_videos"]


@dataclass(frozen=True)
class VideoRow:
    """The per-video columns of `videos/`."""

    id: str
    label: int = -1
    split: str = "all"
    num_frames: int = 0
    fps: float = 0.0
    labels: tuple[int, ...] = ()  # every class of a multi-label video (THUMOS14); () = just `label`


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
    attrs = {**header(KIND, SCHEMA), "layout": layout,
             "class_names": json.dumps(list(class_names)), "new_length": json.dumps(new_length),
             "settings": json.dumps(settings, sort_keys=True, default=str)}
    if layout == "fixed":
        attrs["num_segments"] = int(num_segments)
    else:
        attrs["stride"] = int(stride)
    for key, value in extra.items():
        attrs[key] = json.dumps(value) if isinstance(value, (dict, list)) else value
    return attrs


def conv_filters(attrs: dict) -> dict:
    """The h5py filter arguments for the conv maps of a store with `attrs` (default: none)."""
    name = attrs.get("conv_compression", DEFAULT_CONV_COMPRESSION)
    if name not in CONV_COMPRESSION:
        raise ValueError(f"conv compression {name!r} is not one of {', '.join(CONV_COMPRESSION)}")
    return CONV_COMPRESSION[name]


def write_videos(f: h5py.File, rows: Sequence[VideoRow]) -> None:
    """The `videos/` columns of a store."""
    v = f.create_group("videos")
    v["id"] = np.array([r.id for r in rows], dtype=object).astype(STR_DTYPE)
    v["label"] = np.array([r.label for r in rows], np.int64)
    v["split"] = np.array([r.split for r in rows], dtype=object).astype(STR_DTYPE)
    v["num_frames"] = np.array([r.num_frames for r in rows], np.int64)
    v["fps"] = np.array([r.fps for r in rows], np.float32)
    if any(r.labels for r in rows):  # the optional multi-hot column; stores without it read one-hot
        v["labels"] = multi_hot(rows, len(json.loads(f.attrs.get("class_names", "[]"))))


def multi_hot(rows: Sequence[VideoRow], num_classes: int) -> np.ndarray:
    """(V, C) uint8 multi-hot labels of `rows`: a row's `labels`, else its `label` (-1: none).

    Raises:
        StoreError: a label outside 0 .. C-1 (C = `num_classes`, or the largest label + 1 when 0).
    """
    sets = [tuple(r.labels) or ((r.label,) if r.label >= 0 else ()) for r in rows]
    C = num_classes or max((c + 1 for labels in sets for c in labels), default=0)
    out = np.zeros((len(rows), C), np.uint8)
    for i, labels in enumerate(sets):
        for c in labels:
            if not 0 <= c < C:
                raise StoreError(f"video {rows[i].id!r} has label {c}; the store has {C} classes")
            out[i, c] = 1
    return out


def is_final(path: Path) -> bool:
    """True when `path` is a self-contained feature store (not an index over parts)."""
    with h5py.File(path, "r") as f:
        return f.attrs.get("datp_kind") == KIND and not f.attrs.get("index_only", False)




def plain_attrs(attrs) -> dict:
    """An HDF5 attrs mapping as plain Python values (numpy scalars unwrapped)."""
    return {k: (v.item() if isinstance(v, np.generic) else v) for k, v in attrs.items()}


def stored_attrs(path: Path) -> dict | None:
    """The file attrs of the feature store at `path` (final or an index), or None when `path`
    is not a file or not a feature store."""
    path = Path(path)
    if not path.is_file():
        return None
    with h5py.File(path, "r") as f:
        if f.attrs.get("datp_kind") != KIND:
            return None
        return plain_attrs(f.attrs)
