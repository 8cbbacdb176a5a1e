"""Detection evaluators on hand-worked cases, cross-checked against scikit-learn, and the file readers."""

import json

import numpy as np
import pytest
from datp_testing import assert_close
from sklearn.metrics import average_precision_score

from datp.pool.detect.evaluators import (
    ANET_THRESHOLDS,
    THUMOS14_THRESHOLDS,
    evaluate_detection,
    format_result,
    interpolated_ap,
    temporal_iou,
)
from datp.pool.detect.formats import (
    AmbiguousRegion,
    Detection,
    GroundTruth,
    GroundTruthSet,
    read_activitynet_ground_truth,
    read_activitynet_predictions,
    read_ground_truth,
    read_thumos14_ground_truth,
)

EVALUATORS = ["anet", "thumos14"]


def _close(actual, expected, tol=1e-12):
    assert_close(actual, expected, tol)


def test_default_thresholds():
    assert ANET_THRESHOLDS == (0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95)
    assert THUMOS14_THRESHOLDS == (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7)


def test_temporal_iou_by_hand():
    # [0, 10] vs [5, 15]: 5 / 15; vs [10, 20]: touching, 0; vs [2, 4]: 2 / 10; vs [0, 0]: 0 / 10.
    _close(temporal_iou((0, 10), np.array([[5, 15], [10, 20], [2, 4], [0, 0]])), [1 / 3, 0, 0.2, 0])
    _close(temporal_iou((3, 3), np.array([[3, 3]])), [0.0])  # empty union is defined as 0


@pytest.mark.parametrize("evaluator", EVALUATORS)
def test_perfect_detections_score_one(evaluator):
    gts = [
        GroundTruth("v1", "A", 1.0, 3.0),
        GroundTruth("v1", "A", 5.0, 7.0),
        GroundTruth("v1", "B", 2.0, 4.0),
        GroundTruth("v2", "B", 0.0, 5.0),
    ]
    dets = [Detection(g.video, g.label, g.start, g.end, 0.5 + 0.1 * i) for i, g in enumerate(gts)]
    result = evaluate_detection(dets, gts, evaluator=evaluator)
    assert result.evaluator == evaluator
    assert set(result.ap) == {"A", "B"}
    _close(result.map, np.ones(len(result.thresholds)))
    _close(result.average_map, 1.0)


def test_shifted_detection():
    # GT [0, 10], detection [2, 12]: intersection 8, union 12, tIoU = 2/3.
    gts = [GroundTruth("v", "A", 0.0, 10.0)]
    dets = [Detection("v", "A", 2.0, 12.0, 0.9)]
    # anet: TP at 0.50, 0.55, 0.60, 0.65 (2/3 >= t), FP at 0.70..0.95 -> AP 1 x4, 0 x6; average 0.4.
    anet = evaluate_detection(dets, gts, evaluator="anet")
    _close(anet.map, [1, 1, 1, 1, 0, 0, 0, 0, 0, 0])
    _close(anet.average_map, 0.4)
    # thumos14: TP at 0.1..0.6 (2/3 > t), miss at 0.7 -> AP 1 x6, 0 x1; average 6/7.
    thumos = evaluate_detection(dets, gts, evaluator="thumos14")
    _close(thumos.map, [1, 1, 1, 1, 1, 1, 0])
    _close(thumos.average_map, 6 / 7)


def test_duplicate_detection_ranked_above_the_better_one():
    # GT [0, 10]; a = [1, 10] score 0.9 (tIoU 9/10), b = [0, 10] score 0.8 (tIoU 1).
    gts = [GroundTruth("v", "A", 0.0, 10.0)]
    dets = [Detection("v", "A", 1.0, 10.0, 0.9), Detection("v", "A", 0.0, 10.0, 0.8)]
    # anet (prediction-centric): a comes first and takes the GT wherever 0.9 >= t (t = 0.50..0.90):
    # a TP, b FP (GT locked): precision [1, 1/2], recall [1, 1] -> AP 1.
    # At t = 0.95: a FP, b TP: precision [0, 1/2], recall [0, 1]; interpolated precision at recall 1
    # is 1/2 -> AP = (1 - 0) * 1/2 = 0.5. Average = (9 * 1 + 0.5) / 10 = 0.95.
    anet = evaluate_detection(dets, gts, evaluator="anet")
    _close(anet.map, [1] * 9 + [0.5])
    _close(anet.average_map, 0.95)
    # thumos14 (ground-truth-centric): the GT takes the free detection with the largest overlap, b;
    # a stays a false positive. In score order: a FP, b TP -> precision at the TP 1/2 -> AP 0.5 / 1 GT.
    thumos = evaluate_detection(dets, gts, evaluator="thumos14")
    _close(thumos.map, [0.5] * 7)
    _close(thumos.average_map, 0.5)


