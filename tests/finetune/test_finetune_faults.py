"""kill -9 of `datp finetune` at seeded random moments, then the same command again (with --resume
once a resume point exists): the run ends exactly as an uninterrupted one."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from ft_fixtures import manifest


def _args(out) -> list[str]:
    return [str(manifest()), "--out", str(out), "--backbone", "resnet18", "--segments", "3", "--short-side", "64",
            "--resize", "64", "--input-size", "56", "--epochs", "3", "--batch-size", "2", "--lr", "0.01",
            "--lr-steps", "1", "--val-fraction", "0.33", "--dropout", "0.5", "--workers", "0", "--device", "cpu",
            "--quiet"]


def _finetune(out, *, resume: bool = False) -> subprocess.Popen:
    args = [sys.executable, "-m", "datp", "finetune", *_args(out)] + (["--resume"] if resume else [])
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _finish(out) -> dict:
    """Run the command to its end the way a user would after a crash: --resume when there is a point."""
    proc = _finetune(out, resume=(out / "resume.pt").exists())
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err.decode()
    return json.loads((out / "metrics.json").read_text())


@pytest.mark.slow
def test_kill_9_at_random_moments_then_rerun_equals_an_uninterrupted_run(tmp_path):
    started = time.perf_counter()
    reference = _finish(tmp_path / "reference")
    duration = time.perf_counter() - started
    out = tmp_path / "killed"
    for moment in sorted(np.random.default_rng(0).uniform(0.3, 1.0, size=5) * duration):
        proc = _finetune(out, resume=(out / "resume.pt").exists())
        time.sleep(moment)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
        if proc.returncode == 0:  # it finished before the kill: start again from scratch
            break
    result = _finish(out)
    drop = ("seconds", "images_per_s")
    strip = lambda h: [{k: ({kk: vv for kk, vv in v.items() if kk not in drop} if isinstance(v, dict) else v)
                        for k, v in e.items() if k not in drop} for e in h]
    assert strip(result["history"]) == strip(reference["history"])
    assert result["test"] == reference["test"] and result["best"] == reference["best"]


def test_a_second_finetune_on_one_folder_is_refused_and_the_first_ends_whole(tmp_path):
    out = tmp_path / "run"
    first = _finetune(out)
    lock = tmp_path / "run.lock"
    deadline = time.time() + 120
    while time.time() < deadline and first.poll() is None and not lock.exists():
        time.sleep(0.05)
    assert lock.exists(), "the first run took no lock"
    from datp_testing import run_cli  # in-process: it reaches the lock while the first still runs

    code, output = run_cli("finetune", *_args(out))
    assert code == 2 and f"another datp process (pid {first.pid}) is writing {out}" in output, output
    _, err = first.communicate(timeout=600)
    assert first.returncode == 0, err.decode()
    assert json.loads((out / "metrics.json").read_text())["test"] is not None and not lock.exists()
