"""Metrics, late fusion and the DATP testing schemes, against hand computations."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from datp_testing import assert_close
from sklearn.metrics import balanced_accuracy_score

from datp.extract.store import (
    FeatureStore,
    VideoFeatures,
    VideoRow,
    base_attrs,
    write_features,
)
from datp.flows.store import StoreError
from datp.pool import evaluate as evaluate_module
from datp.pool.config import HeadConfig
from datp.pool.evaluate import EvaluateConfig, evaluate, format_report
from datp.pool.metrics import fuse_runs, metrics
from datp.pool.predict import predict_run
from datp.pool.runs import write_predictions
from datp.pool.schemes import random_mixture
from datp.pool.train import train_head

schemes_of = evaluate_module.testing_schemes  # imported under another name: pytest collects test*

pytestmark = pytest.mark.usefixtures("seeded_one_thread")

CLASSES = [f"c{i}" for i in range(5)]


def close(actual, expected, what: str = "", atol: float = 1e-9):
    assert_close(actual, expected, atol, what)


# ---------------------------------------------------------------- metrics


def test_metrics_by_hand():
    logits = np.array([[5, 1, 0, 0, 0, 0],   # label 0: right
                       [3, 2, 1, 0, 0, 0],   # label 1: wrong, second (in top-5)
                       [6, 5, 4, 3, 2, 1],   # label 5: wrong, sixth (not in top-5)
                       [0, 9, 0, 0, 0, 0],   # label 1: right
                       [1, 1, 1, 1, 1, 1],   # label 2: a tie predicts class 0 (wrong); nothing scores higher
                       [0, 0, 0, 0, 0, 9]])  # unknown label: left out
    labels = np.array([0, 1, 5, 1, 2, -1])
    names = [f"k{i}" for i in range(6)]
    m = metrics(logits, labels, names)
    assert m["videos"] == 5 and m["top1"] == pytest.approx(2 / 5) and m["top5"] == pytest.approx(4 / 5)
    assert m["per_class_accuracy"] == {"k0": 1.0, "k1": 0.5, "k2": 0.0, "k3": None, "k4": None, "k5": 0.0}
    assert m["mean_class_accuracy"] == pytest.approx((1 + 0.5 + 0 + 0) / 4)
    assert m["mean_class_accuracy"] == pytest.approx(balanced_accuracy_score(labels[:5], logits[:5].argmax(1)))
    empty = metrics(logits[:1], np.array([-1]), names)
    assert empty["top1"] is None and empty["videos"] == 0
    with pytest.raises(ValueError, match=r"metrics need \(V, 4\) scores"):
        metrics(logits, labels, names[:4])


# ---------------------------------------------------------------- fusion

RGB = np.array([[2.0, 0.0, 0.0], [1.0, 0.5, 0.0], [0.0, 1.0, 0.8]])   # right, wrong, wrong
FLOW = np.array([[0.0, 0.5, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 3.0]])  # wrong, right, right
LABELS = np.array([0, 1, 2])


def fake_run(folder, logits, *, stream: str, ids=("v0", "v1", "v2"), classes=("a", "b", "c")):
    """A run folder holding only predictions.h5 (what fusion reads)."""
    folder.mkdir(parents=True, exist_ok=True)
    V, N = len(logits), 2
    p = {"labels": LABELS[:V], "logits": logits, "weights": np.full((V, N), 0.5), "mask": np.ones((V, N), bool),
         "t": np.tile([0.25, 0.75], (V, 1)), "frame": np.tile([0, 5], (V, 1))}
    write_predictions(folder, p, ids=list(ids), class_names=list(classes), num_frames=np.full(V, 10),
                      fps=np.full(V, 25.0), attrs={"head": "avg", "stream": stream, "split": "test"})
    return folder


def softmax_by_hand(row):
    e = [math.exp(v) for v in row]
    return [v / sum(e) for v in e]


def test_fusion_equals_hand_computation(tmp_path):
    rgb, flow = fake_run(tmp_path / "rgb", RGB, stream="rgb"), fake_run(tmp_path / "flow", FLOW, stream="flow")
    fused = fuse_runs([rgb, flow])  # default: softmax, rgb 1 : flow 1.5
    expected = [[1.0 * a + 1.5 * b for a, b in zip(softmax_by_hand(r), softmax_by_hand(f))] for r, f in zip(RGB, FLOW)]
    close(fused["scores"], expected, "softmax fusion", atol=1e-6)  # logits are stored as float32
    assert [r["weight"] for r in fused["runs"]] == [1.0, 1.5] and fused["on"] == "softmax"
    assert [r["top1"] for r in fused["runs"]] == pytest.approx([1 / 3, 2 / 3]) and fused["fused"]["top1"] == 1.0

    on_logits = fuse_runs([(rgb, 2.0), (flow, 0.5)], on="logits")
    close(on_logits["scores"], 2.0 * RGB + 0.5 * FLOW, "logit fusion with explicit weights", atol=1e-6)
    rgb_only = fuse_runs([(rgb, 1.0), (flow, 0.0)])
    close(rgb_only["scores"], [softmax_by_hand(r) for r in RGB], "flow weight 0", atol=1e-6)


def test_fusion_refuses_runs_over_other_videos_or_classes(tmp_path):
    rgb = fake_run(tmp_path / "rgb", RGB, stream="rgb")
    shuffled = fake_run(tmp_path / "shuffled", FLOW, stream="flow", ids=("v0", "v2", "v1"))
    with pytest.raises(ValueError, match=r"covers other test videos than .*rgb \(3 vs 3; first difference at row 1: "
                                         r"'v2' vs 'v1'\)"):
        fuse_runs([rgb, shuffled])
    shorter = fake_run(tmp_path / "short", FLOW[:2], stream="flow", ids=("v0", "v1"))
    with pytest.raises(ValueError, match=r"\(2 vs 3; first difference at row 2: '<end>' vs 'v2'\)"):
        fuse_runs([rgb, shorter])
    other = fake_run(tmp_path / "other", FLOW, stream="flow", classes=("a", "b", "d"))
    with pytest.raises(ValueError, match="has other classes than"):
        fuse_runs([rgb, other])
    with pytest.raises(ValueError, match="has no predictions.h5"):
        fuse_runs([tmp_path])


# ---------------------------------------------------------------- testing schemes on trained runs


def write_store(path, parts: dict, splits: dict):
    """A fixed-layout store: `parts` {stream: SegmentBatch-like with conv}, rows split per `splits`."""
    rows, feats = [], {}
    logits = parts.get("rgb", next(iter(parts.values()))).logits
    N = next(iter(parts.values())).conv.shape[1]
    for split, (start, y) in splits.items():
        for i in range(len(y)):
            vid = f"{split}{i:04d}"
            rows.append(VideoRow(vid, int(y[i]), split, 10 * N, 25.0))
            feats[vid] = VideoFeatures(t=(np.arange(N) + 0.5) / N, frame=np.arange(N) * 10,
                                       streams={s: (b.conv[start + i].numpy(), logits[start + i].numpy())
                                                for s, b in parts.items()})
    attrs = base_attrs(layout="fixed", class_names=CLASSES, new_length={s: 1 for s in parts}, settings={},
                       num_segments=N, backbone="synthetic", weights="random", logits_match_labels=True)
    write_features(path, rows, feats, attrs)
    return path


_KEY_RUNS: dict = {}


@pytest.fixture
def key_runs(problem, tmp_path_factory):
    """A datp and an avg run (linear segment classifiers) on the key-moment store, and a flow-only
    store; trained once for this module (cached, as `problem` is a function-scoped fixture)."""
    if not _KEY_RUNS:
        folder = tmp_path_factory.mktemp("key")
        (x, y), (xt, yt) = problem("key")
        both = type(x)(*(torch.cat([a, b]) if a is not None else None for a, b in zip(x, xt)))
        splits = {"train": (0, y), "test": (len(y), yt)}
        store = write_store(folder / "key.h5", {"rgb": both}, splits)
        flow_only = write_store(folder / "flow.h5", {"flow": both}, splits)
        runs = {}
        for name in ("datp", "avg"):
            cfg = HeadConfig(features=str(store), out=str(folder / name), head=name, score_source="linear",
                             lr=1e-2, epochs=100, batch_size=128)
            runs[name] = (folder / name, train_head(cfg, progress=False))
        _KEY_RUNS.update(store=store, flow_only=flow_only, runs=runs)
    return _KEY_RUNS["store"], _KEY_RUNS["flow_only"], _KEY_RUNS["runs"]


def test_testing_schemes_by_hand(key_runs):
    store, _, runs = key_runs
    (datp_dir, datp_metrics), (avg_dir, avg_metrics) = runs["datp"], runs["avg"]
    result = schemes_of(datp_dir, avg_run=avg_dir, seed=0)
    s = result["schemes"]
    print("key-moment store, testing schemes (top-1): " + ", ".join(f"{k} {v['top1']:.3f}" for k, v in s.items())
          + f"; P2 > P3: {result['p2_gt_p3']}")
    assert s["datp"]["top1"] == datp_metrics["top1"] and s["P3"]["top1"] == avg_metrics["top1"]
    assert s["datp"]["videos"] == s["P1"]["videos"] == s["P2"]["videos"] == s["P3"]["videos"] == 256

    # P2 and P1 by hand from the checkpoint's segment classifier and the stored features
    ckpt = torch.load(datp_dir / "checkpoint.pt", weights_only=True)
    state, norm = ckpt["state_dict"], ckpt["input_norm"]["rgb"]  # train-head standardises by default
    W, b = state["scores.fc.weight"].double().numpy(), state["scores.fc.bias"].double().numpy()
    with FeatureStore(store) as f:
        batch = f.load(f.indices("test"))
    conv = (batch.conv["rgb"] - norm["mean"][:, None, None]) / norm["std"][:, None, None]
    pooled = conv.double().numpy().mean(axis=(-2, -1))  # (V, N, Cf)
    scores = pooled @ W.T + b  # (V, N, C) segment scores I_i
    labels = batch.label.numpy()
    p2 = metrics(scores.mean(axis=1), labels, CLASSES)
    assert s["P2"]["top1"] == p2["top1"] and s["P2"]["per_class_accuracy"] == p2["per_class_accuracy"]
    rho, mu, sigma = (v.double().numpy() for v in random_mixture(len(labels), 2, seed=0))
    t = batch.t.double().numpy()[:, :, None]  # (V, N, 1)
    w = (rho[:, None] / np.sqrt(2 * np.pi * sigma[:, None] ** 2)
         * np.exp(-(t - mu[:, None]) ** 2 / (2 * sigma[:, None] ** 2))).sum(axis=2)  # Eq. 1, (V, N)
    S = (w[:, :, None] * scores).sum(axis=1) / np.linalg.norm(w, axis=1, keepdims=True)  # Eq. 3
    p1 = metrics(S, labels, CLASSES)
    assert s["P1"]["top1"] == p1["top1"], f"P1 top-1 {s['P1']['top1']} != hand-computed {p1['top1']}"
    assert schemes_of(datp_dir, seed=0)["schemes"]["P1"] == s["P1"]
    assert schemes_of(datp_dir, seed=0)["notes"] == ["P3 needs --avg-run (a run of the avg head on the same "
                                                          "store and stream)"]


def test_random_mixture_is_seeded_and_in_range():
    rho, mu, sigma = random_mixture(100, 3, seed=5)
    again = random_mixture(100, 3, seed=5)
    assert all(torch.equal(a, b) for a, b in zip((rho, mu, sigma), again))
    assert not torch.equal(mu, random_mixture(100, 3, seed=6)[1])
    close(rho.sum(1), np.ones(100), "rho sums to 1", atol=1e-6)
    assert (mu >= 0).all() and (mu <= 1).all() and (sigma**2 >= 0.01 - 1e-6).all() and (sigma**2 <= 0.2 + 1e-6).all()


def test_a_store_without_the_runs_stream_is_a_clear_error(key_runs):
    _, flow_only, runs = key_runs
    message = "flow.h5 has no 'rgb/conv'; run datp extract-features --streams rgb first"
    with pytest.raises(StoreError, match=message):
        schemes_of(runs["datp"][0], features=flow_only)
    with pytest.raises(StoreError, match=message):
        predict_run(runs["datp"][0], features=flow_only)


def test_schemes_refuse_unsuitable_runs(key_runs, tmp_path):
    store, _, runs = key_runs
    with pytest.raises(ValueError, match="--avg-run .* trained a datp head; P3 needs an avg run"):
        schemes_of(runs["datp"][0], avg_run=runs["datp"][0])
    train_head(HeadConfig(features=str(store), out=str(tmp_path), head="self-attn", epochs=1, attn_hidden=4),
               progress=False)
    with pytest.raises(ValueError, match="trained a self-attn head; the testing schemes need a head that pools"):
        schemes_of(tmp_path)


def test_evaluate_writes_report_and_plots(key_runs, tmp_path):
    _, _, runs = key_runs
    cfg = EvaluateConfig(runs=(str(runs["datp"][0]),), schemes=True, avg_run=str(runs["avg"][0]), out=str(tmp_path),
                         plot_videos=2, compare=str(runs["avg"][0]))
    report = evaluate(cfg)
    saved = json.loads((tmp_path / "evaluation.json").read_text())
    assert saved["fusion"]["runs"][0]["top1"] == runs["datp"][1]["top1"] and saved["fusion"]["fused"] is None
    assert saved["schemes"]["p2_gt_p3"] == report["schemes"]["p2_gt_p3"]
    assert len(report["plots"]) == 3 and all((tmp_path / p).stat().st_size > 0 for p in report["plots"])
    text = format_report(report)
    assert "scheme P2: top-1" in text and "P2 > P3" in text
    with pytest.raises(ValueError, match="--weights gives 1 weights for 2 runs"):
        EvaluateConfig(runs=("a", "b"), weights=(1.0,))
    with pytest.raises(ValueError, match="plots need --out FOLDER"):
        EvaluateConfig(runs=("a",), plot_videos=2)
