"""Localization from attention weights: scores, runs, NMS, files and plots."""

import numpy as np
import pytest
import torch
from datp_testing import assert_close

from datp.pool.detect.evaluators import evaluate_detection
from datp.pool.detect.formats import (
    Detection,
    GroundTruth,
    export_weights,
    read_activitynet_predictions,
    read_weights,
    to_activitynet_json,
    write_activitynet_json,
)
from datp.pool.detect.localize import (
    class_segment_scores,
    fuse_streams,
    localize_video,
    nms,
    segment_seconds,
)
from datp.pool.detect.plots import plot_weights_vs_ground_truth


def _close(actual, expected, tol=1e-12):
    assert_close(actual, expected, tol)


def _bump(N=20, lo=8, hi=11, low=0.01, high=0.2):
    a = np.full(N, low)
    a[lo : hi + 1] = high
    return a / a.sum()


def test_class_segment_scores_and_fusion_by_hand():
    a = torch.tensor([0.1, 0.6, 0.3], dtype=torch.float64, requires_grad=True)  # tensors with grad are accepted
    s = np.array([0.2, 0.8])
    _close(class_segment_scores(a, s), [[0.02, 0.08], [0.12, 0.48], [0.06, 0.24]])
    rgb, flow = np.array([[1.0, 2.0]]), np.array([[3.0, 6.0]])
    _close(fuse_streams(rgb, flow, theta=0.25), [[0.25 * 1 + 0.75 * 3, 0.25 * 2 + 0.75 * 6]])
    _close(fuse_streams(rgb, flow), [[2.0, 4.0]])  # default theta 0.5
    with pytest.raises(ValueError, match="theta"):
        fuse_streams(rgb, flow, theta=1.5)


def test_segment_seconds_are_centred_on_the_shown_frames():
    # Stride store: frames 0, 8, 16, 24 shown at 4 fps in a 30-frame video. Frame centres 0.5, 8.5, 16.5,
    # 24.5; boundaries at their midpoints 4.5, 12.5, 20.5 frames; first from 0, last to frame 30.
    times = segment_seconds([0, 8, 16, 24], fps=4.0, num_frames=30)
    _close(times, np.array([[0, 4.5], [4.5, 12.5], [12.5, 20.5], [20.5, 30]]) / 4.0)
    _close(times[1:3].mean(axis=1), np.array([8.5, 16.5]) / 4.0)  # inner shown frames sit mid-span
    _close(segment_seconds([[0, 4], [8, 12]], fps=4.0, num_frames=30), [[0, 1], [2, 3]])
    with pytest.raises(ValueError, match="non-decreasing"):
        segment_seconds([8, 0], fps=4.0, num_frames=30)
    with pytest.raises(ValueError, match="not after the last shown frame"):
        segment_seconds([0, 30], fps=4.0, num_frames=30)


def test_fixed_layout_segments_are_the_sampled_parts():
    # TSN's fixed layout, T = 1000 frames, N = 10: segment k shows frame 100 k + 50, the centre of part
    # [100 k, 100 k + 100). Its span is that part up to half a frame: [100 k + 0.5, 100 k + 100.5).
    times = segment_seconds(np.arange(10) * 100 + 50, fps=1.0, num_frames=1000)
    want = np.stack([np.arange(10) * 100 + 0.5, np.arange(10) * 100 + 100.5], axis=1)
    want[0, 0], want[-1, 1] = 0.0, 1000.0
    _close(times, want)
    # An event filling part 3 now scores tIoU 99.5 / 100.5 with segment 3 (0.33 under the old rule,
    # which gave it [350, 450)).
    start, end = times[3]
    overlap = min(end, 400) - max(start, 300)
    assert abs(overlap / (max(end, 400) - min(start, 300)) - 99.5 / 100.5) < 1e-12


