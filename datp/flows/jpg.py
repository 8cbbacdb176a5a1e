"""TSN / denseflow / mmaction2 compatible frame folders.

Layout under the output folder, for a video with id `<class>/<video>` and T decoded frames:
- `<class>/<video>/flow_x_00001.jpg`, `flow_y_00001.jpg` ... `_{T-1:05d}`: quantized flow of pair
  i -> i+1, numbered from 1 (denseflow's names);
- with `--rgb`, `<class>/<video>/img_00001.jpg` ... `img_{T:05d}.jpg`: the same resized frames;
- `rgb_list.txt` / `flow_list.txt` (and per split, e.g. `flow_list_train.txt`): lines
  `<frame_dir> <total_frames> <label>` with the true counts (T images, T-1 flows), which
  mmaction2's RawframeDataset and tsn-pytorch's TSNDataSet read directly; they list every video
  of the folder, from every run into it (other lists and shards too);
- `datp_videos.jsonl`: one line (id, label, split) per video written, appended before its folder
  is renamed into place, so the lists can be rebuilt whatever run wrote a video.
A video's folder is written as `.<video>.tmp<pid>` and renamed when complete, so a folder that
exists is whole.

Folders written by other tools are read too (`detect_layout`, `read_flow_pairs(..., layout)`):
denseflow (`flow_x_00000.jpg`, numbered from 0), TSN's dense_flow (`flow_x_00001.jpg`) and
mmaction2 (`x_00001.jpg` / `y_00001.jpg`); their prefixes and first number are detected or given.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from datp.io.datasets import Record
from datp.io.rawframes import numbered

JPEG_QUALITY = 95  # denseflow's default
SETTINGS_NAME = "datp_flow_settings.json"  # the run's settings, beside the video folders
REGISTRY_NAME = "datp_videos.jsonl"  # every video written into the folder: id, label, split


def stored_settings(out: Path) -> dict:
    """The extract-flow settings recorded in the jpg folder `out`.

    Raises:
        ValueError: `out` has no settings file (not written by extract-flow --format jpg).
    """
    marker = Path(out) / SETTINGS_NAME
    if not marker.is_file():
        raise ValueError(f"{out} has no {SETTINGS_NAME}; pass a folder written "
                         "by datp extract-flow --format jpg")
    return json.loads(marker.read_text())


def check_output(out: Path) -> None:
    """Refuse a jpg `--out` that datp would overwrite files in: a file, or a folder that holds
    files but no settings file of extract-flow (not written by datp).

    Raises:
        ValueError: naming the folder.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out} is a file; --format jpg writes a folder: choose another --out")
    if out.is_dir() and not (out / SETTINGS_NAME).is_file():
        stray = next((p for p in out.rglob("*") if p.is_file()), None)
        if stray is not None:
            raise ValueError(f"{out} holds files datp did not write (e.g. {stray}) and no "
                             f"{SETTINGS_NAME}; choose another --out or an empty folder")


def video_dir(out: Path, record: Record) -> Path:
    """The frame folder of a video; refuses ids that would leave `out`."""
    parts = Path(record.id).parts
    if Path(record.id).is_absolute() or ".." in parts or not parts:
        raise ValueError(f"video id {record.id!r} cannot be a folder name under {out}")
    return Path(out, *parts)


def done_ids(out: Path, records: list[Record], *, with_rgb: bool = False, report=None) -> set[str]:
    """Ids of `records` whose frame folder is whole (`check_folder`); a damaged folder is named
    through `report(message)` and left out, so the run redoes it."""
    done = set()
    for record in records:
        folder = video_dir(out, record)
        if folder.is_dir():
            problem = check_folder(folder, with_rgb=with_rgb)
            if problem is None:
                done.add(record.id)
            elif report is not None:
                report(f"{folder}: {problem}; the video is redone")
    return done


def check_folder(folder: Path, *, with_rgb: bool = False) -> str | None:
    """What is wrong with a finished frame folder (None: whole): flow_x_/flow_y_ numbered 1..P with
    no gap (and img_ 1..P+1 with `with_rgb`), every image a complete JPEG (starts with the SOI
    marker, ends with EOI: a file cut short by a crash or a full disk is caught here)."""
    files = {prefix: numbered(folder, prefix) for prefix in ("flow_x_", "flow_y_", "img_")}
    names = {prefix: sorted(found) for prefix, found in files.items()}
    pairs = len(names["flow_x_"])
    if names["flow_x_"] != list(range(1, pairs + 1)) or names["flow_y_"] != names["flow_x_"] or not pairs:
        return f"{pairs} flow_x_ and {len(names['flow_y_'])} flow_y_ images, not both numbered 1..P"
    if with_rgb and names["img_"] != list(range(1, pairs + 2)):
        return f"{len(names['img_'])} img_ images for {pairs} flow pairs (want P + 1 = {pairs + 1})"
    for found in files.values():
        for name in found.values():
            path = folder / name
            with open(path, "rb") as f:
                head = f.read(2)
                f.seek(max(0, os.fstat(f.fileno()).st_size - 2))
                if head != b"\xff\xd8" or f.read(2) != b"\xff\xd9":
                    return f"{path.name} is not a complete JPEG"
    return None


