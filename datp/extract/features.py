"""`datp extract-features`: per-segment conv maps and class scores for every video, to HDF5.

Per video (in DataLoader worker processes, so the backbone never waits): decode, sample N segments
(TSN test mode) or one every `stride` frames, read one RGB frame and a stack of L flow pairs per
segment, and preprocess. Flow comes from a flow store or jpg folders written by extract-flow, or is
computed on the fly for only the pairs the segments read (N*L instead of T-1), with exactly the
same decoding, grayscale conversion, algorithm and quantization, so both give identical features.

In the main process, images of several videos are batched through the backbone (GPU when there is
one: autocast bf16 and channels_last), ten-crop views are averaged per segment, and each video is
written as a part of the feature store (`datp.extract.store`): resumable and crash-safe as
extract-flow.

Segments and streams: with the flow stream, segment k reads flow pairs `start_k .. start_k + L - 1`
(sampled in the space of T - 1 pairs) and its RGB frame is the middle frame of that stack,
`start_k + L // 2`, so both streams see the same moment; `segments/frame` holds `start_k`. With
RGB alone, TSN's RGB sampling is used (L = 1) and `segments/frame` is the RGB frame.
"""

from __future__ import annotations

import functools
import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from datp.extract import store as fstore
from datp.extract.loader import FeatureConfig, VideoItems, device_flow, flow_settings
from datp.io.atomic import die_with_parent, ensure_shared_memory, isolated
from datp.io.datasets import Dataset, Record, shard_out, shard_records
from datp.io.device import resolve_device
from datp.io.h5header import check_output
from datp.io.messages import warn
from datp.io.runner import FailureLog, Summary
from datp.io.settings import check_settings, read_marker, write_marker

__all__ = ["FeatureConfig", "VideoItems", "extract_features", "load_models", "shard_out"]

INDEX_SECONDS = 10.0


def _identity(batch):
    return batch


@dataclass
class _Pending:
    record: Record
    item: dict
    outputs: dict = field(default_factory=dict)  # stream -> list of (conv, logits) pieces


def load_models(cfg: FeatureConfig, class_names: list[str]) -> tuple[dict, dict]:
    """The backbone of each stream, and what the store records about them."""
    from datp.extract.backbones import load_backbone

    models, info = {}, {}
    for stream in cfg.streams:
        weights = cfg.flow_weights if (stream == "flow" and cfg.flow_weights) else cfg.weights
        model, meta = load_backbone(cfg.backbone, stream=stream, weights=weights, seed=cfg.seed,
                                    new_length=cfg.new_length if stream == "flow" else None)
        models[stream] = model
        recorded = ("weights", "sha256", "format", "seed", "fc", "class_names")
        info[stream] = {**{k: meta[k] for k in recorded}, **model.describe()}
    return models, info


def _store_attrs(cfg: FeatureConfig, class_names: list[str], info: dict, flow: dict) -> dict:
    first = info[cfg.streams[0]]
    logit_classes = first.get("class_names") or []
    ragged = cfg.stride is not None or cfg.stride_seconds is not None
    seconds = {"stride_seconds": cfg.stride_seconds} if cfg.stride_seconds is not None else {}
    return fstore.base_attrs(
        layout="ragged" if ragged else "fixed", class_names=class_names,
        new_length={s: (cfg.new_length if s == "flow" else 1) for s in cfg.streams},
        settings=asdict(cfg), num_segments=cfg.num_segments,
        stride=cfg.stride if cfg.stride is not None else 0, **seconds,
        preprocess=preprocessing(cfg, info), protocol=cfg.protocol or "none",
        backbone=cfg.backbone, weights=json.dumps({s: i["weights"] for s, i in info.items()}),
        weights_sha256=json.dumps({s: i["sha256"] for s, i in info.items()}),
        input_size=cfg.input_size, crop="center" if cfg.num_crops == 1 else "ten-crop",
        resize=cfg.resize, flow=flow if "flow" in cfg.streams else {}, conv_compression=cfg.compression,
        models=info, logit_classes=list(logit_classes),
        logits_match_labels=bool(class_names) and list(logit_classes) == list(class_names))


