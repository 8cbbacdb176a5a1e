"""Flow presets on ground-truth pairs: end-point error and seconds per pair, as a markdown table.

    python bench/presets.py                 # every preset in FLOW_PRESETS (the table in docs/flow-presets.md)
    python bench/presets.py --grid          # the TV-L1 tuning grid that chose the default preset

Runs every preset on the pairs in ../shared/data/flow-gt (4 Middlebury pairs + 1 FlyingChairs
pair), then the TV-L1 presets on the first pairs of a real 340x256 clip (no ground truth: time, and
how far each preset's flow is from "opencv"'s, which old features were trained on). One OpenCV
thread (as each extraction worker runs); presets run side by side pair by pair so machine load
affects them alike; times are the best of --repeats runs, as CPU seconds (robust on a shared
machine) and wall seconds. The default preset must have a lower mean EPE than "opencv" AND be
faster, on the Middlebury pairs; the last line says whether it does.
"""

from __future__ import annotations

import argparse
import itertools
import os
import platform
import time
from pathlib import Path

import numpy as np

from datp.flows.compute import DEFAULT_PRESETS, FLOW_PRESETS, FlowComputer, set_single_thread
from datp.flows.middlebury import evaluate_presets, find_pairs
from datp.io.decode import iter_frames

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
FLOW_GT = DATA / "flow-gt"
CLIP = DATA / "clips" / "mmaction2" / "demo.mp4"


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo (Linux), else what `platform` knows."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def middlebury_mean(row: dict, key: str) -> float:
    """Mean of row[key] ("epe", "cpu_seconds" or "seconds") over the Middlebury pairs only."""
    values = [v for name, v in row[key].items() if not name.startswith("flyingchairs")]
    return sum(values) / len(values)


def markdown_table(rows: list[dict]) -> str:
    """One line per preset: Middlebury means, then EPE and CPU seconds per pair."""
    names = list(rows[0]["epe"])
    head = ["algorithm", "preset"]
    head += [f"{what} (Middlebury)" for what in ("mean EPE", "CPU s/pair", "wall s/pair")]
    head += [f"EPE {n}" for n in names] + [f"CPU s {n}" for n in names]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        default = " (default)" if DEFAULT_PRESETS.get(row["algorithm"]) == row["preset"] else ""
        cells = [row["algorithm"], row["preset"] + default, f"{middlebury_mean(row, 'epe'):.3f}"]
        cells += [f"{middlebury_mean(row, key):.3f}" for key in ("cpu_seconds", "seconds")]
        cells += [f"{row['epe'][n]:.3f}" for n in names]
        cells += [f"{row['cpu_seconds'][n]:.3f}" for n in names]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def default_vs_opencv(rows: list[dict]) -> str:
    """The ratios of the default TV-L1 preset to "opencv" on Middlebury (below 1 is better)."""
    by_preset = {r["preset"]: r for r in rows if r["algorithm"] == "tvl1"}
    default, opencv = by_preset[DEFAULT_PRESETS["tvl1"]], by_preset["opencv"]
    ratios = {
        key: middlebury_mean(default, key) / middlebury_mean(opencv, key)
        for key in ("epe", "cpu_seconds", "seconds")
    }
    verdict = "meets" if all(r < 1 for r in ratios.values()) else "FAILS"
    return (
        f"default tvl1 preset {DEFAULT_PRESETS['tvl1']!r} / 'opencv' on Middlebury: "
        f"mean EPE x{ratios['epe']:.2f}, "
        f"CPU time x{ratios['cpu_seconds']:.2f}, wall time x{ratios['seconds']:.2f} "
        f"({verdict} the requirement: all < 1)"
    )