# (x prefix, y prefix) of the tools whose folders are read: denseflow / dense_flow, mmaction2
FLOW_PREFIXES = (("flow_x_", "flow_y_"), ("x_", "y_"))


@dataclass(frozen=True)
class FlowLayout:
    """How a folder names its flow images: pair j (0-based) is `{x}{start + j:05d}.jpg`."""

    x: str = "flow_x_"
    y: str = "flow_y_"
    start: int = 1


DATP_LAYOUT = FlowLayout()


def detect_layout(folder: Path, *, prefixes: tuple[str, str] | None = None,
                  start: int | None = None) -> tuple[FlowLayout, int]:
    """The flow layout of a frame folder and its number of flow pairs P.

    Args:
        folder: one video's frame folder.
        prefixes: (x, y) prefixes, e.g. ("x_", "y_"); detected from `FLOW_PREFIXES` when None.
        start: the first number (0 for denseflow, 1 for TSN / mmaction2); the smallest one
            found when None.

    Returns:
        (layout, P): pairs `start .. start + P - 1` exist for both x and y.

    Raises:
        ValueError: no flow images, both kinds of prefix (ambiguous), or numbers with gaps
            or x and y that disagree; the message says which option fixes it.
    """
    folder = Path(folder)
    candidates = [prefixes] if prefixes else list(FLOW_PREFIXES)
    found = {p: (numbered(folder, p[0]), numbered(folder, p[1])) for p in candidates}
    found = {p: xy for p, xy in found.items() if xy[0] or xy[1]}
    if not found:
        names = " or ".join(f"{x}00001.jpg/{y}00001.jpg" for x, y in candidates)
        raise ValueError(f"{folder}: no flow images ({names}); give the folder of the flow jpgs, "
                         "or their prefixes with --flow-prefixes X,Y")
    if len(found) > 1:
        raise ValueError(f"{folder}: holds flow images of two namings "
                         f"({', '.join(x + '*' for x, _ in found)}); pass --flow-prefixes X,Y")
    (x_prefix, y_prefix), (xs, ys) = next(iter(found.items()))
    first = min(xs) if start is None and xs else (start if start is not None else 0)
    count = 0
    while first + count in xs and first + count in ys:
        count += 1
    if count == 0 or count != len(xs) or count != len(ys):
        raise ValueError(f"{folder}: {len(xs)} {x_prefix}* and {len(ys)} {y_prefix}* images, "
                         f"{count} consecutive pairs from number {first}; the flow jpgs must be "
                         "pairs numbered without gaps (or pass --flow-start with the first number)")
    return FlowLayout(x_prefix, y_prefix, first), count


def read_flow_pairs(folder: Path, pairs, layout: FlowLayout = DATP_LAYOUT) -> dict[int, np.ndarray]:
    """Quantized flow pairs of a video's frame folder: {pair j: (H, W, 2) uint8, x then y}.

    Pair j (0-based, frame j -> j + 1) is `{layout.x}{layout.start + j:05d}.jpg` (datp's own:
    `flow_x_{j + 1:05d}.jpg`) / `{layout.y}...`.

    Raises:
        FileNotFoundError: a pair's image is missing or unreadable.
    """
    folder = Path(folder)
    table = {}
    for j in np.asarray(pairs).tolist():
        number = layout.start + j
        x = cv2.imread(str(folder / f"{layout.x}{number:05d}.jpg"), cv2.IMREAD_GRAYSCALE)
        y = cv2.imread(str(folder / f"{layout.y}{number:05d}.jpg"), cv2.IMREAD_GRAYSCALE)
        if x is None or y is None:
            raise FileNotFoundError(f"{folder}: flow pair {layout.x}{number:05d}.jpg is missing; "
                                    "rerun datp extract-flow --format jpg or check the folder")
        table[j] = np.stack([x, y], -1)
    return table


def count_frames(folder: Path) -> tuple[int, int]:
    """(rgb images, flow pairs) in a frame folder."""
    names = os.listdir(folder)
    return (sum(n.startswith("img_") for n in names), sum(n.startswith("flow_x_") for n in names))


