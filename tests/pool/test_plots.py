"""Figure 3 and Figure 4: the plotted data by hand, and the PNGs written."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from datp.pool.plots import (
    accuracy_changes,
    plot_accuracy_changes,
    plot_segment_weights,
    read_events,
    segment_plot_data,
)
from datp.pool.runs import read_predictions, write_predictions

PNG = b"\x89PNG\r\n\x1a\n"


def is_png(path) -> bool:
    data = path.read_bytes()
    return len(data) > 1000 and data.startswith(PNG)


@pytest.fixture
def run(tmp_path):
    """A run folder with predictions for two videos of 4 segment slots (the second has 3 real ones)."""
    folder = tmp_path / "run"
    folder.mkdir()
    scores = np.zeros((2, 4, 3))
    scores[0] = [[0, 0, 0], [1, 0, 0], [0, 2, 0], [3, 1, 0]]
    scores[1, :3] = [[0, 0, 1], [0, 0, 0], [2, 2, 2]]
    p = {"labels": np.array([1, 2]), "logits": np.zeros((2, 3)),
         "weights": np.array([[0.1, 0.2, 0.6, 0.1], [0.5, 0.25, 0.25, 0.0]]),
         "mask": np.array([[True] * 4, [True, True, True, False]]),
         "t": np.array([[0.125, 0.375, 0.625, 0.875], [1 / 6, 0.5, 5 / 6, 0.0]]),
         "frame": np.array([[0, 25, 50, 75], [0, 10, 20, 0]]), "segment_scores": scores}
    write_predictions(folder, p, ids=["walk/a", "jump b"], class_names=["run", "walk", "jump"],
                      num_frames=np.array([100, 30]), fps=np.array([25.0, 0.0]),
                      attrs={"head": "datp", "stream": "rgb", "split": "test"})
    return folder


def test_segment_plot_data_by_hand(run):
    rows = segment_plot_data(read_predictions(run), ["walk/a", "jump b"])
    a, b = rows
    assert a["class_name"] == "walk" and b["class_name"] == "jump"
    # video a: true class 1; softmax of each segment's scores at class 1
    expected = [math.exp(s[1]) / sum(math.exp(v) for v in s) for s in [[0, 0, 0], [1, 0, 0], [0, 2, 0], [3, 1, 0]]]
    np.testing.assert_allclose(a["true_score"], expected, atol=1e-6)
    np.testing.assert_allclose(a["seconds"], [0.5, 1.5, 2.5, 3.5], atol=1e-6)  # t * 100 frames / 25 fps
    np.testing.assert_allclose(a["weights"], [0.1, 0.2, 0.6, 0.1], atol=1e-7)
    # video b: the padded slot is left out; no fps, so no seconds
    expected = [math.exp(1) / (2 + math.exp(1)), 1 / 3, 1 / 3]
    np.testing.assert_allclose(b["true_score"], expected, atol=1e-6)
    assert b["seconds"] is None and len(b["t"]) == 3 and len(b["weights"]) == 3
    with pytest.raises(ValueError, match="video 'nope' is not among the run's 2 test videos"):
        segment_plot_data(read_predictions(run), ["nope"])


def test_figure3_pngs_per_video_and_grid(run, tmp_path):
    paths = plot_segment_weights(run, tmp_path / "figs", events={"walk/a": [(1.0, 2.0)]})
    assert [p.name for p in paths] == ["segments_walk%2Fa.png", "segments_jump%20b.png"]  # ids by safe_name
    assert all(is_png(p) for p in paths)
    grid = plot_segment_weights(run, tmp_path / "figs", ids=["jump b"], grid=True)
    assert [p.name for p in grid] == ["segments.png"] and is_png(grid[0])


def test_read_events_both_formats(tmp_path):
    synth = tmp_path / "events.json"
    synth.write_text(json.dumps({"v1": {"label": 0, "events": [{"start_frame": 5, "end_frame": 9, "start_s": 0.2,
                                                                  "end_s": 0.36}]}}))
    plain = tmp_path / "plain.json"
    plain.write_text(json.dumps({"v1": [[0.2, 0.36], [1, 2]]}))
    assert read_events(synth) == {"v1": [(0.2, 0.36)]}
    assert read_events(plain) == {"v1": [(0.2, 0.36), (1.0, 2.0)]}


def test_accuracy_changes_by_hand():
    before = {f"k{i:02d}": 0.5 for i in range(12)} | {"gone": 0.3, "new": None}
    after = {f"k{i:02d}": 0.5 + (i - 5) / 20 for i in range(12)} | {"gone": None, "new": 0.9}
    after["k03"] = after["k04"]  # a tie: k03 and k04 both change by -0.05
    before["k03"] = 0.5
    top, bottom = accuracy_changes(before, after, k=5)
    assert [n for n, _ in top] == ["k11", "k10", "k09", "k08", "k07"]
    np.testing.assert_allclose([c for _, c in top], [0.3, 0.25, 0.2, 0.15, 0.1])
    assert [n for n, _ in bottom] == ["k00", "k01", "k02", "k03", "k04"]  # tie k03/k04 by name
    np.testing.assert_allclose([c for _, c in bottom], [-0.25, -0.2, -0.15, -0.05, -0.05])
    # fewer than 2k classes: the bottom list does not repeat the top one
    top, bottom = accuracy_changes({"a": 0.1, "b": 0.5, "c": 0.5}, {"a": 0.6, "b": 0.4, "c": 0.5}, k=2)
    assert top == [("a", pytest.approx(0.5)), ("c", 0.0)] and bottom == [("b", pytest.approx(-0.1))]


def test_figure4_png_from_runs_and_dicts(tmp_path):
    for name, acc in (("before", {"a": 0.1, "b": 0.5, "c": 0.9}), ("after", {"a": 0.6, "b": 0.4, "c": 0.9})):
        (tmp_path / name).mkdir()
        (tmp_path / name / "metrics.json").write_text(json.dumps({"per_class_accuracy": acc}))
    path = plot_accuracy_changes(tmp_path / "before", tmp_path / "after", tmp_path / "changes.png", k=1)
    assert is_png(path)
    path = plot_accuracy_changes({"a": 0.1}, {"a": 0.2}, tmp_path / "dicts.png")
    assert is_png(path)
    with pytest.raises(ValueError, match="has no metrics.json"):
        plot_accuracy_changes(tmp_path, tmp_path / "after", tmp_path / "x.png")
