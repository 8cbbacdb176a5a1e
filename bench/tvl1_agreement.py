"""The torch TV-L1 against OpenCV's at full size, and the TV-L1 presets on pairs they were not tuned on.

    python bench/tvl1_agreement.py                 # both tables of docs/flow-presets.md
    python bench/tvl1_agreement.py --clip-pairs 2  # fewer real-clip pairs

Pairs: the 5 ground-truth pairs of ../shared/data/flow-gt at full size (4 Middlebury, on which
`tuned` was chosen, and 1 FlyingChairs, which it was not tuned on) and `--clip-pairs` consecutive
frame pairs of each of 3 real clips at 340x256 (`datp.flows.agreement.CLIPS`). One thread for
both implementations (as each extract-flow worker runs), CPU seconds of this process.

Table 1, per preset and pair: EPE of each implementation, median |torch - OpenCV|, share of equal
uint8 pixels (and within one step), and the same share for OpenCV against itself when one input
frame moves by one float32 ulp (`opencv 1-ulp`): the agreement any non-bit-exact port can expect.
Table 2, per preset and implementation: mean EPE on the Middlebury pairs (the tuning set), EPE on
FlyingChairs, mean end-point distance on the real clips to OpenCV's `opencv`-preset flow (the flow
TSN-era features were trained on), and CPU seconds per pair.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import cv2
import numpy as np
import torch

from datp.flows.agreement import clip_pairs, compare_flows, ground_truth_pairs
from datp.flows.compute import FLOW_PRESETS, FlowComputer
from datp.flows.middlebury import endpoint_error
from datp.flows.tvl1_torch import tvl1_flow

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"


def timed(fn, *args):
    start = time.process_time()
    out = fn(*args)
    return out, time.process_time() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", default="opencv,tuned,fast")
    parser.add_argument("--ulp-presets", default="opencv,tuned", help="presets with the 1-ulp column")
    parser.add_argument("--clip-pairs", type=int, default=4)
    args = parser.parse_args()
    cv2.setNumThreads(1)
    torch.set_num_threads(1)
    gt_items = list(ground_truth_pairs(DATA / "flow-gt"))
    clips = list(clip_pairs(DATA / "clips", pairs=args.clip_pairs, short_side=None, size=(340, 256)))
    print(f"{len(gt_items)} ground-truth pairs (full size), {len(clips)} clip pairs at 340x256; "
          f"OpenCV {cv2.__version__}, torch {torch.__version__}, one thread each; "
          f"load average {os.getloadavg()[0]:.1f}")
    tsn = FlowComputer(preset="opencv")
    reference = {name: tsn(p, q) for name, p, q in clips}  # OpenCV's opencv preset on the clips
    table1, table2 = [], []
    for preset in [p.strip() for p in args.presets.split(",")]:
        params = FLOW_PRESETS["tvl1"][preset]
        sums = {impl: {"epe_mb": [], "epe_fc": [], "dist": [], "cpu": []} for impl in ("opencv", "torch")}
        items = [(n, p, q, g) for n, p, q, g in gt_items] + [(n, p, q, None) for n, p, q in clips]
        for name, prev, nxt, gt in items:
            ours, cpu_torch = timed(lambda a, b, c: tvl1_flow(a, b, c)[0].numpy(), prev, nxt, params)
            computer = FlowComputer(preset=preset)  # fresh: OpenCV's object can lose scales
            theirs, cpu_cv = timed(computer, prev, nxt)
            fig = compare_flows(ours, theirs)
            ulp = "-"
            if preset in args.ulp_presets.split(","):
                moved = np.nextafter(prev.astype(np.float32) / 255, np.float32(2))
                other = computer._flow.calc(moved, nxt.astype(np.float32) / 255, None)
                ulp = f"{compare_flows(other, theirs)['quantized_equal']:.4f}"
            epe = ("-", "-", "-") if gt is None else (
                f"{endpoint_error(theirs, gt):.4f}", f"{endpoint_error(ours, gt):.4f}",
                f"{100 * (endpoint_error(ours, gt) / endpoint_error(theirs, gt) - 1):+.2f}%")
            line = (f"| {preset} | {name} | {epe[0]} | {epe[1]} | {epe[2]} | {fig['median_diff']:.5f} | "
                    f"{fig['quantized_equal']:.4f} | {fig['quantized_within_one']:.4f} | {ulp} |")
            table1.append(line)
            print(line, flush=True)
            for impl, flow, cpu in (("opencv", theirs, cpu_cv), ("torch", ours, cpu_torch)):
                if gt is None:
                    sums[impl]["dist"].append(np.linalg.norm(flow - reference[name], axis=-1).mean())
                elif name.startswith("flyingchairs"):
                    sums[impl]["epe_fc"].append(endpoint_error(flow, gt))
                else:
                    sums[impl]["epe_mb"].append(endpoint_error(flow, gt))
                    sums[impl]["cpu"].append(cpu)
        for impl, s in sums.items():
            table2.append(f"| {preset} | {impl} | {np.mean(s['epe_mb']):.3f} | {np.mean(s['epe_fc']):.3f} | "
                          f"{np.mean(s['dist']):.3f} | {np.mean(s['cpu']):.2f} |")
    print("\n| preset | pair | EPE OpenCV | EPE torch | torch vs OpenCV EPE | median abs diff (px) | "
          "uint8 equal | uint8 within 1 | OpenCV vs OpenCV 1-ulp: uint8 equal |")
    print("|---|---|---|---|---|---|---|---|---|")
    print("\n".join(table1))
    print("\n| preset | implementation | mean EPE Middlebury (tuning set) | EPE FlyingChairs | "
          "clips: distance to OpenCV opencv-preset flow (px) | CPU s/pair Middlebury |")
    print("|---|---|---|---|---|---|")
    print("\n".join(table2))


if __name__ == "__main__":
    main()
