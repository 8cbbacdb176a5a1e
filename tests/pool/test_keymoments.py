"""Key-moment feature stores (`datp.synth.keymoments`) and DATP on them: the generator, and a reduced sweep
(bench/sweep.py) asserting issue 13's bound at `train-head`'s defaults."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest

from datp.extract.store import FeatureStore
from datp.synth.keymoments import KeyMomentConfig, generate, write_store
from datp.pool.config import HeadConfig
from datp.pool.predict import predict_run
from datp.pool.train import train_head

pytestmark = pytest.mark.usefixtures("seeded_one_thread")

SMALL = KeyMomentConfig(num_classes=4, num_segments=6, channels=16, map_size=4, n_train=12, n_test=6, seed=3)


@pytest.mark.parametrize("channels, map_size", [(16, 4), (64, 7)])
def test_store_has_the_configured_shapes(tmp_path, channels, map_size):
    cfg = replace(SMALL, channels=channels, map_size=map_size, streams=("rgb", "flow"))
    videos = write_store(cfg, tmp_path / "k.h5")
    with FeatureStore(tmp_path / "k.h5") as store:
        assert len(store) == 18 and set(store.streams) == {"rgb", "flow"}
        for stream in ("rgb", "flow"):
            assert store.conv_shape(stream) == (channels, map_size, map_size)
        assert store.num_classes == cfg.logit_classes  # logits over other classes: a linear probe is trained
        assert not store.attrs["logits_match_labels"]
        assert list(store.indices("train")) == list(range(12)) and len(store.indices("test")) == 6
        batch = store.load(range(18), streams=("rgb", "flow"))
        np.testing.assert_array_equal(batch.label.numpy(), videos.labels)
        np.testing.assert_allclose(batch.conv["flow"].numpy(), videos.conv["flow"].astype(np.float32))


def test_generation_is_deterministic_and_seeded():
    a, b, c = generate(SMALL), generate(SMALL), generate(replace(SMALL, seed=4))
    for stream in SMALL.streams:
        np.testing.assert_array_equal(a.conv[stream], b.conv[stream])
        np.testing.assert_array_equal(a.logits[stream], b.logits[stream])
        assert not np.array_equal(a.conv[stream], c.conv[stream])
    np.testing.assert_array_equal(a.key, b.key)


def test_key_segments_are_where_the_store_says(tmp_path):
    cfg = replace(SMALL, key_length=(1, 3), n_train=60, n_test=20)
    videos = write_store(cfg, tmp_path / "k.h5")
    with FeatureStore(tmp_path / "k.h5") as store:
        recorded = json.loads(store.attrs["key_segments"])
        ids = list(store.ids)
    assert list(recorded) == ids == videos.ids
    lengths = set()
    for i, vid in enumerate(ids):
        where = recorded[vid]
        assert where == np.flatnonzero(videos.key[i]).tolist()
        assert where == list(range(where[0], where[0] + len(where)))  # adjacent
        lengths.add(len(where))
        assert (videos.content[i, where] == videos.labels[i]).all()  # key segments show the label
        others = np.delete(videos.content[i], where)
        assert len(set(others.tolist())) == 1 and others[0] != videos.labels[i]  # one confuser per video
    assert lengths == {1, 2, 3}


def test_fixed_keys_are_centred_and_without_cue_or_distractor_only_the_class_shows():
    cfg = replace(SMALL, key_length=(2, 2), key_position="fixed", cue_strength=0.0, distractor="none",
                  noise=0.0, n_train=8, n_test=0)
    videos = generate(cfg)
    assert (videos.key == np.array([False, False, True, True, False, False])).all()
    conv = videos.conv[cfg.streams[0]].astype(np.float64)
    assert np.abs(conv[:, [0, 1, 4, 5]]).max() == 0  # no noise, no distractor, no cue: empty segments
    same = videos.labels[:, None] == videos.labels[None, :]
    flat = conv[:, 2].reshape(len(conv), -1)
    np.testing.assert_allclose(flat[same.argmax(1)], flat, atol=1e-3)  # a class looks the same everywhere
    assert not np.allclose(flat[videos.labels == videos.labels[0]][0], flat[videos.labels != videos.labels[0]][0])


def test_bad_settings_are_named():
    for kwargs, message in (({"key_length": (0, 2)}, "key_length"), ({"distractor": "x"}, "distractor"),
                            ({"key_position": "x"}, "key_position"), ({"streams": ("depth",)}, "streams")):
        with pytest.raises(ValueError, match=message):
            KeyMomentConfig(**kwargs)


# ---------------------------------------------------------------- reduced sweep

# Held out from the tuning of DATP's defaults (seeds 0-3) and from docs/fidelity.md's table (10-12).
SWEEP_SEED = 20
# Constructions with balance r = L (C - 1) / ((N - L) s) >= 1.5 (docs/fidelity.md: below about 1 the
# paper's model cannot learn, near 1 it learns on some seeds only); "issue13-d0.5" is the issue's
# construction (6 classes, 10 segments, key 1-2 with a cue, 64x7x7) with a weaker confuser;
# "N10-key2-3-d1.0-cue0" has no cue: a key segment differs from the confuser's only by its class, and
# which of the two classes is the key depends on the video (where DATP failed before aux_center).
SWEEP = {
    "issue13-d0.5": {"distractor_strength": 0.5},
    "N5-d1.0": {"num_segments": 5, "distractor_strength": 1.0},
    "N5-d1.0-map4": {"num_segments": 5, "distractor_strength": 1.0, "map_size": 4},
    "N10-key2-3-d1.0-cue0": {"key_length": (2, 3), "distractor_strength": 1.0, "cue_strength": 0.0},
}
VIDEOS = {"n_train": 300, "n_test": 100}  # bench/sweep.py's size (at 240 DATP learnt on fewer seeds)
# The paper's model as first implemented here, for the mechanism test: mu from the fc layers, with the
# earlier key-moment settings (sigma floor half the segment spacing, aux step 1e-3).
FC_KEY_MOMENT = {"locate": "fc", "aux_lr_scale": 1.0, "aux_max_lr": 1e-3}


@pytest.mark.parametrize("name", ["N5-d1.0", "N5-d1.0-map4", "issue13-d0.5", "N10-key2-3-d1.0-cue0"])
def test_datp_meets_the_issue_13_bound(tmp_path, name):
    """DATP mog (K=1, K=2) >= 0.9 x the best of avg, max and itself where that best is >= 0.8, and
    >= avg + 0.3 where avg <= 0.5, every head at train-head's defaults (only the seed set)."""
    cfg = KeyMomentConfig(seed=SWEEP_SEED, **VIDEOS, **SWEEP[name])
    write_store(cfg, tmp_path / "k.h5")
    top1 = {}
    for column, head, options in (("avg", "avg", {}), ("max", "max", {}), ("datp-K1", "datp", {"gaussians": 1}),
                                  ("datp-K2", "datp", {})):
        result = train_head(HeadConfig(features=str(tmp_path / "k.h5"), out=str(tmp_path / column), head=head,
                                       stream="flow", seed=SWEEP_SEED, device="cpu", **options), progress=False)
        top1[column] = result["top1"]
    best = max(top1.values())
    for column in ("datp-K1", "datp-K2"):
        if best >= 0.8:
            assert top1[column] >= 0.9 * best, f"{name}: {top1}"
        if top1["avg"] <= 0.5:
            assert top1[column] >= top1["avg"] + 0.3, f"{name}: {top1}"
    assert top1["avg"] <= 0.5  # the construction is one where average pooling fails (else nothing is tested)


