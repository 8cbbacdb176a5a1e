"""The run folder of stage two: the only module that reads or writes its files.

RUN_DIR, written by `datp train-head` (every file atomically):
- config.json: {"config": asdict(HeadConfig), "resolved": chosen score source, head options, streams,
  num_classes, num_segments, data mode, device; "store": the store's path and attrs summary
  (backbone, weights, settings...); "split": sizes; "transfer": null, or the trimmed store's path,
  summary and videos, mmd_weight, bandwidth rule, row cap and fc1's name; "versions": datp, torch,
  python}.
- checkpoint.pt: {"datp_head_checkpoint": 1, "head", "head_options" (all constructor kwargs),
  "state_dict", "class_names", "stream", "config", "input_norm" ({stream: {"mean", "std"}} (Cf,)
  tensors of `ChannelNorm`, or None)}: plain types, read with `torch.load(weights_only=True)`.
- metrics.json: test top1, top5, mean_class_accuracy, per_class_accuracy {name: acc}, videos;
  best_epoch (1-based; 0 when nothing was trained), best_val, history (per epoch: train_loss,
  with transfer mmd (the mean unweighted transfer term), val_loss, val_top1), timing (seconds and
  videos/s per epoch, load time).
- predictions.h5 and weights.csv (the test split; `write_predictions`).
`datp evaluate --out DIR` writes DIR/evaluation.json and its PNGs.

A run folder holds one run. `run_folder(out, kind=...)` writes a new run beside the old one and puts
it in place whole when it is done (`datp.io.atomic.atomic_path`): nothing of an old run is left
beside a new one, and an interrupted run leaves the old run whole. Each folder carries a marker
`.datp-run` naming the command that wrote it; a folder holding anything else (files datp did not
write, or another command's run) is refused before any work starts.
"""

from __future__ import annotations

import contextlib

import csv
import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import torch
from torch import nn

from datp.io.atomic import atomic_path, output_lock
from datp.io.device import resolve_device
from datp.pool.heads import build_head
from datp.pool.standardize import ChannelNorm

CHECKPOINT_VERSION = 1
RUN_MARKER = ".datp-run"  # the command that wrote the folder, one line


def run_kind(folder: str | Path) -> str | None:
    """The datp command that wrote `folder` ("train-head", "evaluate", ...), or None.

    Folders written before the marker existed are recognised by their files (train-head:
    config.json + checkpoint.pt; evaluate: evaluation.json).
    """
    folder = Path(folder)
    marker = folder / RUN_MARKER
    if marker.is_file():
        return marker.read_text().strip() or None
    if (folder / "config.json").is_file() and (folder / "checkpoint.pt").is_file():
        return "train-head"
    if (folder / "evaluation.json").is_file():
        return "evaluate"
    return None


@contextlib.contextmanager
def run_folder(out: str | Path, *, kind: str) -> Iterator[Path]:
    """Yield a fresh folder for a `kind` run; when the block succeeds it replaces `out` whole.

    Raises:
        ValueError: `out` is a file, or a non-empty folder that is not a `kind` run folder (checked
            before the block runs, so no work is lost to it).
        OutputLocked: another live process is writing `out` (`<out>.lock`, held for the block).
    """
    out = Path(out)
    with output_lock(out):  # one writer per run folder, for the whole run: a second exits 2 naming the first
        yield from _fresh_folder(out, kind)


def _fresh_folder(out: Path, kind: str) -> Iterator[Path]:
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; give a folder for the {kind} run")
    if out.is_dir() and any(out.iterdir()):
        found = run_kind(out)
        if found != kind:
            what = f"a datp {found} run" if found else "files datp did not write"
            raise ValueError(f"--out {out} holds {what}; give another --out (datp {kind} replaces only a "
                             f"folder of an earlier {kind} run)")
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        tmp.mkdir()
        (tmp / RUN_MARKER).write_text(kind + "\n")
        yield tmp


def rebuild_head(name: str, options: dict) -> nn.Module:
    """`build_head(name, **options)` from options as JSON holds them (lists where heads take tuples)."""
    return build_head(name, **recorded_options(name, options))


def recorded_options(name: str, options: dict) -> dict:
    """The constructor options of a recorded head, with the value that each option a checkpoint written
    before it existed lacks had then (DATP: `min_sigma` 0.01, `locate` "fc", `aux_center` False,
    `aux_warmup` 0); lists where heads take tuples."""
    options = dict(options)
    if name == "datp" and "min_sigma" not in options:
        options["min_sigma"] = 0.01  # head checkpoints written before min_sigma was recorded used 0.01
    if name == "datp" and "locate" not in options:
        options["locate"] = "fc"  # and before locate was: mu from the fc layers
    if name == "datp" and "aux_center" not in options:
        options["aux_center"] = False  # and before aux_center was: the auxiliary net's input as is
    if name == "datp" and "aux_warmup" not in options:
        options["aux_warmup"] = 0.0  # and before aux_warmup was: no warm-up
    if "streams" in options:
        options["streams"] = tuple(options["streams"])
    return options


def write_json(path: str | Path, obj) -> None:
    """Write `obj` as indented JSON to `path` atomically (numpy scalars become plain numbers)."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, default=plain))


def plain(value):
    """`json.dumps`' `default`: numpy scalars as Python numbers; anything else is an error."""
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


@dataclass
class Run:
    """A trained head rebuilt from RUN_DIR/checkpoint.pt.

    Attributes:
        head: the module, in eval mode, on the requested device.
        name: head name; stream: "rgb" | "flow" | "both"; streams: the streams it reads.
        class_names, options (constructor kwargs), config (config.json's content), path (RUN_DIR),
        device (where the head is), norm ({stream: ChannelNorm} the head's inputs pass through, or None).
    """

    head: nn.Module
    name: str
    stream: str
    streams: tuple[str, ...]
    class_names: list[str]
    options: dict
    config: dict
    path: Path
    device: torch.device
    norm: dict | None = None

    @property
    def score_source(self) -> str | None:
        return self.options.get("score_source")


