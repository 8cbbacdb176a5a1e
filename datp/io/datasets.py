"""Datasets: a list of records (video id, path, label, split), read from the formats users have.

Accepted sources (`load_dataset` picks by what the path is):
1. a folder tree `root/<class>/<video file>`: labels from the sorted class names, split "all"
   (a flat folder of videos gives unlabelled records, label -1);
2. a list file of `<path> <label>` lines (mmaction2's video list): paths relative to `root` when
   given, else to the list's folder; the split comes from the file name (`train`, `val`, `test`
   in it), else "all";
3. UCF101's official splits: a folder holding `classInd.txt` (1-based ids) and
   `trainlist0K.txt` / `testlist0K.txt` (CRLF tolerated), K = `split`; videos under `root`;
4. HMDB51's official splits: a folder of `<class>_test_splitK.txt` files (1 = train, 2 = test,
   0 = unused); videos under `root/<class>/`;
5. a single video file (label -1, split "all");
6. a datp manifest CSV with header `id,path,label,split` (written by `datp synth`).
7. a rawframe annotation list (mmaction2's RawframeDataset): `<frame_dir> <total_frames> <label>`,
   with an offset or several labels (`datp.io.rawframes`); `path` is then the frame folder.
Several sources can be given at once (e.g. a train and a test list); ids must stay unique.

Video ids are the path relative to the dataset root without its extension
(`ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01`), so they keep the class folder that TSN-style frame
folders use. `safe_name` turns an id into a file name that cannot escape a folder.
"""

from __future__ import annotations

import csv
import hashlib
import re
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path

from datp.io.messages import warn
from datp.io.rawframes import LIST_FORMATS, is_rawframe_list, parse_rawframe_list
from datp.io.shards import SHARD_ENV, check_shard, parse_shard, shard_out, shard_records  # noqa: F401 (re-exported)

# every container PyAV (ffmpeg) decodes that datasets ship videos in
VIDEO_EXTENSIONS = (".avi", ".mp4", ".mkv", ".webm", ".mov", ".mpg", ".mpeg", ".m4v", ".flv",
                    ".wmv", ".3gp", ".3g2", ".ts", ".mts", ".m2ts", ".gif", ".ogv", ".ogg",
                    ".mxf", ".y4m", ".nut", ".asf", ".vob", ".f4v", ".dv")


class DatasetError(ValueError):
    """A source that cannot be read; the message names the file and line."""


@dataclass(frozen=True)
class Record:
    """One video. `origin` says where it was listed ("file:line"), for error messages.

    Attributes:
        labels: every label of the video (multi-label lists); `label` is the first, and
            `labels` is `(label,)` for single-label sources and `()` for unlabelled ones.
        total_frames: for a rawframe folder (`path` is a folder of `img_*.jpg`), the frame
            count its list gives; None for a video file.
        offset: a rawframe list's offset (frame i is image number offset + first + i).
    """

    id: str
    path: Path
    label: int = -1
    split: str = "all"
    origin: str = ""
    labels: tuple[int, ...] = ()
    total_frames: int | None = None
    offset: int = 0

    def __post_init__(self):
        labels = tuple(int(v) for v in self.labels)
        if not labels and self.label >= 0:
            labels = (self.label,)
        if labels and self.label == -1:
            object.__setattr__(self, "label", labels[0])
        if labels and labels[0] != self.label:
            raise DatasetError(f"{self.origin}: label {self.label} must be the first of labels {labels}")
        object.__setattr__(self, "labels", labels)

    @property
    def is_rawframes(self) -> bool:
        """A folder of frames (from a rawframe list), not a video file."""
        return self.total_frames is not None


@dataclass
class Dataset:
    records: list[Record]
    class_names: list[str] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)

    def missing(self) -> list[Record]:
        """Records whose video file (or rawframe folder) does not exist."""
        return [r for r in self.records if not (r.path.is_dir() if r.is_rawframes else r.path.is_file())]


