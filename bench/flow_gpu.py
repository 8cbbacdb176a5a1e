"""Throughput of the torch TV-L1 against OpenCV's: frame pairs per second at 340x256.

    python bench/flow_gpu.py                         # presets opencv and tuned, CPU and (if any) GPU
    python bench/flow_gpu.py --cpu-batches 1,8 --presets tuned

Frame pairs are consecutive frames of the real clips in ../shared/data/clips, resized to 340x256
(the TSN size) as extract-flow does. For each preset, side by side in one run:

- OpenCV: one process per core, one OpenCV thread each (as `extract-flow --workers <cores>`),
  over the same pairs;
- torch on the CPU: one process, `torch.set_num_threads(<cores>)` (or each of --torch-threads),
  batches of 1, 8, 32 pairs;
- torch on the GPU (when CUDA is available, else 'no GPU'): batches of 1, 8, 32, 128, after one
  warm-up batch, timed with `torch.cuda.synchronize()`; a batch that does not fit says so.

Printed: wall-clock pairs/s with its ratio to the OpenCV pool's, and CPU seconds per pair (of
this process; robust on a shared machine, where wall time depends on other jobs) with its ratio to
one OpenCV thread's over the same pairs.
"""

from __future__ import annotations

import argparse
import math
import multiprocessing
import os
import time
from pathlib import Path

import numpy as np

from datp.flows.agreement import clip_pairs
from datp.flows.compute import FLOW_PRESETS, FlowComputer, set_single_thread
from datp.io.options import parse_numbers

CLIPS = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "clips"
SIZE = (340, 256)