def clip_table(clip: Path, num_pairs: int) -> str:
    """TV-L1 presets on the first `num_pairs` frame pairs of a clip.

    Returns:
        a markdown table: CPU s/pair, its ratio to "opencv", and the mean end-point distance
        |flow - opencv flow| (no ground truth on real video: this says how far a preset strays
        from the flow TSN-era models were trained on).
    """
    frames = []
    for frame in iter_frames(clip, gray=True):
        frames.append(frame)
        if len(frames) > num_pairs:
            break
    flows, seconds = {}, {}
    for preset in FLOW_PRESETS["tvl1"]:
        computer = FlowComputer(algorithm="tvl1", preset=preset)
        start = time.process_time()
        flows[preset] = [computer(a, b) for a, b in zip(frames[:-1], frames[1:])]
        seconds[preset] = (time.process_time() - start) / (len(frames) - 1)
    height, width = frames[0].shape
    lines = [
        f"{clip.name}, first {len(frames) - 1} pairs at {width}x{height}:\n",
        "| preset | CPU s/pair | x opencv | mean end-point distance to opencv's flow (px) |",
        "|---|---|---|---|",
    ]
    for preset in FLOW_PRESETS["tvl1"]:
        pairs = zip(flows[preset], flows["opencv"])
        distance = np.mean([np.linalg.norm(f - g, axis=2).mean() for f, g in pairs])  # f, g: (H, W, 2)
        ratio = seconds[preset] / seconds["opencv"]
        lines.append(f"| {preset} | {seconds[preset]:.3f} | {ratio:.2f} | {distance:.3f} |")
    return "\n".join(lines)


def tuning_grid() -> list[tuple[str, dict]]:
    """TV-L1 candidates around OpenCV's defaults: pyramid step, warps and inner iterations.

    Left out because they change nothing on these pairs (measured in a wider first pass):
    scalesNumber above 5 (OpenCV stops the pyramid once a side is below 16 px, which for 388-480
    px frames at step 0.5 is after 5 levels), and outerIterations 5 vs 10 (the epsilon test ends
    the loop before 5 outer iterations).
    """
    base = FLOW_PRESETS["tvl1"]["opencv"]
    candidates = []
    for step, warps, inner in itertools.product([0.5, 0.6, 0.8], [2, 3, 5], [10, 30]):
        name = f"step{step}-warps{warps}-inner{inner}"
        params = {**base, "scaleStep": step, "warpingsNumber": warps, "innerIterations": inner}
        candidates.append((name, params))
    return candidates


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--pairs", type=Path, default=FLOW_GT, help="folder of ground-truth pairs")
    parser.add_argument("--repeats", type=int, default=1, help="timing repeats per pair (minimum kept)")
    parser.add_argument("--grid", action="store_true", help="run the TV-L1 tuning grid, not the presets")
    parser.add_argument("--clip", type=Path, default=CLIP, help="real clip for the TV-L1 timing table")
    parser.add_argument("--clip-pairs", type=int, default=20, help="pairs of --clip to time (0 = skip)")
    args = parser.parse_args()
    if not args.pairs.is_dir():
        raise SystemExit(f"no ground-truth pairs at {args.pairs}; pass --pairs FOLDER")
    set_single_thread()

    if args.grid:
        # The grid's candidates are registered as presets in this process only, so that they run
        # through exactly the same FlowComputer code as the frozen presets.
        candidates = tuning_grid()
        for name, params in candidates:
            FLOW_PRESETS["tvl1"][name] = params
        names = [n for n, *_ in find_pairs(args.pairs) if not n.startswith("flyingchairs")]
        specs = [("tvl1", "opencv")] + [("tvl1", name) for name, _ in candidates]
        rows = evaluate_presets(args.pairs, specs, names=names, repeats=args.repeats)
        rows.sort(key=lambda r: (round(middlebury_mean(r, "epe"), 3), middlebury_mean(r, "cpu_seconds")))
    else:
        specs = [(algorithm, preset) for algorithm, presets in FLOW_PRESETS.items() for preset in presets]
        rows = evaluate_presets(args.pairs, specs, repeats=args.repeats)

    print(f"machine: {cpu_name()} ({os.cpu_count()} CPUs), 1 OpenCV thread, best of {args.repeats}\n")
    print(markdown_table(rows))
    if not args.grid:
        print("\n" + default_vs_opencv(rows))
        if args.clip_pairs > 0 and args.clip.is_file():
            print("\n" + clip_table(args.clip, args.clip_pairs))


if __name__ == "__main__":
    main()