def test_lower_scored_duplicate_does_not_hurt():
    # GT [0, 10]; [0, 10] score 0.9 is TP; the duplicate [1, 10] score 0.8 is FP in both.
    # Precision [1, 1/2]: anet interpolated AP = 1 (recall reached 1 at precision 1); thumos14 AP =
    # precision at the only TP = 1.
    gts = [GroundTruth("v", "A", 0.0, 10.0)]
    dets = [Detection("v", "A", 0.0, 10.0, 0.9), Detection("v", "A", 1.0, 10.0, 0.8)]
    for evaluator in EVALUATORS:
        _close(evaluate_detection(dets, gts, evaluator=evaluator).average_map, 1.0)


@pytest.mark.parametrize("evaluator", EVALUATORS)
def test_missing_class_scores_zero_without_zeroing_the_map(evaluator):
    # A is detected perfectly (AP 1), B has ground truth but no prediction (AP 0): mAP = (1 + 0) / 2.
    # C is predicted but has no ground truth: not scored, reported as ignored.
    gts = [GroundTruth("v1", "A", 0.0, 4.0), GroundTruth("v2", "B", 1.0, 2.0)]
    dets = [Detection("v1", "A", 0.0, 4.0, 0.7), Detection("v1", "C", 0.0, 4.0, 0.9)]
    result = evaluate_detection(dets, gts, evaluator=evaluator)
    assert sorted(result.ap) == ["A", "B"]
    _close(result.ap["A"], np.ones(len(result.thresholds)))
    _close(result.ap["B"], np.zeros(len(result.thresholds)))
    _close(result.map, np.full(len(result.thresholds), 0.5))
    assert result.ignored_labels == ("C",)


def test_ambiguous_region():
    # GT A [0, 10]; Ambiguous [20, 30]. Detections: in-ambiguous [21, 29] 0.9, far [40, 50] 0.8,
    # correct [0, 10] 0.5.
    truth = GroundTruthSet(
        instances=(GroundTruth("v", "A", 0.0, 10.0),), ambiguous=(AmbiguousRegion("v", 20.0, 30.0),)
    )
    dets = [
        Detection("v", "A", 21.0, 29.0, 0.9),
        Detection("v", "A", 40.0, 50.0, 0.8),
        Detection("v", "A", 0.0, 10.0, 0.5),
    ]
    # thumos14: the in-ambiguous detection is dropped; order FP (0.8), TP (0.5) -> AP = 1/2.
    _close(evaluate_detection(dets, truth, evaluator="thumos14").map, [0.5] * 7)
    # anet has no ambiguous regions: FP, FP, TP -> precision at recall 1 is 1/3 -> AP = 1/3.
    _close(evaluate_detection(dets, truth, evaluator="anet").map, [1 / 3] * 10)
    # A matched detection overlapping an ambiguous region stays a true positive.
    truth2 = GroundTruthSet(truth.instances, (AmbiguousRegion("v", 5.0, 15.0),))
    _close(evaluate_detection(dets[2:], truth2, evaluator="thumos14").map, [1.0] * 7)


