"""The file formats of temporal detection: ground truth (ActivityNet JSON, THUMOS14 annotation
folders), detections (ActivityNet results JSON, written and read) and exported attention weights
(JSON or CSV), with the records they hold (`GroundTruth`, `AmbiguousRegion`, `Detection`,
`GroundTruthSet`). Nothing else in datp opens these files.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from datp.io.atomic import atomic_path


def checked_array(x, name: str, ndim: int) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != ndim:
        raise ValueError(f"{name} has shape {x.shape}; expected {ndim} dimensions")
    return x


def _check_segment(what: str, video: str, start: float, end: float) -> None:
    if not (np.isfinite(start) and np.isfinite(end)) or end < start:
        raise ValueError(f"{what} in video {video!r} has segment [{start}, {end}]; need finite start <= end")


@dataclass(frozen=True)
class GroundTruth:
    """One annotated action instance: `label` happens in `video` from `start` to `end` seconds."""

    video: str
    label: str
    start: float
    end: float

    def __post_init__(self) -> None:
        _check_segment(f"ground truth {self.label!r}", self.video, self.start, self.end)


@dataclass(frozen=True)
class AmbiguousRegion:
    """A THUMOS14 "Ambiguous" span of `video` (seconds): detections there are not false positives."""

    video: str
    start: float
    end: float

    def __post_init__(self) -> None:
        _check_segment("ambiguous region", self.video, self.start, self.end)


@dataclass(frozen=True)
class Detection:
    """One predicted action instance with its confidence `score` (higher is more confident)."""

    video: str
    label: str
    start: float
    end: float
    score: float

    def __post_init__(self) -> None:
        _check_segment(f"detection {self.label!r}", self.video, self.start, self.end)
        if not np.isfinite(self.score):
            raise ValueError(f"detection {self.label!r} in video {self.video!r} has score {self.score}")


@dataclass(frozen=True)
class GroundTruthSet:
    """Everything an evaluator needs to know about the truth.

    Attributes:
        instances: the annotated actions, in file order (THUMOS14 matches ground truth in this order).
        ambiguous: THUMOS14 "Ambiguous" regions (empty for ActivityNet files); only `thumos14` uses them.
        videos: every video of the subset, including videos without annotations.
    """

    instances: tuple[GroundTruth, ...]
    ambiguous: tuple[AmbiguousRegion, ...] = ()
    videos: tuple[str, ...] = ()


def read_activitynet_ground_truth(path: str | Path, *, subset: str | None = None) -> GroundTruthSet:
    """Read an ActivityNet-style ground-truth JSON.

    The format is `{"database": {video: {"subset": ..., "annotations": [{"segment": [s, e],
    "label": name}, ...]}}}`; other keys (`taxonomy`, `version`, `duration`, ...) are ignored.

    Args:
        path: the JSON file.
        subset: keep only videos whose `"subset"` equals this (the official tool uses
            "validation"); None keeps every video.

    Returns:
        The ground truth (no ambiguous regions).
    """
    data = json.loads(Path(path).read_text())
    if not isinstance(data, dict) or "database" not in data:
        raise ValueError(f"{path} has no 'database' key; expected ActivityNet ground truth JSON")
    instances, videos, subsets = [], [], set()
    for video, entry in data["database"].items():
        subsets.add(entry.get("subset"))
        if subset is not None and entry.get("subset") != subset:
            continue
        videos.append(video)
        for ann in entry.get("annotations", []):
            start, end = ann["segment"]
            instances.append(GroundTruth(video, str(ann["label"]), float(start), float(end)))
    if subset is not None and not videos:
        raise ValueError(f"{path} has no video in subset {subset!r}; its subsets are {sorted(map(str, subsets))}")
    return GroundTruthSet(tuple(instances), (), tuple(videos))


def _read_thumos_file(path: Path) -> list[tuple[str, float, float]]:
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) != 3:
            raise ValueError(f"{path}:{number}: expected '<video> <start> <end>', got {line!r}")
        rows.append((parts[0], float(parts[1]), float(parts[2])))
    return rows


def read_thumos14_ground_truth(folder: str | Path, *, subset: str | None = None) -> GroundTruthSet:
    """Read THUMOS14 temporal annotations: one `<Class>_<subset>.txt` per class in `folder`.

    Each line is `<video> <start seconds> <end seconds>`; `Ambiguous_<subset>.txt` holds the ambiguous
    regions. Other files (e.g. `detclasslist.txt`) are ignored.

    Args:
        folder: the annotation folder.
        subset: "val" or "test" (the file suffix); None picks the only subset present.

    Returns:
        The ground truth, in file order (classes sorted by name), with its ambiguous regions.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"{folder} is not a folder of THUMOS14 '<Class>_<subset>.txt' files")
    files = sorted(p for p in folder.glob("*_*.txt"))
    present = sorted({p.stem.rsplit("_", 1)[1] for p in files})
    if subset is None:
        if len(present) != 1:
            raise ValueError(f"{folder} holds subsets {present}; pass subset= one of them")
        subset = present[0]
    files = [p for p in files if p.stem.rsplit("_", 1)[1] == subset]
    if not files:
        raise ValueError(f"{folder} has no '<Class>_{subset}.txt' files; its subsets are {present}")
    instances, ambiguous = [], []
    for path in files:
        label = path.stem.rsplit("_", 1)[0]
        for video, start, end in _read_thumos_file(path):
            if label == "Ambiguous":
                ambiguous.append(AmbiguousRegion(video, start, end))
            else:
                instances.append(GroundTruth(video, label, start, end))
    videos = sorted({g.video for g in instances} | {a.video for a in ambiguous})
    return GroundTruthSet(tuple(instances), tuple(ambiguous), tuple(videos))