def preprocessing(cfg: FeatureConfig, info: dict) -> dict:
    """The exact transform from decoded frames to backbone inputs, recorded in the store.

    RGB: frames decoded by PyAV (FFmpeg swscale to rgb24) at the source size (or shrunk to
    `short_side` by swscale's area filter when it is > 0), scaled to float32 [0, 1], then
    torchvision.transforms.v2.functional resize(short side, bilinear, antialias=True),
    center_crop (or ten_crop), normalize(mean, std): torchvision's eval transform
    (`Resize(resize, antialias=True) + CenterCrop(input_size) + Normalize`) on the decoded frames.
    Flow: decoded at the flow's size, gray, flow, quantized; then (q - 128) / 128, the same resize
    and crops.
    """
    import torchvision

    crop = {"op": "center_crop" if cfg.num_crops == 1 else "ten_crop", "size": cfg.input_size,
            "views": cfg.num_crops, "average": "conv maps (mirrored views mirrored back) and logits"}
    resize = {"op": "resize", "size": cfg.resize, "edge": "short side", "interpolation": "bilinear",
              "antialias": True, "dtype": "float32"}
    out = {"library": "torchvision.transforms.v2.functional", "torchvision": torchvision.__version__,
           "resize": resize, "crop": crop}
    if "rgb" in cfg.streams:
        out["rgb"] = {"decode": ("source size" if not cfg.short_side else
                                 f"short side {cfg.short_side} (swscale area) before resize"),
                      "input": "rgb24 uint8 / 255", "normalize": {
                          "mean": info["rgb"]["mean"], "std": info["rgb"]["std"]}}
    if "flow" in cfg.streams:
        out["flow"] = {"decode": "the flow's size (see attrs flow)", "input": "(q - 128) / 128",
                       "mirror": "x negated"}
    return out


def extract_features(dataset: Dataset, cfg: FeatureConfig, *, progress: bool = True,
                     missing: list[Record] = ()) -> Summary:
    """Extract features for every video of `dataset` (this shard's part), skipping done ones.

    One process writes a store at a time (`datp.io.atomic.output_lock`); an existing `out` of
    another kind, or a file datp did not write, is refused. The store is the union of every run
    into it (`datp.extract.store.build_store(union=True)`).

    Returns:
        The run's Summary (failures also in `<out>.failures.csv`).
    """
    from datp.io.atomic import output_lock

    out = shard_out(cfg.out, cfg.shard)
    check_output(out, kind=fstore.KIND, noun="feature store")
    with output_lock(out):
        return _extract(dataset, cfg, out, progress, missing)


def _extract(dataset: Dataset, cfg: FeatureConfig, out: Path, progress: bool,
             missing: list[Record]) -> Summary:
    from tqdm import tqdm

    records = shard_records(dataset.records, *cfg.shard)
    flow = flow_settings(cfg, dataset.records) if "flow" in cfg.streams else {}
    models, info = load_models(cfg, dataset.class_names)
    attrs = _store_attrs(cfg, dataset.class_names, info, flow)
    mark = _check_same_run(out, attrs)
    rows = [fstore.VideoRow(r.id, r.label, r.split, labels=tuple(r.labels) if len(r.labels) > 1 else ())
            for r in records]  # multi-label lists: every label, in the store's multi-hot column
    finished = fstore.done_ids(out, report=warn)
    absent = {r.id for r in missing}
    todo = [r for r in records if r.id not in finished and r.id not in absent]
    summary = Summary(skipped=len(records) - len(todo) - len(absent & {r.id for r in records}))
    failure_log = FailureLog(Path(f"{out}.failures.csv"), {r.id for r in records})
    for record in missing:
        if record in records:
            failure_log.add(record, "video file not found")
            summary.failed.append((record.id, str(record.path), "video file not found"))
    device = resolve_device(cfg.device)
    for model in models.values():
        model.to(device)
        if device.type == "cuda":
            model.to(memory_format=torch.channels_last)
    flow_computer = None
    if flow.get("backend") == "torch" and flow["source"] == "on-the-fly":
        from datp.flows.compute import FlowComputer

        flow_computer = FlowComputer(algorithm=flow["algorithm"], preset=flow["preset"], backend="torch",
                                     device=str(device))
    build = functools.partial(fstore.build_store, out, rows, attrs, cfg.streams, union=True)
    build(final=False)
    items = _items(todo, cfg, flow)
    bar = tqdm(total=len(todo), unit="video", desc="extract-features", disable=not progress,
               dynamic_ncols=True)
    start = last_index = time.perf_counter()
    pending: list[_Pending] = []
    images = 0

    def flush(force: bool) -> None:
        nonlocal images, last_index
        while pending and (force or _queued(pending) >= cfg.batch_size):
            _forward(pending, models, device, cfg.batch_size)
            while pending and _complete(pending[0], cfg.streams):
                done = pending.pop(0)
                mark()  # settings bind the store from its first finished video on
                images += _write(out, done, cfg)
                summary.done += 1
                bar.update(1)
                bar.set_postfix_str(f"{images / (time.perf_counter() - start):.1f} images/s")
            if time.perf_counter() - last_index > INDEX_SECONDS:
                build(final=False)
                last_index = time.perf_counter()

    def fail(record: Record, reason: str) -> None:
        failure_log.add(record, reason)
        summary.failed.append((record.id, str(record.path), reason))
        bar.update(1)

    try:
        for item in items:
            record = todo[item["i"]]
            if not item["ok"]:
                fail(record, item["reason"])
                continue
            if "flow_gray" in item:  # on-the-fly flow by the torch TV-L1, here on the backbone's device
                try:
                    device_flow(item, flow_computer, cfg, flow["bound"])
                except (ValueError, torch.cuda.OutOfMemoryError) as err:
                    fail(record, f"{type(err).__name__}: {err}".replace("\n", " "))
                    continue
            pending.append(_Pending(record, item))
            flush(force=False)
        flush(force=True)
    except KeyboardInterrupt:
        summary.interrupted = True
    finally:
        items.close()  # stops the DataLoader workers now, also on an error
        bar.close()
        failure_log.close()
    summary.seconds = time.perf_counter() - start
    summary.units = images
    if summary.interrupted:
        build(final=False)
    else:  # in a child process: HDF5 may crash if the disk fills meanwhile
        isolated(build, final=True, out=out)
    return summary


