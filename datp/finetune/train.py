"""`finetune(cfg)`: TSN-style end-to-end training of backbone + pooling head, one process or many.

Per epoch: reseed the global torch RNG (dropout) from `(seed, epoch, rank)`, train on this rank's
share of the epoch order (`datp.finetune.data`), copy rank 0's BatchNorm statistics to every rank,
validate (each rank a share, sums all-reduced), step the schedule, and let rank 0 write `last.pt`,
`best.pt` when validation improved, `resume.pt` and `metrics.json` (`datp.finetune.checkpoint`).
Since sampling, augmentation and dropout are pure functions of the seed and the epoch, a run resumed
from `resume.pt` computes exactly what an uninterrupted run does (bit for bit on CPU; on GPU up to
the nondeterminism of cuDNN kernels). An interrupted epoch is redone from its start.

At the end, when the dataset has a test split, the best checkpoint is evaluated on it.
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from datp.finetune import checkpoint as ckpt_io
from datp.finetune import data
from datp.finetune.config import RESUMABLE_CHANGES, FinetuneConfig, lr_factor
from datp.finetune.distributed import (
    Context,
    all_sum,
    barrier,
    broadcast_buffers,
    broadcast_object,
    setup,
    teardown,
)
from datp.finetune.model import VideoModel, build_model, param_groups
from datp.io.atomic import OutputLocked, output_lock
from datp.io.splits import better_epoch
from datp.pool.runs import recorded_options


def finetune(cfg: FinetuneConfig, *, progress: bool = True) -> dict:
    """Train backbone + head end to end on `cfg.sources`; see the module docstring.

    Launched by torchrun (WORLD_SIZE > 1) it runs DistributedDataParallel (gloo on CPU, nccl on
    GPU); only rank 0 writes files and shows progress.

    Returns:
        On every rank: `out`, `epochs` (finished), `best_epoch` (1-based), `best_val`
        ({loss, accuracy, videos} or None), `test` (of the best checkpoint, or None), `history`
        (one dict per epoch), `checkpoint` (best.pt) and `state_sha256` (digest of the final
        model, equal on all ranks).
    """
    ctx = setup(cfg.device)
    try:
        with contextlib.ExitStack() as held:
            error = None
            if ctx.is_main:  # one writer per output folder, for the whole run (rank 0 writes it)
                try:
                    held.enter_context(output_lock(Path(cfg.out)))
                except OutputLocked as err:
                    error = str(err)
            error = broadcast_object(error, ctx)
            if error is not None:
                raise OutputLocked(error)
            return _run(cfg, ctx, progress)
    finally:
        teardown(ctx)


def _run(cfg: FinetuneConfig, ctx: Context, progress: bool) -> dict:
    splits, names, pairs = _data(cfg)
    model, head_kwargs, weights = build_model(cfg, len(names))
    if ctx.device.type == "cuda" and cfg.channels_last:
        model.to(memory_format=torch.channels_last)
        model.memory_format = torch.channels_last
    model.to(ctx.device)
    optimizer = torch.optim.SGD(param_groups(model, lr=cfg.lr, weight_decay=cfg.weight_decay,
                                             conv1_lr_mult=cfg.conv1_lr_mult, head_lr_mult=cfg.head_lr_mult),
                                lr=cfg.lr, momentum=cfg.momentum)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda epoch: lr_factor(epoch, cfg))
    out = Path(cfg.out)
    state = broadcast_object(_start(cfg, out, ctx, head_kwargs) if ctx.is_main else None, ctx)
    if "error" in state:
        raise ValueError(state["error"])
    if "model" in state:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        for group, base in zip(optimizer.param_groups, scheduler.base_lrs):
            group["lr"] = base * lr_factor(state["epoch"], cfg)  # epochs may have changed (cosine)
    history, best = state["history"], state["best"]
    net = model
    if ctx.distributed:
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[ctx.device] if ctx.device.type == "cuda" else None)
    norm = {"mean": model.backbone.mean, "std": model.backbone.std} if cfg.stream == "rgb" else {}
    clips = dict(stream=cfg.stream, num_segments=cfg.num_segments, new_length=cfg.new_length, flows=cfg.flows,
                 flow_pairs=pairs, short_side=cfg.short_side, resize=cfg.resize, input_size=cfg.input_size,
                 multi_scale=cfg.multi_scale, seed=cfg.seed, on_the_fly=_on_the_fly(cfg), **norm)
    flow_computer = _flow_computer(clips["on_the_fly"], ctx)
    sampler = data.EpochSampler(len(splits.train), seed=cfg.seed, rank=ctx.rank, world_size=ctx.world_size)
    train_loader = _loader(data.ClipDataset(splits.train, train=True, **clips), sampler, cfg, ctx)
    val_loader = _eval_loader(splits.val, clips, cfg, ctx)
    config = {**cfg.plain(), "head_kwargs": head_kwargs, "class_names": names, "world_size": ctx.world_size,
              "init_weights": weights["weights"], "init_sha256": weights["sha256"]}

    for epoch in range(state["epoch"], cfg.epochs):
        torch.manual_seed(int(np.random.default_rng([cfg.seed, epoch, ctx.rank, 2]).integers(2**62)))
        sampler.set_epoch(epoch)
        started = time.perf_counter()
        train = _train_epoch(net, model, train_loader, optimizer, cfg, ctx, progress, epoch, flow_computer)
        broadcast_buffers(model, ctx)
        val = _evaluate(model, val_loader, cfg, ctx, flow_computer) if splits.val else None
        scheduler.step()
        history.append({"epoch": epoch + 1, "lr": optimizer.param_groups[0]["lr"], "train": train, "val": val,
                        "seconds": time.perf_counter() - started})
        old = best["val"]
        improved = better_epoch(None if val is None else val["accuracy"], None if val is None else val["loss"],
                                None if old is None else (old["accuracy"], old["loss"]))
        if improved:
            best = {"epoch": epoch + 1, "val": val}
        if ctx.is_main:
            meta = {**config, "epoch": epoch + 1, "val": val}
            ckpt_io.save_model_checkpoint(out / ckpt_io.LAST, model, class_names=names, config=meta)
            if improved:
                ckpt_io.save_model_checkpoint(out / ckpt_io.BEST, model, class_names=names, config=meta)
            ckpt_io.save_resume(out / ckpt_io.RESUME, {
                "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "epoch": epoch + 1, "history": history, "best": best,
                "config": cfg.plain(), "head_kwargs": head_kwargs, "world_size": ctx.world_size})
            ckpt_io.write_json(out / ckpt_io.METRICS, {"history": history, "best": best, "test": None})
            if progress:
                _report(history[-1], cfg.epochs)
        barrier(ctx)

    digest = ckpt_io.state_digest(model)  # before the best weights are loaded for the test
    test = _test_best(model, out, splits.test, clips, cfg, ctx, flow_computer) if splits.test else None
    if ctx.is_main:
        ckpt_io.write_json(out / ckpt_io.METRICS, {"history": history, "best": best, "test": test})
        if progress:
            _summary(out, best, test)
    return {"out": str(out), "epochs": len(history), "best_epoch": best["epoch"], "best_val": best["val"],
            "test": test, "history": history, "checkpoint": str(out / ckpt_io.BEST), "state_sha256": digest}


def _data(cfg: FinetuneConfig) -> tuple[data.Splits, list[str], dict[str, int]]:
    """The splits, the class names, and the flow pair count of every video (when flows are given)."""
    from datp.io.datasets import load_dataset

    dataset = load_dataset(list(cfg.sources), root=cfg.root, split=cfg.split, list_format=cfg.list_format)
    missing = dataset.missing()
    if missing:
        raise ValueError(f"{missing[0].origin}: video {missing[0].path} not found ({len(missing)} of "
                         f"{len(dataset.records)} missing); check --root")
    splits = data.split_dataset(dataset, train_split=cfg.train_split, test_split=cfg.test_split,
                                val_fraction=cfg.val_fraction, seed=cfg.seed)
    pairs = data.flow_counts(splits.train + splits.val + splits.test, cfg.flows) if cfg.flows else {}
    return splits, data.class_names(dataset, splits), pairs


def _on_the_fly(cfg: FinetuneConfig) -> dict | None:
    """The flow settings of a flow stream without a flow store (None otherwise)."""
    if cfg.stream != "flow" or cfg.flows:
        return None
    from datp.flows.compute import FlowComputer

    preset = FlowComputer(algorithm=cfg.flow_algorithm, preset=cfg.flow_preset).preset
    return {"algorithm": cfg.flow_algorithm, "preset": preset, "backend": cfg.flow_backend,
            "bound": cfg.flow_bound, "short_side": cfg.flow_short_side, "size": cfg.flow_size}


def _flow_computer(on_the_fly: dict | None, ctx: Context):
    """The torch backend's TV-L1 on this process's device (None for stored or opencv flow)."""
    if on_the_fly is None or on_the_fly["backend"] != "torch":
        return None
    from datp.flows.compute import FlowComputer

    return FlowComputer(algorithm=on_the_fly["algorithm"], preset=on_the_fly["preset"], backend="torch",
                        device=str(ctx.device))


def _test_best(model: VideoModel, out: Path, records: list, clips: dict, cfg: FinetuneConfig,
               ctx: Context, flow_computer=None) -> dict:
    """Load best.pt (read by rank 0, sent to all) into `model` and evaluate it on `records`."""
    chosen = broadcast_object(
        torch.load(out / ckpt_io.BEST, map_location="cpu", weights_only=True) if ctx.is_main else None, ctx)
    model.backbone.load_state_dict(chosen["model"])
    model.head.load_state_dict(chosen["head"])
    return _evaluate(model, _eval_loader(records, clips, cfg, ctx), cfg, ctx, flow_computer)


def _start(cfg: FinetuneConfig, out: Path, ctx: Context, head_kwargs: dict) -> dict:
    """Rank 0: a fresh start (writing config.json) or the resume state; errors are returned so that
    every rank can raise them. A resumed head must be built as the run's was: the same options give
    another head when a default changed between releases (DATP's aux_center), so the head's
    constructor arguments are compared too (from last.pt for resume files that do not hold them)."""
    resume = out / ckpt_io.RESUME
    fresh = {"epoch": 0, "history": [], "best": {"epoch": None, "val": None}}
    if not cfg.resume:
        if resume.exists():
            return {"error": f"{out} already holds a run; pass --resume to continue it or choose another --out"}
        if out.exists() and not out.is_dir():
            return {"error": f"--out {out} is a file; give a folder for the finetune run"}
        ours = {ckpt_io.CONFIG, ckpt_io.LAST, ckpt_io.BEST, ckpt_io.METRICS}  # a start that saved no epoch
        # a killed run may also leave the temporaries of those files (`last.pt.tmp`, `.metrics.json.tmp<pid>`)
        if out.is_dir() and any(p.name.lstrip(".").split(".tmp")[0] not in ours for p in out.iterdir()):
            return {"error": f"--out {out} holds files datp finetune did not write; give another --out"}
        out.mkdir(parents=True, exist_ok=True)
        ckpt_io.write_json(out / ckpt_io.CONFIG, cfg.plain())
        return fresh
    try:
        state = ckpt_io.load_resume(resume)
    except ValueError as err:
        return {"error": str(err)}
    recorded = state.get("head_kwargs")
    if recorded is None and (out / ckpt_io.LAST).is_file():
        recorded = torch.load(out / ckpt_io.LAST, map_location="cpu", weights_only=True)["config"].get("head_kwargs")
    now, then = cfg.plain(), state["config"]
    # With the head's recorded arguments, those decide (--head-option may restate an old default).
    free = RESUMABLE_CHANGES + (("head_options",) if recorded is not None else ())
    changed = sorted(k for k in set(now) | set(then) if now.get(k) != then.get(k) and k not in free)
    if changed:
        return {"error": f"{out} was run with other settings ({', '.join(changed)} differ); resume with the "
                         "same options (only --epochs, --workers and --device may change)"}
    if recorded is not None:
        recorded = recorded_options(cfg.head, recorded)
        differ = sorted(k for k in set(head_kwargs) | set(recorded) if recorded.get(k) != head_kwargs.get(k))
        if differ:
            options = " ".join(f"--head-option {k}={json.dumps(recorded[k])}" for k in differ if k in recorded)
            return {"error": f"{out} was trained with another head ({', '.join(differ)} differ, e.g. a default "
                             f"changed since); resume with the run's head options{': ' + options if options else ''}"}
    if state["world_size"] != ctx.world_size:
        print(f"note: {out} ran on {state['world_size']} processes, now {ctx.world_size}: the sample "
              "order changes from here on", file=sys.stderr)
    if state["epoch"] >= cfg.epochs:
        print(f"note: {out} already finished {state['epoch']} epochs (--epochs {cfg.epochs})", file=sys.stderr)
    return state


def _loader(dataset, sampler, cfg: FinetuneConfig, ctx: Context):
    """Batches of `dataset` in `sampler`'s order, decoded by `cfg.workers` spawned, persistent
    workers. The loader gets its own generator: by default each new iterator draws a worker seed
    from the global RNG, which would shift dropout masks between a resumed and an uninterrupted
    run (samples never use worker seeds)."""
    workers = cfg.workers
    return torch.utils.data.DataLoader(
        dataset, batch_size=cfg.batch_size, sampler=sampler, num_workers=workers,
        multiprocessing_context="spawn" if workers else None, persistent_workers=workers > 0,
        worker_init_fn=data.worker_init if workers else None, pin_memory=ctx.device.type == "cuda",
        collate_fn=data.collate,
        prefetch_factor=2 if workers else None, generator=torch.Generator().manual_seed(cfg.seed))


def _autocast(cfg: FinetuneConfig, ctx: Context):
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=ctx.device.type == "cuda" and cfg.amp)


def _inputs(batch: dict, loader, ctx: Context, flow_computer=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x, t, y) on the device; on-the-fly flow of the torch backend is computed here first."""
    x = batch["x"] if "x" in batch else loader.dataset.on_device(batch, flow_computer)
    return (x.to(ctx.device, non_blocking=True), batch["t"].to(ctx.device, non_blocking=True),
            batch["label"].to(ctx.device, non_blocking=True))


def train_step(net, model: VideoModel, x, t, y, optimizer, cfg: FinetuneConfig, ctx: Context) -> tuple[float, int]:
    """One SGD step on a batch of B videos (autocast bf16 on GPU when `cfg.amp`).

    Args:
        net: the model, or its DistributedDataParallel wrapper (which averages gradients).
        model: the model itself (its parameters are clipped).
        x: (B, N, C_in, S, S) segments; t: (B, N) segment times; y: (B,) labels.
        optimizer, cfg, ctx: the optimizer, the run's config and process context.

    Returns:
        (loss summed over the batch, number of correct predictions).
    """
    with _autocast(cfg, ctx):
        out = net(x, t)
    loss = F.cross_entropy(out.logits.float(), y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if cfg.clip_grad:
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], cfg.clip_grad)
    optimizer.step()
    return loss.item() * len(y), int((out.logits.argmax(1) == y).sum())