def test_interpolated_versus_non_interpolated():
    # GT A: [0, 10] and [20, 30]. Detections: FP [40, 50] 0.9, TP [0, 10] 0.8, TP [20, 30] 0.7.
    # Precision [0, 1/2, 2/3], recall [0, 1/2, 1].
    # thumos14: (1/2 + 2/3) / 2 = 7/12. anet: the interpolated precision is 2/3 at both recall steps:
    # 1/2 * 2/3 + 1/2 * 2/3 = 2/3.
    gts = [GroundTruth("v", "A", 0.0, 10.0), GroundTruth("v", "A", 20.0, 30.0)]
    dets = [
        Detection("v", "A", 40.0, 50.0, 0.9),
        Detection("v", "A", 0.0, 10.0, 0.8),
        Detection("v", "A", 20.0, 30.0, 0.7),
    ]
    _close(evaluate_detection(dets, gts, evaluator="thumos14").average_map, 7 / 12)
    _close(evaluate_detection(dets, gts, evaluator="anet").average_map, 2 / 3)


def test_strictly_greater_versus_greater_or_equal():
    # GT [0, 2], detection [0, 1]: tIoU = 1/2 exactly. anet counts tIoU >= 0.5 (AP 1); thumos14 needs
    # overlap > 0.5 (AP 0). At 0.4 both match.
    gts = [GroundTruth("v", "A", 0.0, 2.0)]
    dets = [Detection("v", "A", 0.0, 1.0, 1.0)]
    _close(evaluate_detection(dets, gts, evaluator="anet", tiou_thresholds=[0.4, 0.5]).map, [1.0, 1.0])
    _close(evaluate_detection(dets, gts, evaluator="thumos14", tiou_thresholds=[0.4, 0.5]).map, [1.0, 0.0])


def test_detection_in_a_video_without_ground_truth_is_a_false_positive():
    # Score order: FP (v2, 0.9), TP (v1, 0.5). thumos14: 1/2. anet: 1/2.
    gts = [GroundTruth("v1", "A", 0.0, 10.0)]
    dets = [Detection("v2", "A", 0.0, 10.0, 0.9), Detection("v1", "A", 0.0, 10.0, 0.5)]
    for evaluator in EVALUATORS:
        _close(evaluate_detection(dets, gts, evaluator=evaluator).average_map, 0.5)


def _random_case(seed):
    rng = np.random.default_rng(seed)
    gts, dets = [], []
    for v in range(4):
        for _ in range(rng.integers(1, 4)):
            start = rng.uniform(0, 80)
            gts.append(GroundTruth(f"v{v}", "A", start, start + rng.uniform(2, 20)))
        for _ in range(rng.integers(0, 6)):
            start = rng.uniform(0, 80)
            dets.append(Detection(f"v{v}", "A", start, start + rng.uniform(2, 20), rng.uniform()))
    for g in gts[:3]:  # a few near-correct detections so that there are true positives
        dets.append(Detection(g.video, "A", g.start + 0.5, g.end + 0.5, rng.uniform()))
    return gts, dets


@pytest.mark.parametrize("seed", range(5))
def test_thumos_ap_matches_sklearn_on_its_own_matches(seed):
    # With no ambiguity, thumos14 AP = sum over TPs of precision / #GT, while scikit-learn's
    # average_precision_score (distinct scores) = sum over TPs of precision / #TP. So
    # thumos14 AP = sklearn AP * #TP / #GT, with the TP labels from an independent GT-centric match.
    gts, dets = _random_case(seed)
    threshold = 0.3
    ordered = sorted(dets, key=lambda d: -d.score)
    is_tp = np.zeros(len(ordered), dtype=bool)
    for g in gts:  # each GT in order takes its best free detection of the same video if overlap > t
        best, best_ov = None, -1.0
        for i, d in enumerate(ordered):
            if d.video == g.video and not is_tp[i]:
                ov = temporal_iou((g.start, g.end), np.array([[d.start, d.end]]))[0]
                if ov > best_ov:
                    best, best_ov = i, ov
        if best is not None and best_ov > threshold:
            is_tp[best] = True
    expected = 0.0
    if is_tp.any():
        expected = average_precision_score(is_tp, [d.score for d in ordered]) * is_tp.sum() / len(gts)
    got = evaluate_detection(dets, gts, evaluator="thumos14", tiou_thresholds=[threshold]).average_map
    _close(got, expected, tol=1e-9)


