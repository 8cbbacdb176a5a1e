"""Multi-label videos: `train-head --loss bce` (a sigmoid per class against the store's multi-hot labels),
the multi-label metrics by hand, and localize reading sigmoid class scores from a bce run."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from datp.extract.store import VideoFeatures, VideoRow, base_attrs, write_features
from datp.pool.config import HeadConfig, study_configs
from datp.pool.metrics import multilabel_metrics
from datp.pool.train import train_heads
from tests.datp_testing import run_cli

pytestmark = pytest.mark.usefixtures("seeded_one_thread")


def _store(path, seed: int, videos: int = 96, C: int = 3, D: int = 12):
    """Ragged vector store: each video holds 1-2 classes, each shown in its own few rows."""
    rng = np.random.default_rng(seed)
    rows, feats = [], {}
    for i in range(videos):
        n = int(rng.integers(8, 14))
        labels = tuple(sorted(rng.choice(C, size=1 + (i % 2), replace=False).tolist()))
        x = rng.normal(size=(n, D)).astype(np.float32)
        for c in labels:  # the class's key rows
            k = int(rng.integers(0, n - 2))
            x[k:k + 2, c] += 4.0
        vid = f"v{i:03d}"
        rows.append(VideoRow(vid, labels[0], "train" if i < 72 else "test", 16 * n, 25.0,
                             labels if len(labels) > 1 else ()))
        feats[vid] = VideoFeatures(t=(np.arange(n) + 0.5) / n, frame=np.arange(n) * 16,
                                   streams={"rgb": (x, np.zeros((n, 0), np.float32))})
    write_features(path, rows, feats, base_attrs(layout="ragged", class_names=[f"c{c}" for c in range(C)],
                                                 new_length={"rgb": 16}, settings={}, stride=16))
    return rows


def test_multilabel_metrics_by_hand():
    scores = np.array([[0.9, 0.1, 0.5], [0.2, 0.8, 0.7], [0.3, 0.4, 0.1], [0.0, 0.0, 0.0]])
    targets = np.array([[1, 0, 1], [0, 0, 1], [0, 1, 0], [0, 0, 0]])  # the last row: no label, left out
    got = multilabel_metrics(scores, targets)
    assert got["top1_any"] == pytest.approx(2 / 3)  # row 1's top class (1) is not one of its labels
    # AP per class over rows 0-2: c0: the positive ranks first -> 1; c1: positive at rank 2 -> 1/2;
    # c2: positives at ranks 1 (0.7) and 2 (0.5) -> 1.
    assert got["class_map"] == pytest.approx((1 + 0.5 + 1) / 3)
    assert got["map_classes"] == 3 and got["multilabel_videos"] == 3


@pytest.mark.parametrize("seed", [0, 1])
def test_bce_heads_learn_multilabel_videos(tmp_path, seed):
    rows = _store(tmp_path / "m.h5", seed)
    cfgs = study_configs(str(tmp_path / "m.h5"), str(tmp_path / "runs"), heads=["avg", "max", "datp", "lstm-attn",
                                                                                "self-attn"],
                         streams=["rgb"], epochs=30, lr=1e-2, batch_size=8, hidden=16, attn_hidden=16,
                         val_fraction=0.0, loss="bce", attention="sigmoid", seed=seed)
    results = {r["out"].split("/")[-1]: r for r in train_heads(cfgs, progress=False)}
    test = [r for r in rows if r.split == "test"]
    assert all(r["multilabel_videos"] == len(test) for r in results.values())
    # chance: class mAP about the share of positives (0.5), top-1-any about 0.5
    assert min(r["class_map"] for r in results.values()) >= 0.8, {k: r["class_map"] for k, r in results.items()}
    assert min(r["top1_any"] for r in results.values()) >= 0.8, {k: r["top1_any"] for k, r in results.items()}
    # the training loss is the BCE of the multi-hot labels: the first epoch starts near log 2 per class
    assert all(0.3 < r["history"][0]["train_loss"] < 1.0 for r in results.values())


def test_bce_loss_is_the_mean_per_class_binary_cross_entropy(tmp_path):
    """The chosen epoch's validation loss and top-1 equal BCE and top-1-any computed by hand on the saved
    head's predictions of the validation rows."""
    _store(tmp_path / "m.h5", 2)
    cfg = HeadConfig(features=str(tmp_path / "m.h5"), out=str(tmp_path / "run"), head="self-attn", epochs=3,
                     val_fraction=0.25, loss="bce", attention="sigmoid", attn_hidden=8, batch_size=8, lr=1e-2)
    result = train_heads([cfg], progress=False)[0]
    from datp.extract.store import FeatureStore
    from datp.pool.data import split_rows
    from datp.pool.predict import predict, run_data
    from datp.pool.runs import load_run

    run = load_run(tmp_path / "run")
    with FeatureStore(tmp_path / "m.h5") as store:
        _, val, _, _ = split_rows(store, 0.25, 0)
        p = predict(run.head, run_data(run, store, val), val, batch_size=8, device=run.device)
        target = torch.from_numpy(store.multi_hot()[p["rows"]]).double()
    logits = torch.from_numpy(p["logits"]).double()
    by_hand = -(target * F.logsigmoid(logits) + (1 - target) * F.logsigmoid(-logits)).mean().item()
    hits = target[torch.arange(len(target)), logits.argmax(1)].mean().item()
    chosen = result["history"][result["best_epoch"] - 1]
    assert chosen["val_loss"] == pytest.approx(by_hand, rel=1e-4), (chosen, by_hand)
    assert chosen["val_top1"] == pytest.approx(hits, abs=1e-12)


