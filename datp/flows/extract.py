"""`datp extract-flow`: optical flow for every video of a dataset, resumable and parallel.

Each video is decoded (`datp.io.decode`), resized, turned to grayscale (`datp.flows.compute.to_gray`, the one
conversion every flow path uses, so on-the-fly flow in extract-features matches stored flow),
and every consecutive pair goes through a `FlowComputer`; flow is quantized and streamed to the
parent in chunks, which writes an HDF5 part per video (`datp.flows.store`) or a TSN/denseflow
jpg folder (`datp.flows.jpg`). See docs/architecture.md for the guarantees.
"""

from __future__ import annotations

import functools
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from datp.flows.compute import FlowComputer, set_single_thread, to_gray
from datp.flows.quantize import quantize
from datp.io import datasets
from datp.io.atomic import isolated
from datp.io.datasets import Dataset, Record, check_range, check_shard, shard_records
from datp.io.decode import DecodeError, VideoInfo, iter_frames
from datp.io.h5header import check_output
from datp.io.messages import warn
from datp.io.runner import FailureLog, Summary, run_jobs
from datp.io.settings import check_settings, read_marker, write_marker

CHUNK_PAIRS = 16  # flow pairs per message from a worker: bounds memory for hour-long videos
INDEX_SECONDS = 10.0  # how often the store's index is rewritten during a run


@dataclass(frozen=True)
class FlowConfig:
    """Settings of one extract-flow run; saved in the store (or next to the jpg folders).

    Attributes:
        out: the HDF5 store (format h5) or the output folder (format jpg).
        format: "h5" or "jpg" (TSN/denseflow folders plus annotation lists).
        algorithm, preset: see `datp.flows.compute.FLOW_PRESETS` (preset None = the default).
        backend: "opencv" or "torch" (TV-L1 in PyTorch, `datp.flows.tvl1_torch`; the pairs of
            a chunk run as one batch); default: the faster on CPU (docs/flow-presets.md).
        device: the torch backend's device ("auto", "cpu", "cuda[:K]"); opencv: "auto" or "cpu".
        short_side: resize so the short side has this many pixels (0 keeps the source size).
        size: (W, H) fixed size instead, e.g. (340, 256) as TSN.
        bound: quantization bound in pixels.
        rgb: with jpg, also write the resized RGB frames `img_00001.jpg`.
        workers: worker processes.
        shard: (i, n): this run does shard i of n.
        allow_decode_errors: keep videos whose stream has corrupt packets (frames around them
            are missing, so flow there is between non-neighbouring frames); default: fail them.
    """

    out: str
    format: str = "h5"
    algorithm: str = "tvl1"
    preset: str | None = None
    backend: str = "opencv"
    device: str = "auto"
    short_side: int = 256
    size: tuple[int, int] | None = None
    bound: float = 20.0
    rgb: bool = False
    workers: int = 1
    shard: tuple[int, int] = (0, 1)
    allow_decode_errors: bool = False

    def __post_init__(self):
        if self.format not in ("h5", "jpg"):
            raise ValueError(f"format {self.format!r} must be h5 or jpg")
        if self.workers < 1:
            raise ValueError(f"workers {self.workers} must be >= 1")
        check_range("short_side", self.short_side, 0, "0 keeps the source size")
        if self.size is not None and (len(self.size) != 2 or min(self.size) < 1):
            raise ValueError(f"size {self.size} must be W x H, both >= 1")
        if not self.bound > 0:
            raise ValueError(f"bound {self.bound} must be > 0 pixels")
        check_shard(self.shard)
        if self.rgb and self.format != "jpg":
            raise ValueError("--rgb writes img_00001.jpg frames and needs --format jpg")
        FlowComputer(algorithm=self.algorithm, preset=self.preset, backend=self.backend,
                     device=self.device)  # validates the names now

    def resize_kwargs(self) -> dict:
        if self.size is not None:
            return {"size": tuple(self.size)}
        return {"short_side": self.short_side or None}

    def settings(self) -> dict:
        """What the output records: the config plus the algorithm's full parameters."""
        flow = FlowComputer(algorithm=self.algorithm, preset=self.preset)
        return {**asdict(self), "preset": flow.preset, "flow_params": flow.params}


def flow_job(record: Record, emit, *, cfg: FlowConfig) -> dict:
    """Worker side: decode `record`, compute and emit quantized flow (and RGB) chunks.

    Returns:
        The video's metadata for the store (num_frames, fps, sizes, timestamps...).
    """
    computer = FlowComputer(algorithm=cfg.algorithm, preset=cfg.preset, backend=cfg.backend,
                            device=cfg.device)
    info = VideoInfo(path=str(record.path))
    prev = None
    pairs, images = [], []
    for rgb in iter_frames(record.path, info, **cfg.resize_kwargs()):
        gray = to_gray(rgb)
        if cfg.rgb:
            images.append(rgb)
        if prev is not None:
            pairs.append((prev, gray))
        if len(pairs) == CHUNK_PAIRS:  # one batch for the torch backend
            emit(_chunk([quantize(f, cfg.bound) for f in computer.pairs(pairs)], images, cfg.rgb))
            pairs, images = [], []
        prev = gray
    if info.errors and not cfg.allow_decode_errors:
        raise DecodeError(f"corrupt stream: {len(info.errors)} packet(s) failed to decode "
                          f"({info.errors[0]}); pass --allow-decode-errors to keep such videos")
    if info.num_frames < 2:
        raise DecodeError(f"{info.num_frames} frame decoded; optical flow needs at least 2")
    if pairs or images:
        emit(_chunk([quantize(f, cfg.bound) for f in computer.pairs(pairs)], images, cfg.rgb))
    sy = info.height / (info.source_width if info.rotation in (90, 270) else info.source_height)
    sx = info.width / (info.source_height if info.rotation in (90, 270) else info.source_width)
    return {"num_frames": info.num_frames, "fps": info.fps, "height": info.height,
            "width": info.width, "source_height": info.source_height,
            "source_width": info.source_width, "rotation": info.rotation, "scale": (sy, sx),
            "bound": cfg.bound, "algorithm": cfg.algorithm, "preset": computer.preset,
            "backend": cfg.backend, "device": str(computer.device),
            "codec": info.codec, "timestamps": info.timestamps,
            "decode_errors": len(info.errors)}