def test_interpolated_ap_matches_the_max_precision_formula():
    # Interpolated AP = sum over TPs (each a recall step of 1/npos) of the largest precision at that
    # recall or later, i.e. max over ranks >= the TP's rank.
    rng = np.random.default_rng(0)
    for _ in range(20):
        is_tp = rng.uniform(size=12) < 0.5
        npos = int(is_tp.sum()) + int(rng.integers(0, 3))
        if npos == 0:
            continue
        tp = np.cumsum(is_tp)
        precision, recall = tp / np.arange(1, 13), tp / npos
        expected = sum(precision[i:].max() / npos for i in np.flatnonzero(is_tp))
        _close(interpolated_ap(precision, recall), expected, tol=1e-12)


def test_anet_interpolated_is_at_least_thumos_non_interpolated_on_one_to_one_cases():
    # One GT and one detection per video, far apart from the other videos: both evaluators make the
    # same matches (up to > vs >=), so interpolated AP >= non-interpolated AP.
    rng = np.random.default_rng(1)
    gts = [GroundTruth(f"v{i}", "A", 10.0, 20.0) for i in range(8)]
    dets = [Detection(f"v{i}", "A", 10.0 + s, 20.0 + s, rng.uniform()) for i, s in enumerate(rng.uniform(0, 8, 8))]
    for threshold in (0.3, 0.5):
        anet = evaluate_detection(dets, gts, evaluator="anet", tiou_thresholds=[threshold]).average_map
        thumos = evaluate_detection(dets, gts, evaluator="thumos14", tiou_thresholds=[threshold]).average_map
        assert anet >= thumos - 1e-12, f"anet {anet} < thumos14 {thumos} at {threshold}"
        assert anet > 0, "the case should have some true positives"


def test_bad_arguments():
    gts = [GroundTruth("v", "A", 0.0, 1.0)]
    with pytest.raises(ValueError, match="unknown evaluator"):
        evaluate_detection([], gts, evaluator="voc")
    with pytest.raises(ValueError, match="tiou_thresholds"):
        evaluate_detection([], gts, evaluator="anet", tiou_thresholds=[1.5])
    with pytest.raises(ValueError, match="no instances"):
        evaluate_detection([], [], evaluator="anet")
    with pytest.raises(ValueError, match="start <= end"):
        Detection("v", "A", 2.0, 1.0, 0.5)


def test_format_result_names_evaluator_and_thresholds():
    gts = [GroundTruth("v", "A", 0.0, 10.0)]
    result = evaluate_detection([Detection("v", "A", 2.0, 12.0, 0.9)], gts, evaluator="thumos14")
    text = format_result(result, per_class=True)
    assert "thumos14" in text.splitlines()[0]
    assert "0.70     0.00" in text and "0.60   100.00" in text, text
    assert text.splitlines()[-1] == f"average mAP [0.10:0.70] (thumos14): {100 * 6 / 7:.2f}"


# ---------------------------------------------------------------------------------------- readers


def test_activitynet_readers_round_trip(tmp_path):
    gt_file = tmp_path / "gt.json"
    gt_file.write_text(
        json.dumps(
            {
                "version": "VERSION 1.3",
                "taxonomy": [],
                "database": {
                    "a": {"subset": "validation", "annotations": [{"segment": [1.5, 4.0], "label": "Run"}]},
                    "b": {"subset": "training", "annotations": [{"segment": [0, 2], "label": "Jump"}]},
                    "c": {"subset": "validation", "annotations": []},
                },
            }
        )
    )
    truth = read_activitynet_ground_truth(gt_file, subset="validation")
    assert truth.instances == (GroundTruth("a", "Run", 1.5, 4.0),)
    assert truth.videos == ("a", "c")
    assert len(read_ground_truth(gt_file).instances) == 2  # subset None keeps every video
    with pytest.raises(ValueError, match="subsets are"):
        read_activitynet_ground_truth(gt_file, subset="testing")

    pred_file = tmp_path / "pred.json"
    pred_file.write_text(
        json.dumps(
            {"version": "VERSION 1.3", "external_data": {}, "results": {"a": [{"label": "Run", "score": 0.25, "segment": [1.5, 4.0]}]}}
        )
    )
    dets = read_activitynet_predictions(pred_file)
    assert dets == [Detection("a", "Run", 1.5, 4.0, 0.25)]
    _close(evaluate_detection(dets, truth, evaluator="anet").average_map, 1.0)