def test_below_balance_one_the_segment_classifier_learns_inverted_scores(tmp_path):
    """The diagnosis of issue 13 (docs/fidelity.md): on its construction (r = 0.68 < 1) the linear
    segment classifier of DATP with mu from the fc layers (`locate="fc"`), trained through near-uniform weights, does not score key segments as their
    class (0% at 720 videos, 19% at 240: about chance, 1/6), so the auxiliary net has no signal towards
    the key; with r = 2.1 it scores them right (81% at 240 videos, 100% at 720)."""
    accuracy = {}
    for name, overrides in (("issue13", {}), ("N5-d1.0", SWEEP["N5-d1.0"])):
        cfg = KeyMomentConfig(seed=SWEEP_SEED, n_train=240, n_test=100, **overrides)
        videos = write_store(cfg, tmp_path / f"{name}.h5")
        run = tmp_path / name
        train_head(HeadConfig(features=str(tmp_path / f"{name}.h5"), out=str(run), head="datp", stream="flow",
                              seed=SWEEP_SEED, device="cpu", val_fraction=0.0, min_sigma=0.5 / cfg.num_segments,
                              **FC_KEY_MOMENT), progress=False)
        p = predict_run(run)
        predicted = p["segment_scores"].argmax(-1)  # (V, N)
        key = videos.key[p["rows"]]
        accuracy[name] = (predicted == p["labels"][:, None])[key].mean()
    assert accuracy["issue13"] < 1 / 3 and accuracy["N5-d1.0"] > 2 / 3, accuracy


