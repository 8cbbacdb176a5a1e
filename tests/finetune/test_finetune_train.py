"""datp.finetune.train: the loss falls, checkpoints round-trip, resume equals an uninterrupted run,
and the checkpoint loads in extract-features (same logits) and its head in stage two."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from datp.extract.backbones import load_backbone
from datp.extract.features import FeatureConfig, extract_features
from datp.extract.store import FeatureStore
from datp.finetune import config_from_json, finetune, load_head
from datp.finetune.__main__ import main as module_main
from datp.finetune.checkpoint import state_digest
from datp.finetune.data import ClipDataset
from datp.finetune.distributed import Context
from datp.finetune.model import VideoModel, build_model, param_groups
from datp.finetune.train import train_step
from datp.io.datasets import load_dataset
from datp.pool.heads import SegmentBatch
from ft_fixtures import CLASSES, flows, manifest, tiny
from datp_testing import assert_close, one_thread  # noqa: F401 (one_thread: an autouse fixture)

CPU = Context(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


def _load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def _rebuilt(cfg, path) -> VideoModel:
    """The VideoModel of a finetune checkpoint, rebuilt from its parts as stage one and two would."""
    backbone, info = load_backbone(cfg.backbone, stream=cfg.stream, weights=path,
                                   new_length=cfg.new_length if cfg.stream == "flow" else None)
    assert info["format"] == "datp" and info["class_names"] == list(CLASSES)
    return VideoModel(backbone=backbone, head=load_head(path), head_name=cfg.head, bn_freeze=cfg.bn_freeze)


def test_loss_falls_over_a_few_steps_on_one_batch(tmp_path):
    cfg = tiny(tmp_path / "run", dropout=0.0, bn_freeze="none", lr=0.003)
    records = [r for r in load_dataset(manifest()).records if r.split == "train"][:4]
    clips = ClipDataset(records, stream="rgb", train=True, num_segments=3, short_side=64, resize=64, input_size=56)
    batch = torch.utils.data.default_collate([clips[(0, i)] for i in range(4)])
    model, _, _ = build_model(cfg, 2)
    optimizer = torch.optim.SGD(param_groups(model, lr=cfg.lr, weight_decay=cfg.weight_decay), lr=cfg.lr,
                                momentum=cfg.momentum)
    model.train()
    losses = [train_step(model, model, batch["x"], batch["t"], batch["label"], optimizer, cfg, CPU)[0] / 4
              for _ in range(5)]
    assert losses[-1] < 0.5 * losses[0] and all(b < a for a, b in zip(losses, losses[1:])), losses


def test_checkpoint_round_trip_and_run_folder(tmp_path):
    cfg = tiny(tmp_path / "run", head="datp", head_options=("input=softmax", "num_gaussians=3"))
    result = finetune(cfg, progress=False)
    run = tmp_path / "run"
    assert {p.name for p in run.iterdir()} == {"config.json", "last.pt", "best.pt", "resume.pt", "metrics.json"}
    assert config_from_json(run / "config.json") == cfg
    ckpt = _load(run / "last.pt")
    assert ckpt["class_names"] == list(CLASSES) and ckpt["config"]["head"] == "datp"
    assert ckpt["config"]["head_kwargs"]["num_gaussians"] == 3 and ckpt["config"]["head_kwargs"]["num_segments"] == 3
    model = _rebuilt(cfg, run / "last.pt")
    assert state_digest(model) == result["state_sha256"], "the checkpoint is not the trained model"
    resumed = _load(run / "resume.pt")["model"]
    for key, value in model.state_dict().items():
        assert torch.equal(value, resumed[key]), key
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["history"] == result["history"] and result["test"]["videos"] == 2
    assert result["best_val"]["videos"] == 2  # 0.34 of 3 training videos per class
    # A checkpoint written before aux_center existed trained without centring, and rebuilds so.
    kwargs = {k: v for k, v in ckpt["config"]["head_kwargs"].items() if k not in ("aux_center", "aux_warmup")}
    old = {**ckpt, "config": {**ckpt["config"], "head_kwargs": kwargs}}
    assert load_head(ckpt).aux.center and not load_head(old).aux.center


@pytest.mark.slow
def test_resume_equals_an_uninterrupted_run(tmp_path):
    """2 epochs straight vs 1 epoch + resume; lr_steps=(1,) changes the lr between them, and the
    train/val/test metrics must agree too. The resumed part decodes in a spawned worker
    (workers=1), the rest in the main process: samples must not depend on where they are made."""
    straight = tiny(tmp_path / "straight", epochs=2)
    a = finetune(straight, progress=False)
    half = replace(straight, out=str(tmp_path / "resumed"), epochs=1)
    finetune(half, progress=False)
    b = finetune(replace(half, epochs=2, resume=True, workers=1), progress=False)
    assert a["state_sha256"] == b["state_sha256"]
    sa, sb = _load(tmp_path / "straight" / "resume.pt"), _load(tmp_path / "resumed" / "resume.pt")
    for key in sa["model"]:
        diff = (sa["model"][key].double() - sb["model"][key].double()).abs().max().item()
        assert torch.equal(sa["model"][key], sb["model"][key]), f"{key}: max |diff| {diff}"
    momentum = [s["momentum_buffer"] for s in sa["optimizer"]["state"].values()]
    assert all(torch.equal(m, s["momentum_buffer"]) for m, s in zip(momentum, sb["optimizer"]["state"].values()))
    drop = ("seconds", "images_per_s")
    strip = lambda h: [{k: ({kk: vv for kk, vv in v.items() if kk not in drop} if isinstance(v, dict) else v)
                        for k, v in e.items() if k not in drop} for e in h]
    assert strip(a["history"]) == strip(b["history"]) and a["test"] == b["test"]
    assert [e["lr"] for e in a["history"]] == [pytest.approx(0.001), pytest.approx(0.001)]


def test_refuses_to_overwrite_a_run_or_resume_with_other_settings(tmp_path):
    cfg = tiny(tmp_path / "run")
    finetune(cfg, progress=False)
    with pytest.raises(ValueError, match="already holds a run"):
        finetune(cfg, progress=False)
    with pytest.raises(ValueError, match=r"other settings \(lr differ\)"):
        finetune(replace(cfg, lr=0.5, resume=True), progress=False)
    with pytest.raises(ValueError, match="no run to resume"):
        finetune(replace(cfg, out=str(tmp_path / "empty"), resume=True), progress=False)
    (tmp_path / "cfg.json").write_text(json.dumps(cfg.plain()))
    assert module_main([str(tmp_path / "cfg.json"), "--quiet"]) == 2  # the runnable entry: one-line error


def test_a_run_from_before_a_head_default_changed_resumes_only_with_its_old_head(tmp_path):
    """A DATP run written before aux_center existed (its resume.pt without head_kwargs, its last.pt's
    head_kwargs without aux_center / aux_warmup) trained without centring: resuming it with today's
    defaults would train another head, so it is refused with the options that rebuild the old one,
    and resumes with them."""
    cfg = tiny(tmp_path / "run", head="datp", head_options=("input=softmax",))
    finetune(cfg, progress=False)
    run = tmp_path / "run"
    state = _load(run / "resume.pt")
    del state["head_kwargs"]
    torch.save(state, run / "resume.pt")
    last = _load(run / "last.pt")
    for key in ("aux_center", "aux_warmup"):
        del last["config"]["head_kwargs"][key]
    torch.save(last, run / "last.pt")
    with pytest.raises(ValueError, match=r"another head \(aux_center, aux_warmup differ.*"
                                         r"--head-option aux_center=false --head-option aux_warmup=0.0"):
        finetune(replace(cfg, epochs=cfg.epochs + 1, resume=True), progress=False)
    old = replace(cfg, epochs=cfg.epochs + 1, resume=True,
                  head_options=cfg.head_options + ("aux_center=false", "aux_warmup=0.0"))
    finetune(old, progress=False)
    assert not load_head(run / "last.pt").aux.center


@pytest.mark.slow
def test_checkpoint_loads_in_extract_features_with_the_same_logits_and_its_head_in_stage_two(tmp_path):
    cfg = tiny(tmp_path / "run", head="avg")
    finetune(cfg, progress=False)
    ckpt = tmp_path / "run" / "last.pt"
    dataset = load_dataset(manifest())
    store_path = tmp_path / "features.h5"
    summary = extract_features(dataset, FeatureConfig(
        out=str(store_path), backbone=cfg.backbone, weights=str(ckpt), streams=("rgb",),
        num_segments=cfg.num_segments, short_side=cfg.short_side, resize=cfg.resize,
        input_size=cfg.input_size, workers=0, device="cpu"), progress=False)
    assert summary.done == len(dataset.records) and not summary.failed
    model, _, _ = build_model(cfg, 2)  # the fine-tuned model, as training left it
    model.load_state_dict(_load(tmp_path / "run" / "resume.pt")["model"])
    model.eval()
    clips = ClipDataset(dataset.records, stream="rgb", train=False, num_segments=cfg.num_segments,
                        short_side=cfg.short_side, resize=cfg.resize, input_size=cfg.input_size)
    head = load_head(ckpt)
    with FeatureStore(store_path) as store, torch.no_grad():
        assert store.class_names == list(CLASSES) and store.attrs["logits_match_labels"]
        batch = store.load(range(len(dataset.records)), streams=["rgb"])
        items = torch.utils.data.default_collate([clips[(0, i)] for i in range(len(dataset.records))])
        assert np.array_equal(store.ids, [r.id for r in dataset.records])
        _, logits = model.backbone(items["x"].flatten(0, 1))  # (V*N, C)
        assert_close(batch.logits["rgb"], logits.view(len(dataset.records), cfg.num_segments, -1), atol=1e-5)
        assert_close(batch.t, items["t"])
        stage_two = head(SegmentBatch(conv=batch.conv["rgb"], logits=batch.logits["rgb"], t=batch.t))
        assert_close(stage_two.logits, model(items["x"], items["t"]).logits, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["h5", "jpg"])
def test_flow_stream_trains_from_a_flow_store_and_from_jpg_folders(tmp_path, fmt):
    cfg = tiny(tmp_path / "run", stream="flow", flows=str(flows(fmt)), new_length=3, conv1_lr_mult=5.0,
               resize=48, input_size=40)
    result = finetune(cfg, progress=False)
    assert all(np.isfinite(e["train"]["loss"]) for e in result["history"])
    model = _rebuilt(cfg, tmp_path / "run" / "last.pt")
    assert model.backbone.conv1.in_channels == 6 and state_digest(model) == result["state_sha256"]


def test_a_truncated_resume_file_is_one_line_naming_it(tmp_path):
    from datp.finetune.checkpoint import load_resume

    path = tmp_path / "resume.pt"
    torch.save({"epoch": 1, "state": torch.zeros(1000)}, path)
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(ValueError, match="resume.pt cannot be read .*cut short or damaged"):
        load_resume(path)