def read_ground_truth(path: str | Path, *, subset: str | None = None) -> GroundTruthSet:
    """ActivityNet JSON (a file) or THUMOS14 annotation folder (a directory), by what `path` is."""
    if Path(path).is_dir():
        return read_thumos14_ground_truth(path, subset=subset)
    return read_activitynet_ground_truth(path, subset=subset)


def read_activitynet_predictions(path: str | Path) -> list[Detection]:
    """Read an ActivityNet results JSON.

    The format is `{"version": ..., "results": {video: [{"label": name, "score": s,
    "segment": [start, end]}, ...]}, "external_data": {...}}`; only `results` is required.

    Returns:
        The detections, in file order.
    """
    try:
        data = json.loads(Path(path).read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not JSON ({err.msg} at line {err.lineno}); expected an ActivityNet results "
                         "JSON (datp localize writes one)") from None
    if not isinstance(data, dict) or not isinstance(data.get("results"), dict):
        raise ValueError(f"{path} has no 'results' mapping; expected an ActivityNet results JSON")
    detections = []
    for video, rows in data["results"].items():
        for i, r in enumerate(rows if isinstance(rows, list) else [rows]):
            try:
                segment = [float(v) for v in r["segment"]]
                if len(segment) != 2:
                    raise ValueError
                detections.append(Detection(video, str(r["label"]), segment[0], segment[1], float(r["score"])))
            except (KeyError, TypeError, ValueError):
                raise ValueError(f"{path}: detection {i} of video {video!r} must be {{'label', 'score', "
                                 f"'segment': [start, end]}}, got {r!r}") from None
    return detections


ACTIVITYNET_VERSION = "VERSION 1.3"


def to_activitynet_json(
    detections_by_video: Mapping[str, Sequence[Detection]],
    *,
    version: str = ACTIVITYNET_VERSION,
    external_data: Mapping | None = None,
) -> dict:
    """ActivityNet results dict: `{"version", "results": {video: [{"label", "score", "segment"}]},
    "external_data"}`. Videos with no detections are listed with an empty list."""
    results = {}
    for video, detections in detections_by_video.items():
        for d in detections:
            if d.video != video:
                raise ValueError(f"detection of video {d.video!r} is listed under video {video!r}")
        results[video] = [{"label": d.label, "score": d.score, "segment": [d.start, d.end]} for d in detections]
    return {"version": version, "results": results, "external_data": dict(external_data or {})}