def test_thumos14_reader(tmp_path):
    (tmp_path / "BaseballPitch_test.txt").write_text("video_test_1 1.0 2.5\nvideo_test_2  3.0  4.0 \n\n")
    (tmp_path / "Diving_test.txt").write_text("video_test_1 10 20\n")
    (tmp_path / "Ambiguous_test.txt").write_text("video_test_1 30.0 31.0\n")
    (tmp_path / "Diving_val.txt").write_text("video_validation_1 0 1\n")
    (tmp_path / "detclasslist.txt").write_text("7 BaseballPitch\n26 Diving\n")
    truth = read_thumos14_ground_truth(tmp_path, subset="test")
    assert truth.instances == (
        GroundTruth("video_test_1", "BaseballPitch", 1.0, 2.5),
        GroundTruth("video_test_2", "BaseballPitch", 3.0, 4.0),
        GroundTruth("video_test_1", "Diving", 10.0, 20.0),
    )
    assert truth.ambiguous == (AmbiguousRegion("video_test_1", 30.0, 31.0),)
    assert truth.videos == ("video_test_1", "video_test_2")
    assert read_ground_truth(tmp_path, subset="val").instances == (GroundTruth("video_validation_1", "Diving", 0.0, 1.0),)
    with pytest.raises(ValueError, match="pass subset="):
        read_thumos14_ground_truth(tmp_path)
    (tmp_path / "Bad_test.txt").write_text("video_test_1 1.0\n")
    with pytest.raises(ValueError, match="Bad_test.txt:1"):
        read_thumos14_ground_truth(tmp_path, subset="test")


# ----------------------------------------------- cross-check against the official code's loops
# Plain-loop transliterations of ActivityNet's compute_average_precision_detection (+ segment_iou,
# interpolated_prec_rec) and THUMOS14's TH14eventdetpr.m (+ intervaloverlapvalseconds, prap), kept
# close to the originals' structure so that a change in datp's vectorised matching shows up here.


def _official_anet(gts, dets, thresholds):
    if not dets:
        return np.zeros(len(thresholds))
    lock = -np.ones((len(thresholds), len(gts)))
    dets = sorted(dets, key=lambda d: -d.score)
    tp, fp = np.zeros((len(thresholds), len(dets))), np.zeros((len(thresholds), len(dets)))
    for idx, p in enumerate(dets):
        g_idx = [i for i, g in enumerate(gts) if g.video == p.video]
        if not g_idx:
            fp[:, idx] = 1
            continue
        segs = np.array([[gts[i].start, gts[i].end] for i in g_idx])
        inter = (np.minimum(p.end, segs[:, 1]) - np.maximum(p.start, segs[:, 0])).clip(0)
        tiou = inter / ((segs[:, 1] - segs[:, 0]) + (p.end - p.start) - inter)
        for t, threshold in enumerate(thresholds):
            for j in np.argsort(-tiou, kind="stable"):
                if tiou[j] < threshold:
                    fp[t, idx] = 1
                    break
                if lock[t, g_idx[j]] >= 0:
                    continue
                tp[t, idx], lock[t, g_idx[j]] = 1, idx
                break
            if fp[t, idx] == 0 and tp[t, idx] == 0:
                fp[t, idx] = 1
    out = []
    for t in range(len(thresholds)):
        tc, fc = np.cumsum(tp[t]), np.cumsum(fp[t])
        mprec, mrec = np.hstack([[0], tc / (tc + fc), [0]]), np.hstack([[0], tc / len(gts), [1]])
        for i in range(len(mprec) - 1)[::-1]:
            mprec[i] = max(mprec[i], mprec[i + 1])
        idx = np.where(mrec[1:] != mrec[:-1])[0] + 1
        out.append(np.sum((mrec[idx] - mrec[idx - 1]) * mprec[idx]))
    return np.array(out)


