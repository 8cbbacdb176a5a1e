"""Tests for datp/synth/: the synthetic key-moment benchmark."""

from __future__ import annotations

import csv
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from datp.synth import CLASSES, SynthConfig, generate, render_video
from datp.synth.render import _free_stretches, _place_events

# 16 frames of 48x48; an event lasts round(0.2 * 2 * 8) = 3 frames.
TINY = SynthConfig(seed=3, num_classes=3, videos_per_class_train=2, videos_per_class_test=1,
                   size=48, fps=8, duration_s=2.0, event_fraction=0.2)
# Nothing moves but the drawn motions, so every moving pixel belongs to the event or a confuser.
CLEAN = replace(TINY, num_classes=len(CLASSES), size=64, fps=10, duration_s=4.0,
                event_fraction=0.2, distractor_strength=0.0)


def decode(path: Path) -> np.ndarray:
    import av

    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


def read_manifest(root: Path) -> list[dict]:
    with (root / "manifest.csv").open(newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return generate(TINY, tmp_path_factory.mktemp("tiny"), progress=False)


def test_videos_decode_to_the_frames_written(tiny):
    events = json.loads((tiny / "events.json").read_text())
    for row in read_manifest(tiny):
        written, info = render_video(TINY, label=int(row["label"]), split=row["split"],
                                     index=int(Path(row["path"]).stem.split("_")[1]))
        decoded = decode(tiny / row["path"])
        assert decoded.shape == written.shape == (events[row["id"]]["num_frames"], 48, 48, 3)
        diff = np.abs(decoded.astype(int) - written).max()
        assert diff == 0, f"{row['path']}: largest difference {diff}"
        assert events[row["id"]] == info


def test_opencv_reads_the_same_frames(tiny):
    import cv2

    path = tiny / read_manifest(tiny)[0]["path"]
    capture = cv2.VideoCapture(str(path))
    frames = []
    while True:
        ok, frame = capture.read()
        if not ok:
            break
        frames.append(frame[..., ::-1])  # BGR -> RGB
    capture.release()
    expected = decode(path)
    assert len(frames) == len(expected) == 16
    diff = np.abs(np.stack(frames).astype(int) - expected).max()
    assert diff == 0, f"OpenCV and PyAV differ by up to {diff}"


def test_lists_agree_with_the_config(tiny):
    rows = read_manifest(tiny)
    assert (tiny / "classes.txt").read_text().splitlines() == ["disc_right", "disc_left", "disc_up"]
    for split, per_class in (("train", 2), ("test", 1)):
        labels = [int(r["label"]) for r in rows if r["split"] == split]
        assert np.bincount(labels).tolist() == [per_class] * 3
        listed = [line.split() for line in (tiny / f"{split}.txt").read_text().splitlines()]
        assert listed == [[r["path"], r["label"]] for r in rows if r["split"] == split]
    for r in rows:
        assert r["id"] == r["path"].removesuffix(".mkv")
        assert r["path"].startswith(f"videos/{CLASSES[int(r['label'])][0]}/")
    assert len({r["id"] for r in rows}) == len(rows) == 9
    record = json.loads((tiny / "synth_config.json").read_text())
    assert record["seed"] == 3 and record["size"] == 48 and "datp_version" in record
    assert not (tiny / "ground_truth.json").exists()


def test_same_config_gives_identical_files(tiny, tmp_path):
    again = generate(TINY, tmp_path / "again", progress=False)
    files = sorted(p.relative_to(tiny) for p in tiny.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file())
    differing = [str(f) for f in files if (tiny / f).read_bytes() != (again / f).read_bytes()]
    assert not differing, f"files differ between two runs: {differing}"
    # And the seed matters: another seed gives other frames.
    other, _ = render_video(replace(TINY, seed=4), label=0, split="train", index=0)
    same, _ = render_video(TINY, label=0, split="train", index=0)
    assert np.abs(other.astype(int) - same).max() > 0


def test_rerun_reuses_a_finished_set_and_refuses_another_config(tiny, tmp_path):
    root = generate(TINY, tmp_path / "set", progress=False)
    video = root / read_manifest(root)[0]["path"]
    stamp = video.stat().st_mtime_ns
    generate(TINY, root, progress=False)
    assert video.stat().st_mtime_ns == stamp, "a finished set was written again"

    video.unlink()  # an incomplete set is completed
    generate(TINY, root, progress=False)
    assert video.read_bytes() == (tiny / video.relative_to(root)).read_bytes()

    with pytest.raises(ValueError, match="differs in seed, size"):
        generate(replace(TINY, seed=9, size=40), root, progress=False)


def test_untrimmed_ground_truth_matches_the_frames(tmp_path):
    cfg = replace(TINY, num_classes=2, videos_per_class_train=2, videos_per_class_test=1, size=32,
                  fps=5, untrimmed=True, untrimmed_duration_s=(6.0, 8.0), max_events=3)
    root = generate(cfg, tmp_path, progress=False)
    events = json.loads((root / "events.json").read_text())
    truth = json.loads((root / "ground_truth.json").read_text())["database"]
    assert set(truth) == set(events)
    event_s = cfg.event_frames / cfg.fps  # 2 frames = 0.4 s
    for video_id, info in events.items():
        gt = truth[video_id]
        assert gt["subset"] == {"train": "training", "test": "validation"}[info["split"]]
        assert len(decode(root / f"{video_id}.mkv")) == info["num_frames"]
        assert gt["duration"] == pytest.approx(info["num_frames"] / cfg.fps)
        assert 6.0 - 0.1 <= gt["duration"] <= 8.0 + 0.1
        assert 1 <= len(gt["annotations"]) <= 3
        ends = [0.0]
        for annotation, event in zip(gt["annotations"], info["events"], strict=True):
            start, end = annotation["segment"]
            assert annotation["label"] == info["class_name"] == CLASSES[info["label"]][0]
            assert (start, end) == pytest.approx((event["start_frame"] / cfg.fps,
                                                  event["end_frame"] / cfg.fps))
            assert end - start == pytest.approx(event_s)
            assert ends[-1] <= start and end <= gt["duration"] + 1e-9
            ends.append(end)


def test_place_events_keeps_events_apart_and_inside():
    rng = np.random.default_rng(0)
    counts = set()
    for _ in range(300):
        T, E = int(rng.integers(20, 80)), int(rng.integers(2, 6))
        count = int(rng.integers(1, min(4, T // (2 * E)) + 1))
        events = _place_events(T, E, count, rng)
        counts.add(len(events))
        assert len(events) == count
        assert all(e - s == E and 0 <= s and e <= T for s, e in events), events
        gap = E if count > 1 else 0
        assert all(b[0] - a[1] >= gap for a, b in zip(events, events[1:])), events
        stretches = _free_stretches(T, events, E)
        busy = np.zeros(T, int)
        for s, e in events + stretches:
            busy[s:e] += 1
        assert busy.max() <= 1, f"overlap in {events} {stretches}"
        # Every free frame is covered except short leftovers of each gap.
        assert (busy == 0).sum() <= (count + 1) * max(2, E / 2), (events, stretches)
    assert counts == {1, 2, 3, 4}


def moving_mask(frames: np.ndarray, background: np.ndarray) -> np.ndarray:
    """(T, H, W) weights of how much each pixel differs from the static background."""
    return np.abs(frames.astype(np.float32) - background).max(-1) > 20


def centroids(mask: np.ndarray) -> np.ndarray:
    y, x = np.mgrid[0 : mask.shape[1], 0 : mask.shape[2]]
    area = mask.sum((1, 2))
    return np.stack([(mask * x).sum((1, 2)) / area, (mask * y).sum((1, 2)) / area], -1)  # (T, 2)


def orientation(mask: np.ndarray) -> np.ndarray:
    """Angle of each frame's principal axis (second moments), radians in (-pi/2, pi/2]."""
    y, x = np.mgrid[0 : mask.shape[1], 0 : mask.shape[2]]
    c = centroids(mask)
    dx, dy = x[None] - c[:, 0, None, None], y[None] - c[:, 1, None, None]
    mxx, myy, mxy = (mask * dx**2).sum((1, 2)), (mask * dy**2).sum((1, 2)), (mask * dx * dy).sum((1, 2))
    return 0.5 * np.arctan2(2 * mxy, mxx - myy)


def check_motion(motion: str, mask: np.ndarray, S: int, strength: float) -> float:
    """Assert that `mask` (T, H, W) shows `motion`; return the speed (pixels or radians per frame).

    As documented: over an event of T frames a translating shape covers 0.4 * S * min(1, T / 6)
    pixels and a bar turns pi / 2 * min(1, T / 6), times `strength`, each +-15% per event.
    """
    T = len(mask)
    amount = strength * min(1.0, T / 6)
    if motion in ("right", "left", "up", "down", "diagonal"):
        step = np.diff(centroids(mask), axis=0).mean(0)  # (dx, dy) per frame
        expected = {"right": (1, 0), "left": (-1, 0), "up": (0, -1), "down": (0, 1),
                    "diagonal": (0.7071, 0.7071)}[motion]
        speed = float(np.hypot(*step))
        cosine = float(np.dot(step, expected)) / speed
        assert cosine > 0.98, f"{motion}: centroid moved by {step} per frame"
        nominal = 0.4 * S * amount / T
        assert 0.83 * nominal < speed < 1.17 * nominal, f"{motion}: {speed} px/frame, nominal {nominal}"
        return speed
    if motion in ("expand", "contract"):
        radius = np.sqrt(mask.sum((1, 2)))  # a ring's area grows with its radius
        sign = 1 if motion == "expand" else -1
        assert (sign * np.diff(radius) > 0).all(), f"{motion}: sqrt(area) per frame {radius}"
        return float(abs(radius[-1] - radius[0]))
    assert motion == "rotate"
    turn = np.angle(np.exp(2j * np.diff(orientation(mask)))) / 2  # steps, wrapped mod pi
    nominal = np.pi / 2 * amount / T
    assert 0.83 * nominal < turn.mean() < 1.17 * nominal, f"rotate: steps {turn}, nominal {nominal}"
    assert (0.6 * nominal < turn).all() and (turn < 1.4 * nominal).all(), f"rotate: steps {turn}"
    return float(abs(turn).mean())


@pytest.mark.parametrize("label", range(len(CLASSES)))
def test_event_shows_the_class_motion_and_nothing_else_moves(label):
    cfg = replace(CLEAN, confuser_probability=0.0)
    frames, info = render_video(cfg, label=label, split="test", index=label)
    (event,) = info["events"]
    start, end = event["start_frame"], event["end_frame"]
    assert end - start == cfg.event_frames == 8
    still = np.ones(len(frames), bool)
    still[start:end] = False
    background = frames[still][0].astype(np.float32)
    assert (frames[still] == frames[still][0]).all(), "something moves outside the event"
    mask = moving_mask(frames[start:end], background)
    assert mask.sum((1, 2)).min() > 10, "the event is not visible in every event frame"
    check_motion(CLASSES[label][1], mask, cfg.size, 1.0)


def test_short_events_keep_within_the_flow_speed_limit():
    cfg = replace(CLEAN, duration_s=2.0, event_fraction=0.15, confuser_probability=0.0)  # 3 frames
    frames, info = render_video(cfg, label=0, split="test", index=0)
    (event,) = info["events"]
    start, end = event["start_frame"], event["end_frame"]
    background = frames[end % len(frames) if start == 0 else 0].astype(np.float32)
    speed = check_motion("right", moving_mask(frames[start:end], background), cfg.size, 1.0)
    assert speed <= 1.15 * cfg.size / 15, f"{speed} px/frame"


def test_difficulty_knobs_leave_the_timeline_and_event_alone():
    _, info = render_video(CLEAN, label=2, split="train", index=5)
    alone = replace(CLEAN, confuser_probability=0.0)
    base, base_info = render_video(alone, label=2, split="train", index=5)
    busy, busy_info = render_video(replace(alone, distractor_strength=1.0), label=2, split="train",
                                   index=5)
    assert busy_info == base_info
    (event,) = info["events"]
    assert base_info["events"] == info["events"]
    background = base[0 if event["start_frame"] > 0 else -1].astype(np.float32)
    event_mask = moving_mask(base[event["start_frame"] : event["end_frame"]], background)
    assert event_mask.sum() > 0
    # With distractors the event's shape is drawn at the same place (same opaque pixels).
    part = slice(event["start_frame"], event["end_frame"])
    core = event_mask & (np.abs(base[part].astype(int) - busy[part]).max(-1) == 0)
    assert core.sum() > 0.5 * event_mask.sum(), f"{core.sum()} of {event_mask.sum()} pixels agree"
    fewer, fewer_info = render_video(replace(CLEAN, confuser_probability=0.3), label=2,
                                     split="train", index=5)
    assert fewer_info["events"] == info["events"]
    assert {(c["start_frame"], c["end_frame"]) for c in fewer_info["confusers"]} <= \
           {(c["start_frame"], c["end_frame"]) for c in info["confusers"]}


@pytest.mark.parametrize("label", [0, 3, 5])
def test_confuser_is_a_weaker_motion_of_another_class(label):
    cfg = replace(CLEAN, confuser_probability=1.0, confuser_strength=0.6)
    frames, info = render_video(cfg, label=label, split="train", index=7)
    confuser = info["confuser_label"]
    assert confuser != label
    assert len(info["confusers"]) >= 2
    # The same video without confusers shows the bare background where they were.
    bare, _ = render_video(replace(cfg, confuser_probability=0.0), label=label, split="train", index=7)
    background = bare[info["confusers"][0]["start_frame"]].astype(np.float32)
    full = [c for c in info["confusers"] if c["end_frame"] - c["start_frame"] == cfg.event_frames]
    for part in full:
        mask = moving_mask(frames[part["start_frame"] : part["end_frame"]], background)
        check_motion(CLASSES[confuser][1], mask, cfg.size, 0.6)
    # Fainter: its peak contrast is confuser_strength times that of a real event of its class.
    real, real_info = render_video(replace(cfg, confuser_probability=0.0), label=confuser,
                                   split="test", index=0)
    (event,) = real_info["events"]
    real_peak = np.abs(real[event["start_frame"] : event["end_frame"]].astype(np.float32)
                       - real[0 if event["start_frame"] > 0 else -1]).max()
    part = full[0]
    peak = np.abs(frames[part["start_frame"] : part["end_frame"]] - background).max()
    assert peak / real_peak == pytest.approx(0.6, abs=0.03), f"contrast ratio {peak / real_peak}"


@pytest.mark.parametrize("change, field", [
    (dict(num_classes=9), "num_classes"), (dict(size=16), "size"), (dict(fps=7.5), "fps"),
    (dict(event_fraction=0.0), "event_fraction"), (dict(duration_s=0.5), "event lasts"),
    (dict(confuser_strength=0.0), "confuser_strength"),
    (dict(untrimmed=True, untrimmed_duration_s=(1.0, 2.0)), "untrimmed_duration_s"),
])
def test_bad_config_names_the_value(change, field):
    with pytest.raises(ValueError, match=field):
        replace(TINY, **change)


def test_cli_untrimmed_duration_and_max_events(tmp_path):
    """`datp synth --untrimmed --untrimmed-duration MIN,MAX --max-events K` reaches SynthConfig;
    a malformed range is a usage error (exit 2) naming the option."""
    from click.testing import CliRunner

    from datp.cli import main

    args = ["synth", "--out", str(tmp_path / "s"), "--untrimmed", "--classes", "2", "--train-per-class", "2",
            "--test-per-class", "1", "--size", "32", "--untrimmed-duration", "8,10", "--max-events", "2"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    events = json.loads((tmp_path / "s" / "events.json").read_text())
    assert len(events) == 6
    for vid, info in events.items():
        assert 8.0 <= info["duration_s"] <= 10.0, (vid, info["duration_s"])
        assert 1 <= len(info["events"]) <= 2, (vid, info["events"])
    bad = CliRunner().invoke(main, args[:-4] + ["--untrimmed-duration", "8"])
    assert bad.exit_code == 2 and "--untrimmed-duration" in bad.output
