"""Writing the synthetic benchmark: videos, manifest, lists, events, ground truth; see `datp.synth`."""

from __future__ import annotations

import csv
import json
from dataclasses import asdict
from pathlib import Path

import numpy as np

import datp
from datp.io.atomic import atomic_path
from datp.synth.config import ACTIVITYNET_SUBSETS, CLASSES, SPLITS, SynthConfig
from datp.synth.render import render_video


# ------------------------------------------------------------------------------------- writing


def generate(cfg: SynthConfig, out_dir: Path, *, progress: bool = True) -> Path:
    """Write the benchmark into `out_dir` and return `out_dir`.

    Layout (paths in the lists are relative to `out_dir`; a video's id is its path without suffix,
    e.g. `videos/disc_right/train_0003`, the id `datp.io.datasets` gives it from either list):
        videos/<class name>/<split>_<index>.mkv   FFV1 (lossless, bgr0) in Matroska, cfg.fps
        manifest.csv        id,path,label,split
        classes.txt         class names, one a line, in label order
        train.txt, test.txt mmaction2 video lists: `<path> <label>`
        events.json         {id: render_video's info} (event and confuser frames and seconds)
        ground_truth.json   untrimmed only: ActivityNet-style {"database": {id: {"subset",
                            "duration", "annotations": [{"segment": [start_s, end_s], "label"}]}}},
                            subset "training" for train videos and "validation" for test videos
        synth_config.json   asdict(cfg) and the datp version; written last, it marks a finished set

    Rerunning with the same config returns at once when the set is complete (synth_config.json
    matches and every listed video exists); otherwise it is written again over what is there.

    Raises:
        ValueError: `out_dir` holds a finished set made with a different config or datp version.
    """
    out_dir = Path(out_dir)
    record = _config_record(cfg)
    marker = out_dir / "synth_config.json"
    if marker.is_file():
        found = json.loads(marker.read_text())
        if found != record:
            changed = sorted(k for k in record.keys() | found.keys() if record.get(k) != found.get(k))
            raise ValueError(f"{out_dir} holds a synthetic set made with a different config "
                             f"(differs in {', '.join(changed)}); choose another folder or delete it")
        if _is_complete(out_dir, cfg):
            return out_dir
        marker.unlink()  # incomplete: regenerate

    jobs = [(split, label, index) for split in SPLITS for label in range(cfg.num_classes)
            for index in range(cfg.videos_per_class_train if split == "train"
                               else cfg.videos_per_class_test)]
    rows, infos = [], {}
    from tqdm import tqdm

    for split, label, index in tqdm(jobs, desc="synth", unit="video", disable=not progress):
        frames, info = render_video(cfg, label=label, split=split, index=index)
        path = f"videos/{CLASSES[label][0]}/{split}_{index:04d}.mkv"
        video_id = path[: -len(".mkv")]
        (out_dir / path).parent.mkdir(parents=True, exist_ok=True)
        write_video(out_dir / path, frames, fps=cfg.fps)
        rows.append((video_id, path, label, split))
        infos[video_id] = info

    _write_text(out_dir / "classes.txt", "".join(f"{name}\n" for name in cfg.class_names))
    for split in SPLITS:
        _write_text(out_dir / f"{split}.txt",
                    "".join(f"{path} {label}\n" for _, path, label, s in rows if s == split))
    lines = ["id,path,label,split\n"]
    lines += [",".join(map(str, row)) + "\n" for row in rows]  # ids and paths hold no commas
    _write_text(out_dir / "manifest.csv", "".join(lines))
    _write_text(out_dir / "events.json", json.dumps(infos, indent=1) + "\n")
    if cfg.untrimmed:
        database = {
            video_id: {
                "subset": ACTIVITYNET_SUBSETS[info["split"]],
                "duration": info["duration_s"],
                "annotations": [{"segment": [e["start_s"], e["end_s"]], "label": info["class_name"]}
                                for e in info["events"]],
            }
            for video_id, info in infos.items()
        }
        _write_text(out_dir / "ground_truth.json", json.dumps({"database": database}, indent=1) + "\n")
    _write_text(marker, json.dumps(record, indent=1) + "\n")
    return out_dir


def write_video(path: Path, frames: np.ndarray, *, fps: int) -> None:
    """Write (T, H, W, 3) uint8 RGB frames losslessly: FFV1 (bgr0) in Matroska.

    Every frame decodes back bit-exactly with PyAV and with OpenCV, and `bitexact` keeps FFmpeg from
    writing a random segment id or its version into the file, so equal frames give equal bytes.
    """
    import av

    T, H, W, _ = frames.shape
    with atomic_path(path) as tmp, av.open(str(tmp), "w", format="matroska",
                                           options={"fflags": "+bitexact"}) as container:
        stream = container.add_stream("ffv1", rate=fps)
        stream.width, stream.height, stream.pix_fmt = W, H, "bgr0"
        stream.codec_context.flags |= av.codec.context.Flags.bitexact
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())


def _config_record(cfg: SynthConfig) -> dict:
    """asdict(cfg) as it reads back from JSON (tuples become lists), plus the datp version."""
    return json.loads(json.dumps({**asdict(cfg), "datp_version": datp.__version__}))


def _is_complete(out_dir: Path, cfg: SynthConfig) -> bool:
    names = ["manifest.csv", "classes.txt", "train.txt", "test.txt", "events.json"]
    names += ["ground_truth.json"] if cfg.untrimmed else []
    if not all((out_dir / name).is_file() for name in names):
        return False
    with (out_dir / "manifest.csv").open(newline="") as f:
        return all((out_dir / row["path"]).is_file() for row in csv.DictReader(f))


def _write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8", newline="\n")