def load_dataset(sources: str | Path | list, *, root: str | Path | None = None,
                 split: int = 1, list_format: str = "auto") -> Dataset:
    """Read one or more sources into a Dataset (see the module docstring for the formats).

    Args:
        sources: a path or a list of paths.
        root: where videos live, for list files and official split folders.
        split: split number for UCF101/HMDB51 official splits (1, 2 or 3).
        list_format: how list files are read: "auto" (rawframe lists are told from video lists
            by their fields, `datp.io.rawframes`), "video", "rawframes" or "rawframes-offset".

    Raises:
        DatasetError: unreadable source, malformed line (file and line named), duplicate ids.
    """
    if isinstance(sources, (str, Path)):
        sources = [sources]
    if not sources:
        raise DatasetError("no source given; pass a video, a folder, a list file or a split folder")
    root = Path(root) if root is not None else None
    if list_format not in LIST_FORMATS:
        raise DatasetError(f"list format {list_format!r}; choose from {list(LIST_FORMATS)}")
    records: list[Record] = []
    class_names: list[str] = []
    for source in map(Path, sources):
        part = _load_one(source, root, split, list_format)
        if part.class_names:
            if class_names and part.class_names != class_names:
                raise DatasetError(f"{source}: its classes differ from the previous source's; "
                                   "give sources of one dataset")
            class_names = part.class_names
        records.extend(part.records)
    seen: dict[str, Record] = {}
    for record in records:
        if record.id in seen:
            raise DatasetError(f"{record.origin}: video id {record.id!r} already listed at "
                               f"{seen[record.id].origin}; ids must be unique")
        seen[record.id] = record
        _check_label(record, class_names)
    _note_label_gaps(records, class_names)
    return Dataset(records, class_names, [str(s) for s in sources])


def _note_label_gaps(records: list[Record], class_names: list[str]) -> None:
    """Without a class list, the classes are 0..max label: say so when most of them have no video
    (a label of 99 among 0-2 is more likely a typo than 97 empty classes). A warning, not an error:
    a list of a few classes of a larger dataset is legitimate."""
    labels = {lab for r in records for lab in (r.labels or (r.label,)) if lab >= 0}
    if class_names or not labels or len(labels) * 2 >= max(labels) + 1:
        return
    first = min(set(range(max(labels) + 1)) - labels)
    top = next(r for r in records if max(r.labels or (r.label,)) == max(labels))
    warn(f"labels go up to {max(labels)} ({top.origin}) but only {len(labels)} of the "
          f"{max(labels) + 1} classes this makes have videos (none for {first}); check the labels, or give "
          "the class list (classInd.txt or a manifest's class column)")


def _check_label(record: Record, class_names: list[str]) -> None:
    """Labels are -1 (unknown) or a class index; within the class list when there is one."""
    for label in record.labels[1:]:
        if label < 0 or (class_names and label >= len(class_names)):
            raise DatasetError(f"{record.origin}: label {label} is not a class index")
    if record.label < -1:
        raise DatasetError(f"{record.origin}: label {record.label} must be -1 (unknown) or a "
                           "class index >= 0")
    if class_names and record.label >= len(class_names):
        raise DatasetError(f"{record.origin}: label {record.label} is not a class index "
                           f"(the dataset has {len(class_names)} classes: 0..{len(class_names) - 1})")


def open_dataset(sources: str | Path | list, *, root: str | Path | None = None, split: int = 1,
                 skip_missing: bool = False, list_format: str = "auto") -> tuple[Dataset, list[Record]]:
    """`load_dataset`, then the rule for videos that are not on disk: an error naming the first one,
    or, with `skip_missing`, the list of them (the long jobs record them as failures).

    Returns:
        (dataset, missing records).

    Raises:
        DatasetError: as `load_dataset`, or a missing video without `skip_missing`.
    """
    dataset = load_dataset(sources, root=root, split=split, list_format=list_format)
    missing = dataset.missing()
    if missing and not skip_missing:
        first = missing[0]
        raise DatasetError(f"{first.origin}: video {first.path} not found ({len(missing)} of "
                           f"{len(dataset.records)} missing); check --root, or pass "
                           "--skip-missing to record them as failures")
    return dataset, missing


