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

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from datp.extract import store as fstore
from datp.extract.sampling import frame_indices, segment_indices, segment_times, stride_indices
from datp.extract.transforms import flow_to_tensor, rgb_to_tensor
from datp.io.datasets import Dataset, Record, shard_out, shard_records
from datp.io.device import resolve_device
from datp.io.runner import FailureLog, Summary
from datp.io.settings import check_settings, marked_settings

INDEX_SECONDS = 10.0


@dataclass(frozen=True)
class FeatureConfig:
    """Settings of one extract-features run; saved in the store's attrs.

    Attributes:
        out: the feature store.
        backbone: torchvision ResNet name.
        weights: "random" (seeded, for tests and demos), a torchvision state_dict file, or a datp
            finetune checkpoint; used for every stream unless `flow_weights` is given.
        flow_weights: weights for the flow stream (default: `weights`).
        streams: "rgb" and/or "flow".
        num_segments: N segments per video (TSN test sampling); ignored with `stride`.
        stride: one segment every S frames instead (ragged store, for untrimmed videos).
        new_length: flow pairs per segment (L).
        flows: a flow store (.h5) or jpg folder from extract-flow; None computes flow on the fly.
        flow_algorithm, flow_preset, flow_bound, flow_short_side, flow_size: on-the-fly flow
            settings (taken from the flow store when `flows` is given).
        short_side: decode size when only RGB is extracted (with flow, frames are decoded at the
            flow's size); then resized to `resize` and cropped.
        resize: short side before cropping; input_size: the crop (224).
        num_crops: 1 (centre crop) or 10 (ten-crop, averaged per segment).
        batch_size: images per backbone forward.
        workers: DataLoader worker processes (0: decode in the main process).
        shard: (i, n).
        device: "auto" (cuda when available), "cpu" or "cuda[:k]".
        seed: seed of random weights.
    """

    out: str
    backbone: str = "resnet34"
    weights: str = "random"
    flow_weights: str | None = None
    streams: tuple[str, ...] = ("rgb", "flow")
    num_segments: int = 10
    stride: int | None = None
    new_length: int = 5
    flows: str | None = None
    flow_algorithm: str = "tvl1"
    flow_preset: str | None = None
    flow_bound: float = 20.0
    flow_short_side: int = 256
    flow_size: tuple[int, int] | None = None
    short_side: int = 256
    resize: int = 256
    input_size: int = 224
    num_crops: int = 1
    batch_size: int = 64
    workers: int = 2
    shard: tuple[int, int] = (0, 1)
    device: str = "auto"
    seed: int = 0

    def __post_init__(self):
        bad = set(self.streams) - {"rgb", "flow"}
        if bad or not self.streams:
            raise ValueError(f"streams {','.join(self.streams)} must be rgb and/or flow")
        if self.num_crops not in (1, 10):
            raise ValueError(f"num_crops {self.num_crops} must be 1 or 10")
        if self.stride is not None and self.stride < 1:
            raise ValueError(f"stride {self.stride} must be >= 1")
        if self.num_segments < 1:
            raise ValueError(f"segments {self.num_segments} must be >= 1")


def _flow_settings(cfg: FeatureConfig) -> dict:
    """Flow settings, from the flow source when there is one (so sizes and presets agree)."""
    from datp.flows.compute import FlowComputer

    if cfg.flows is not None:
        path = Path(cfg.flows)
        if path.is_dir():
            marker = path / "datp_flow_settings.json"
            if not marker.is_file():
                raise ValueError(f"{path} has no datp_flow_settings.json; pass a folder written "
                                 "by datp extract-flow --format jpg")
            settings = json.loads(marker.read_text())
        else:
            from datp.flows.store import FlowStore

            with FlowStore(path) as s:
                settings = s.settings
        return {"source": str(path), "algorithm": settings["algorithm"],
                "preset": settings["preset"], "bound": settings["bound"],
                "short_side": settings["short_side"], "size": settings["size"]}
    preset = FlowComputer(algorithm=cfg.flow_algorithm, preset=cfg.flow_preset).preset
    return {"source": "on-the-fly", "algorithm": cfg.flow_algorithm, "preset": preset,
            "bound": cfg.flow_bound, "short_side": cfg.flow_short_side, "size": cfg.flow_size}