# ---------------------------------------------------------------- the ablation tables (bench/ablations.py)

def _bench(name: str):
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "bench" / f"{name}.py"
    sys.path.insert(0, str(path.parent))  # ablations imports sweep
    try:
        spec = importlib.util.spec_from_file_location(f"bench_{name}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(path.parent))
    return module


def test_ablation_cells_are_their_runs_schemes_and_fusion(tmp_path):
    """Every cell of bench/ablations.py is what its run folder, the testing schemes and late fusion give,
    computed here again: run metrics from predictions.h5, P2 as the mean of the DATP run's segment scores,
    P3 as the avg run, fused as softmax(rgb) + 1.5 softmax(flow)."""
    import torch

    from datp.pool.metrics import metrics
    from datp.pool.runs import read_predictions

    ablations = _bench("ablations")
    store = tmp_path / "k.h5"
    write_store(replace(SMALL, n_train=40, n_test=16, streams=("rgb", "flow")), store)
    cells = ablations.run_seed(str(store), 5, tmp_path / "w", ["avg", "datp"], train={"all": {"epochs": 3}},
                               datp={}, extra={"km": {"min_sigma": "half", "aux_lr_scale": 1.0}})
    assert set(cells) == {"avg", "datp", "km", "datp:P1", "datp:P2"}
    soft = {}
    for row in ("avg", "datp", "km"):
        for stream in ("rgb", "flow"):
            p = read_predictions(tmp_path / "w" / "seed5" / f"{row}-{stream}")
            assert cells[row][stream] == metrics(p["logits"], p["labels"], p["class_names"])["top1"]
            soft[row, stream] = torch.from_numpy(p["logits"]).double().softmax(1).numpy()
            if row == "datp":
                # P2: the DATP run's own segment classifier, averaged over the (all real) segments
                p2 = p["segment_scores"].mean(axis=1)
                assert cells["datp:P2"][stream] == metrics(p2, p["labels"], p["class_names"])["top1"]
        fused = soft[row, "rgb"] + 1.5 * soft[row, "flow"]
        assert cells[row]["fused"] == metrics(fused, p["labels"], p["class_names"])["top1"]
    import json as _json
    km = _json.loads((tmp_path / "w" / "seed5" / "km-flow" / "config.json").read_text())["resolved"]["head_options"]
    assert km["min_sigma"] == 0.5 / SMALL.num_segments and km["aux_lr_scale"] == 1.0
    table = ablations.format_tables([cells, cells])
    assert "| P3 (avg-trained, avg pooling) | " + " | ".join(f"{cells['avg'][c]:.2f} +- 0.00" for c in
                                                          ("rgb", "flow", "fused")) + " |" in table