def _load_one(source: Path, root: Path | None, split: int, list_format: str) -> Dataset:
    if not source.exists():
        raise DatasetError(f"{source}: no such file or folder")
    if source.is_file():
        if source.suffix.lower() in VIDEO_EXTENSIONS:
            return Dataset([Record(source.stem, source, -1, "all", str(source))])
        if source.suffix.lower() == ".csv":
            return _load_manifest(source)
        return _load_list(source, root, list_format)
    if (source / "classInd.txt").is_file():
        return _load_ucf101(source, root, split)
    if any(source.glob(f"*_test_split{split}.txt")):
        return _load_hmdb51(source, root, split)
    return _load_tree(source)


def _split_from_name(name: str) -> str:
    lowered = name.lower()
    for key in ("train", "val", "test"):
        if key in lowered:
            return key
    return "all"


def _video_id(path: Path, base: Path) -> str:
    try:
        rel = path.relative_to(base)
    except ValueError:
        rel = Path(path.name)
    return rel.with_suffix("").as_posix()


def _read_lines(path: Path) -> list[tuple[int, str]]:
    """(line number, stripped text) of non-empty lines; CRLF and a UTF-8 BOM tolerated."""
    text = path.read_text(encoding="utf-8-sig", errors="replace")
    return [(n, line.strip()) for n, line in enumerate(text.splitlines(), 1) if line.strip()]


def _load_list(path: Path, root: Path | None, list_format: str) -> Dataset:
    base = root if root is not None else path.parent
    split = _split_from_name(path.name)
    lines = _read_lines(path)
    if list_format.startswith("rawframes") or (list_format == "auto" and is_rawframe_list(lines)):
        try:
            rows = parse_rawframe_list(path, lines, list_format)
        except ValueError as err:
            raise DatasetError(str(err)) from None
        # mmaction2's frame_dir is the video's id; the same folder may be listed twice (its tests do)
        return Dataset([Record(_video_id(base / r.frame_dir, base) + (f"#{r.line}" if _repeated(rows, r) else ""),
                               base / r.frame_dir, -1, split, f"{path}:{r.line}", r.labels,
                               r.total_frames, r.offset) for r in rows])
    records = []
    for n, line in lines:
        parts = line.rsplit(maxsplit=1)
        if len(parts) != 2 or not re.fullmatch(r"-?\d+", parts[1]):
            raise DatasetError(f"{path}:{n}: expected '<video path> <integer label>', got {line!r}")
        video = base / parts[0]
        records.append(Record(_video_id(video, base), video, int(parts[1]), split, f"{path}:{n}"))
    return Dataset(records)


def _repeated(rows, row) -> bool:
    return sum(r.frame_dir == row.frame_dir for r in rows) > 1


def _load_manifest(path: Path) -> Dataset:
    records = []
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        expected = {"id", "path", "label", "split"}
        if reader.fieldnames is None or not expected <= set(reader.fieldnames):
            raise DatasetError(f"{path}:1: a manifest needs the header id,path,label,split; "
                               f"got {reader.fieldnames}")
        for n, row in enumerate(reader, 2):
            empty = [k for k in ("id", "path", "label", "split") if not (row.get(k) or "").strip()]
            if empty or None in row:
                what = (f"field {empty[0]!r} is missing or empty" if empty
                        else "the row has more fields than the header")
                raise DatasetError(f"{path}:{n}: {what}; rows are id,path,label,split")
            try:
                label = int(row["label"])
            except (TypeError, ValueError):
                raise DatasetError(f"{path}:{n}: label {row['label']!r} is not an integer") from None
            records.append(Record(row["id"], path.parent / row["path"], label, row["split"],
                                  f"{path}:{n}"))
    classes = path.parent / "classes.txt"
    names = [line for _, line in _read_lines(classes)] if classes.is_file() else []
    return Dataset(records, names)


