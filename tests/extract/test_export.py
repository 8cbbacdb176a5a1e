"""`datp export-features`: per-video arrays equal the store's rows; the list names them; reruns and
foreign folders."""

from __future__ import annotations

import csv

import numpy as np

from datp.extract.store import VideoFeatures, VideoRow, base_attrs, write_features
from datp_testing import run_cli


def _store(path):
    rng = np.random.default_rng(0)
    rows, feats = [], {}
    for i, (vid, n) in enumerate((("walk/a", 3), ("jump b", 5))):  # ragged: 3 and 5 segments
        rows.append(VideoRow(vid, i, "train" if i == 0 else "test", 40, 25.0))
        feats[vid] = VideoFeatures(t=(np.arange(n) + 0.5) / n, frame=np.arange(n) * 7,
                                   streams={s: (rng.normal(size=(n, 4, 2, 2)).astype(np.float16).astype(np.float32),
                                                rng.normal(size=(n, 2)).astype(np.float32)) for s in ("rgb", "flow")})
    write_features(path, rows, feats, base_attrs(layout="ragged", class_names=["walk", "jump"],
                                                  new_length={"rgb": 1, "flow": 5}, settings={"t": 1}, stride=7))
    return feats


def test_export_writes_each_video_and_stream_as_stored(tmp_path):
    feats = _store(tmp_path / "f.h5")
    code, output = run_cli("export-features", tmp_path / "f.h5", "--out", tmp_path / "out")
    assert code == 0 and "exported 2 videos" in output, output
    with (tmp_path / "out" / "videos.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [r["id"] for r in rows] == ["walk/a", "jump b"] and [r["file"] for r in rows] == ["walk%2Fa.npy", "jump%20b.npy"]
    assert rows[1]["class"] == "jump" and rows[1]["split"] == "test" and rows[1]["segment_frames"] == "0 7 14 21 28"
    for r in rows:
        for stream in ("rgb", "flow"):
            conv = np.load(tmp_path / "out" / stream / r["file"])
            assert conv.dtype == np.float16 and np.array_equal(conv, feats[r["id"]].streams[stream][0].astype(np.float16))
            logits = np.load(tmp_path / "out" / f"{stream}_logits" / r["file"])
            assert np.array_equal(logits, feats[r["id"]].streams[stream][1])
    # a rerun replaces its own export; --split and --streams narrow it
    code, _ = run_cli("export-features", tmp_path / "f.h5", "--out", tmp_path / "out", "--split", "test",
                      "--streams", "flow")
    assert code == 0 and sorted(p.name for p in (tmp_path / "out").iterdir() if not p.name.startswith(".")) == \
        ["flow", "flow_logits", "settings.json", "videos.csv"]


def test_export_refuses_a_folder_it_did_not_write(tmp_path):
    _store(tmp_path / "f.h5")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("x")
    code, output = run_cli("export-features", tmp_path / "f.h5", "--out", tmp_path / "mine")
    assert code == 2 and "not an earlier datp export-features folder" in output, output
    assert [p.name for p in (tmp_path / "mine").iterdir()] == ["notes.txt"]
