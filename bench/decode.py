"""Decode every shared clip and stress file with datp's decoder (PyAV) and with OpenCV.

Prints a markdown table (file, frames decoded by each, container's claim, what happened) — the
evidence for the backend choice in docs/decoding.md. Run: python bench/decode.py
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import cv2

from datp.io.decode import DecodeError, VideoInfo, iter_frames

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
EXTS = {".avi", ".mp4", ".mkv", ".webm", ".mov"}


def opencv_count(path: Path) -> tuple[int, int]:
    capture = cv2.VideoCapture(str(path))
    claimed = int(capture.get(cv2.CAP_PROP_FRAME_COUNT))
    n = 0
    while capture.read()[0]:
        n += 1
    return n, claimed


def main() -> None:
    if not DATA.is_dir():
        sys.exit(f"{DATA} is absent")
    files = sorted(p for folder in ("clips", "stress") for p in (DATA / folder).rglob("*")
                   if p.suffix.lower() in EXTS)
    print("| file | datp (PyAV) frames | OpenCV frames | container claims | datp: what happened |")
    print("|---|---|---|---|---|")
    for path in files:
        info = VideoInfo(path=str(path))
        start = time.perf_counter()
        try:
            for _ in iter_frames(path, info):
                pass
            what = []
            if info.rotation:
                what.append(f"rotated {info.rotation} deg upright")
            if info.errors:
                what.append(f"{len(info.errors)} corrupt packet(s) reported -> video fails")
            what.append(f"{info.codec} {info.width}x{info.height} {info.fps:.2f} fps")
            ours = str(info.num_frames)
        except DecodeError as err:
            ours, what = "error", [str(err).split(": ", 1)[-1]]
        seconds = time.perf_counter() - start
        theirs, claimed = opencv_count(path)
        rel = path.relative_to(DATA)
        print(f"| {rel} | {ours} | {theirs} | {claimed} | {'; '.join(what)} ({seconds:.2f}s) |")


if __name__ == "__main__":
    main()