def test_bump_gives_detection_at_the_bump():
    # 20 one-second segments; class 1's attention bump covers segments 8..11 = [8 s, 12 s].
    a = _bump()
    s = np.array([0.05, 0.9])  # class 0 is below class_threshold 0.1
    times = segment_seconds(np.arange(20), fps=1.0, num_frames=20)
    dets = localize_video(class_segment_scores(a, s), s, segment_times=times, class_names=["A", "B"], video="v")
    # r = 1 on the bump, 0.05 elsewhere: one run, score = 0.9 * mean(r over run) = 0.9.
    assert len(dets) == 1 and (dets[0].label, dets[0].start, dets[0].end) == ("B", 8.0, 12.0), dets
    _close(dets[0].score, 0.9)
    # The detection scores AP 1 against the bump's ground truth.
    gt = [GroundTruth("v", "B", 8.0, 12.0)]
    assert evaluate_detection(dets, gt, evaluator="anet").average_map == 1.0


def test_class_threshold_and_top_class():
    a, times = _bump(), segment_seconds(np.arange(20), fps=1.0, num_frames=20)
    s = np.array([0.04, 0.06])
    w = class_segment_scores(a, s)
    dets = localize_video(w, s, segment_times=times, class_names=["A", "B"], video="v")
    assert [d.label for d in dets] == ["B"], "with no class passing, the top class is kept"
    assert localize_video(w, s, segment_times=times, class_names=["A", "B"], video="v", keep_top_class=False) == []
    s2 = np.array([0.5, 0.5])
    dets = localize_video(class_segment_scores(a, s2), s2, segment_times=times, class_names=["A", "B"], video="v")
    assert sorted(d.label for d in dets) == ["A", "B"]


def test_outer_inner_contrast_score_by_hand():
    # r = [0, 0.5, 1, 1, 0.5, 0.2]; threshold 0.6 -> run = segments 2..3 (inner mean 1), margin =
    # max(1, round(0.25 * 2)) = 1 -> outer = segments 1 and 4 (mean 0.5).
    # score = s * (inner - lambda * outer) = 0.8 * (1 - 0.5 * 0.5) = 0.6.
    r = np.array([0.0, 0.5, 1.0, 1.0, 0.5, 0.2])
    times = segment_seconds(np.arange(6) * 2, fps=2.0, num_frames=12)
    dets = localize_video(
        r[:, None] * 0.3, np.array([0.8]), segment_times=times, class_names=["A"], video="v",
        segment_threshold=0.6, contrast_weight=0.5,
    )
    # segments 2..3 show frames 4 and 6: centred spans from frame 3.5 to 7.5, at 2 fps [1.75, 3.75] s
    assert len(dets) == 1 and (dets[0].start, dets[0].end) == (1.75, 3.75), dets
    _close(dets[0].score, 0.6)


def test_nms_removes_a_duplicate_only():
    dets = [
        Detection("v", "A", 0.0, 10.0, 0.9),
        Detection("v", "A", 1.0, 10.0, 0.8),  # tIoU 0.9 with the first: removed
        Detection("v", "A", 5.0, 15.0, 0.7),  # tIoU 5/15 = 1/3 <= 0.5: kept
        Detection("v", "B", 0.0, 10.0, 0.6),  # another class: kept
        Detection("w", "A", 0.0, 10.0, 0.5),  # another video: kept
    ]
    assert nms(dets, iou_threshold=0.5) == [dets[0], dets[2], dets[3], dets[4]]
    assert nms(dets, iou_threshold=0.3) == [dets[0], dets[3], dets[4]]  # 1/3 > 0.3