def _train_epoch(net, model, loader, optimizer, cfg, ctx, progress: bool, epoch: int, flow_computer=None) -> dict:
    from tqdm import tqdm

    net.train()
    totals = np.zeros(3)  # loss sum, correct, videos
    bar = tqdm(loader, desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="batch", leave=False,
               disable=not (progress and ctx.is_main), dynamic_ncols=True)
    started = time.perf_counter()
    for batch in bar:
        x, t, y = _inputs(batch, loader, ctx, flow_computer)
        loss, correct = train_step(net, model, x, t, y, optimizer, cfg, ctx)
        totals += (loss, correct, len(y))
        rate = totals[2] * cfg.num_segments / (time.perf_counter() - started)
        bar.set_postfix_str(f"loss {totals[0] / totals[2]:.4f}, {rate:.1f} images/s")
    loss, correct, videos = all_sum(totals.tolist(), ctx)
    seconds = time.perf_counter() - started
    return {"loss": loss / videos, "accuracy": correct / videos, "videos": int(videos),
            "images_per_s": videos * cfg.num_segments / max(seconds, 1e-9)}


def _eval_loader(records: list, clips: dict, cfg: FinetuneConfig, ctx: Context):
    """Centred segments and centre crops of `records`; rank r takes every world_size-th video from r."""
    keys = [(0, i) for i in range(ctx.rank, len(records), ctx.world_size)]
    return _loader(data.ClipDataset(records, train=False, **clips), keys, cfg, ctx)


