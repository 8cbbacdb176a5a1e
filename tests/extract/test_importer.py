"""`datp import-features`: per-video .npy arrays in the video_features and the THUMOS14 I3D (BaSNet /
W-TALC) layouts -> a ragged vector store that reads back equal, with segment times checked by hand;
bad widths and lengths are one line and exit 2; multi-label rows fill the multi-hot column."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from datp.extract.importer import ImportConfig, import_features
from datp.extract.store import (
    FeatureStore,
    VideoFeatures,
    VideoRow,
    base_attrs,
    write_features,
)
from datp.pool.detect.localize import segment_seconds
from datp.pool.detect.pipeline import shown_frames
from tests.datp_testing import run_cli

VIDEOS = [("v_a", "jump", "train"), ("v_b", "jump;run", "train"), ("v_c", "", "test"), ("v_d", "run", "test")]


def _arrays(seed: int, T: int, D: int = 8) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(T, D)).astype(np.float32) * 3


def _write_csv(path, rows, header=("id", "labels", "split", "fps", "frames_per_row", "offset", "num_frames")):
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)


@pytest.mark.parametrize("seed", [0, 1])
def test_video_features_layout_reads_back_equal(tmp_path, seed):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(3, 12, size=len(VIDEOS))
    want = {}
    for k, ((vid, _, _), T) in enumerate(zip(VIDEOS, lengths)):
        want[vid] = {"rgb": _arrays(seed * 100 + k, int(T)), "flow": _arrays(seed * 100 + k + 50, int(T), 6)}
        for s, x in want[vid].items():
            np.save(tmp_path / f"{vid}_{s}.npy", x)  # v-iashin/video_features: <stem>_rgb.npy, <stem>_flow.npy
    _write_csv(tmp_path / "list.csv", [(v, lab, sp, 25, 16, 0, "") for v, lab, sp in VIDEOS])
    code, out = run_cli("import-features", tmp_path, "--list", tmp_path / "list.csv", "--out", tmp_path / "f.h5")
    assert code == 0, out
    assert "imported 4 videos" in out and "1 multi-label, 1 without labels" in out
    with FeatureStore(tmp_path / "f.h5") as store:
        assert store.layout == "ragged" and store.streams == ["rgb", "flow"]
        assert store.conv_shape("rgb") == (8,) and store.conv_shape("flow") == (6,)
        assert store.class_names == ["jump", "run"]
        assert store.labels.tolist() == [0, 0, -1, 1]
        assert store.multi_hot().tolist() == [[1, 0], [1, 1], [0, 0], [0, 1]]
        assert store.splits.tolist() == ["train", "train", "test", "test"]
        batch = store.load(np.arange(4), streams=["rgb", "flow"])
        for i, (vid, _, _) in enumerate(VIDEOS):
            T = int(lengths[i])
            assert store.ids[i] == vid and store.num_frames[i] == 16 * T and store.fps[i] == 25
            for s in ("rgb", "flow"):  # float16 in the store: equal to the arrays rounded to float16
                got = batch.conv[s][i, :T].numpy()
                assert np.array_equal(got, want[vid][s].astype(np.float16).astype(np.float32)), s
            assert batch.frame[i, :T].tolist() == list(range(0, 16 * T, 16))
            assert batch.mask[i].sum() == T


def test_thumos_layouts_basnet_folders_and_joint_arrays(tmp_path):
    """BaSNet: features/<split>/rgb|flow/<id>.npy + gt.json; W-TALC/BaS-Net joint (T, 2048) = rgb | flow
    arrays with --split-at: both give the same store contents."""
    gt = {"database": {}}
    arrays = {}
    for k, (vid, subset, labels) in enumerate([("video_validation_1", "validation", ["Diving"]),
                                              ("video_validation_2", "validation", ["Diving", "Shotput"]),
                                              ("video_test_1", "test", [])]):
        T = 5 + k
        rgb, flow = _arrays(k, T, 1024), _arrays(k + 10, T, 1024)
        arrays[vid] = (rgb, flow)
        split = "train" if subset == "validation" else "test"
        for s, x in (("rgb", rgb), ("flow", flow)):
            (tmp_path / "basnet" / split / s).mkdir(parents=True, exist_ok=True)
            np.save(tmp_path / "basnet" / split / s / f"{vid}.npy", x)
        (tmp_path / "joint").mkdir(exist_ok=True)
        np.save(tmp_path / "joint" / f"{vid}.npy", np.concatenate([rgb, flow], axis=1))
        gt["database"][vid] = {"subset": subset, "duration": T * 16 / 25,
                               "annotations": [{"label": c, "segment": [0.0, 1.0]} for c in labels]}
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    stores = []
    for folder, extra in (("basnet", []), ("joint", ["--split-at", 1024])):
        out = tmp_path / f"{folder}.h5"
        code, text = run_cli("import-features", tmp_path / folder, "--list", tmp_path / "gt.json", "--out", out,
                             "--splits", "validation=train,test=test", *extra)
        assert code == 0, text
        stores.append(FeatureStore(out))
    for store in stores:
        assert store.class_names == ["Diving", "Shotput"]
        assert store.splits.tolist() == ["train", "train", "test"]
        assert store.multi_hot().tolist() == [[1, 0], [1, 1], [0, 0]]
        batch = store.load(np.arange(3), streams=["rgb", "flow"])
        for i, vid in enumerate(store.ids):
            T = len(arrays[vid][0])
            assert store.num_frames[i] == T * 16
            for s, x in zip(("rgb", "flow"), arrays[vid]):
                assert np.array_equal(batch.conv[s][i, :T].numpy(), x.astype(np.float16).astype(np.float32))
    stores[0].close()
    stores[1].close()


def test_localization_times_of_an_imported_store_by_hand(tmp_path):
    """Row k covers frames offset + 16k .. offset + 16k + 15 at 25 fps; it shows offset + 16k + 8, and its
    span runs between the midpoints of the shown frames' centres: row 0 from 0, the last to the end."""
    np.save(tmp_path / "x.npy", _arrays(0, 4))
    _write_csv(tmp_path / "l.csv", [("x", "a", "test", 25, 16, 3, 70)])
    code, out = run_cli("import-features", tmp_path, "--list", tmp_path / "l.csv", "--out", tmp_path / "f.h5",
                        "--layout", "joint")
    assert code == 0, out
    with FeatureStore(tmp_path / "f.h5") as store:
        frames = store.load([0], streams=["rgb"]).frame.numpy()
        assert frames.tolist() == [[3, 19, 35, 51]]
        shown = shown_frames(frames, json.loads(store.attrs["new_length"]))
        assert shown.tolist() == [[11, 27, 43, 59]]
        times = segment_seconds(shown[0], fps=float(store.fps[0]), num_frames=int(store.num_frames[0]))
    # centres 11.5, 27.5, 43.5, 59.5 frames; boundaries 0 | 19.5 | 35.5 | 51.5 | 70
    want = np.array([[0, 19.5], [19.5, 35.5], [35.5, 51.5], [51.5, 70]]) / 25
    assert np.allclose(times, want), (times, want)
    # each inner span is the row's own 16 frames, shifted by half a frame (the shown frame is 8 of 0..15)
    assert np.allclose((times[1:3] * 25 - [[19, 35], [35, 51]]), 0.5)


