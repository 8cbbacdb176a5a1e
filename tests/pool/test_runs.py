"""Run folders hold one run: reruns replace them whole, interruptions and kills leave the old run
whole, and nothing datp did not write is overwritten (train-head, evaluate, localize)."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from datp.extract.store import VideoFeatures, VideoRow, base_attrs, write_features
from datp.pool.config import HeadConfig
from datp.pool.runs import RUN_MARKER, load_run, run_kind
from datp.pool.train import train_head
from datp_testing import run_cli

pytestmark = pytest.mark.usefixtures("seeded_one_thread")
CLASSES = ["a", "b", "c"]


def tiny_store(path: Path, *, splits=("train", "test"), per_split: int = 24, seed: int = 0) -> Path:
    """A fixed-layout store of random features whose class shows in channel `label` of every segment."""
    rng = np.random.default_rng(seed)
    rows, feats = [], {}
    for split in splits:
        for i in range(per_split):
            label = i % len(CLASSES)
            conv = rng.normal(size=(4, 8, 2, 2)).astype(np.float32)
            conv[:, label] += 2.0
            vid = f"{split}{i:03d}"
            rows.append(VideoRow(vid, label, split, 40, 25.0))
            feats[vid] = VideoFeatures(t=(np.arange(4) + 0.5) / 4, frame=np.arange(4) * 10,
                                       streams={"rgb": (conv, rng.normal(size=(4, 3)).astype(np.float32))})
    attrs = base_attrs(layout="fixed", class_names=CLASSES, new_length={"rgb": 1}, settings={"synthetic": 1},
                       num_segments=4, backbone="synthetic", weights="random", logits_match_labels=False)
    write_features(path, rows, feats, attrs)
    return path


def snapshot(folder: Path) -> dict[str, str]:
    """{relative path: sha256} of every file below `folder`."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def leftovers(parent: Path) -> list[str]:
    """Hidden temporary or set-aside folders that a run left in `parent`."""
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(".") and (".tmp" in p.name or ".old" in p.name))


def cfg(store, out, **kw) -> HeadConfig:
    return HeadConfig(features=str(store), out=str(out), head="avg", score_source="linear", epochs=3,
                      batch_size=8, lr=1e-2, **kw)


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    folder = tmp_path_factory.mktemp("run-stores")
    return {"full": tiny_store(folder / "full.h5"), "train_only": tiny_store(folder / "train.h5", splits=("train",))}


def test_a_rerun_replaces_the_whole_run(stores, tmp_path):
    out = tmp_path / "run"
    train_head(cfg(stores["full"], out), progress=False)
    assert (out / "predictions.h5").is_file() and (out / "weights.csv").is_file()
    assert run_kind(out) == "train-head" and (out / RUN_MARKER).read_text().strip() == "train-head"
    train_head(cfg(stores["train_only"], out), progress=False)  # no test split: no predictions
    assert not (out / "predictions.h5").exists() and not (out / "weights.csv").exists(), sorted(os.listdir(out))
    assert json.loads((out / "metrics.json").read_text())["top1"] is None
    assert json.loads((out / "config.json").read_text())["store"]["path"] == str(stores["train_only"].resolve())
    assert leftovers(tmp_path) == []