def _load_ucf101(folder: Path, root: Path | None, split: int) -> Dataset:
    base = root if root is not None else folder
    class_ids: dict[str, int] = {}
    index = folder / "classInd.txt"
    for n, line in _read_lines(index):
        parts = line.split()
        if len(parts) != 2 or not parts[0].isdigit():
            raise DatasetError(f"{index}:{n}: expected '<1-based id> <class name>', got {line!r}")
        class_ids[parts[1]] = int(parts[0]) - 1
    names = [name for name, _ in sorted(class_ids.items(), key=lambda kv: kv[1])]
    records = []
    for subset in ("train", "test"):
        listing = folder / f"{subset}list0{split}.txt"
        if not listing.is_file():
            raise DatasetError(f"{listing}: missing; UCF101 split {split} needs trainlist0{split}.txt "
                               f"and testlist0{split}.txt")
        for n, line in _read_lines(listing):
            rel = line.split()[0]
            cls = rel.split("/")[0]
            if cls not in class_ids:
                raise DatasetError(f"{listing}:{n}: class {cls!r} is not in {index.name}")
            video = base / rel
            records.append(Record(_video_id(video, base), video, class_ids[cls], subset,
                                  f"{listing}:{n}"))
    return Dataset(records, names)


def _load_hmdb51(folder: Path, root: Path | None, split: int) -> Dataset:
    base = root if root is not None else folder
    suffix = f"_test_split{split}.txt"
    # sorted by class name (as the official label order), not by file name: climb < climb_stairs
    files = sorted(folder.glob(f"*{suffix}"), key=lambda f: f.name[: -len(suffix)])
    names = [f.name[: -len(suffix)] for f in files]
    subsets = {"0": "unused", "1": "train", "2": "test"}
    records = []
    for label, (name, listing) in enumerate(zip(names, files)):
        for n, line in _read_lines(listing):
            parts = line.split()
            if len(parts) != 2 or parts[1] not in subsets:
                raise DatasetError(f"{listing}:{n}: expected '<video> <0|1|2>', got {line!r}")
            video = base / name / parts[0]
            records.append(Record(_video_id(video, base), video, label, subsets[parts[1]],
                                  f"{listing}:{n}"))
    return Dataset(records, names)


def _load_tree(folder: Path) -> Dataset:
    classes = sorted(d.name for d in folder.iterdir() if d.is_dir())
    records = [Record(v.stem, v, -1, "all", str(v)) for v in sorted(folder.iterdir())
               if v.suffix.lower() in VIDEO_EXTENSIONS and v.is_file()]
    if records and any(_has_videos(folder / name) for name in classes):
        raise DatasetError(f"{folder}: holds videos at its root ({records[0].path.name}, ...) and "
                           f"class folders ({classes[0]}, ...); move the videos into class folders "
                           "or give a folder of one kind")
    if records:  # a flat folder of videos: no labels
        return Dataset(records)
    for label, name in enumerate(classes):
        for video in sorted((folder / name).rglob("*")):
            if video.suffix.lower() in VIDEO_EXTENSIONS and video.is_file():
                records.append(Record(_video_id(video, folder), video, label, "all", str(video)))
    if not records:
        raise DatasetError(f"{folder}: no videos found in {folder}/<class>/ (extensions "
                           f"{', '.join(VIDEO_EXTENSIONS)})")
    return Dataset(records, classes)


def _has_videos(folder: Path) -> bool:
    return any(v.suffix.lower() in VIDEO_EXTENSIONS and v.is_file() for v in folder.rglob("*"))


def class_names_or_numbers(class_names, labels) -> list[str]:
    """`class_names` when there are any, else "0", "1", ... up to the largest known label (>= 0).

    Returns:
        The names; [] when there are no names and no known labels.
    """
    if len(class_names):
        return list(class_names)
    known = [int(label) for label in labels if label >= 0]
    return [str(c) for c in range(max(known) + 1)] if known else []


def check_range(name: str, value, low, note: str = "") -> None:
    """Raise ValueError unless `value` >= `low` (the option `name` in the message)."""
    if value is None or not value >= low:
        extra = f" ({note})" if note else ""
        raise ValueError(f"{name.replace('_', '-')} {value} must be >= {low}{extra}")


def safe_name(video_id: str) -> str:
    """A file name for a video id: percent-encoded (no '/', no '..'), hashed when too long."""
    name = urllib.parse.quote(video_id, safe="-_.")
    if name.startswith("."):
        name = "%2E" + name[1:]
    if len(name) > 200:
        name = name[:150] + "-" + hashlib.sha1(video_id.encode()).hexdigest()
    return name
