"""Rawframe folders (a video stored as numbered jpgs) and their annotation lists, as mmaction2's
`RawframeDataset` and tsn-pytorch's `TSNDataSet` read them.

Annotation lists, one video a line (mmaction2 `mmaction/datasets/rawframe_dataset.py`):
- plain: `<frame_dir> <total_frames> <label>`;
- with offset (`with_offset=True` there): `<frame_dir> <offset> <total_frames> <label>`;
- multi-label (`multi_class=True` there): `<frame_dir> <total_frames> <label1> <label2> ...`
  (also after an offset).
A line with three fields is never the offset form (that needs four), so a list with one such line
is read without offsets; a list whose every line has four or more fields is ambiguous (offset or
multi-label) and must be named (`list_format="rawframes-offset"` or `"rawframes"`).

Frames: frame i (0-based) of a video is `img_{offset + start + i:05d}.jpg`, `start` being the
folder's first number (1 for mmaction2, TSN and dense_flow; 0 for denseflow), detected from the
files. Images are read with OpenCV and returned RGB, at their stored size.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

IMAGE_PREFIX = "img_"
LIST_FORMATS = ("auto", "video", "rawframes", "rawframes-offset")


@dataclass(frozen=True)
class RawframeLine:
    """One parsed line of a rawframe list."""

    frame_dir: str
    offset: int
    total_frames: int
    labels: tuple[int, ...]
    line: int


def is_rawframe_list(lines: list[tuple[int, str]]) -> bool:
    """True when every line is `<dir> <int> <int> ...` (three or more fields, all but the first
    integers): a rawframe list, not a video list `<path> <label>`."""
    return bool(lines) and all(len(t) >= 3 and all(re.fullmatch(r"-?\d+", v) for v in t[1:])
                               for t in (text.split() for _, text in lines))


def parse_rawframe_list(path: Path, lines: list[tuple[int, str]], list_format: str = "auto"
                        ) -> list[RawframeLine]:
    """Parse a rawframe annotation list (see the module docstring).

    Args:
        path: the list file (for messages).
        lines: (line number, text) of its non-empty lines.
        list_format: "auto", "rawframes" (no offset) or "rawframes-offset".

    Raises:
        ValueError: a malformed line (file and line named), or an ambiguous list under "auto".
    """
    rows = [(n, text.split()) for n, text in lines]
    with_offset = list_format == "rawframes-offset"
    if list_format == "auto" and rows and all(len(t) >= 4 for _, t in rows):
        raise ValueError(f"{path}: every line has 4 or more fields, so it is either "
                         "'<dir> <offset> <total_frames> <label>...' or multi-label "
                         "'<dir> <total_frames> <label1> <label2>...'; pass --list-format "
                         "rawframes-offset or --list-format rawframes")
    out = []
    for n, tokens in rows:
        need = 4 if with_offset else 3
        if len(tokens) < need or not all(re.fullmatch(r"-?\d+", v) for v in tokens[1:]):
            form = "<dir> <offset> <total_frames> <label>..." if with_offset else \
                "<dir> <total_frames> <label>..."
            raise ValueError(f"{path}:{n}: expected '{form}' (integers), got {' '.join(tokens)!r}")
        numbers = [int(v) for v in tokens[1:]]
        offset, numbers = (numbers[0], numbers[1:]) if with_offset else (0, numbers)
        total, labels = numbers[0], tuple(numbers[1:])
        if total < 1 or offset < 0:
            raise ValueError(f"{path}:{n}: total_frames {total} must be >= 1 and offset {offset} "
                             ">= 0")
        out.append(RawframeLine(tokens[0], offset, total, labels, n))
    return out


def numbered(folder: Path, prefix: str) -> dict[int, str]:
    """{number: file name} of the `<prefix><digits>.jpg` files of a folder."""
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.jpe?g")
    found = {}
    for name in os.listdir(folder):
        match = pattern.fullmatch(name)
        if match:
            found[int(match[1])] = name
    return found


def image_index(folder: Path, *, offset: int = 0, total_frames: int | None = None
                ) -> tuple[dict[int, str], int, int]:
    """The RGB frames of a rawframe folder: ({frame i: file name}, start, T).

    T is `total_frames` when the list gives it, else the images from the first on.

    Raises:
        FileNotFoundError: no `img_*.jpg`, or a frame the list promises is missing.
    """
    files = numbered(folder, IMAGE_PREFIX)
    if not files:
        raise FileNotFoundError(f"{folder}: no {IMAGE_PREFIX}*.jpg frames (rawframe folders hold "
                                "img_00001.jpg ...)")
    start = min(files)
    T = total_frames if total_frames is not None else len(files) - offset
    index = {i: files.get(offset + start + i) for i in range(max(T, 0))}
    gaps = [i for i, name in index.items() if name is None]
    if T < 1 or gaps:
        first = offset + start + (gaps[0] if gaps else 0)
        raise FileNotFoundError(f"{folder}: frame {IMAGE_PREFIX}{first:05d}.jpg is missing "
                                f"({T} frames from {IMAGE_PREFIX}{offset + start:05d}.jpg expected); "
                                "check the list's total_frames and offset")
    return index, start, T


def read_images(folder: Path, index: dict[int, str], frames) -> dict[int, np.ndarray]:
    """{frame i: (H, W, 3) uint8 RGB} for the wanted frames of `image_index`'s index.

    Raises:
        FileNotFoundError: an image that cannot be read.
    """
    import cv2

    out = {}
    for i in sorted({int(i) for i in np.asarray(frames).ravel()}):
        image = cv2.imread(str(Path(folder) / index[i]), cv2.IMREAD_COLOR)
        if image is None:
            raise FileNotFoundError(f"{Path(folder) / index[i]}: unreadable image")
        out[i] = np.ascontiguousarray(image[..., ::-1])  # OpenCV reads BGR
    return out