class VideoItems(torch.utils.data.Dataset):
    """Per video: sampled, preprocessed segment tensors, or the reason it failed."""

    def __init__(self, records: list[Record], cfg: FeatureConfig, flow: dict):
        self.records, self.cfg, self.flow = records, cfg, flow
        self._reader = None

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict:
        record = self.records[i]
        try:
            return {"i": i, "ok": True, **self._load(record)}
        except Exception as err:  # a failing video is data: recorded, the run goes on
            return {"i": i, "ok": False, "reason": f"{type(err).__name__}: {err}".replace("\n", " ")}

    def _load(self, record: Record) -> dict:
        from datp.io.decode import DecodeError, VideoInfo, read_frames

        cfg, use_flow = self.cfg, "flow" in self.cfg.streams
        L = cfg.new_length
        if use_flow:
            resize = ({"size": tuple(self.flow["size"])} if self.flow["size"]
                      else {"short_side": self.flow["short_side"] or None})
        else:
            resize = {"short_side": cfg.short_side or None}
        on_the_fly = use_flow and self.flow["source"] == "on-the-fly"

        def needed(T: int) -> np.ndarray:
            """The frames this video's segments read: RGB frames, and both frames of each
            flow pair computed on the fly."""
            if use_flow and T < 2:
                return np.zeros(0, np.int64)  # fails below with a clear reason
            starts, length, space = self._starts(T)
            keep = [self._rgb_index(starts, T)] if "rgb" in cfg.streams else []
            if on_the_fly:
                pairs = frame_indices(starts, L, space).ravel()
                keep += [pairs, pairs + 1]
            return np.concatenate(keep) if keep else np.zeros(0, np.int64)

        info = VideoInfo(path=str(record.path))
        frames, info = read_frames(record.path, needed, info, **resize)  # {index: frame}
        if info.errors:
            raise DecodeError(f"corrupt stream: {len(info.errors)} packet(s) failed to decode "
                              f"({info.errors[0]})")
        T = info.num_frames
        if use_flow and T < 2:
            raise DecodeError(f"{T} frame decoded; the flow stream needs at least 2")
        starts, length, space = self._starts(T)
        out = {"t": segment_times(starts, length, space), "frame": starts,
               "num_frames": T, "fps": info.fps}
        if "rgb" in cfg.streams:
            out["rgb"] = rgb_to_tensor(np.stack([frames[j] for j in self._rgb_index(starts, T)]),
                                       resize=cfg.resize, crop=cfg.input_size,
                                       num_crops=cfg.num_crops)
        if use_flow:
            pairs = frame_indices(starts, L, T - 1)  # (N, L) pair indices
            stacks = self._flow_pairs(record, frames, T, pairs)  # (N, L, H, W, 2) uint8
            out["flow"] = flow_to_tensor(stacks, resize=cfg.resize, crop=cfg.input_size,
                                         num_crops=cfg.num_crops)
        return out

    def _starts(self, T: int) -> tuple[np.ndarray, int, int]:
        """(segment starts, indices per segment, index space) for a video of T frames."""
        cfg = self.cfg
        space, length = (T - 1, cfg.new_length) if "flow" in cfg.streams else (T, 1)
        if cfg.stride is not None:
            return stride_indices(space, cfg.stride, length), length, space
        return segment_indices(space, cfg.num_segments, length, "test"), length, space

    def _rgb_index(self, starts: np.ndarray, T: int) -> np.ndarray:
        if "flow" in self.cfg.streams:
            return np.minimum(starts + self.cfg.new_length // 2, T - 1)
        return starts

    def _flow_pairs(self, record: Record, frames: dict, T: int, pairs: np.ndarray) -> np.ndarray:
        needed = np.unique(pairs)
        if self.flow["source"] == "on-the-fly":
            from datp.flows.compute import FlowComputer
            from datp.flows.extract import to_gray
            from datp.flows.quantize import quantize

            computer = FlowComputer(algorithm=self.flow["algorithm"], preset=self.flow["preset"])
            gray = {}
            for j in np.unique(np.concatenate([needed, needed + 1])):
                gray[j] = to_gray(frames[j])
            table = {j: quantize(computer(gray[j], gray[j + 1]), self.flow["bound"]) for j in needed}
        elif Path(self.flow["source"]).is_dir():
            from datp.flows.jpg import read_flow_pairs, video_dir

            table = read_flow_pairs(video_dir(Path(self.flow["source"]), record), needed)
        else:
            from datp.flows.store import FlowStore

            if self._reader is None:  # opened in the worker process that uses it
                self._reader = FlowStore(self.flow["source"])
            if record.id not in self._reader:
                raise KeyError(f"{self.flow['source']} has no flow for {record.id!r}; run "
                               "datp extract-flow on this dataset first")
            stored = self._reader.meta(record.id)["num_frames"]
            if stored != T:
                raise ValueError(f"the flow store has {stored} frames for {record.id!r}, the "
                                 f"video decodes to {T}; re-extract its flow")
            data = self._reader.flow(record.id, needed)
            table = dict(zip(needed.tolist(), data))
        return np.stack([[table[j] for j in row] for row in pairs])


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
    return fstore.base_attrs(
        layout="ragged" if cfg.stride else "fixed", class_names=class_names,
        new_length={s: (cfg.new_length if s == "flow" else 1) for s in cfg.streams},
        settings=asdict(cfg), num_segments=cfg.num_segments, stride=cfg.stride,
        backbone=cfg.backbone, weights=json.dumps({s: i["weights"] for s, i in info.items()}),
        weights_sha256=json.dumps({s: i["sha256"] for s, i in info.items()}),
        input_size=cfg.input_size, crop="center" if cfg.num_crops == 1 else "ten-crop",
        resize=cfg.resize, flow=flow if "flow" in cfg.streams else {},
        models=info, logit_classes=list(logit_classes),
        logits_match_labels=bool(class_names) and list(logit_classes) == list(class_names))


def extract_features(dataset: Dataset, cfg: FeatureConfig, *, progress: bool = True,
                     missing: list[Record] = ()) -> Summary:
    """Extract features for every video of `dataset` (this shard's part), skipping done ones.

    Returns:
        The run's Summary (failures also in `<out>.failures.csv`).
    """
    from tqdm import tqdm

    out = shard_out(cfg.out, cfg.shard)
    records = shard_records(dataset.records, *cfg.shard)
    flow = _flow_settings(cfg) if "flow" in cfg.streams else {}
    models, info = load_models(cfg, dataset.class_names)
    attrs = _store_attrs(cfg, dataset.class_names, info, flow)
    _check_same_run(out, attrs)
    rows = [fstore.VideoRow(r.id, r.label, r.split) for r in records]
    finished = fstore.done_ids(out)
    absent = {r.id for r in missing}
    todo = [r for r in records if r.id not in finished and r.id not in absent]
    summary = Summary(skipped=len(records) - len(todo) - len(absent & {r.id for r in records}))
    failure_log = FailureLog(Path(f"{out}.failures.csv"))
    for record in missing:
        if record in records:
            failure_log.add(record, "video file not found")
            summary.failed.append((record.id, str(record.path), "video file not found"))
    device = resolve_device(cfg.device)
    for model in models.values():
        model.to(device)
        if device.type == "cuda":
            model.to(memory_format=torch.channels_last)
    fstore.build_store(out, rows, attrs, cfg.streams, final=False)
    loader = torch.utils.data.DataLoader(
        VideoItems(todo, cfg, flow), batch_size=None, shuffle=False, num_workers=cfg.workers,
        collate_fn=_identity, multiprocessing_context="spawn" if cfg.workers else None,
        prefetch_factor=4 if cfg.workers else None, persistent_workers=False)
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
                images += _write(out, done, cfg)
                summary.done += 1
                bar.update(1)
                bar.set_postfix_str(f"{images / (time.perf_counter() - start):.1f} images/s")
            if time.perf_counter() - last_index > INDEX_SECONDS:
                fstore.build_store(out, rows, attrs, cfg.streams, final=False)
                last_index = time.perf_counter()

    try:
        for item in loader:
            record = todo[item["i"]]
            if not item["ok"]:
                failure_log.add(record, item["reason"])
                summary.failed.append((record.id, str(record.path), item["reason"]))
                bar.update(1)
                continue
            pending.append(_Pending(record, item))
            flush(force=False)
        flush(force=True)
    except KeyboardInterrupt:
        summary.interrupted = True
    finally:
        bar.close()
        failure_log.close()
    summary.seconds = time.perf_counter() - start
    summary.units = images
    fstore.build_store(out, rows, attrs, cfg.streams, final=not summary.interrupted)
    return summary


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
        p.item["t"], p.item["frame"], streams, p.item["num_frames"], p.item["fps"]))
    return images


SETTINGS_ONLY = ("settings", "created", "datp_version", "index_only")  # may differ in a rerun


def _check_same_run(out: Path, attrs: dict) -> None:
    """Refuse to mix features of other settings into an existing store or its parts."""
    from datp.io.atomic import parts_dir

    key = {k: v for k, v in attrs.items() if k not in SETTINGS_ONLY}
    marker = parts_dir(out) / "settings.json"
    same = {"what": "features", "ignore": SETTINGS_ONLY}
    if not marker.is_file():
        check_settings(out, fstore.stored_attrs(out), key, **same)
    marked_settings(marker, key, where=out, **same)