def write_checkpoint(run_dir: str | Path, *, head: nn.Module, name: str, options: dict, class_names, stream: str,
                     config: dict, norm: dict | None) -> Path:
    """Write RUN_DIR/checkpoint.pt (see the module docstring) atomically; returns its path."""
    checkpoint = {"datp_head_checkpoint": CHECKPOINT_VERSION, "head": name, "head_options": options,
                  "state_dict": {k: v.detach().cpu() for k, v in head.state_dict().items()},
                  "class_names": list(class_names), "stream": stream, "config": config,
                  "input_norm": None if norm is None else {s: n.state() for s, n in norm.items()}}
    path = Path(run_dir) / "checkpoint.pt"
    with atomic_path(path) as tmp:
        torch.save(checkpoint, tmp)
    return path


def load_run(run_dir: str | Path, *, device: str | torch.device = "cpu") -> Run:
    """Rebuild the head of a `train_head` run from its checkpoint (`torch.load(weights_only=True)`)."""
    path = Path(run_dir) / "checkpoint.pt"
    if not path.is_file():
        raise ValueError(f"{run_dir} has no checkpoint.pt; pass a RUN_DIR written by datp train-head")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # an unsafe or damaged file: say so in one line
        lines = str(err).splitlines() or [type(err).__name__]
        reason = next((line.strip() for line in lines if "Unsupported global" in line), lines[0].strip())
        raise ValueError(f"{path} cannot be loaded safely (weights_only=True): {reason}; train the run again "
                         "with this datp") from None
    if not isinstance(ckpt, dict) or ckpt.get("datp_head_checkpoint") != CHECKPOINT_VERSION:
        raise ValueError(f"{path} is not a datp head checkpoint (version {CHECKPOINT_VERSION})")
    head = rebuild_head(ckpt["head"], ckpt["head_options"])
    head.load_state_dict(ckpt["state_dict"])
    device = resolve_device(device) if isinstance(device, str) else device
    stream = ckpt["stream"]
    norm = ckpt.get("input_norm")
    norm = None if norm is None else {s: ChannelNorm.from_state(v) for s, v in norm.items()}
    return Run(head.to(device).eval(), ckpt["head"], stream, ("rgb", "flow") if stream == "both" else (stream,),
               list(ckpt["class_names"]), dict(ckpt["head_options"]), ckpt["config"], Path(run_dir), device, norm)


_STR = h5py.string_dtype("utf-8")


def write_predictions(run_dir: str | Path, p: Mapping[str, np.ndarray], *, ids: Sequence[str],
                      class_names: Sequence[str], num_frames, fps, attrs: Mapping) -> None:
    """Write RUN_DIR/predictions.h5 and RUN_DIR/weights.csv (atomically).

    predictions.h5: `ids` (V,) utf-8, `labels` (V,), `logits` (V, C), `weights` (V, N), `mask` (V, N),
    `t` (V, N) segment centre times in [0, 1], `frame` (V, N) first frames, `num_frames` (V,),
    `fps` (V,), and `segment_scores` (V, N, C) when the head has per-segment class scores; attrs
    `class_names` (JSON) and `attrs` (head, stream, split).
    weights.csv: `video,segment,t,frame,weight`, one row per real segment.

    Args:
        run_dir: the run folder.
        p: `datp.pool.predict.predict`'s arrays.
        ids, class_names, num_frames, fps: per video / per class, in the order of `p`.
        attrs: extra attributes to record.
    """
    run_dir = Path(run_dir)
    with atomic_path(run_dir / "predictions.h5") as tmp, h5py.File(tmp, "w") as f:
        f.attrs["class_names"] = json.dumps(list(class_names))
        for key, value in attrs.items():
            f.attrs[key] = value
        f["ids"] = np.array(list(ids), dtype=object).astype(_STR)
        f["labels"] = np.asarray(p["labels"], np.int64)
        for key, dtype in (("logits", np.float32), ("weights", np.float32), ("mask", bool), ("t", np.float32),
                           ("frame", np.int64), ("segment_scores", np.float32)):
            if key in p:
                f[key] = np.asarray(p[key], dtype)
        f["num_frames"] = np.asarray(num_frames, np.int64)
        f["fps"] = np.asarray(fps, np.float32)
    with atomic_path(run_dir / "weights.csv") as tmp, tmp.open("w", newline="") as out:
        writer = csv.writer(out)
        writer.writerow(["video", "segment", "t", "frame", "weight"])
        for v, video in enumerate(ids):
            for i in np.flatnonzero(p["mask"][v]):
                writer.writerow([video, int(i), repr(float(p["t"][v, i])), int(p["frame"][v, i]),
                                 repr(float(p["weights"][v, i]))])


def read_predictions(run_dir: str | Path) -> dict:
    """RUN_DIR/predictions.h5 as {"ids": list, arrays..., "class_names": list, "attrs": dict, "run": path}."""
    path = Path(run_dir) / "predictions.h5"
    if not path.is_file():
        raise ValueError(f"{run_dir} has no predictions.h5; it is written by datp train-head when the store has "
                         "a test split")
    with h5py.File(path, "r") as f:
        out = {k: f[k][:] for k in f if k != "ids"}
        out["ids"] = [v.decode() if isinstance(v, bytes) else str(v) for v in f["ids"][:]]
        out["class_names"] = json.loads(f.attrs["class_names"])
        out["attrs"] = {k: f.attrs[k] for k in f.attrs if k != "class_names"}
    out["run"] = str(run_dir)
    return out
