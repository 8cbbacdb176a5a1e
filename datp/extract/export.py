"""`datp export-features`: a feature store as plain per-video NumPy arrays, for other tools.

OUT/
  <stream>/<safe id>.npy         conv maps (n, Cf, h, w) float16, as stored (n = the video's segments)
  <stream>_logits/<safe id>.npy  class scores (n, C) float32
  videos.csv                     id, label, class, split, fps, num_frames, file (<safe id>.npy),
                                 segment_frames (the first frame of each segment, space-separated)
  settings.json                  the store's attributes (backbone, weights, settings, ...) and datp's version
  .datp-export                   marker: OUT was written by datp export-features

File names come from `datp.io.datasets.safe_name(id)`. The folder is written aside and renamed into
place whole; an OUT that holds anything but an earlier export is refused.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np

import datp
from datp.extract.store import FeatureStore
from datp.io.atomic import atomic_path
from datp.io.datasets import safe_name

MARKER = ".datp-export"
FORMATS = ("npy",)


def export_features(store_path: str | Path, out: str | Path, *, fmt: str = "npy",
                    streams: tuple[str, ...] | None = None, split: str | None = None) -> int:
    """Write every done video of the store (or of one split) as arrays under `out` (see the module docstring).

    Returns:
        The number of videos written.

    Raises:
        ValueError: an unknown format or stream, no done video, or an `out` datp did not write.
    """
    if fmt not in FORMATS:
        raise ValueError(f"--format {fmt!r} is not one of {list(FORMATS)}")
    out = Path(out)
    if out.exists() and not (out.is_dir() and (not any(out.iterdir()) or (out / MARKER).is_file())):
        raise ValueError(f"--out {out} exists and is not an earlier datp export-features folder; give another --out")
    with FeatureStore(store_path) as store:
        streams = tuple(streams or store.streams)
        for stream in streams:
            store.require(stream)
        rows = store.indices(split)
        if not len(rows):
            raise ValueError(f"{store.path.name} has no done videos" + (f" of split {split!r}" if split else ""))
        names = list(store.class_names or [])
        out.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(out) as tmp:
            for stream in streams:
                (tmp / stream).mkdir(parents=True)
                (tmp / f"{stream}_logits").mkdir()
            with (tmp / "videos.csv").open("w", newline="") as f:
                writer = csv.writer(f)
                writer.writerow(["id", "label", "class", "split", "fps", "num_frames", "file", "segment_frames"])
                for row in rows:
                    batch = store.load([row], streams=streams, conv=True)
                    n = int(batch.mask[0].sum())
                    file = f"{safe_name(store.ids[row])}.npy"
                    for stream in streams:
                        np.save(tmp / stream / file, batch.conv[stream][0, :n].numpy().astype(np.float16))
                        np.save(tmp / f"{stream}_logits" / file, batch.logits[stream][0, :n].numpy())
                    label = int(store.labels[row])
                    writer.writerow([store.ids[row], label, names[label] if 0 <= label < len(names) else "",
                                     store.splits[row], float(store.fps[row]), int(store.num_frames[row]), file,
                                     " ".join(str(int(v)) for v in batch.frame[0, :n])])
            attrs = {k: (v.item() if isinstance(v, np.generic) else v) for k, v in store.attrs.items()}
            (tmp / "settings.json").write_text(json.dumps({"store": str(store.path.resolve()), "attrs": attrs,
                                                           "streams": list(streams), "split": split,
                                                           "datp_version": datp.__version__}, indent=2, default=str))
            (tmp / MARKER).write_text("export-features\n")
    return len(rows)
