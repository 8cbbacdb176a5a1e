"""`torchrun --nproc-per-node 2` on the CPU (gloo): both ranks end with the same weights, which are
the checkpoint's, and equal those of one process with the same global batch."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

import datp
from datp.extract.backbones import load_backbone
from datp.finetune import finetune, load_head
from datp.finetune.checkpoint import state_digest
from datp.finetune.model import VideoModel
from ft_fixtures import tiny

REPO = Path(datp.__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _model(cfg, path) -> VideoModel:
    backbone, _ = load_backbone(cfg.backbone, stream=cfg.stream, weights=path)
    return VideoModel(backbone=backbone, head=load_head(path), head_name=cfg.head, bn_freeze=cfg.bn_freeze)


def _torchrun(cfg, tmp_path: Path) -> tuple[dict, dict]:
    """Run `cfg` as `torchrun --nproc-per-node 2 -m datp.finetune`; each rank's result."""
    config = tmp_path / f"{Path(cfg.out).name}.json"
    config.write_text(json.dumps(cfg.plain()))
    report = tmp_path / f"{Path(cfg.out).name}.report"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
               "--master-port", str(_free_port()), "-m", "datp.finetune", str(config), "--report", str(report),
               "--quiet"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    r0, r1 = (json.loads((report / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["state_sha256"] == r1["state_sha256"], "the ranks ended with different weights"
    assert r0["history"] == [{**e, "seconds": r0["history"][i]["seconds"],
                              "train": {**e["train"], "images_per_s": r0["history"][i]["train"]["images_per_s"]}}
                             for i, e in enumerate(r1["history"])], "the ranks report different metrics"
    assert state_digest(_model(cfg, Path(cfg.out) / "last.pt")) == r0["state_sha256"], \
        "rank 0's checkpoint is not the ranks' model"
    return r0, r1


@pytest.mark.slow
def test_torchrun_two_cpu_ranks_with_partial_bn_and_dropout_end_with_identical_weights(tmp_path):
    """The first BatchNorm trains on each rank's own batch: its statistics are made equal again."""
    r0, _ = _torchrun(tiny(tmp_path / "ddp", batch_size=1, epochs=2), tmp_path)
    assert r0["epochs"] == 2 and r0["history"][0]["train"]["videos"] == 4 and r0["test"]["videos"] == 2


@pytest.mark.slow
def test_torchrun_two_cpu_ranks_take_the_same_steps_as_one_process(tmp_path):
    """Frozen BatchNorm and no dropout make 2 ranks x 1 video the same step as 1 process x 2 videos
    (DDP averages the ranks' gradients; the epoch order gives rank r every other video)."""
    common = dict(bn_freeze="all", dropout=0.0, head="datp", head_options=("input=softmax",))
    cfg = tiny(tmp_path / "ddp", batch_size=1, **common)
    r0, _ = _torchrun(cfg, tmp_path)
    single = finetune(tiny(tmp_path / "single", batch_size=2, **common), progress=False)
    ddp = _model(cfg, tmp_path / "ddp" / "last.pt").state_dict()
    one = _model(cfg, tmp_path / "single" / "last.pt").state_dict()
    worst = max(((one[k].double() - v.double()).abs().max().item(), k) for k, v in ddp.items())
    assert worst[0] < 1e-5, f"DDP differs from one process: max |diff| {worst[0]} at {worst[1]}"
    assert abs(single["history"][0]["train"]["loss"] - r0["history"][0]["train"]["loss"]) < 1e-5
    assert single["test"]["accuracy"] == r0["test"]["accuracy"]