def _chunk(flows: list, images: list, with_rgb: bool):
    flow = np.stack(flows) if flows else None
    return (flow, np.stack(images)) if with_rgb else flow


RUN_ONLY = ("workers", "shard", "out")  # settings that may change between runs of one store


def shard_out(out: str, shard: tuple[int, int], fmt: str) -> Path:
    """`flows.h5` with shard (2, 4) -> `flows.shard2of4.h5` (jpg folders are shared by shards).

    Kept for callers of the old name; the rule is `datp.io.datasets.shard_out`.
    """
    return datasets.shard_out(out, shard, shared=fmt == "jpg")


def extract_flow(dataset: Dataset, cfg: FlowConfig, *, progress: bool = True,
                 missing: list[Record] = ()) -> Summary:
    """Compute flow for every video of `dataset` (this shard's part), skipping finished ones.

    One process writes an output at a time (`datp.io.atomic.output_lock`); an existing output
    of another kind, or a file datp did not write, is refused. The store (or the jpg lists) is
    the union of every run into it.

    Args:
        dataset: the videos.
        cfg: the settings.
        progress: show a progress bar with videos/s and frame pairs/s.
        missing: videos whose file is missing: recorded as failures, not attempted.

    Returns:
        The run's Summary (failures are also in `<out>.failures.csv`).
    """
    from datp.flows import jpg, store
    from datp.io.atomic import lock_path, output_lock

    out = datasets.shard_out(cfg.out, cfg.shard, shared=cfg.format == "jpg")
    lock = lock_path(out)
    if cfg.format == "jpg" and cfg.shard[1] > 1:  # shards share the folder, each has a lock
        lock = out.with_name(f"{out.name}.shard{cfg.shard[0]}of{cfg.shard[1]}.lock")
    if cfg.format == "h5":
        check_output(out, kind=store.KIND, noun="flow store")
    else:
        jpg.check_output(out)
    with output_lock(out, lock):
        return _extract_flow(dataset, cfg, out, progress, missing)


def _extract_flow(dataset, cfg, out, progress, missing) -> Summary:
    from tqdm import tqdm

    from datp.flows import jpg, store
    from datp.io.atomic import parts_dir

    records = shard_records(dataset.records, *cfg.shard)
    settings = cfg.settings()
    same = {"what": "flow", "ignore": RUN_ONLY}
    if cfg.format == "h5":
        # settings are recorded when the first video is done, so a run that failed every video
        # (a bad option) does not bind the corrected rerun
        marker = parts_dir(out) / "settings.json"
        check_settings(out, read_marker(marker) or (store.stored_settings(out) if out.is_file()
                                                    else None), settings, **same)
        finished = store.done_ids(out, report=warn)
        store.open_for_update(out)
        store.write_store(out, records, settings, final=False)
        sink = store.FlowPartWriter(out, on_first_done=lambda: write_marker(marker, settings))
    else:
        marker = out / jpg.SETTINGS_NAME
        check_settings(out, read_marker(marker), settings, **same)
        finished = jpg.done_ids(out, records, with_rgb=cfg.rgb, report=warn)
        sink = jpg.JpgWriter(out, with_rgb=cfg.rgb,
                             on_first_done=lambda: write_marker(marker, settings))
    absent = {r.id for r in missing}
    todo = [r for r in records if r.id not in finished and r.id not in absent]
    failure_log = FailureLog(Path(f"{out}.failures.csv"), {r.id for r in records})
    for record in missing:
        if record in records:
            failure_log.add(record, "video file not found")
    bar = tqdm(total=len(todo), unit="video", desc="extract-flow", disable=not progress,
               dynamic_ncols=True)
    started = last_index = time.perf_counter()

    def on_progress(n: int, pairs: int) -> None:
        nonlocal last_index
        bar.update(n - bar.n)
        bar.set_postfix_str(f"{pairs / max(time.perf_counter() - started, 1e-9):.1f} pairs/s")
        if cfg.format == "h5" and time.perf_counter() - last_index > INDEX_SECONDS:
            store.write_store(out, records, settings, final=False)  # the store opens after a kill
            last_index = time.perf_counter()

    job = functools.partial(flow_job, cfg=cfg)
    try:
        summary = run_jobs(todo, job, sink, workers=cfg.workers, init=set_single_thread,
                           progress=on_progress, failure_log=failure_log,
                           units_of=lambda meta: meta.get("num_frames", 1) - 1)
    finally:
        bar.close()
        sink.close()
        failure_log.close()
    summary.skipped = len(records) - len(todo) - len(absent & {r.id for r in records})
    summary.failed[:0] = [(r.id, str(r.path), "video file not found")
                          for r in missing if r in records]
    if cfg.format == "h5" and summary.interrupted:
        store.write_store(out, records, settings, final=False)
    elif cfg.format == "h5":  # in a child process: HDF5 may crash if the disk fills meanwhile
        isolated(store.write_store, out, records, settings, final=True, out=out)
    else:
        jpg.write_lists(out, records)
    return summary