@torch.inference_mode()
def _evaluate(model: VideoModel, loader, cfg: FinetuneConfig, ctx: Context, flow_computer=None) -> dict:
    """Loss and accuracy of `model` over the loader's videos of all ranks."""
    model.eval()
    totals = np.zeros(3)  # loss sum, correct, videos
    for batch in loader:
        x, t, y = _inputs(batch, loader, ctx, flow_computer)
        with _autocast(cfg, ctx):
            logits = model(x, t).logits.float()
        totals += (F.cross_entropy(logits, y, reduction="sum").item(), int((logits.argmax(1) == y).sum()), len(y))
    loss, correct, videos = all_sum(totals.tolist(), ctx)
    return {"loss": loss / videos, "accuracy": correct / videos, "videos": int(videos)}


def _report(entry: dict, epochs: int) -> None:
    train, val = entry["train"], entry["val"]
    line = (f"epoch {entry['epoch']}/{epochs}: train loss {train['loss']:.4f} acc {train['accuracy']:.4f}, "
            f"{train['images_per_s']:.1f} images/s")
    if val is not None:
        line += f"; val loss {val['loss']:.4f} acc {val['accuracy']:.4f}"
    print(line + f" ({entry['seconds']:.1f}s)", file=sys.stderr)


def _summary(out: Path, best: dict, test: dict | None) -> None:
    line = f"finetune: best epoch {best['epoch']}"
    if best["val"] is not None:
        line += f" (val accuracy {best['val']['accuracy']:.4f})"
    if test is not None:
        line += f"; test accuracy {test['accuracy']:.4f} on {test['videos']} videos"
    print(f"{line}\n{out / ckpt_io.BEST} loads in datp extract-features --weights", file=sys.stderr)


def config_from_json(path: str | Path) -> FinetuneConfig:
    """A FinetuneConfig from a `config.json` (lists become the tuples the fields hold)."""
    values = json.loads(Path(path).read_text())
    tuples = ("sources", "head_options", "lr_steps", "flow_size")
    return FinetuneConfig(**{k: tuple(v) if k in tuples and v is not None else v for k, v in values.items()})