class JpgWriter:
    """Runner sink: writes a video's jpgs into a temporary folder, renamed when complete."""

    def __init__(self, out: Path, *, with_rgb: bool, on_first_done=None):
        self.out = Path(out)
        self.with_rgb = with_rgb
        self._on_first_done = on_first_done
        self._state: dict[str, list] = {}  # id -> [tmp folder, flows written, images written]

    def chunk(self, record: Record, payload) -> None:
        flow, images = payload if self.with_rgb else (payload, None)
        if record.id not in self._state:
            final = video_dir(self.out, record)
            tmp = final.with_name(f".{final.name}.tmp{os.getpid()}")
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            self._state[record.id] = [tmp, 0, 0]
        state = self._state[record.id]
        params = [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY]
        for pair in (flow if flow is not None else []):
            state[1] += 1
            _imwrite(state[0] / f"flow_x_{state[1]:05d}.jpg", pair[..., 0], params)
            _imwrite(state[0] / f"flow_y_{state[1]:05d}.jpg", pair[..., 1], params)
        for image in (images if images is not None else []):
            state[2] += 1
            _imwrite(state[0] / f"img_{state[2]:05d}.jpg",
                     np.ascontiguousarray(image[..., ::-1]), params)  # OpenCV writes BGR

    def done(self, record: Record, meta: dict) -> None:
        tmp, flows, images = self._state.pop(record.id)
        if flows != meta["num_frames"] - 1 or (self.with_rgb and images != meta["num_frames"]):
            raise RuntimeError(f"{record.id}: wrote {flows} flows / {images} images for "
                               f"{meta['num_frames']} frames")
        if self._on_first_done is not None:
            self._on_first_done()
            self._on_first_done = None
        _register(self.out, record)  # before the rename: a folder that exists is listed
        final = video_dir(self.out, record)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)

    def fail(self, record: Record, reason: str) -> None:
        state = self._state.pop(record.id, None)
        if state is not None:
            shutil.rmtree(state[0], ignore_errors=True)

    def close(self) -> None:
        for record_id in list(self._state):
            shutil.rmtree(self._state.pop(record_id)[0], ignore_errors=True)


def _imwrite(path: Path, image: np.ndarray, params) -> None:
    """cv2.imwrite, whose failure (disk full) is only a False: an OSError naming the file."""
    import errno

    if not cv2.imwrite(str(path), image, params):
        raise OSError(errno.EIO, "could not write the image (disk full or not writable?); "
                      "finished videos are kept: free space, then rerun the same command", str(path))


def _listed(out: Path) -> list[Record]:
    """The videos of the folder `out`: those its lists name, then those of its registry they
    miss (written by an interrupted run, or a run of another shard or list)."""
    found: dict[str, Record] = {}
    for name in ("flow_list.txt", "rgb_list.txt"):
        path = out / name
        for line in (path.read_text().splitlines() if path.is_file() else []):
            parts = line.rsplit(maxsplit=2)
            if len(parts) == 3 and parts[0] not in found:
                found[parts[0]] = Record(parts[0], out / parts[0], int(parts[2]), "all")
    for path in list(out.glob("*_list_*.txt")):
        split = path.stem.split("_list_", 1)[1]
        for line in path.read_text().splitlines():
            parts = line.rsplit(maxsplit=2)
            if len(parts) == 3 and parts[0] in found:
                old = found[parts[0]]
                found[parts[0]] = Record(old.id, old.path, old.label, split)
    registry = out / REGISTRY_NAME
    for line in (registry.read_text().splitlines() if registry.is_file() else []):
        try:
            meta = json.loads(line)
        except ValueError:  # a line cut by a kill: its folder was not renamed into place yet
            continue
        if meta["id"] not in found:
            found[meta["id"]] = Record(meta["id"], out / meta["id"], int(meta["label"]),
                                       meta["split"])
    return list(found.values())


def _register(out: Path, record: Record) -> None:
    """Append the video to the folder's registry (one short O_APPEND write: shards writing into
    one folder do not mix their lines)."""
    line = json.dumps({"id": record.id, "label": record.label, "split": record.split}) + "\n"
    fd = os.open(out / REGISTRY_NAME, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


def write_lists(out: Path, records: list[Record]) -> None:
    """Write the annotation lists for every finished video of the folder, counting the files on
    disk: the videos of earlier runs (other lists too) first, then this run's `records`."""
    out = Path(out)
    rows: dict[str, list[str]] = {}
    ours = {r.id: r for r in records}
    known = [ours.pop(r.id, r) for r in _listed(out)]
    for record in known + list(ours.values()):
        folder = video_dir(out, record)
        if not folder.is_dir():
            continue
        images, flows = count_frames(folder)
        for modality, count in (("rgb", images), ("flow", flows)):
            if count:
                line = f"{record.id} {count} {record.label}"
                rows.setdefault(f"{modality}_list.txt", []).append(line)
                if record.split != "all":
                    rows.setdefault(f"{modality}_list_{record.split}.txt", []).append(line)
    for name, lines in rows.items():
        tmp = out / f".{name}.tmp{os.getpid()}"
        tmp.write_text("\n".join(lines) + "\n")
        os.replace(tmp, out / name)
