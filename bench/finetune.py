"""Cost of end-to-end DATP against TSN's average consensus, and of bf16 + channels_last on a GPU.

1. Training step time (forward, backward, SGD step: `datp.finetune.train.train_step`) of the same
   backbone on the same batch with `--head datp` against `--head avg`, timed alternately (so load
   from other processes hits both alike); prints the medians and their ratio (target < 1.05; the
   DATP paper reports under 10%). Two settings: DATP's auxiliary net on the conv maps (its default;
   needs 7x7 maps, so 224 px input) and on the segment scores (input=softmax) at --size.
2. With CUDA: images/s of a ResNet-34 training step with bf16 autocast and channels_last against the
   same step in plain fp32 (prints 'no GPU' otherwise).

Run: python bench/finetune.py [--backbone resnet18] [--videos 2] [--segments 5] [--size 112]
     [--repeats 10] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from datp.finetune.config import FinetuneConfig  # noqa: E402
from datp.finetune.distributed import Context  # noqa: E402
from datp.finetune.model import build_model, param_groups  # noqa: E402
from datp.finetune.train import train_step  # noqa: E402


def _step_fn(cfg: FinetuneConfig, ctx: Context, x, t, y):
    model, _, _ = build_model(cfg, num_classes=101)
    if ctx.device.type == "cuda" and cfg.channels_last:
        model.to(memory_format=torch.channels_last)
        model.memory_format = torch.channels_last
    model.to(ctx.device).train()
    optimizer = torch.optim.SGD(param_groups(model, lr=cfg.lr, weight_decay=cfg.weight_decay), lr=cfg.lr,
                                momentum=cfg.momentum)

    def step() -> float:
        if ctx.device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        train_step(model, model, x, t, y, optimizer, cfg, ctx)  # .item() inside waits for the GPU
        return time.perf_counter() - start

    return step


def head_overhead(base: FinetuneConfig, ctx: Context, *, videos: int, size: int, repeats: int,
                  datp_options: tuple[str, ...]) -> None:
    cfg = replace(base, input_size=size, resize=size)
    N = cfg.num_segments
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(videos, N, 3, size, size, generator=gen).to(ctx.device)
    t = ((torch.arange(N) + 0.5) / N).expand(videos, N).contiguous().to(ctx.device)
    y = torch.randint(101, (videos,), generator=gen).to(ctx.device)
    steps = {"avg": _step_fn(replace(cfg, head="avg"), ctx, x, t, y),
             "datp": _step_fn(replace(cfg, head="datp", head_options=datp_options), ctx, x, t, y)}
    for step in steps.values():  # warm-up: allocator, thread pools, cuDNN autotuning
        step(), step()
    times = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            times[name].append(step())
    avg, datp = (statistics.median(times[n]) for n in ("avg", "datp"))
    options = " ".join(datp_options) or "input=conv (default)"
    print(f"  {cfg.backbone} {size}px, B={videos} videos x N={N} segments, datp {options}: "
          f"avg {avg * 1e3:.1f} ms, datp {datp * 1e3:.1f} ms per step (medians of {repeats}); "
          f"ratio datp/avg = {datp / avg:.3f}")


def gpu_images_per_s(*, videos: int, segments: int, repeats: int) -> None:
    if not torch.cuda.is_available():
        print("no GPU: skipping the bf16 autocast + channels_last measurement")
        return
    ctx = Context(rank=0, world_size=1, local_rank=0, device=torch.device("cuda"))
    torch.backends.cudnn.benchmark = True
    base = FinetuneConfig(sources=("bench",), out="bench", backbone="resnet34", num_segments=segments,
                          head="avg", dropout=0.5)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(videos, segments, 3, 224, 224, generator=gen).to(ctx.device)
    t = ((torch.arange(segments) + 0.5) / segments).expand(videos, segments).contiguous().to(ctx.device)
    y = torch.randint(101, (videos,), generator=gen).to(ctx.device)
    rates = {}
    for name, amp in (("fp32", False), ("bf16 autocast + channels_last", True)):
        step = _step_fn(replace(base, amp=amp, channels_last=amp), ctx, x, t, y)
        for _ in range(5):
            step()
        seconds = statistics.median(step() for _ in range(repeats))
        rates[name] = videos * segments / seconds
        print(f"  resnet34 224px training step, {videos * segments} images, {name}: {rates[name]:.0f} images/s")
    print(f"  speed-up bf16+channels_last / fp32 = {rates['bf16 autocast + channels_last'] / rates['fp32']:.2f} "
          f"on {torch.cuda.get_device_name()}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--videos", type=int, default=2)
    parser.add_argument("--segments", type=int, default=5)
    parser.add_argument("--size", type=int, default=112)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--gpu-videos", type=int, default=8)
    parser.add_argument("--gpu-segments", type=int, default=8)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    ctx = Context(rank=0, world_size=1, local_rank=0, device=device)
    base = FinetuneConfig(sources=("bench",), out="bench", backbone=args.backbone, num_segments=args.segments,
                          dropout=0.8, bn_freeze="partial", clip_grad=20.0)
    print(f"1. training step, head datp against head avg, on {device} ({torch.get_num_threads()} threads)")
    head_overhead(base, ctx, videos=args.videos, size=224, repeats=args.repeats, datp_options=())
    head_overhead(base, ctx, videos=args.videos, size=args.size, repeats=args.repeats,
                  datp_options=("input=softmax",))
    print("2. ResNet-34 training step on GPU, bf16 autocast + channels_last against fp32")
    gpu_images_per_s(videos=args.gpu_videos, segments=args.gpu_segments, repeats=args.repeats)


if __name__ == "__main__":
    main()
