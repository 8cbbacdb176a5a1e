"""Throughput of `datp extract-flow` against a bare OpenCV TV-L1 loop, measured side by side.

On real clips from ../shared/data/clips (the first FRAMES frames of each, re-encoded losslessly so
every video has the same length and the two-worker run can balance):
  1. bare loop: OpenCV TV-L1 (same preset, same size) over frames decoded beforehand, in memory;
  2. `datp extract-flow --workers 1` (the whole CLI: start-up, decode, flow, quantize, write);
  3. `datp extract-flow --workers 2`.
Prints frame pairs/s of each and the ratios 2/1 (target >= 0.95) and 3/2 (target >= 1.8 on two
cores). Run: python bench/flow.py [--frames 40] [--clips 6] [--preset tuned]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
CLIPS = ROOT / ".." / "shared" / "data" / "clips"
sys.path.insert(0, str(ROOT))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=40)
    parser.add_argument("--clips", type=int, default=6)
    parser.add_argument("--preset", default=None, help="TV-L1 preset (default: datp's default)")
    parser.add_argument("--short-side", type=int, default=256)
    args = parser.parse_args()
    if args.preset is None:
        from datp.flows.compute import DEFAULT_PRESETS

        args.preset = DEFAULT_PRESETS["tvl1"]
    if not CLIPS.is_dir():
        sys.exit(f"{CLIPS} is absent: the benchmark needs the shared real clips")

    from datp.flows.compute import FlowComputer, set_single_thread, to_gray
    from datp.io.clips import write_video  # the lossless FFV1 writer of the tests
    from datp.io.decode import read_video

    sources = sorted(CLIPS.rglob("*.mp4"))[: args.clips]
    work = Path(tempfile.mkdtemp(prefix="datp-bench-flow-"))
    frames = []
    for i, src in enumerate(sources):
        video, _ = read_video(src, short_side=args.short_side)
        video = video[: args.frames]
        write_video(work / "clips" / f"{i:02d}_{src.stem}.mkv", video)
        frames.append([to_gray(f) for f in video])
    pairs = sum(len(f) - 1 for f in frames)
    print(f"{len(frames)} real clips x {args.frames} frames at short side {args.short_side}: "
          f"{pairs} frame pairs, TV-L1 preset {args.preset!r}")

    def bare() -> float:
        set_single_thread()
        flow = FlowComputer(algorithm="tvl1", preset=args.preset)
        start = time.perf_counter()
        for video in frames:
            for prev, nxt in zip(video, video[1:]):
                flow(prev, nxt)
        return time.perf_counter() - start

    def cli(workers: int, tag: str) -> float:
        out = work / f"{tag}.h5"
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "datp", "extract-flow", str(work / "clips"),
                        "--out", str(out), "--preset", args.preset, "--short-side", "0",
                        "--workers", str(workers), "--quiet"], check=True)
        return time.perf_counter() - start

    # interleaved, best of two, so drifting machine load hits every variant alike
    times = {"bare": [], "w1": [], "w2": []}
    for rep in range(2):
        times["bare"].append(bare())
        times["w1"].append(cli(1, f"w1_{rep}"))
        times["w2"].append(cli(2, f"w2_{rep}"))
    best = {k: min(v) for k, v in times.items()}
    rate = {k: pairs / v for k, v in best.items()}
    print("| run | seconds (best of 2) | frame pairs/s |")
    print("|---|---|---|")
    for key, name in (("bare", "bare OpenCV TV-L1 loop (frames in memory)"),
                      ("w1", "datp extract-flow --workers 1"), ("w2", "datp extract-flow --workers 2")):
        print(f"| {name} | {best[key]:.2f} | {rate[key]:.2f} |")
    print(f"ratio datp 1 worker / bare loop: {rate['w1'] / rate['bare']:.3f} (target >= 0.95)")
    print(f"ratio datp 2 workers / 1 worker: {rate['w2'] / rate['w1']:.3f} (target >= 1.8)")


if __name__ == "__main__":
    main()
