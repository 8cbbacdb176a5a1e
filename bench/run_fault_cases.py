"""Fault cases for the commands that write run folders (train-head, finetune), beside the long
jobs' cases of fault_cases.py: kill -9 at seeded moments then the same command again (with
--resume for finetune once a resume point exists) -> the folder is absent or one whole run after
every kill, and the rerun equals an uninterrupted run; two runs on one --out -> the second exits 2
naming the first, the first ends whole. Each case returns `fault_cases.Outcome`."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from fault_cases import Outcome, _env, _one_line

from datp.io.clips import moving_texture, write_video

ARGS = {
    "train-head": ["--stream", "flow", "--head", "self-attn", "--attn-hidden", "8", "--epochs", "6", "--batch-size", "4",
                   "--lr", "0.01", "--quiet"],
    "finetune": ["--backbone", "resnet18", "--segments", "3", "--short-side", "64", "--resize", "64",
                 "--input-size", "56", "--epochs", "3", "--batch-size", "2", "--lr", "0.01", "--lr-steps", "1",
                 "--val-fraction", "0.33", "--workers", "0", "--device", "cpu", "--quiet"],
}


def make_inputs(folder: Path) -> dict[str, Path]:
    """A key-moment feature store (train-head) and a manifest of 8 moving-texture clips (finetune)."""
    from datp.synth.keymoments import KeyMomentConfig, write_store

    folder = Path(folder)
    store = folder / "keymoments.h5"
    write_store(KeyMomentConfig(num_classes=3, num_segments=5, channels=8, map_size=2, n_train=48, n_test=12),
                store)
    rows = []
    for i in range(8):
        label = i % 2
        path = write_video(folder / "clips" / f"c{label}" / f"v{i}.mkv",
                           moving_texture(10 + i % 3, shift=((-2, 0), (2, 0))[label], seed=i))
        rows.append({"id": f"v{i}", "path": str(path), "label": label, "split": "test" if i >= 6 else "train"})
    manifest = folder / "manifest.csv"
    with manifest.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["id", "path", "label", "split"])
        writer.writeheader()
        writer.writerows(rows)
    (folder / "classes.txt").write_text("left\nright\n")
    return {"train-head": store, "finetune": manifest}


def _start(command: str, source: Path, out: Path, *extra: str) -> subprocess.Popen:
    args = [sys.executable, "-m", "datp", command, str(source), "--out", str(out), *ARGS[command], *extra]
    return subprocess.Popen(args, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def _resume(command: str, out: Path) -> list[str]:
    """What a user reruns after a crash: finetune continues from its resume point when there is one."""
    return ["--resume"] if command == "finetune" and (out / "resume.pt").exists() else []


def _finish(command: str, source: Path, out: Path) -> tuple[int, str]:
    proc = _start(command, source, out, *_resume(command, out))
    _, err = proc.communicate(timeout=900)
    return proc.returncode, err


def _result(command: str, out: Path) -> dict:
    """What must equal between runs: the metrics less timings (and for train-head the weights' digest)."""
    metrics = json.loads((out / "metrics.json").read_text())
    drop = {"timing", "seconds", "images_per_s"}

    def strip(value):
        if isinstance(value, dict):
            return {k: strip(v) for k, v in value.items() if k not in drop}
        if isinstance(value, list):
            return [strip(v) for v in value]
        return value

    found = strip(metrics)
    if command == "train-head":
        import hashlib

        import torch

        state = torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=True)["state_dict"]
        found["weights"] = hashlib.sha256(b"".join(v.numpy().tobytes() for v in state.values())).hexdigest()
    return found


def kill9(command: str, inputs: dict, folder: Path, *, kills: int = 5, seed: int = 0) -> Outcome:
    source, folder = inputs[command], Path(folder)
    reference = folder / f"{command}-reference"
    started = time.perf_counter()
    code, err = _finish(command, source, reference)
    if code != 0:
        return Outcome(False, f"reference run exit {code}: {err.strip()[-200:]}")
    duration, want = time.perf_counter() - started, _result(command, reference)
    out, mid = folder / f"{command}-killed", 0
    for moment in sorted(np.random.default_rng(seed).uniform(0.2, 1.0, size=kills) * duration):
        proc = _start(command, source, out, *_resume(command, out))
        time.sleep(moment)
        if proc.poll() is not None:  # it ended before this moment: a whole run, then start afresh
            if proc.returncode != 0 or _result(command, out) != want:
                return Outcome(False, f"a run that ended before its kill (exit {proc.returncode}) differs")
            shutil.rmtree(out)
            continue
        mid += 1
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
        if command == "train-head" and out.exists() and _result(command, out) != want:
            return Outcome(False, f"after a kill at {moment:.1f} s the folder is not one whole run")
    code, err = _finish(command, source, out)
    if code != 0:
        return Outcome(False, f"rerun exit {code}: {err.strip()[-200:]}")
    if _result(command, out) != want:
        return Outcome(False, "the rerun differs from the uninterrupted run")
    return Outcome(True, f"equal to the uninterrupted run; {mid} of {kills} kills mid-run")


def concurrent(command: str, inputs: dict, folder: Path) -> Outcome:
    source, out = inputs[command], Path(folder) / f"{command}-shared"
    first = _start(command, source, out, "--epochs", "12")  # long enough for the second to start meanwhile
    lock = out.with_name(out.name + ".lock")
    deadline = time.time() + 120
    while time.time() < deadline and first.poll() is None and not lock.exists():
        time.sleep(0.05)
    second = _start(command, source, out)
    _, err2 = second.communicate(timeout=600)
    _, err1 = first.communicate(timeout=900)
    if first.returncode != 0:
        return Outcome(False, f"the first run exit {first.returncode}: {err1.strip()[-200:]}")
    if second.returncode == 0:
        return Outcome(False, "both ran (the first had ended before the second started?)")
    if second.returncode != 2 or not _one_line(err2) or f"(pid {first.pid})" not in err2:
        return Outcome(False, f"second exit {second.returncode}: {err2.strip()[-200:]}")
    return Outcome(True, f"second refused ({err2.strip()[12:70]}...), the first whole")
