"""The rules several stages share: settings markers, shard outputs, option lists, validation."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from datp.io.datasets import class_names_or_numbers, shard_out
from datp.io.options import parse_numbers
from datp.io.settings import check_settings, marked_settings
from datp.io.splits import carve_validation, split_validation


def test_shard_out():
    assert shard_out("a/f.h5", (0, 1)) == Path("a/f.h5")
    assert shard_out("a/f.h5", (2, 4)) == Path("a/f.shard2of4.h5")
    assert shard_out("a/jpgs", (2, 4), shared=True) == Path("a/jpgs")


def test_settings_marker_refuses_other_settings(tmp_path):
    marker = tmp_path / "out.parts" / "settings.json"
    marked_settings(marker, {"a": 1, "b": (1, 2), "workers": 2}, what="flow", indent=2)
    assert json.loads(marker.read_text()) == {"a": 1, "b": [1, 2], "workers": 2}
    marked_settings(marker, {"a": 1, "b": [1, 2], "workers": 8}, what="flow", ignore=("workers",))
    with pytest.raises(ValueError, match=r"out.parts holds flow made with other settings \(a differ\)"):
        marked_settings(marker, {"a": 2, "b": [1, 2], "workers": 2}, what="flow")
    with pytest.raises(ValueError, match=r"x.h5 holds features .* \(b, c differ\)"):
        check_settings(Path("x.h5"), {"a": 1, "b": 2}, {"a": 1, "c": 3}, what="features")
    check_settings(Path("x.h5"), None, {"a": 1}, what="features")  # nothing recorded yet
    check_settings(Path("x.h5"), {"a": 1, "created": "t0"}, {"a": 1, "created": "t1"},
                   what="features", ignore=("created",))


def test_parse_numbers():
    assert parse_numbers("30, 60") == (30, 60) and parse_numbers("") == ()
    assert parse_numbers("1,1.5", kind=float) == (1.0, 1.5)
    with pytest.raises(ValueError, match="--lr-steps '30;60' must be comma-separated integers"):
        parse_numbers("30;60", what="--lr-steps")
    with pytest.raises(ValueError, match="--weights 'a' must be comma-separated numbers"):
        parse_numbers("a", kind=float, what="--weights")


def test_carve_validation_is_sklearns_stratified_split_sorted():
    from sklearn.model_selection import train_test_split

    labels = np.array([0] * 10 + [1] * 6 + [2] * 4)
    train, val = carve_validation(labels, 0.2, seed=3)
    want_train, want_val = train_test_split(np.arange(20), test_size=0.2, random_state=3,
                                            stratify=labels)
    np.testing.assert_array_equal(train, np.sort(want_train))
    np.testing.assert_array_equal(val, np.sort(want_val))
    assert sorted(train.tolist() + val.tolist()) == list(range(20))
    assert np.bincount(labels[val]).tolist() == [2, 1, 1]
    assert split_validation(labels, 0.2, 3)[2] is True
    # a class with one video: not stratifiable, a plain seeded shuffle split
    single = np.array([0, 0, 0, 0, 1])
    train, val, stratified = split_validation(single, 0.4, seed=0)
    want_train, want_val = train_test_split(np.arange(5), test_size=0.4, random_state=0)
    assert not stratified and val.tolist() == sorted(want_val.tolist())
    train, val = carve_validation(labels, 0.0, seed=0)
    assert train.tolist() == list(range(20)) and val.tolist() == []


def test_class_names_or_numbers():
    assert class_names_or_numbers(["a", "b"], [0, 5]) == ["a", "b"]
    assert class_names_or_numbers([], np.array([2, -1, 0])) == ["0", "1", "2"]
    assert class_names_or_numbers([], [-1]) == []


def _rows(path):
    import csv

    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.reader(f))


def test_failures_file_keeps_other_runs_rows_and_rewrites_this_runs(tmp_path):
    """`<out>.failures.csv` is the union over runs, like its store: rows of videos this run does not
    process stay; this run's videos get this run's outcome; a file datp did not write is refused."""
    from datp.io.datasets import Record
    from datp.io.runner import FailureLog

    path = tmp_path / "out.h5.failures.csv"
    first = FailureLog(path, {"a", "b", "c"})
    first.add(Record("a", tmp_path / "a.mp4", 0, "train"), "corrupt stream")
    first.add(Record("b", tmp_path / "b.mp4", 0, "train"), "empty file")
    first.close()
    assert [r[0] for r in _rows(path)] == ["id", "a", "b"]
    # another list (b again, d new): a's row stays, b is this run's (now done: no row), d fails
    second = FailureLog(path, {"b", "d"})
    second.add(Record("d", tmp_path / "d.mp4", 1, "test"), "video file not found")
    assert [r[0] for r in _rows(path)] == ["id", "a", "d"]  # written as it happens, not at the end
    second.close()
    assert _rows(path)[1] == ["a", str(tmp_path / "a.mp4"), "corrupt stream"]
    # a run that fails nothing still keeps the others' rows; once every failed video is done, no file
    FailureLog(path, {"c"}).close()
    assert [r[0] for r in _rows(path)] == ["id", "a", "d"]
    FailureLog(path, {"a", "d"}).close()
    assert not path.exists()
    # not datp's: refused, untouched
    path.write_text("name,score\nx,1\n")
    with pytest.raises(ValueError, match="not a failures file datp wrote"):
        FailureLog(path, {"x"})
    assert path.read_text() == "name,score\nx,1\n"
