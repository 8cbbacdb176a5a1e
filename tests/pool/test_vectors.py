"""Every head trains on a store of feature vectors (imported I3D-style (T, D) rows) as on conv maps;
DATP's auxiliary net reads them through a per-segment linear layer equal to its 1x1 conv."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from datp.extract.store import VideoFeatures, VideoRow, base_attrs, write_features
from datp.pool.config import study_configs
from datp.pool.heads.datp import AuxNet
from datp.pool.train import train_heads

pytestmark = pytest.mark.usefixtures("seeded_one_thread")


def test_vector_input_equals_a_one_by_one_map():
    net = AuxNet(in_channels=6, num_segments=4, out_features=3, input="conv", hidden=8, map_size=1)
    x = torch.randn(2, 4, 6)
    mask = torch.tensor([[True] * 4, [True, True, True, False]])
    assert torch.allclose(net(x, mask), net(x[..., None, None], mask), atol=1e-6)


def test_every_head_learns_a_vector_store(tmp_path):
    rng = np.random.default_rng(0)
    rows, feats = [], {}
    for i in range(120):
        label, n = i % 3, int(rng.integers(4, 9))  # ragged: 4-8 rows per video
        x = rng.normal(size=(n, 16)).astype(np.float32)
        x[:, label] += 1.0  # every row shows the class a little, one key row strongly
        x[rng.integers(n), label] += 3.0
        rows.append(VideoRow(f"v{i:03d}", label, "train" if i < 90 else "test", 16 * n, 25.0))
        feats[f"v{i:03d}"] = VideoFeatures(t=(np.arange(n) + 0.5) / n, frame=np.arange(n) * 16 + 8,
                                           streams={"rgb": (x, np.zeros((n, 3), np.float32))})
    write_features(tmp_path / "v.h5", rows, feats, base_attrs(layout="ragged", class_names=["a", "b", "c"],
                                                               new_length={"rgb": 1}, settings={}, stride=16))
    cfgs = study_configs(str(tmp_path / "v.h5"), str(tmp_path / "runs"),
                         heads=["avg", "max", "datp", "lstm-attn", "self-attn"], streams=["rgb"], epochs=40,
                         lr=1e-2, batch_size=8, hidden=16, attn_hidden=16, val_fraction=0.0)
    results = {r["out"].split("/")[-1]: r["top1"] for r in train_heads(cfgs, progress=False)}
    assert min(results.values()) >= 0.8, results  # chance is 1/3