def test_bce_is_refused_where_no_paper_allows_it():
    with pytest.raises(ValueError, match="--loss applies to avg, max, datp, lstm-attn, self-attn only, not to joint-attn"):
        HeadConfig(features="f.h5", out="r", head="joint-attn", stream="both", loss="bce")
    with pytest.raises(ValueError, match="--pooled-scores logits"):
        HeadConfig(features="f.h5", out="r", head="datp", pooled_scores="probs", loss="bce")
    with pytest.raises(ValueError, match="--loss 'mse' is not one of"):
        HeadConfig(features="f.h5", out="r", head="avg", loss="mse")


def test_localize_reads_sigmoid_scores_of_a_bce_run(tmp_path):
    _store(tmp_path / "m.h5", 3)
    code, out = run_cli("train-head", tmp_path / "m.h5", "--head", "self-attn", "--attention", "sigmoid", "--loss", "bce",
                        "--out", tmp_path / "run", "--epochs", 20, "--lr", 0.01, "--attn-hidden", 16,
                        "--val-fraction", 0, "--device", "cpu", "--quiet")
    assert code == 0, out
    code, out = run_cli("localize", tmp_path / "run", tmp_path / "m.h5", "--split", "test", "--out", tmp_path / "d.json")
    assert code == 0, out
    results = json.loads((tmp_path / "d.json").read_text())
    assert results["external_data"]["datp"]["settings"]["scores"] == "w_i^c = a_i * sigmoid(logits)_c"
    from datp.pool.predict import predict_run

    p = predict_run(tmp_path / "run", split="test")
    probs = torch.from_numpy(p["logits"]).double().sigmoid().numpy()
    for v, vid in enumerate(p["ids"]):
        kept = {p["class_names"][c] for c in np.flatnonzero(probs[v] >= 0.1)} or {p["class_names"][probs[v].argmax()]}
        assert {d["label"] for d in results["results"][vid]} == kept, vid
    multi = [vid for v, vid in enumerate(p["ids"]) if (probs[v] >= 0.1).sum() > 1]
    assert multi  # sigmoid scores keep several classes of a multi-label video (a softmax would split them)
