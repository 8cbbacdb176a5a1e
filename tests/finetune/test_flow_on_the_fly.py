"""finetune --stream flow without a flow store: the flow of the sampled pairs is computed while
training (opencv in the decoding workers, torch in the training process) and gives the inputs, and
the trained weights, of a run on a store that extract-flow made with the same settings."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from datp_testing import one_thread, run_cli  # noqa: F401 (one_thread: an autouse fixture)
from ft_fixtures import manifest, tiny

from datp.finetune import finetune
from datp.finetune.data import ClipDataset, collate, flow_counts
from datp.flows.compute import FlowComputer
from datp.flows.extract import FlowConfig, extract_flow
from datp.io.datasets import load_dataset

FLOW = {"algorithm": "tvl1", "preset": "fast", "bound": 20.0, "short_side": 0, "size": None}


def _store(tmp_path, backend: str):
    out = tmp_path / f"{backend}.h5"
    cfg = FlowConfig(out=str(out), algorithm="tvl1", preset="fast", backend=backend, device="cpu",
                     short_side=0, workers=1)
    summary = extract_flow(load_dataset(manifest()), cfg, progress=False)
    assert not summary.failed, summary.failed
    return out


@pytest.mark.parametrize("backend", ["opencv", "torch"])
def test_on_the_fly_clips_equal_clips_of_an_extract_flow_store(tmp_path, backend):
    records = load_dataset(manifest()).records[:3]
    store = _store(tmp_path, backend)
    clips = dict(stream="flow", num_segments=3, new_length=2, resize=48, input_size=40, seed=5)
    computer = FlowComputer(algorithm="tvl1", preset="fast", backend="torch", device="cpu")
    for train in (True, False):
        stored = ClipDataset(records, train=train, flows=str(store),
                             flow_pairs=flow_counts(records, str(store)), **clips)
        fly = ClipDataset(records, train=train, on_the_fly={**FLOW, "backend": backend}, **clips)
        keys = [(0, 0), (0, 2), (3, 1)]
        items = [fly[key] for key in keys]
        if backend == "torch":
            assert "x" not in items[0] and items[0]["flow_gray"].ndim == 3  # the workers only decode
            batch = collate(items)
            x = fly.on_device(batch, computer)
            items = [{"x": x[i], "t": batch["t"][i]} for i in range(len(keys))]
        for key, item in zip(keys, items):
            expected = stored[key]
            assert torch.equal(item["t"], expected["t"]), (train, key)
            assert torch.equal(item["x"], expected["x"]), (train, key)
        if train:  # TSN's random sampling: other epochs draw other pairs
            assert any(not torch.equal(fly[(e, 0)]["t"], items[0]["t"]) for e in range(1, 5))


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["opencv", "torch"])
def test_a_run_without_a_flow_store_trains_the_weights_of_a_run_on_one(tmp_path, backend):
    store = _store(tmp_path, backend)
    base = dict(stream="flow", new_length=2, resize=48, input_size=40, flow_preset="fast", flow_short_side=0)
    on_store = finetune(tiny(tmp_path / "stored", flows=str(store), **base), progress=False)
    cfg = tiny(tmp_path / "fly", flow_backend=backend, workers=1 if backend == "torch" else 0, **base)
    on_the_fly = finetune(cfg, progress=False)
    assert on_the_fly["state_sha256"] == on_store["state_sha256"]
    assert on_the_fly["history"][0]["train"]["loss"] == on_store["history"][0]["train"]["loss"]
    assert on_the_fly["test"] == on_store["test"]
    # the implementation is a setting of the run: resuming with the other one is refused
    other = "opencv" if backend == "torch" else "torch"
    with pytest.raises(ValueError, match=r"other settings \(flow_backend differ\)"):
        finetune(replace(cfg, resume=True, flow_backend=other, epochs=2), progress=False)


def test_cli_trains_flow_without_a_store_and_names_bad_flow_settings(tmp_path):
    args = ["finetune", manifest(), "--stream", "flow", "--backbone", "resnet18", "--segments", 2,
            "--new-length", 2, "--resize", 48, "--input-size", 40, "--epochs", 1, "--batch-size", 2,
            "--workers", 0, "--device", "cpu", "--flow-preset", "fast", "--flow-short-side", 0, "--quiet"]
    code, output = run_cli(*args, "--out", tmp_path / "bad", "--flow-backend", "torch", "--flow-algorithm", "dis")
    assert code == 2 and "torch' computes tvl1 only" in output, output
    assert not (tmp_path / "bad").exists()
    code, output = run_cli(*args, "--out", tmp_path / "run", "--flow-backend", "torch")
    assert code == 0, output
    config = (tmp_path / "run" / "config.json").read_text()
    assert '"flow_backend": "torch"' in config and '"flows": null' in config