PREFETCH = 4  # videos each DataLoader worker prepares ahead


def _worker_init(_worker_id: int) -> None:
    import multiprocessing.queues

    die_with_parent()
    # When the run stops (Ctrl-C, SIGTERM, an error) the parent closes the queues while a worker
    # may still be sending a video: its feeder thread's BrokenPipeError is expected, not news.
    report = multiprocessing.queues.Queue._on_queue_feeder_error

    def quiet(err, obj):
        if not isinstance(err, BrokenPipeError):
            report(err, obj)

    multiprocessing.queues.Queue._on_queue_feeder_error = staticmethod(quiet)
    # Likewise the thread that passes tensor fds to the parent (multiprocessing.resource_sharer) reports
    # a connection the stopping parent dropped through sys.excepthook: a traceback after every SIGTERM
    # under load (seen once in the fault table), not an error of the run.
    hook = sys.excepthook

    def quiet_hook(kind, value, tb):
        if not issubclass(kind, (ConnectionResetError, BrokenPipeError, EOFError)):
            hook(kind, value, tb)

    sys.excepthook = quiet_hook


def _loader(items: VideoItems, indices: list[int], workers: int):
    return torch.utils.data.DataLoader(
        torch.utils.data.Subset(items, indices), batch_size=None, shuffle=False,
        num_workers=workers, collate_fn=_identity, worker_init_fn=_worker_init if workers else None,
        multiprocessing_context="spawn" if workers else None,
        prefetch_factor=PREFETCH if workers else None, persistent_workers=False)


def _worker_died(err: RuntimeError) -> bool:
    return "DataLoader worker" in str(err)


def _item_bytes(cfg: FeatureConfig) -> int:
    """About the float32 bytes of one prepared video: segments x crops x (3 RGB + 2L flow channels) x
    crop^2 (a stride store's videos vary: counted as 64 segments)."""
    segments = 64 if cfg.stride else cfg.num_segments
    channels = (3 if "rgb" in cfg.streams else 0) + (2 * cfg.new_length if "flow" in cfg.streams else 0)
    return segments * cfg.num_crops * channels * cfg.input_size ** 2 * 4


