"""A study (`train_heads`): several heads and both streams from one pass over the data end exactly as
their own `train_head` runs, each in its own run folder."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from datp.extract.store import VideoFeatures, VideoRow, base_attrs, write_features
from datp.pool.config import HeadConfig
from datp.pool.runs import load_run
from datp.pool.train import train_head, train_heads
from datp_testing import run_cli

pytestmark = pytest.mark.usefixtures("seeded_one_thread")


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """Two streams, 3 classes, 5 segments of 6x3x3 maps; the class shows in one key segment's flow."""
    path = tmp_path_factory.mktemp("study") / "features.h5"
    rng = np.random.default_rng(0)
    rows, feats = [], {}
    for i in range(36):
        label = i % 3
        rgb = rng.normal(size=(5, 6, 3, 3)).astype(np.float32)
        rgb[:, label] += 1.0
        flow = rng.normal(size=(5, 6, 3, 3)).astype(np.float32)
        flow[rng.integers(5), label] += 3.0
        logits = rng.normal(size=(5, 3)).astype(np.float32)
        rows.append(VideoRow(f"v{i:02d}", label, "train" if i < 24 else "test", 50, 25.0))
        feats[f"v{i:02d}"] = VideoFeatures(t=(np.arange(5) + 0.5) / 5, frame=np.arange(5) * 10,
                                           streams={"rgb": (rgb, logits), "flow": (flow, logits)})
    attrs = base_attrs(layout="fixed", class_names=["a", "b", "c"], new_length={"rgb": 1, "flow": 1},
                       settings={"t": 1}, num_segments=5, backbone="synthetic", weights="random",
                       logits_match_labels=False)
    write_features(path, rows, feats, attrs)
    return path


def _configs(store, folder) -> list[HeadConfig]:
    base = HeadConfig(features=str(store), out="", epochs=3, batch_size=8, lr=1e-2, dropout=0.3)
    heads = [("avg", "rgb", {}), ("max", "flow", {}), ("datp", "flow", {"gaussians": 1}),
             ("datp", "rgb", {"generator": "discrete"}), ("lstm-attn", "rgb", {"hidden": 8}),
             ("self-attn", "flow", {"attn_hidden": 8, "alpha": 0.1}), ("joint-attn", "both", {"attn_hidden": 8})]
    return [replace(base, head=h, stream=s, out=str(folder / f"{h}-{s}-{i}"), **o)
            for i, (h, s, o) in enumerate(heads)]


def _without_timing(result: dict) -> dict:
    return {k: v for k, v in result.items() if k not in ("timing", "out")}


def test_a_study_equals_one_run_per_head(store, tmp_path):
    alone = [train_head(c, progress=False) for c in _configs(store, tmp_path / "alone")]
    together = train_heads(_configs(store, tmp_path / "study"), progress=False)
    for a, b in zip(alone, together):
        assert _without_timing(a) == _without_timing(b), a["out"]
        sa, sb = load_run(a["out"]).head.state_dict(), load_run(b["out"]).head.state_dict()
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa), a["out"]
        ca = json.loads((tmp_path / "alone" / a["out"].split("/")[-1] / "config.json").read_text())
        cb = json.loads((tmp_path / "study" / b["out"].split("/")[-1] / "config.json").read_text())
        assert cb["resolved"]["study"] and ca["resolved"]["study"] is None
        assert ca["config"] | {"out": ""} == cb["config"] | {"out": ""}
    assert len({r["timing"]["epochs"][0]["heads"] for r in together}) == 1  # one pass for all


def test_heads_of_a_study_must_share_the_data_settings(store, tmp_path):
    cfgs = _configs(store, tmp_path)
    with pytest.raises(ValueError, match="share --seed"):
        train_heads([cfgs[0], replace(cfgs[1], seed=1)], progress=False)
    with pytest.raises(ValueError, match="same run folder"):
        train_heads([cfgs[0], replace(cfgs[1], out=cfgs[0].out)], progress=False)


def test_cli_trains_every_head_and_stream_into_its_own_folder(store, tmp_path):
    code, output = run_cli("train-head", store, "--head", "avg,max,joint-attn", "--stream", "rgb,flow",
                           "--epochs", "1", "--attn-hidden", "8", "--out", tmp_path / "runs", "--quiet")
    assert code == 0, output
    folders = sorted(p.name for p in (tmp_path / "runs").iterdir())
    assert folders == ["avg-flow", "avg-rgb", "joint-attn-both", "max-flow", "max-rgb"], folders
    assert load_run(tmp_path / "runs" / "max-flow").stream == "flow"
    code, output = run_cli("train-head", store, "--head", "avg,datp", "--gaussians", "1", "--epochs", "1",
                           "--out", tmp_path / "runs2", "--quiet")
    assert code == 0, output  # --gaussians goes to datp only
    assert load_run(tmp_path / "runs2" / "datp-rgb").options["num_gaussians"] == 1
