"""Shared data for the finetune tests (a helper module, not a conftest: a second conftest.py would
break `from conftest import ...` in other folders; shared video helpers are in tests/datp_testing.py).

A tiny two-class dataset (texture moving right vs left), its flow store and jpg flow folders are
built once per test process in a temporary folder removed at exit.
"""

from __future__ import annotations

import atexit
import csv
import functools
import shutil
import tempfile
from dataclasses import replace
from pathlib import Path

from datp_testing import moving_texture, write_video
from datp.finetune import FinetuneConfig

CLASSES = ("left", "right")


@functools.lru_cache(maxsize=None)
def _root() -> Path:
    root = Path(tempfile.mkdtemp(prefix="datp_finetune_tests_"))
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    return root


@functools.lru_cache(maxsize=None)
def manifest() -> Path:
    """manifest.csv of 8 clips (10-12 frames, 48x64): 3 train and 1 test video per class."""
    root = _root() / "videos"
    rows = []
    for i in range(8):
        label = i % 2
        shift = (-2, 0) if CLASSES[label] == "left" else (2, 0)
        rel = f"{CLASSES[label]}/clip{i}.mkv"
        write_video(root / rel, moving_texture(10 + i % 3, shift=shift, seed=i))
        rows.append({"id": f"{CLASSES[label]}/clip{i}", "path": rel, "label": label,
                     "split": "test" if i >= 6 else "train"})
    with (root / "manifest.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["id", "path", "label", "split"])
        writer.writeheader()
        writer.writerows(rows)
    (root / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    return root / "manifest.csv"


@functools.lru_cache(maxsize=None)
def flows(fmt: str) -> Path:
    """Farneback flow of the manifest's videos: a store (fmt "h5") or jpg folders ("jpg")."""
    from datp.flows.extract import FlowConfig, extract_flow
    from datp.io.datasets import load_dataset

    out = _root() / ("flows.h5" if fmt == "h5" else "flows")
    cfg = FlowConfig(out=str(out), format=fmt, algorithm="farneback", short_side=0, workers=1)
    summary = extract_flow(load_dataset(manifest()), cfg, progress=False)
    assert not summary.failed, summary.failed
    return out


def tiny(out: Path, **changes) -> FinetuneConfig:
    """resnet18 at 56 px, 3 segments, 2 videos per batch, no workers, 1 epoch, on the CPU.

    val_fraction 0.33 holds out ceil(0.33 * 6) = 2 of the 6 train videos (one per class), so 4
    are trained on: an even count, which the torchrun tests' 2 ranks x 1 video need."""
    cfg = FinetuneConfig(sources=(str(manifest()),), out=str(out), backbone="resnet18", num_segments=3,
                         short_side=64, resize=64, input_size=56, epochs=1, batch_size=2, lr=0.01,
                         lr_steps=(1,), val_fraction=0.33, dropout=0.5, workers=0, device="cpu")
    return replace(cfg, **changes)