def frame_pairs(n: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """`n` grayscale 340x256 pairs from the shared clips (cycled when the clips have fewer)."""
    found = [(p, q) for _, p, q in clip_pairs(CLIPS, pairs=max(1, -(-n // 3)), start=0, size=SIZE,
                                              short_side=None)]
    return [found[i % len(found)] for i in range(n)]


_WORKER: dict = {}  # preset -> FlowComputer, one per pool process


def _opencv_worker(args) -> None:
    preset, prev, nxt = args
    if preset not in _WORKER:
        _WORKER[preset] = FlowComputer(preset=preset)
    _WORKER[preset](prev, nxt)


def opencv_pool(pool, preset: str, pairs) -> float:
    """Wall seconds of OpenCV over `pairs` in a pool of one-thread processes (objects made first)."""
    pool.map(_opencv_worker, [(preset, *pairs[0])] * pool._processes, chunksize=1)
    start = time.perf_counter()
    pool.map(_opencv_worker, [(preset, p, q) for p, q in pairs], chunksize=1)
    return time.perf_counter() - start


def opencv_single(preset: str, pairs) -> tuple[float, float]:
    """(wall s, CPU s) of one OpenCV thread over `pairs` in this process (the CPU-time reference)."""
    import cv2

    before = cv2.getNumThreads()
    cv2.setNumThreads(1)
    computer = FlowComputer(preset=preset)
    wall, cpu = time.perf_counter(), time.process_time()
    for prev, nxt in pairs:
        computer(prev, nxt)
    result = time.perf_counter() - wall, time.process_time() - cpu
    cv2.setNumThreads(before)
    return result


def torch_run(preset: str, pairs, batch: int, device: str) -> tuple[float, float]:
    """(wall s, CPU s) of the torch TV-L1 over `pairs` in batches of `batch` on `device`."""
    import torch

    from datp.flows.tvl1_torch import tvl1_flow

    params = FLOW_PRESETS["tvl1"][preset]
    prevs = torch.from_numpy(np.stack([p for p, _ in pairs]))
    nexts = torch.from_numpy(np.stack([q for _, q in pairs]))
    if device != "cpu":
        prevs, nexts = prevs.to(device), nexts.to(device)
        tvl1_flow(prevs[:batch], nexts[:batch], params, device=device)  # warm-up
        torch.cuda.synchronize()
    wall, cpu = time.perf_counter(), time.process_time()
    for i in range(0, len(pairs), batch):
        tvl1_flow(prevs[i:i + batch], nexts[i:i + batch], params, device=device)
    if device != "cpu":
        torch.cuda.synchronize()
    return time.perf_counter() - wall, time.process_time() - cpu


def row(label: str, n: int, wall: float, cpu: float, ref_wall: float, ref_cpu: float) -> str:
    ratio_cpu = "-" if math.isnan(cpu) or math.isnan(ref_cpu) else f"{ref_cpu / cpu:.2f}"
    cpu_text = "-" if math.isnan(cpu) else f"{cpu / n:.3f}"
    return (f"| {label} | {n} | {n / wall:.2f} | {ref_wall / wall:.2f} | {cpu_text} | {ratio_cpu} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", default="opencv,tuned")
    parser.add_argument("--cpu-batches", default="1,8,32")
    parser.add_argument("--gpu-batches", default="1,8,32,128")
    parser.add_argument("--pairs", type=int, default=0, help="pairs per measurement (default: the largest batch)")
    parser.add_argument("--cores", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--torch-threads", default="", help="torch CPU threads to try (default: cores)")
    args = parser.parse_args()
    import torch

    cpu_batches = [int(b) for b in parse_numbers(args.cpu_batches)]
    gpu_batches = [int(b) for b in parse_numbers(args.gpu_batches)]
    gpu = torch.cuda.is_available()
    n_cpu = args.pairs or max(cpu_batches)
    pairs = frame_pairs(max(n_cpu, max(gpu_batches) if gpu else 0))
    print(f"{len(pairs)} frame pairs at {SIZE[0]}x{SIZE[1]}; {args.cores} cores; load average "
          f"{os.getloadavg()[0]:.1f}; torch {torch.__version__}; "
          f"GPU: {torch.cuda.get_device_name(0) if gpu else 'no GPU'}")
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(args.cores, initializer=set_single_thread) as pool:
        for preset in [p.strip() for p in args.presets.split(",")]:
            work = pairs[:n_cpu]
            print(f"\n### preset {preset}\n")
            print("| run | pairs | pairs/s (wall) | x OpenCV pool (wall) | CPU s/pair | x OpenCV (CPU s) |")
            print("|---|---|---|---|---|---|")
            ref_wall = opencv_pool(pool, preset, work)
            one_wall, one_cpu = opencv_single(preset, work)
            print(row(f"OpenCV, {args.cores} processes x 1 thread", len(work), ref_wall, float("nan"),
                      ref_wall, one_cpu))
            print(row("OpenCV, 1 process x 1 thread", len(work), one_wall, one_cpu, ref_wall, one_cpu))
            for threads in [int(t) for t in parse_numbers(args.torch_threads or str(args.cores))]:
                torch.set_num_threads(threads)
                for batch in cpu_batches:
                    wall, cpu = torch_run(preset, work, batch, "cpu")
                    print(row(f"torch CPU, {threads} thread(s), batch {batch}", len(work), wall, cpu,
                              ref_wall, one_cpu), flush=True)
            if not gpu:
                print("| torch GPU | - | no GPU | - | - | - |")
                continue
            for batch in gpu_batches:
                work_gpu = pairs[:max(batch, n_cpu)]
                try:
                    wall, cpu = torch_run(preset, work_gpu, batch, "cuda")
                except torch.cuda.OutOfMemoryError:
                    print(f"| torch GPU, batch {batch} | - | out of GPU memory | - | - | - |")
                    torch.cuda.empty_cache()
                    continue
                # the OpenCV pool's rate is per pair, so it compares with any number of pairs
                rate_ref = len(work) / ref_wall
                print(f"| torch GPU, batch {batch} | {len(work_gpu)} | {len(work_gpu) / wall:.2f} | "
                      f"{len(work_gpu) / wall / rate_ref:.2f} | - | - |", flush=True)


if __name__ == "__main__":
    main()
