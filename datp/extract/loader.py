"""What extract-features does per video, in DataLoader worker processes: its settings
(`FeatureConfig`), the flow source's settings, and `VideoItems` (decode, sample, read RGB frames
and flow stacks, preprocess). See `datp.extract.features` for the sampling rules.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from datp.extract.sampling import frame_indices, segment_indices, segment_times, stride_indices
from datp.extract.transforms import flow_to_tensor, rgb_to_tensor
from datp.io.datasets import Record, check_range, check_shard


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
        check_range("new_length", self.new_length, 1, "flow pairs per segment")
        check_range("input_size", self.input_size, 1, "the crop, e.g. 224")
        check_range("resize", self.resize, self.input_size, "the short side before the crop")
        check_range("batch_size", self.batch_size, 1)
        check_range("workers", self.workers, 0, "0 decodes in the main process")
        check_range("short_side", self.short_side, 0, "0 keeps the source size")
        check_range("flow_short_side", self.flow_short_side, 0, "0 keeps the source size")
        if not self.flow_bound > 0:
            raise ValueError(f"bound {self.flow_bound} must be > 0 pixels")
        if self.flow_size is not None and (len(self.flow_size) != 2 or min(self.flow_size) < 1):
            raise ValueError(f"flow size {self.flow_size} must be W x H, both >= 1")
        check_shard(self.shard)


def flow_settings(cfg: FeatureConfig) -> dict:
    """Flow settings, from the flow source when there is one (so sizes and presets agree)."""
    from datp.flows.compute import FlowComputer

    if cfg.flows is not None:
        path = Path(cfg.flows)
        if path.is_dir():
            from datp.flows.jpg import stored_settings

            settings = stored_settings(path)
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