def test_a_folder_datp_did_not_write_is_refused_before_any_work(stores, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("my notes")
    code, output = run_cli("train-head", stores["full"], "--head", "avg", "--out", out, "--epochs", "1", "--quiet")
    assert code == 2 and output.startswith("datp: error: --out") and "files datp did not write" in output, output
    assert len(output.strip().splitlines()) == 1, output
    assert sorted(os.listdir(out)) == ["notes.txt"] and (out / "notes.txt").read_text() == "my notes"
    code, output = run_cli("train-head", stores["full"], "--head", "avg", "--out", stores["full"], "--quiet")
    assert code == 2 and "is a file" in output, output


def test_an_interrupted_run_leaves_the_old_run_whole_and_exits_130(stores, tmp_path, monkeypatch):
    out = tmp_path / "run"
    train_head(cfg(stores["full"], out), progress=False)
    before = snapshot(out)
    import datp.pool.train as train_module

    real = train_module._step
    calls = []

    def interrupt_in_epoch_two(*args, **kwargs):  # 24 train videos - 20% validation, batch 8: 3 steps an epoch
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(train_module, "_step", interrupt_in_epoch_two)
    with pytest.raises(KeyboardInterrupt):
        train_head(cfg(stores["train_only"], out, seed=1), progress=False)
    assert snapshot(out) == before and leftovers(tmp_path) == []
    calls.clear()
    code, output = run_cli("train-head", stores["train_only"], "--head", "avg", "--score-source", "linear",
                           "--epochs", "3", "--batch-size", "8", "--out", out, "--quiet")
    assert code == 130 and "interrupted" in output, (code, output)
    assert snapshot(out) == before and leftovers(tmp_path) == []


def test_evaluate_and_localize_never_overwrite_another_output(stores, tmp_path):
    run = tmp_path / "run"
    train_head(cfg(stores["full"], run), progress=False)
    before, store_before = snapshot(run), hashlib.sha256(stores["full"].read_bytes()).hexdigest()
    code, output = run_cli("evaluate", run, "--out", run)
    assert code == 2 and "holds a datp train-head run" in output, output
    code, output = run_cli("localize", run, stores["full"], "--out", stores["full"])
    assert code == 2 and "not a detections file written by datp" in output, output
    assert snapshot(run) == before and hashlib.sha256(stores["full"].read_bytes()).hexdigest() == store_before
    # their own outputs are replaced on a rerun
    assert run_cli("evaluate", run, "--out", tmp_path / "eval")[0] == 0
    assert run_cli("evaluate", run, "--out", tmp_path / "eval")[0] == 0
    assert run_kind(tmp_path / "eval") == "evaluate"
    for _ in range(2):
        code, output = run_cli("localize", run, stores["full"], "--out", tmp_path / "det.json",
                               "--export", tmp_path / "w.csv")
        assert code == 0, output
    (tmp_path / "other.csv").write_text("x,y\n1,2\n")
    code, output = run_cli("localize", run, stores["full"], "--out", tmp_path / "det.json", "--export",
                           tmp_path / "other.csv")
    assert code == 2 and "--export" in output and (tmp_path / "other.csv").read_text() == "x,y\n1,2\n", output


def _train_head_process(store: Path, out: Path) -> subprocess.Popen:
    args = [sys.executable, "-m", "datp", "train-head", str(store), "--head", "self-attn", "--attn-hidden", "8",
            "--epochs", "6", "--batch-size", "4", "--lr", "0.01", "--out", str(out), "--quiet"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _state(out: Path) -> tuple[dict, dict]:
    run = load_run(out)
    metrics = json.loads((out / "metrics.json").read_text())
    return ({k: v.clone() for k, v in run.head.state_dict().items()},
            {k: v for k, v in metrics.items() if k != "timing"})


@pytest.mark.slow
def test_kill_9_at_random_moments_then_rerun_equals_an_uninterrupted_run(stores, tmp_path):
    reference = tmp_path / "reference"
    assert _train_head_process(stores["full"], reference).wait(timeout=300) == 0
    want_state, want_metrics = _state(reference)
    # Seeded kill moments across the run (start-up, store loading, training, writing the folder).
    started = time.perf_counter()
    assert _train_head_process(stores["full"], tmp_path / "timing").wait(timeout=300) == 0
    duration = time.perf_counter() - started
    rng = np.random.default_rng(0)
    out = tmp_path / "killed"
    for moment in sorted(rng.uniform(0.2, 1.0, size=5) * duration):
        proc = _train_head_process(stores["full"], out)
        time.sleep(moment)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
        # After any kill the folder is absent or one whole run: never a mix of files.
        if out.exists():
            state, metrics = _state(out)
            assert metrics == want_metrics and all(torch.equal(state[k], want_state[k]) for k in want_state)
    assert _train_head_process(stores["full"], out).wait(timeout=300) == 0
    state, metrics = _state(out)
    assert metrics == want_metrics
    assert all(torch.equal(state[k], want_state[k]) for k in want_state)
    # a killed run may leave its hidden staging folder; the next run clears its own, never the run
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in reference.iterdir())


def test_two_runs_on_one_folder_one_is_refused_the_other_whole(stores, tmp_path):
    """One writer per run folder: a second train-head on the same --out while the first runs exits 2
    naming the first's pid, before any work; the first ends as the run it would have been alone."""
    reference = tmp_path / "reference"
    assert _train_head_process(stores["full"], reference).wait(timeout=300) == 0
    out = tmp_path / "shared"
    first = _train_head_process(stores["full"], out)
    lock = tmp_path / "shared.lock"
    deadline = time.time() + 120
    while time.time() < deadline and first.poll() is None and not lock.exists():
        time.sleep(0.05)
    assert lock.exists(), "the first run took no lock"
    code, output = run_cli("train-head", str(stores["full"]), "--head", "avg", "--out", str(out), "--quiet")
    assert code == 2 and f"another datp process (pid {first.pid}) is writing {out}" in output, output
    assert first.wait(timeout=300) == 0
    state, metrics = _state(out)
    want_state, want_metrics = _state(reference)
    assert metrics == want_metrics and all(torch.equal(state[k], want_state[k]) for k in want_state)
    assert not lock.exists()


def test_a_datp_checkpoint_rebuilds_its_own_sigma_floor(stores, tmp_path):
    """New runs record min_sigma; checkpoints written before it was recorded used 0.01."""
    out = tmp_path / "datp"
    train_head(HeadConfig(features=str(stores["full"]), out=str(out), head="datp", score_source="linear", epochs=1,
                          min_sigma=0.5 / 4), progress=False)
    run = load_run(out)
    assert run.options["min_sigma"] == 0.5 / 4 and run.head.min_sigma == 0.5 / 4
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    del ckpt["head_options"]["min_sigma"]
    torch.save(ckpt, out / "checkpoint.pt")
    assert load_run(out).head.min_sigma == 0.01


def test_predict_scores_any_split_as_train_head_scores_its_test_split(stores, tmp_path):
    from datp.pool.runs import read_predictions

    run = tmp_path / "run"
    train_head(cfg(stores["full"], run), progress=False)
    code, output = run_cli("predict", run, stores["full"], "--split", "test", "--out", tmp_path / "pred")
    assert code == 0 and "top-1" in output, output
    mine, theirs = read_predictions(run), read_predictions(tmp_path / "pred")
    assert mine["ids"] == theirs["ids"]
    for key in ("logits", "weights", "mask", "labels", "t", "frame"):
        assert np.array_equal(mine[key], theirs[key]), key
    metrics = json.loads((tmp_path / "pred" / "metrics.json").read_text())
    assert metrics["top1"] == json.loads((run / "metrics.json").read_text())["top1"]
    assert run_kind(tmp_path / "pred") == "predict"
    code, output = run_cli("predict", run, stores["train_only"], "--split", "train", "--out", tmp_path / "train")
    assert code == 0 and len(read_predictions(tmp_path / "train")["ids"]) == 24, output
    assert run_cli("evaluate", tmp_path / "pred", tmp_path / "train", "--weights", "1,1")[0] == 2  # other videos
    code, output = run_cli("predict", run, stores["full"], "--out", run)
    assert code == 2 and "holds a datp train-head run" in output, output