def _items(todo: list[Record], cfg: FeatureConfig, flow: dict):
    """The prepared items of `todo`, in order. A video whose worker process dies (a crash in
    native code, an OOM kill) is yielded as failed and the rest goes on, as in extract-flow:
    after a death, each video the dead pool may have held is redone alone in a fresh worker."""
    dataset = VideoItems(todo, cfg, flow)
    ensure_shared_memory(cfg.workers * PREFETCH * _item_bytes(cfg), workers=cfg.workers)
    remaining = list(range(len(todo)))
    while remaining:
        got = set()
        try:
            for item in _loader(dataset, remaining, cfg.workers):
                got.add(item["i"])
                yield item
            return
        except RuntimeError as err:
            if not _worker_died(err):
                raise
        remaining = [i for i in remaining if i not in got]
        suspects = remaining[:cfg.workers * (PREFETCH + 1)]
        for i in suspects:
            try:
                item = next(iter(_loader(dataset, [i], 1)))
            except RuntimeError as err:
                if not _worker_died(err):
                    raise
                item = {"i": i, "ok": False, "reason": "worker process died while decoding or "
                        f"computing this video ({err})".replace("\n", " ")}
            yield item
        remaining = remaining[len(suspects):]


def _queued(pending: list[_Pending]) -> int:
    """Images waiting for the backbone."""
    return sum(p.item[s].shape[0] * p.item[s].shape[1] - sum(len(o[0]) for o in p.outputs.get(s, []))
               for p in pending for s in ("rgb", "flow") if s in p.item)


def _complete(p: _Pending, streams) -> bool:
    return all(sum(len(o[0]) for o in p.outputs.get(s, [])) == p.item[s].shape[0] * p.item[s].shape[1]
               for s in streams)


@torch.inference_mode()
def _forward(pending: list[_Pending], models: dict, device: torch.device, batch_size: int) -> None:
    """Run one batch of up to `batch_size` images per stream, across videos, in order."""
    for stream, model in models.items():
        pieces, owners = [], []
        room = batch_size
        for p in pending:
            x = p.item[stream].flatten(0, 1)  # (N*K, C, S, S)
            done = sum(len(o[0]) for o in p.outputs.get(stream, []))
            take = min(room, len(x) - done)
            if take > 0:
                pieces.append(x[done:done + take])
                owners.append((p, take))
                room -= take
            if room == 0:
                break
        if not pieces:
            continue
        x = torch.cat(pieces).to(device, non_blocking=True)
        if device.type == "cuda":
            x = x.to(memory_format=torch.channels_last)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                conv, logits = model(x)
        else:
            conv, logits = model(x)
        conv, logits = conv.float().cpu(), logits.float().cpu()
        start = 0
        for p, take in owners:
            p.outputs.setdefault(stream, []).append((conv[start:start + take],
                                                     logits[start:start + take]))
            start += take


def _write(out: Path, p: _Pending, cfg: FeatureConfig) -> int:
    streams, images = {}, 0
    for stream in cfg.streams:
        conv = torch.cat([o[0] for o in p.outputs[stream]])
        logits = torch.cat([o[1] for o in p.outputs[stream]])
        n, k = p.item[stream].shape[:2]
        images += n * k
        conv = conv.view(n, k, *conv.shape[1:])
        if k == 10:  # views 5..9 are mirrored: mirror their maps back so positions agree
            conv = torch.cat([conv[:, :5], conv[:, 5:].flip(-1)], 1)
        # average the K views of each segment -> (n, Cf, h, w) and (n, C)
        streams[stream] = (conv.mean(1).numpy(), logits.view(n, k, -1).mean(1).numpy())
    fstore.write_part(out, p.record.id, fstore.VideoFeatures(
        p.item["t"], p.item["frame"], streams, p.item["num_frames"], p.item["fps"]),
        label=p.record.label, split=p.record.split)
    return images


# may differ in a rerun (the compression of the conv maps changes bytes on disk, not features)
SETTINGS_ONLY = ("settings", "created", "datp_version", "index_only", "conv_compression")


def _check_same_run(out: Path, attrs: dict):
    """Refuse to mix features of other settings into an existing store or its parts.

    Returns:
        `mark()`: records the settings (the marker in the parts folder); called before the first
        video is written, so a run that fails every video binds no later run.
    """
    from datp.io.atomic import parts_dir

    key = {k: v for k, v in attrs.items() if k not in SETTINGS_ONLY}
    marker = parts_dir(out) / "settings.json"
    old = read_marker(marker)
    if old is None:  # no marker: a finished store (or its base) with videos in it binds
        old = fstore.finished_attrs(out)
    check_settings(out, old, key, what="features", ignore=SETTINGS_ONLY)
    return lambda: write_marker(marker, key)
