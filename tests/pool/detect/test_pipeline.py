"""`localize_run` / `eval_detection` on the untrimmed synthetic set (events at known times).

The videos come from `datp.synth.generate(untrimmed=True)`; their features are written directly as a
ragged (stride-mode) store in which the segments inside an event carry the class signal and the rest
is noise, so a self-attention head trained on video labels alone has to find the events.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from datp.cli import main
from datp.extract.store import VideoFeatures, VideoRow, base_attrs, write_features
from datp.io.datasets import safe_name
from datp.pool.config import HeadConfig
from datp.pool.detect.evaluators import evaluate_detection
from datp.pool.detect.formats import (
    GroundTruth,
    GroundTruthSet,
    read_activitynet_ground_truth,
    read_activitynet_predictions,
    read_weights,
)
from datp.pool.detect.pipeline import eval_detection, localize_arrays, localize_run
from datp.pool.detect.plots import plot_videos
from datp.pool.predict import predict_run
from datp.pool.train import train_head
from datp.synth import SynthConfig, generate

pytestmark = pytest.mark.usefixtures("seeded_one_thread")

STRIDE = 2  # frames per segment
CF = 8  # conv channels; the last one marks events (salience)
SYNTH = SynthConfig(num_classes=3, videos_per_class_train=8, videos_per_class_test=4, size=32, fps=5,
                    duration_s=4.0, event_fraction=0.3, untrimmed=True, untrimmed_duration_s=(12.0, 16.0),
                    max_events=2)  # events of 6 frames in videos of 60 to 80 frames


def in_event(frames: np.ndarray, events: list[dict]) -> np.ndarray:
    """(n,) True for segments whose centre frame lies in an event."""
    centre = frames + STRIDE / 2
    return np.any([(centre >= e["start_frame"]) & (centre < e["end_frame"]) for e in events], axis=0)


@pytest.fixture(scope="module")
def untrimmed(tmp_path_factory):
    """(synth folder, ragged store path, events {id: info}, trained self-attn run folder).

    The head uses sigmoid attention: with softmax attention it classified the test videos but its
    weights collapsed onto one or two segments, often outside the events (anet mAP@0.5 0.03 to 0.34
    over lr 1e-3..1e-2 and two seeds, against 0.67 and 1.0 for sigmoid with seeds 1 and 0).
    """
    root = tmp_path_factory.mktemp("untrimmed")
    synth = generate(SYNTH, root / "synth", progress=False)
    events = json.loads((synth / "events.json").read_text())
    rng = np.random.default_rng(0)
    rows, feats = [], {}
    for video, info in events.items():
        frames = np.arange(0, info["num_frames"], STRIDE)
        key = in_event(frames, info["events"])
        conv = 0.5 * rng.standard_normal((len(frames), CF, 2, 2))
        conv[key, info["label"]] += 2.0  # the class shows only during its events
        conv[key, -1] += 2.0
        logits = rng.standard_normal((len(frames), SYNTH.num_classes))  # a backbone over other classes
        rows.append(VideoRow(video, info["label"], info["split"], info["num_frames"], float(info["fps"])))
        feats[video] = VideoFeatures(t=(frames + STRIDE / 2) / info["num_frames"], frame=frames,
                                     streams={"rgb": (conv, logits)}, num_frames=info["num_frames"],
                                     fps=float(info["fps"]))
    store = root / "features.h5"
    write_features(store, rows, feats, base_attrs(layout="ragged", class_names=SYNTH.class_names,
                                                   new_length={"rgb": 1}, settings={}, stride=STRIDE))
    cfg = HeadConfig(features=str(store), out=str(root / "run"), head="self-attn", epochs=40, batch_size=8,
                     lr=1e-2, attn_hidden=16, attention="sigmoid", val_fraction=0.0, device="cpu", max_ram_gb=1.0)
    train_head(cfg, progress=False)
    return synth, store, events, root / "run"


def test_localize_run_finds_the_events(untrimmed, tmp_path):
    synth, store, events, run = untrimmed
    out = tmp_path / "detections.json"
    localize_run(run, store, out=out, split="test")
    result = eval_detection(out, synth / "ground_truth.json", evaluator="anet", subset="validation", tiou=[0.5])
    thumos = eval_detection(out, synth / "ground_truth.json", evaluator="thumos14", subset="validation",
                            tiou=[0.5])

    # Chance: the run's own video scores, with each video's attention shuffled over its segments.
    truth = read_activitynet_ground_truth(synth / "ground_truth.json", subset="validation")
    p = predict_run(run, features=store, split="test")
    rng = np.random.default_rng(0)
    shuffled = p["weights"].copy()
    for i, real in enumerate(p["mask"]):
        shuffled[i, real] = rng.permutation(shuffled[i, real])
    chance_dets, _ = localize_arrays(shuffled, p["logits"], p["mask"], p["frame"], ids=p["ids"],
                                     num_frames=[events[v]["num_frames"] for v in p["ids"]],
                                     fps=[events[v]["fps"] for v in p["ids"]], class_names=SYNTH.class_names)
    chance = evaluate_detection([d for ds in chance_dets.values() for d in ds], truth, evaluator="anet",
                                tiou_thresholds=[0.5])
    print(f"mAP@0.5 anet {result.map[0]:.3f}, thumos14 {thumos.map[0]:.3f}; shuffled weights {chance.map[0]:.3f}")
    assert result.map[0] >= 0.6, f"anet mAP@0.5 {result.map[0]:.3f} (shuffled weights: {chance.map[0]:.3f})"
    assert thumos.map[0] >= 0.6, f"thumos14 mAP@0.5 {thumos.map[0]:.3f}"
    assert chance.map[0] < result.map[0] - 0.3, f"shuffled {chance.map[0]:.3f} vs trained {result.map[0]:.3f}"


def test_localize_run_writes_activitynet_json(untrimmed, tmp_path):
    synth, store, events, run = untrimmed
    out = tmp_path / "d.json"
    written = localize_run(run, store, out=out, split="test", export=tmp_path / "w.json", class_threshold=0.2,
                           nms_iou=0.4)
    data = json.loads(out.read_text())
    assert data == json.loads(json.dumps(written))
    assert data["version"] == "VERSION 1.3"
    test_ids = sorted(v for v, info in events.items() if info["split"] == "test")
    assert sorted(data["results"]) == test_ids
    settings = data["external_data"]["datp"]["settings"]
    assert (settings["class_threshold"], settings["nms_iou"], settings["theta"]) == (0.2, 0.4, None)
    assert data["external_data"]["datp"]["split"] == "test"
    back = read_activitynet_predictions(out)
    listed = [(v, r["label"], r["segment"][0], r["segment"][1], r["score"]) for v, rs in data["results"].items()
              for r in rs]
    assert [(d.video, d.label, d.start, d.end, d.score) for d in back] == listed
    for v in test_ids:  # every segment of the ragged videos, sigmoid weights in (0, 1), tiling the video
        a, times = read_weights(tmp_path / "w.json")[v]
        info = events[v]
        assert len(a) == -(-info["num_frames"] // STRIDE), (v, len(a))
        assert np.all((a > 0) & (a < 1)), f"{v}: weights outside (0, 1): {a.min()}, {a.max()}"
        assert times[0, 0] == 0 and times[-1, 1] == pytest.approx(info["duration_s"])
        assert np.all(times[1:, 0] == times[:-1, 1])
        for d in data["results"][v]:
            assert 0 <= d["segment"][0] < d["segment"][1] <= info["duration_s"] + 1e-9


def test_fusing_a_run_with_itself_changes_nothing(untrimmed, tmp_path):
    synth, store, events, run = untrimmed
    one = localize_run(run, store, out=tmp_path / "a.json", split="test")
    two = localize_run(run, store, out=tmp_path / "b.json", split="test", flow_run=run, theta=0.3)
    for v, rows in one["results"].items():
        other = two["results"][v]
        assert [(r["label"], r["segment"]) for r in rows] == [(r["label"], r["segment"]) for r in other], v
        worst = max((abs(r["score"] - o["score"]) for r, o in zip(rows, other)), default=0.0)
        assert worst < 1e-12, f"{v}: largest score difference {worst}"
    assert two["external_data"]["datp"]["settings"]["theta"] == 0.3


def test_perfect_weights_give_map_one(untrimmed):
    synth, store, events, run = untrimmed
    ids = sorted(v for v, info in events.items() if info["split"] == "test")
    n = max(-(-events[v]["num_frames"] // STRIDE) for v in ids)
    weights, mask, frames = np.zeros((len(ids), n)), np.zeros((len(ids), n), bool), np.zeros((len(ids), n), int)
    probs = np.zeros((len(ids), SYNTH.num_classes))
    for i, v in enumerate(ids):
        f = np.arange(0, events[v]["num_frames"], STRIDE)
        frames[i, :len(f)], mask[i, :len(f)] = f, True
        weights[i, :len(f)] = in_event(f, events[v]["events"])
        weights[i, len(f):] = 5.0  # padding must be ignored
        probs[i, events[v]["label"]] = 1.0
    dets, _ = localize_arrays(weights, probs, mask, frames, ids=ids, scores_are_probs=True,
                              num_frames=[events[v]["num_frames"] for v in ids], fps=[events[v]["fps"] for v in ids],
                              class_names=SYNTH.class_names)
    truth = read_activitynet_ground_truth(synth / "ground_truth.json", subset="validation")
    found = [d for ds in dets.values() for d in ds]
    assert len(found) == len(truth.instances), (len(found), len(truth.instances))
    for evaluator in ("anet", "thumos14"):
        result = evaluate_detection(found, truth, evaluator=evaluator, tiou_thresholds=[0.5])
        assert result.map[0] == 1.0, f"{evaluator}: {result.ap}"


def test_fusion_by_hand():
    """theta=1 is the rgb run, theta=0 the flow run, 0.5 the mean of both w and s."""
    rgb_w, flow_w = np.array([[0.1, 0.8, 0.1, 0.0]]), np.array([[0.0, 0.1, 0.1, 0.8]])
    rgb_s, flow_s = np.array([[0.9, 0.1]]), np.array([[0.2, 0.8]])
    kwargs = dict(ids=["v"], num_frames=[8], fps=[2.0], class_names=["a", "b"], scores_are_probs=True,
                  class_threshold=0.5)
    mask, frames = np.ones((1, 4), bool), np.array([[0, 2, 4, 6]])

    def run(theta):
        dets, att = localize_arrays(rgb_w, rgb_s, mask, frames, flow=(flow_w, flow_s), theta=theta, **kwargs)
        return [(d.label, d.start, d.end, round(d.score, 12)) for d in dets["v"]], att["v"][0]

    # segments show frames 0, 2, 4, 6 (2 fps, 8 frames): spans centred on them, boundaries at frames
    # 1.5, 3.5, 5.5: segment 1 = 0.75-1.75 s, segment 3 = 2.75-4.0 s (the last runs to the end)
    assert run(1.0)[0] == [("a", 0.75, 1.75, 0.9)]
    assert run(0.0)[0] == [("b", 2.75, 4.0, 0.8)]
    # theta 0.5: s = (0.55, 0.45), only "a" passes; w_a = 0.5 * (0.9 a_rgb + 0.2 a_flow) = (.045, .37, .055, .08)
    # relative to its peak: (.1216, 1, .1486, .2162): one run, segment 1, score 0.55 * 1.
    dets, att = run(0.5)
    assert dets == [("a", 0.75, 1.75, 0.55)]
    assert np.allclose(att, [0.05, 0.45, 0.1, 0.4])
    with pytest.raises(ValueError, match="fps"):
        localize_arrays(rgb_w, rgb_s, mask, frames, **(kwargs | {"fps": [0.0]}))


# ---------------------------------------------------------------- attention plots


def green_pixels(png) -> int:
    """Pixels of the ground truth shading (tab:green at alpha 0.25 on white); no other element is green."""
    import matplotlib.image

    image = matplotlib.image.imread(png)  # (H, W, 4) floats in [0, 1]
    assert image.shape == (300, 1000, 4), f"{png}: {image.shape}"  # 10 x 3 inches at 100 dpi
    r, g, b = image[..., 0], image[..., 1], image[..., 2]
    return int(((g > r + 0.08) & (g > b + 0.08)).sum())


def test_localize_run_plots_attention_against_ground_truth(untrimmed, tmp_path):
    synth, store, events, run = untrimmed
    test_ids = [v for v, info in events.items() if info["split"] == "test"]  # store order
    localize_run(run, store, out=tmp_path / "d.json", split="test", plot=tmp_path / "gt",
                 ground_truth=synth / "ground_truth.json", plot_count=3)
    pngs = sorted(p.name for p in (tmp_path / "gt").iterdir())
    assert pngs == sorted(f"{safe_name(v)}.png" for v in test_ids[:3]), pngs  # ids hold '/': safe names
    shaded = [green_pixels(tmp_path / "gt" / name) for name in pngs]
    assert all(n > 1000 for n in shaded), f"ground truth shading missing: green pixels {shaded}"

    # Without ground truth: the default count, nothing shaded; a flow run adds rgb/flow/fused curves.
    localize_run(run, store, out=tmp_path / "e.json", split="test", plot=tmp_path / "plain", flow_run=run)
    plain = sorted((tmp_path / "plain").iterdir())
    assert len(plain) == min(8, len(test_ids)), [p.name for p in plain]
    assert [green_pixels(p) for p in plain] == [0] * len(plain)

    with pytest.raises(ValueError, match="is drawn on the attention plots; pass --plot DIR too"):
        localize_run(run, store, out=tmp_path / "f.json", ground_truth=synth / "ground_truth.json")
    with pytest.raises(ValueError, match="--plot-count 0 must be >= 1"):
        localize_run(run, store, out=tmp_path / "f.json", plot=tmp_path / "none", plot_count=0)


def test_plot_videos_puts_videos_with_ground_truth_first(tmp_path):
    times = np.array([[0.0, 1.0], [1.0, 2.0], [2.0, 3.0]])
    attention = {"plain": (np.array([0.1, 0.9, 0.2]), times), "a/b c": (np.array([0.5, 0.5, 0.1]), times)}
    truth = GroundTruthSet((GroundTruth("a/b c", "jump", 0.5, 1.5),))
    written = plot_videos(attention, {}, tmp_path, ground_truth=truth, count=1)
    assert [p.name for p in written] == ["a%2Fb%20c.png"] and green_pixels(written[0]) > 1000
    written = plot_videos(attention, {}, tmp_path / "all", count=5)
    assert [p.name for p in written] == ["plain.png", "a%2Fb%20c.png"]


def test_localize_cli_writes_plots(untrimmed, tmp_path):
    synth, store, events, run = untrimmed
    args = ["localize", str(run), str(store), "--out", str(tmp_path / "d.json"), "--split", "test",
            "--plot", str(tmp_path / "plots"), "--ground-truth", str(synth / "ground_truth.json"), "--plot-count", "2"]
    result = CliRunner().invoke(main, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "; 2 plots in " in result.output and len(list((tmp_path / "plots").glob("*.png"))) == 2
    bad = CliRunner().invoke(main, [a for a in args if a not in ("--plot", str(tmp_path / "plots"))])
    assert bad.exit_code == 2 and bad.output.startswith("datp: error: --ground-truth "), bad.output