def _overlaps(a, b):
    out = np.zeros((len(a), len(b)))
    for i, (s1, e1) in enumerate(a):
        for j, (s2, e2) in enumerate(b):
            iw = min(e1, e2) - max(s1, s2)
            out[i, j] = iw / (max(e1, e2) - min(s1, s2)) if iw > 0 else 0
    return out


def _official_thumos(gts, dets, ambiguous, threshold):
    confs, flags = [], []
    for video in sorted({g.video for g in gts} | {d.video for d in dets}):
        gt = [(g.start, g.end) for g in gts if g.video == video]
        amb = [(a.start, a.end) for a in ambiguous if a.video == video]
        det = sorted((d for d in dets if d.video == video), key=lambda d: -d.score)
        if not det:
            continue
        free, in_amb = np.ones(len(det)), np.zeros(len(det))
        if gt:
            ov = _overlaps(gt, [(d.start, d.end) for d in det])
            for k in range(len(gt)):
                ind = np.flatnonzero(free)
                if len(ind) and ov[k, ind].max() > threshold:
                    free[ind[np.argmax(ov[k, ind])]] = 0
        if amb:
            in_amb = _overlaps(amb, [(d.start, d.end) for d in det]).sum(axis=0)
        for i in sorted(list(np.flatnonzero(free == 0)) + list(np.flatnonzero((free == 1) & (in_amb == 0)))):
            confs.append(det[i].score)
            flags.append(free[i] == 0)
    if not confs:
        return 0.0
    is_tp = np.array(flags)[np.argsort(-np.array(confs), kind="stable")]
    precision = np.cumsum(is_tp) / np.arange(1, len(is_tp) + 1)
    return precision[is_tp].sum() / len(gts)


def test_matches_loop_transliteration_of_official_code():
    rng = np.random.default_rng(0)
    worst = 0.0
    for _ in range(60):
        gts, dets, amb = [], [], []
        for v in range(4):
            for _ in range(rng.integers(0, 4)):
                s = rng.uniform(0, 60)
                gts.append(GroundTruth(f"v{v}", str(rng.choice(["A", "B"])), s, s + rng.uniform(1, 15)))
            if rng.uniform() < 0.4:
                s = rng.uniform(0, 60)
                amb.append(AmbiguousRegion(f"v{v}", s, s + rng.uniform(1, 10)))
            for _ in range(rng.integers(0, 6)):
                s = rng.uniform(0, 60)
                dets.append(Detection(f"v{v}", str(rng.choice(["A", "B"])), s, s + rng.uniform(1, 15), rng.uniform()))
        for g in gts:  # noisy copies of most ground truth
            if rng.uniform() < 0.7:
                start = g.start + rng.normal(0, 1)
                dets.append(Detection(g.video, g.label, start, g.end + abs(rng.normal(0, 1)) + 2, rng.uniform()))
        if not gts:
            continue
        truth = GroundTruthSet(tuple(gts), tuple(amb))
        anet = evaluate_detection(dets, truth, evaluator="anet")
        thumos = evaluate_detection(dets, truth, evaluator="thumos14")
        for label in anet.ap:
            G, D = [g for g in gts if g.label == label], [d for d in dets if d.label == label]
            worst = max(worst, np.abs(np.array(anet.ap[label]) - _official_anet(G, D, ANET_THRESHOLDS)).max())
            expected = [_official_thumos(G, D, amb, t) for t in THUMOS14_THRESHOLDS]
            worst = max(worst, np.abs(np.array(thumos.ap[label]) - expected).max())
    assert worst <= 1e-12, f"largest difference from the official loops: {worst}"


def test_a_malformed_results_file_is_one_line_naming_it(tmp_path):
    from datp.pool.detect.formats import read_activitynet_predictions

    bad = tmp_path / "bad.json"
    bad.write_text('{"results": {"v": [{"label": "a", "score": 0.5, "segment": [3.0]}]}}')
    with pytest.raises(ValueError, match=r"bad.json: detection 0 of video 'v' must be"):
        read_activitynet_predictions(bad)
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="bad.json is not JSON"):
        read_activitynet_predictions(bad)
