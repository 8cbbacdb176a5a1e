"""What extract-features does per video, in DataLoader worker processes: its settings
(`FeatureConfig`), the flow source's settings, and `VideoItems` (decode, sample, read RGB frames
and flow stacks, preprocess). See `datp.extract.features` for the sampling rules.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from datp.extract.sampling import (
    frame_indices,
    seconds_indices,
    segment_indices,
    segment_times,
    stride_indices,
)
from datp.extract.store.schema import CONV_COMPRESSION, DEFAULT_CONV_COMPRESSION
from datp.extract.transforms import flow_to_tensor, rgb_to_tensor
from datp.io.datasets import Record, check_range, check_shard

# Named test protocols: the fields they set. TSN's (Wang et al. 2016, tsn-pytorch test_models.py):
# 25 segments, ten crops (4 corners + centre and their mirror images), scores averaged over crops.
PROTOCOLS = {"tsn": {"num_segments": 25, "num_crops": 10}}


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
        stride_seconds: one segment every S seconds instead (`sampling.seconds_indices`, from
            the video's frame rate); exclusive with `stride`.
        protocol: a named test protocol (`PROTOCOLS`: "tsn" = 25 segments x 10 crops) that sets
            its fields; None for none.
        new_length: flow pairs per segment (L).
        flows: a flow store (.h5) or jpg folder from extract-flow, or a folder of another tool's
            flow jpgs (denseflow, dense_flow, mmaction2: one folder per video id); None computes
            flow on the fly (for rawframe datasets: reads the flow jpgs in each frame folder).
        compression: HDF5 filter of the conv maps in the final store: "none" (default, fastest for
            stage two to read), "lzf" or "gzip" (level 1); see `datp.extract.store.schema`.
        flow_backend: on-the-fly TV-L1 by "opencv" (CPU, in the decoding workers) or "torch"
            (`datp.flows.tvl1_torch` in the main process on `device`, next to the backbone, each
            video's pairs as one batch; the workers only decode): the GPU path.
        flow_algorithm, flow_preset, flow_bound, flow_short_side, flow_size: on-the-fly flow
            settings (taken from the flow store when `flows` is given); `flow_bound` is also
            the bound recorded for another tool's jpgs (their quantization is not in the files).
        flow_prefixes, flow_start: another tool's flow jpg names ("x_", "y_") and first number
            (0 or 1); detected when None (`datp.flows.jpg.detect_layout`).
        short_side: the size RGB frames are decoded at; 0 (default) keeps the source size, so
            torchvision resizes them (`resize`, bilinear, antialiased) exactly as its eval transform
            does; a size > 0 shrinks them in the decoder first (swscale area: faster on large
            videos, but no longer torchvision's preprocessing). Flow frames are decoded at the
            flow's size.
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
    stride_seconds: float | None = None
    protocol: str | None = None
    new_length: int = 5
    flows: str | None = None
    flow_prefixes: tuple[str, str] | None = None
    flow_start: int | None = None
    flow_algorithm: str = "tvl1"
    flow_backend: str = "opencv"
    compression: str = DEFAULT_CONV_COMPRESSION
    flow_preset: str | None = None
    flow_bound: float = 20.0
    flow_short_side: int = 256
    flow_size: tuple[int, int] | None = None
    short_side: int = 0
    resize: int = 256
    input_size: int = 224
    num_crops: int = 1
    batch_size: int = 64
    workers: int = 2
    shard: tuple[int, int] = (0, 1)
    device: str = "auto"
    seed: int = 0

    def __post_init__(self):
        if self.protocol is not None:
            if self.protocol not in PROTOCOLS:
                raise ValueError(f"unknown protocol {self.protocol!r}; choose from {sorted(PROTOCOLS)}")
            for name, value in PROTOCOLS[self.protocol].items():
                object.__setattr__(self, name, value)  # frozen: the protocol's fields, set once
        if self.stride is not None and self.stride_seconds is not None:
            raise ValueError("give a stride in frames (--stride) or in seconds (--stride-seconds), not both")
        if self.stride_seconds is not None and not self.stride_seconds > 0:
            raise ValueError(f"stride-seconds {self.stride_seconds} must be > 0")
        if self.protocol is not None and (self.stride or self.stride_seconds):
            raise ValueError(f"protocol {self.protocol} samples {self.num_segments} segments; "
                             "drop --stride / --stride-seconds")
        if self.flow_start is not None and self.flow_start < 0:
            raise ValueError(f"flow-start {self.flow_start} must be >= 0 (0 for denseflow, 1 for TSN)")
        if self.flow_prefixes is not None and (len(self.flow_prefixes) != 2 or not all(self.flow_prefixes)):
            raise ValueError(f"flow-prefixes {self.flow_prefixes} must be two prefixes X,Y, e.g. x_,y_")
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
        if self.compression not in CONV_COMPRESSION:
            raise ValueError(f"compression {self.compression!r} must be one of {', '.join(CONV_COMPRESSION)}")
        if self.flow_backend not in ("opencv", "torch"):
            raise ValueError(f"flow backend {self.flow_backend!r} must be opencv or torch")
        if self.flow_backend == "torch" and self.flow_algorithm != "tvl1":
            raise ValueError(f"flow backend torch computes tvl1 only, not {self.flow_algorithm}; use --flow-backend opencv")
        if not self.flow_bound > 0:
            raise ValueError(f"bound {self.flow_bound} must be > 0 pixels")
        if self.flow_size is not None and (len(self.flow_size) != 2 or min(self.flow_size) < 1):
            raise ValueError(f"flow size {self.flow_size} must be W x H, both >= 1")
        check_shard(self.shard)


def flow_settings(cfg: FeatureConfig, records: list[Record] = ()) -> dict:
    """Flow settings, from the flow source when there is one (so sizes and presets agree).

    Another tool's jpgs (a folder without extract-flow's settings, or the frame folders of a
    rawframe dataset when `flows` is None) get `algorithm` "external", the user's bound, and the
    `layout` detected on the first video's folder (or given), which every video must then have.
    """
    from datp.flows.compute import FlowComputer

    rawframes = [r for r in records if r.is_rawframes]
    if cfg.flows is not None or rawframes:
        path = Path(cfg.flows) if cfg.flows is not None else None
        if path is not None and path.is_dir() and (path / "datp_flow_settings.json").is_file():
            from datp.flows.jpg import stored_settings

            settings = stored_settings(path)
        elif path is None or path.is_dir():
            return _external_flow(cfg, path, rawframes or list(records))
        else:
            from datp.flows.store import FlowStore

            with FlowStore(path) as s:
                settings = s.settings
        return {"source": str(path), "algorithm": settings["algorithm"],
                "preset": settings["preset"], "bound": settings["bound"],
                "short_side": settings["short_side"], "size": settings["size"]}
    preset = FlowComputer(algorithm=cfg.flow_algorithm, preset=cfg.flow_preset).preset
    return {"source": "on-the-fly", "algorithm": cfg.flow_algorithm, "preset": preset, "backend": cfg.flow_backend,
            "bound": cfg.flow_bound, "short_side": cfg.flow_short_side, "size": cfg.flow_size}


def _external_flow(cfg: FeatureConfig, path: Path | None, records: list[Record]) -> dict:
    from datp.flows.jpg import detect_layout

    source = str(path) if path is not None else "rawframes"
    folders = [flow_folder(source, r) for r in records]
    first = next((f for f in folders if f.is_dir()), None)
    if first is None:
        raise ValueError(f"no flow folder found for the first video ({folders[0] if folders else path}); "
                         "give --flows the folder holding one flow folder per video id")
    layout, _ = detect_layout(first, prefixes=cfg.flow_prefixes, start=cfg.flow_start)
    return {"source": source, "algorithm": "external", "preset": None, "bound": cfg.flow_bound,
            "short_side": None, "size": None,
            "layout": {"x": layout.x, "y": layout.y, "start": layout.start}}


def flow_folder(source: str, record: Record) -> Path:
    """A video's flow jpg folder: its own frame folder ("rawframes"), else `source/<id>`."""
    from datp.flows.jpg import video_dir

    return record.path if source == "rawframes" else video_dir(Path(source), record)


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
        from datp.io.decode import DecodeError, VideoInfo, read_picked

        if record.is_rawframes:
            return self._load_rawframes(record)
        cfg, use_flow = self.cfg, "flow" in self.cfg.streams
        L = cfg.new_length
        flow_size = ({"size": tuple(self.flow["size"])} if use_flow and self.flow["size"]
                     else {"short_side": (self.flow.get("short_side") if use_flow else None) or None})
        on_the_fly = use_flow and self.flow["source"] == "on-the-fly"
        info = VideoInfo(path=str(record.path))

        def rgb_frames(T: int) -> np.ndarray:
            """The RGB frame of each segment (read at cfg.short_side, the source size by default)."""
            if "rgb" not in cfg.streams or (use_flow and T < 2):
                return np.zeros(0, np.int64)  # too short for flow: fails below with a clear reason
            starts, _, _ = self._starts(T, info.fps)
            return self._rgb_index(starts, T)

        def flow_frames(T: int) -> np.ndarray:
            """Both frames of each flow pair computed on the fly (at the flow's size)."""
            if T < 2:
                return np.zeros(0, np.int64)
            starts, _, space = self._starts(T, info.fps)
            pairs = frame_indices(starts, L, space).ravel()
            return np.concatenate([pairs, pairs + 1])

        picks = {"rgb": (rgb_frames, {"short_side": cfg.short_side or None})}
        if on_the_fly:
            picks["flow"] = (flow_frames, flow_size)
        frames, info = read_picked(record.path, picks, info)  # {"rgb": {index: frame}, ...}
        if info.errors:
            raise DecodeError(f"corrupt stream: {len(info.errors)} packet(s) failed to decode "
                              f"({info.errors[0]})")
        T = info.num_frames
        if use_flow and T < 2:
            raise DecodeError(f"{T} frame decoded; the flow stream needs at least 2")
        return self._items(record, T, info.fps, frames["rgb"], frames.get("flow"), T - 1)

    def _load_rawframes(self, record: Record) -> dict:
        """A rawframe folder: RGB from its `img_*.jpg`, flow from jpgs; fps unknown (0)."""
        from datp.io.rawframes import image_index, read_images

        cfg, use_flow = self.cfg, "flow" in self.cfg.streams
        index, _, T = image_index(record.path, offset=record.offset, total_frames=record.total_frames)
        P = T - 1
        if use_flow:
            P = self._external_pairs(record)[1]
            if "rgb" in cfg.streams:  # the RGB frame in the middle of each stack must exist
                P = min(P, T - 1)
            else:
                T = P + 1
            if P < 1:
                raise ValueError(f"{record.path}: {P} flow pairs; the flow stream needs at least 1")
        starts, _, _ = self._starts(T, 0.0, P)
        rgb = (read_images(record.path, index, self._rgb_index(starts, T))
               if "rgb" in cfg.streams else {})
        return self._items(record, T, 0.0, rgb, None, P)

    def _items(self, record: Record, T: int, fps: float, rgb: dict, flow_frames: dict | None,
               P: int) -> dict:
        """Sampled, preprocessed streams of one video of T frames (P flow pairs)."""
        cfg = self.cfg
        starts, length, space = self._starts(T, fps, P)
        out = {"t": segment_times(starts, length, space), "frame": starts,
               "num_frames": T, "fps": fps}
        if "rgb" in cfg.streams:
            out["rgb"] = rgb_to_tensor(np.stack([rgb[j] for j in self._rgb_index(starts, T)]),
                                       resize=cfg.resize, crop=cfg.input_size,
                                       num_crops=cfg.num_crops)
        if "flow" in cfg.streams:
            pairs = frame_indices(starts, cfg.new_length, P)  # (N, L) pair indices
            if self.flow.get("backend") == "torch" and self.flow["source"] == "on-the-fly":
                from datp.flows.compute import gray_pairs

                # flow: computed by `device_flow` in the main process
                out["flow_pairs"], out["flow_index"], out["flow_gray"] = gray_pairs(flow_frames, pairs)
                return out
            stacks = self._flow_pairs(record, flow_frames, T, pairs)  # (N, L, H, W, 2) uint8
            out["flow"] = flow_to_tensor(stacks, resize=cfg.resize, crop=cfg.input_size,
                                         num_crops=cfg.num_crops)
        return out

    def _external_pairs(self, record: Record):
        """(layout, pairs from the record's offset on) of another tool's flow jpgs."""
        from datp.flows.jpg import FlowLayout, detect_layout

        if "layout" not in self.flow:
            raise ValueError(f"{record.path} is a rawframe folder: its flow must be jpgs (give "
                             "--flows a jpg folder, or keep the flow jpgs in the frame folders)")
        given = self.flow["layout"]
        folder = flow_folder(self.flow["source"], record)
        layout, P = detect_layout(folder, prefixes=(given["x"], given["y"]), start=given["start"])
        return FlowLayout(layout.x, layout.y, layout.start + record.offset), P - record.offset

    def _starts(self, T: int, fps: float, pairs: int | None = None) -> tuple[np.ndarray, int, int]:
        """(segment starts, indices per segment, index space) for a video of T frames (and
        `pairs` flow pairs, T - 1 unless a rawframe folder has fewer)."""
        cfg = self.cfg
        space, length = ((T - 1 if pairs is None else pairs, cfg.new_length) if "flow" in cfg.streams
                         else (T, 1))
        if cfg.stride is not None:
            return stride_indices(space, cfg.stride, length), length, space
        if cfg.stride_seconds is not None:
            return seconds_indices(space, cfg.stride_seconds, fps, length), length, space
        return segment_indices(space, cfg.num_segments, length, "test"), length, space

    def _rgb_index(self, starts: np.ndarray, T: int) -> np.ndarray:
        if "flow" in self.cfg.streams:
            return np.minimum(starts + self.cfg.new_length // 2, T - 1)
        return starts

    def _flow_pairs(self, record: Record, frames: dict | None, T: int, pairs: np.ndarray) -> np.ndarray:
        needed = np.unique(pairs)
        if "layout" in self.flow:  # another tool's jpgs
            from datp.flows.jpg import read_flow_pairs

            layout, P = self._external_pairs(record)
            if needed.max() >= P:
                raise ValueError(f"{flow_folder(self.flow['source'], record)} has {P} flow pairs, the "
                                 f"segments read pair {needed.max() + 1}; its video decodes to {T} frames")
            table = read_flow_pairs(flow_folder(self.flow["source"], record), needed, layout)
        elif self.flow["source"] == "on-the-fly":
            from datp.flows.compute import FlowComputer, gray_pairs, sampled_flow

            computer = FlowComputer(algorithm=self.flow["algorithm"], preset=self.flow["preset"])
            return sampled_flow(computer, [gray_pairs(frames, pairs)], self.flow["bound"])[0]
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


def device_flow(item: dict, computer, cfg: FeatureConfig, bound: float) -> None:
    """Turn an item's decoded gray frames into its flow input, in place: TV-L1 of every pair the
    segments read as one batch on `computer`'s device (a torch `FlowComputer`), quantized at `bound`
    like stored flow (`datp.flows.compute.sampled_flow`), then the flow transform. The same numbers
    as the opencv path's workers would give with the torch backend (tested against a store made by
    `extract-flow --backend torch`)."""
    from datp.flows.compute import sampled_flow

    video = item.pop("flow_pairs"), item.pop("flow_index"), item.pop("flow_gray")
    stacks = sampled_flow(computer, [video], bound)[0]
    item["flow"] = flow_to_tensor(stacks, resize=cfg.resize, crop=cfg.input_size, num_crops=cfg.num_crops)