def write_activitynet_json(
    detections_by_video: Mapping[str, Sequence[Detection]],
    path: str | Path,
    *,
    version: str = ACTIVITYNET_VERSION,
    external_data: Mapping | None = None,
) -> Path:
    """Write `to_activitynet_json(...)` to `path` atomically and return the path."""
    path = Path(path)
    text = json.dumps(to_activitynet_json(detections_by_video, version=version, external_data=external_data))
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return path


WEIGHTS_CSV_HEADER = "video,segment,start,end,weight"


def check_replaceable(path: str | Path, *, what: str, option: str = "--out") -> None:
    """Refuse to overwrite `path` unless it is absent or a file of this kind that datp wrote.

    `what` is "detections" (ActivityNet results JSON with datp's `external_data`) or "weights"
    (`export_weights`' JSON or CSV). Called before any work, so a refusal loses nothing.

    Raises:
        ValueError: `path` is a folder, or a file datp did not write as `what`.
    """
    path = Path(path)
    if not path.exists():
        return
    if path.is_dir():
        raise ValueError(f"{option} {path} is a folder; give a file name")
    ours = False
    try:
        if path.suffix == ".csv" and what == "weights":
            with path.open() as f:
                ours = f.readline().strip() == WEIGHTS_CSV_HEADER
        else:
            data = json.loads(path.read_text())
            ours = isinstance(data, dict) and (
                "datp" in (data.get("external_data") or {}) if what == "detections" else set(data) == {"videos"})
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        ours = False
    if not ours:
        raise ValueError(f"{option} {path} exists and is not a {what} file written by datp; give another "
                         f"{option} (datp overwrites only its own {what} files)")


def export_weights(weights_by_video: Mapping[str, tuple], path: str | Path) -> Path:
    """Write per-video attention weights, as JSON or CSV by the suffix of `path`.

    CSV: a header `video,segment,start,end,weight` then one row per segment. JSON:
    `{"videos": {video: {"start": [...], "end": [...], "weight": [...]}}}`.

    Args:
        weights_by_video: video id -> (weights (N,), segment_times (N, 2) seconds).
        path: a `.json` or `.csv` file.

    Returns:
        The path written.
    """
    path = Path(path)
    if path.suffix not in (".json", ".csv"):
        raise ValueError(f"{path} must end in .json or .csv")
    rows = {}
    for video, (weights, times) in weights_by_video.items():
        a, t = checked_array(weights, f"weights of {video!r}", 1), checked_array(times, f"segment times of {video!r}", 2)
        if t.shape != (len(a), 2):
            raise ValueError(f"video {video!r} has {len(a)} weights but segment times of shape {t.shape}")
        rows[video] = (a, t)
    if path.suffix == ".json":
        videos = {v: {"start": t[:, 0].tolist(), "end": t[:, 1].tolist(), "weight": a.tolist()} for v, (a, t) in rows.items()}
        with atomic_path(path) as tmp:
            tmp.write_text(json.dumps({"videos": videos}))
        return path
    with atomic_path(path) as tmp, tmp.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(WEIGHTS_CSV_HEADER.split(","))
        for video, (a, t) in rows.items():
            for i in range(len(a)):
                writer.writerow([video, i, repr(float(t[i, 0])), repr(float(t[i, 1])), repr(float(a[i]))])
    return path


def read_weights(path: str | Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Read `export_weights` output back: video id -> (weights (N,), segment_times (N, 2))."""
    path = Path(path)
    if path.suffix == ".json":
        videos = json.loads(path.read_text())["videos"]
        return {v: (np.array(d["weight"]), np.stack([d["start"], d["end"]], axis=1)) for v, d in videos.items()}
    rows: dict[str, list] = {}
    with path.open(newline="") as f:
        for row in csv.DictReader(f):
            rows.setdefault(row["video"], []).append((float(row["weight"]), float(row["start"]), float(row["end"])))
    return {v: (np.array([r[0] for r in rs]), np.array([r[1:] for r in rs]).reshape(-1, 2)) for v, rs in rows.items()}