@pytest.mark.parametrize("case, message", [
    ("width", "width 6, other videos 8"),
    ("length", "4 feature rows, but the list's num_frames 200"),
    ("streams", "rgb has 4 rows but flow 5"),
    ("split_at", "--split-at 9 must be inside it"),
    ("missing", "1 listed videos have no arrays"),
    ("pickle", "datp never unpickles files"),
])
def test_bad_arrays_are_one_line_and_exit_2(tmp_path, case, message):
    np.save(tmp_path / "a_rgb.npy", _arrays(0, 4))
    np.save(tmp_path / "b_rgb.npy", _arrays(1, 4, 6 if case == "width" else 8))
    rows = [("a", "x", "train", 25, 16, 0, 200 if case == "length" else ""), ("b", "y", "train", 25, 16, 0, "")]
    extra = []
    if case == "streams":
        np.save(tmp_path / "b_flow.npy", _arrays(2, 5))
    if case == "missing":
        rows.append(("c", "x", "test", 25, 16, 0, ""))
    if case in ("split_at", "pickle"):
        for p in tmp_path.glob("*.npy"):
            p.unlink()
        np.save(tmp_path / "a.npy", _arrays(0, 4))
        if case == "pickle":
            np.save(tmp_path / "b.npy", np.array([{"not": "an array"}], dtype=object), allow_pickle=True)
        else:
            np.save(tmp_path / "b.npy", _arrays(1, 4))
        extra = ["--layout", "joint", "--split-at", 9 if case == "split_at" else 0]
    _write_csv(tmp_path / "l.csv", rows)
    code, out = run_cli("import-features", tmp_path, "--list", tmp_path / "l.csv", "--out", tmp_path / "f.h5", *extra)
    assert code == 2, out
    assert message in out and out.strip().count("\n") == 0, out
    assert not (tmp_path / "f.h5").exists()


def test_old_stores_without_the_column_read_one_hot(tmp_path):
    rows = [VideoRow("a", 1, "train", 8, 25.0), VideoRow("b", -1, "test", 8, 25.0)]
    feats = {r.id: VideoFeatures(t=np.array([0.5]), frame=np.array([0]),
                                 streams={"rgb": (np.ones((1, 4)), np.zeros((1, 0)))}) for r in rows}
    write_features(tmp_path / "s.h5", rows, feats, base_attrs(layout="ragged", class_names=["p", "q", "r"],
                                                              new_length={"rgb": 1}, settings={}, stride=1))
    with FeatureStore(tmp_path / "s.h5") as store:
        assert not store.multi_label
        assert store.multi_hot().tolist() == [[0, 1, 0], [0, 0, 0]]


def test_config_checks_values():
    with pytest.raises(ValueError, match="--layout 'x'"):
        ImportConfig(features=".", out="o.h5", list="l.csv", layout="x")
    with pytest.raises(ValueError, match="--splits item 'validation=training'"):
        ImportConfig(features=".", out="o.h5", list="l.csv", splits="validation=training")
    assert callable(import_features)


def test_merge_keeps_the_multi_hot_labels(tmp_path):
    from datp.extract.store import merge_feature_stores

    for k, (vid, _, _) in enumerate(VIDEOS):
        np.save(tmp_path / f"{vid}_rgb.npy", _arrays(k, 3 + k))
    halves = [[("v_a", "jump;run", "train"), ("v_c", "", "test")], [("v_b", "run;jump", "train"), ("v_d", "jump", "test")]]
    for i, half in enumerate(halves):
        _write_csv(tmp_path / f"l{i}.csv", [(v, lab, sp) for v, lab, sp in half], header=("id", "labels", "split"))
        code, out = run_cli("import-features", tmp_path, "--list", tmp_path / f"l{i}.csv", "--out", tmp_path / f"s{i}.h5")
        assert code == 0, out
    merge_feature_stores([tmp_path / "s0.h5", tmp_path / "s1.h5"], tmp_path / "m.h5")
    with FeatureStore(tmp_path / "m.h5") as store:
        assert store.ids == ["v_a", "v_c", "v_b", "v_d"]
        assert store.multi_hot().tolist() == [[1, 1], [0, 0], [1, 1], [1, 0]]