def test_several_thresholds_then_nms():
    # r = [0.2, 0.6, 1, 0.6, 0.2]. Threshold 0.5 -> run 1..3; threshold 0.9 -> run 2..2 (tIoU 1/3 with
    # the first, so NMS at 0.5 keeps both; at 0.3 only the higher-scored one, run 2..2 with mean 1).
    r = np.array([0.2, 0.6, 1.0, 0.6, 0.2])
    times = segment_seconds(np.arange(5), fps=1.0, num_frames=5)
    kwargs = dict(segment_times=times, class_names=["A"], video="v", segment_threshold=[0.5, 0.9])
    both = localize_video(r[:, None], np.array([1.0]), nms_iou=0.5, **kwargs)
    assert [(d.start, d.end) for d in both] == [(2.0, 3.0), (1.0, 4.0)]
    _close([d.score for d in both], [1.0, (0.6 + 1 + 0.6) / 3])
    one = localize_video(r[:, None], np.array([1.0]), nms_iou=0.3, **kwargs)
    assert [(d.start, d.end) for d in one] == [(2.0, 3.0)]


def test_localize_rejects_logits_and_bad_shapes():
    times = segment_seconds(np.arange(3), fps=1.0, num_frames=3)
    with pytest.raises(ValueError, match="negative"):
        localize_video(-np.ones((3, 1)), np.ones(1), segment_times=times, class_names=["A"], video="v")
    with pytest.raises(ValueError, match="class_names"):
        localize_video(np.ones((3, 2)), np.ones(2), segment_times=times, class_names=["A"], video="v")


def test_activitynet_json_round_trip(tmp_path):
    by_video = {
        "v1": [Detection("v1", "A", 0.1, 2.5, 0.75), Detection("v1", "B", 3.0, 4.0, 1 / 3)],
        "v2": [],
    }
    data = to_activitynet_json(by_video, external_data={"used": False})
    assert data["version"] == "VERSION 1.3" and data["results"]["v2"] == []
    assert data["results"]["v1"][0] == {"label": "A", "score": 0.75, "segment": [0.1, 2.5]}
    path = write_activitynet_json(by_video, tmp_path / "det.json")
    assert read_activitynet_predictions(path) == by_video["v1"]
    with pytest.raises(ValueError, match="listed under"):
        to_activitynet_json({"v2": by_video["v1"]})


@pytest.mark.parametrize("suffix", [".json", ".csv"])
def test_export_weights_round_trip(tmp_path, suffix):
    rng = np.random.default_rng(0)
    weights = {
        "v1": (rng.uniform(size=5), segment_seconds(np.arange(5) * 3, fps=2.5, num_frames=17)),
        "v,2": (torch.rand(2, dtype=torch.float64), np.array([[0.0, 1.0], [1.0, 2.0]])),  # comma in an id
    }
    back = read_weights(export_weights(weights, tmp_path / f"w{suffix}"))
    assert list(back) == ["v1", "v,2"]
    for video, (a, t) in weights.items():
        _close(back[video][0], np.asarray(a))  # exact: floats are written with repr
        _close(back[video][1], t)
    if suffix == ".csv":
        assert (tmp_path / "w.csv").read_text().splitlines()[0] == "video,segment,start,end,weight"


def test_plot_shades_ground_truth(tmp_path):
    from matplotlib.image import imread

    a = _bump(N=10, lo=2, hi=3)
    times = segment_seconds(np.arange(10), fps=1.0, num_frames=10)

    def shaded_columns(gt):
        path = plot_weights_vs_ground_truth({"rgb": a, "flow": a[::-1]}, times, gt, tmp_path / "p.png", title="v")
        image = imread(path)[..., :3]  # (H, W, 3) in [0, 1]
        shade = np.array([202, 231, 202]) / 255  # tab:green at alpha 0.25 over white
        return np.flatnonzero((np.abs(image - shade).max(axis=-1) < 0.02).any(axis=0))

    assert len(shaded_columns([])) == 0
    narrow = shaded_columns([GroundTruth("v", "A", 0.0, 2.0)])
    wide = shaded_columns([GroundTruth("v", "A", 0.0, 6.0)])
    late = shaded_columns([GroundTruth("v", "A", 6.0, 8.0)])
    assert 2.7 < len(wide) / len(narrow) < 3.3, (len(wide), len(narrow))  # 6 s vs 2 s of shading
    assert late.min() > narrow.max(), "GT at 6-8 s is shaded right of GT at 0-2 s"
