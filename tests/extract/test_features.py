"""extract-features end to end: features equal a direct torchvision computation, on-the-fly flow
equals stored flow, the store records its settings and sampling, failures, stride mode, shards +
merge and resume after a kill."""

import csv
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import torchvision.transforms.v2 as T
from torch import nn

from datp_testing import eval_resnet18, moving_texture, one_thread, run_cli, shared_data, write_video  # noqa: F401 (one_thread: an autouse fixture)
from datp.extract.backbones import build_backbone
from datp.extract.store import FeatureStore
from datp.io.decode import read_video

SMALL = ["--backbone", "resnet18", "--device", "cpu", "--quiet"]
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def tsn_test_starts(T_: int, N: int, L: int = 1) -> list[int]:
    """TSN test sampling as documented: segment k starts at int(tick / 2 + tick * k)."""
    span = T_ - L + 1
    if span < 1:
        return [0] * N
    tick = span / N
    return [int(tick / 2 + tick * k) for k in range(N)]


def rgb_input(frames: np.ndarray, resize: int, crop: int) -> torch.Tensor:
    """(n, H, W, 3) uint8 -> (n, 3, crop, crop): torchvision's ImageClassification steps on floats."""
    x = torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 255
    steps = T.Compose([T.Resize(resize, antialias=True), T.CenterCrop(crop), T.Normalize(MEAN, STD)])
    return steps(x)


def flow_input(stacks: np.ndarray, resize: int, crop: int) -> torch.Tensor:
    """(n, L, H, W, 2) uint8 flow -> (n, 2L, crop, crop): x1, y1, x2, ... as (q - 128) / 128."""
    n, L, H, W, _ = stacks.shape
    x = (torch.from_numpy(stacks).permute(0, 1, 4, 2, 3).reshape(n, 2 * L, H, W).float() - 128) / 128
    return T.Compose([T.Resize(resize, antialias=True), T.CenterCrop(crop)])(x)


def torchvision_taps(net: nn.Module, x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """A plain torchvision ResNet's conv map before avgpool, and its logits."""
    with torch.no_grad():
        conv = nn.Sequential(*list(net.children())[:-2])(x)  # (n, 512, h, w): up to layer4
        return conv.numpy(), net(x).numpy()


def assert_close_fp16(stored: np.ndarray, want: np.ndarray, what: str):
    """float16 storage: within half an fp16 step of the largest value (plus float32 noise)."""
    atol = np.abs(want).max() * 2.0 ** -11 + 1e-5
    diff = np.abs(stored.astype(np.float32) - want).max()
    assert diff <= atol, f"{what}: max |diff| {diff:.3g} > {atol:.3g}"


def store_arrays(path: Path) -> dict:
    """Every dataset of a store (read through links) and its attrs, except the creation time."""
    with h5py.File(path, "r") as f:
        arrays = {}
        f.visititems(lambda k, v: arrays.update({k: v[()]}) if isinstance(v, h5py.Dataset) else None)
        attrs = {k: v for k, v in f.attrs.items() if k != "created"}
    settings = json.loads(attrs.pop("settings"))
    settings.pop("out"), settings.pop("shard"), settings.pop("workers")
    return {"arrays": arrays, "attrs": attrs, "settings": settings}


def assert_same_store(a: Path, b: Path):
    a, b = store_arrays(a), store_arrays(b)
    assert str(a["attrs"]) == str(b["attrs"]) and a["settings"] == b["settings"]
    assert sorted(a["arrays"]) == sorted(b["arrays"])
    for key in a["arrays"]:
        np.testing.assert_array_equal(a["arrays"][key], b["arrays"][key], err_msg=key)


def per_video(path: Path) -> dict:
    """id -> every per-video array of a fixed-layout store."""
    with FeatureStore(path) as store:
        batch = store.load(range(len(store)), streams=store.streams)
        return {vid: {"t": batch.t[i], "frame": batch.frame[i], "done": store.done[i],
                      "num_frames": store.num_frames[i], "fps": store.fps[i],
                      **{f"{s}/conv": batch.conv[s][i] for s in store.streams},
                      **{f"{s}/logits": batch.logits[s][i] for s in store.streams}}
                for i, vid in enumerate(store.ids)}


# --- 1. features of a real clip equal a direct torchvision computation ---------------------------

@pytest.mark.parametrize("crops", [1, 10])
def test_real_clip_equals_torchvision(tmp_path, crops):
    clip = shared_data("clips", "mmaction2", "tests_data", "test.mp4")
    net = eval_resnet18(7)
    weights = tmp_path / "resnet18-test.pth"
    torch.save(net.state_dict(), weights)
    out = tmp_path / "features.h5"
    code, output = run_cli("extract-features", clip, "--out", out, *SMALL, "--weights", weights,
                           "--streams", "rgb", "--segments", 3, "--resize", 128,
                           "--input-size", 112, "--workers", 0,
                           *(["--ten-crop"] if crops == 10 else []))
    assert code == 0, output

    frames, info = read_video(clip)  # RGB is decoded at the source size (FeatureConfig.short_side 0)
    assert len(frames) == 300
    index = tsn_test_starts(300, 3)
    assert index == [50, 150, 250]  # tick = 100: the centres of three equal parts
    x = rgb_input(frames[index], 128, 112)  # (3, 3, 112, 112)
    if crops == 1:
        conv, logits = torchvision_taps(net, x)
    else:  # ten views; the maps of the mirrored five are mirrored back before averaging
        views = torch.stack(T.functional.ten_crop(T.functional.resize(
            torch.from_numpy(frames[index]).permute(0, 3, 1, 2).float() / 255, 128,
            antialias=True), 112), 1)
        views = T.functional.normalize(views, MEAN, STD).flatten(0, 1)  # (3*10, 3, 112, 112)
        conv, logits = torchvision_taps(net, views)
        conv = conv.reshape(3, 10, 512, 4, 4)
        conv = np.concatenate([conv[:, :5], conv[:, 5:, ..., ::-1]], 1).mean(1)
        logits = logits.reshape(3, 10, -1).mean(1)
    with FeatureStore(out) as store:
        batch = store.load([0], streams=["rgb"])
        assert store.ids == ["test"] and store.conv_shape("rgb") == (512, 4, 4)
        assert store.num_frames.tolist() == [300] and store.fps[0] == pytest.approx(30.0)
        assert store.attrs["weights"] == json.dumps({"rgb": "resnet18-test.pth"})
        sha = hashlib.sha256(weights.read_bytes()).hexdigest()
        assert store.attrs["weights_sha256"] == json.dumps({"rgb": sha})
        assert store.attrs["crop"] == ("center" if crops == 1 else "ten-crop")
        assert store.attrs["input_size"] == 112 and store.attrs["resize"] == 128
    with h5py.File(out, "r") as f:
        stored_conv = f["rgb/conv"][0]  # float16, as stored
    assert batch.frame[0].tolist() == index
    np.testing.assert_allclose(batch.t[0].numpy(), (np.array(index) + 0.5) / 300, rtol=1e-6)
    assert_close_fp16(stored_conv, conv, "conv")
    diff = np.abs(batch.logits["rgb"][0].numpy() - logits).max()
    assert diff <= 1e-4 * np.abs(logits).max(), f"logits: max |diff| {diff:.3g}"


# --- 2-4. flow: on the fly equals stored; settings and sampling are recorded ---------------------

# The flow tests share one fixture that runs extract-flow twice and extract-features three times
# (three spawned worker processes): 10-20 s on two shared cores, hence marked slow.
FLOW = ["--flow-algorithm", "dis", "--segments", 3, "--resize", 64, "--input-size", 56]


@pytest.fixture(scope="module")
def flow_run(tmp_path_factory):
    """One real (rotated, variable frame rate) and one synthetic clip, features with rgb+flow
    computed on the fly, from an extract-flow h5 store and from its jpg folders."""
    tmp = tmp_path_factory.mktemp("flow")
    fire = shared_data("stress", "fire2.mp4")
    texture = write_video(tmp / "texture.mkv", moving_texture(12, 72, 96, shift=(3, -2)))
    sources = [fire, texture]
    runs = {}
    for fmt in ("h5", "jpg"):
        flows = tmp / ("flows.h5" if fmt == "h5" else "flows")
        code, output = run_cli("extract-flow", *sources, "--out", flows, "--format", fmt,
                               "--algorithm", "dis", "--short-side", 64, "--quiet")
        assert code == 0, output
        runs[fmt] = (tmp / f"features_{fmt}.h5", ["--flows", flows])
    runs["fly"] = (tmp / "features_fly.h5", ["--flow-short-side", 64])
    for name, (out, extra) in runs.items():
        workers = 1 if name == "h5" else 0  # one run through a worker process (spawned)
        code, output = run_cli("extract-features", *sources, "--out", out, *SMALL, *FLOW, *extra,
                               "--workers", workers)
        assert code == 0, output
    return {name: out for name, (out, _) in runs.items()} | {"sources": sources, "tmp": tmp}


@pytest.mark.slow
def test_on_the_fly_flow_equals_stored_flow(flow_run):
    fly, stored = per_video(flow_run["fly"]), per_video(flow_run["h5"])
    assert sorted(fly) == ["fire2", "texture"]
    for vid in fly:
        for key, value in fly[vid].items():
            np.testing.assert_array_equal(np.asarray(stored[vid][key]), np.asarray(value),
                                          err_msg=f"{vid} {key}")
        assert fly[vid]["flow/conv"].abs().max() > 0  # real features, not zeros


@pytest.mark.slow
def test_jpg_flow_is_close_to_stored_flow(flow_run):
    """jpg folders hold flow as quality-95 JPEG, which is lossy: the features are close, not
    equal. The exact part (the jpg reader feeds the same pipeline) is checked on the inputs."""
    from datp.extract.loader import FeatureConfig, VideoItems, flow_settings
    from datp.io.datasets import load_dataset

    jpg, stored = per_video(flow_run["jpg"]), per_video(flow_run["h5"])
    for vid in stored:
        assert jpg[vid]["frame"].tolist() == stored[vid]["frame"].tolist()
        for key in ("rgb/conv", "rgb/logits"):  # RGB does not go through the jpgs
            np.testing.assert_array_equal(jpg[vid][key].numpy(), stored[vid][key].numpy())
        for key in ("flow/conv", "flow/logits"):
            a, b = jpg[vid][key], stored[vid][key]
            rel = ((a - b).norm() / b.norm()).item()
            assert rel < 0.03, f"{vid} {key}: relative difference {rel:.3g}"  # seen: <= 0.013
    # the jpg path's network input equals the jpg images, read and preprocessed by hand
    import cv2

    folder = flow_run["tmp"] / "flows"
    cfg = FeatureConfig(out="unused.h5", backbone="resnet18", streams=("flow",), num_segments=3,
                        flows=str(folder), resize=64, input_size=56, workers=0)
    dataset = load_dataset(flow_run["sources"])
    items = VideoItems(dataset.records, cfg, flow_settings(cfg))
    for i, record in enumerate(dataset.records):
        item = items[i]
        assert item["ok"], item.get("reason")
        pairs = np.minimum(item["frame"][:, None] + np.arange(5), item["num_frames"] - 2)
        stacks = np.stack([[np.stack([cv2.imread(str(folder / record.id / f"flow_{c}_{j + 1:05d}.jpg"),
                                                 cv2.IMREAD_GRAYSCALE) for c in "xy"], -1)
                            for j in row] for row in pairs])
        want = flow_input(stacks, 64, 56)
        diff = (item["flow"][:, 0] - want).abs().max().item()
        assert diff < 1e-6, f"{record.id}: jpg flow input differs by {diff}"


@pytest.mark.slow
def test_store_records_settings(flow_run):
    with FeatureStore(flow_run["fly"]) as store:
        a = store.attrs
        assert a["datp_schema"] == 1 and a["datp_kind"] == "features" and a["layout"] == "fixed"
        assert a["backbone"] == "resnet18" and a["num_segments"] == 3
        assert json.loads(a["weights"]) == {"rgb": "random", "flow": "random"}
        assert json.loads(a["weights_sha256"]) == {"rgb": "random", "flow": "random"}
        assert json.loads(a["new_length"]) == {"rgb": 1, "flow": 5}
        flow = json.loads(a["flow"])
        assert (flow["source"], flow["algorithm"], flow["preset"], flow["bound"],
                flow["short_side"]) == ("on-the-fly", "dis", "medium", 20.0, 64)
        assert json.loads(a["class_names"]) == [] and store.labels.tolist() == [-1, -1]
        import datp

        assert a["datp_version"] == datp.__version__
        assert a["input_size"] == 56 and a["crop"] == "center"
        models = json.loads(a["models"])
        assert models["flow"]["in_channels"] == 10 and models["rgb"]["seed"] == 0
        settings = json.loads(a["settings"])
        assert settings["flow_algorithm"] == "dis" and settings["num_segments"] == 3
    with FeatureStore(flow_run["h5"]) as store:
        flow = json.loads(store.attrs["flow"])
        assert flow["source"].endswith("flows.h5") and flow["algorithm"] == "dis"
        assert flow["preset"] == "medium" and flow["short_side"] == 64


@pytest.mark.slow
def test_flow_segments_and_their_rgb_frame(flow_run):
    """With flow, starts are TSN test starts over the T - 1 pairs (L = 5); the RGB frame of a
    segment is the middle of its stack, start + L // 2."""
    frames, _ = read_video(flow_run["sources"][0])  # fire2: 25 frames, upright, RGB at its own size
    T_ = len(frames)
    starts = tsn_test_starts(T_ - 1, 3, 5)
    with FeatureStore(flow_run["fly"]) as store:
        i = store.ids.index("fire2")
        batch = store.load([i], streams=["rgb"])
        assert store.num_frames[i] == T_ == 25
    assert batch.frame[0].tolist() == starts == [3, 10, 16]  # tick = 20 / 3
    np.testing.assert_allclose(batch.t[0].numpy(), (np.array(starts) + 2.5) / (T_ - 1), rtol=1e-6)
    net = build_backbone("resnet18", seed=0).eval()  # --weights random: seed 0
    conv, logits = net(rgb_input(frames[np.array(starts) + 2], 64, 56))
    assert_close_fp16(batch.conv["rgb"][0].numpy(), conv.detach().numpy(), "rgb conv")
    np.testing.assert_allclose(batch.logits["rgb"][0].numpy(), logits.detach().numpy(), atol=1e-4)


def test_short_video_sampling(tmp_path):
    """3 frames, 4 segments. RGB alone: TSN starts [0, 1, 1, 2]. With flow: 2 pairs < L = 5, so
    every start is 0, its stack repeats the last pair, and its RGB frame is min(0 + 2, T - 1) = 2."""
    frames = moving_texture(3, 72, 96, seed=3)
    clip = write_video(tmp_path / "short.mkv", frames)
    common = [*SMALL, "--segments", 4, "--resize", 64, "--input-size", 56, "--workers", 0]
    assert run_cli("extract-features", clip, "--out", tmp_path / "rgb.h5", "--streams", "rgb",
                   *common)[0] == 0
    assert run_cli("extract-features", clip, "--out", tmp_path / "both.h5", "--flow-short-side", 0,
                   "--flow-algorithm", "dis", *common)[0] == 0
    net = build_backbone("resnet18", seed=0).eval()
    with FeatureStore(tmp_path / "rgb.h5") as store:
        batch = store.load([0], streams=["rgb"])
    assert batch.frame[0].tolist() == tsn_test_starts(3, 4) == [0, 1, 1, 2]
    np.testing.assert_allclose(batch.t[0].numpy(), (np.array([0, 1, 1, 2]) + 0.5) / 3)
    with FeatureStore(tmp_path / "both.h5") as store:
        both = store.load([0], streams=["rgb", "flow"])
    assert both.frame[0].tolist() == [0, 0, 0, 0]
    assert both.t[0].tolist() == [1.0] * 4  # (0 + 5/2) / 2 pairs, clipped to 1
    # flow frames are decoded at the source size (--flow-short-side 0); frame 2 for every segment
    with torch.no_grad():
        conv, logits = net(rgb_input(np.repeat(frames[2:3], 4, 0), 64, 56))
    np.testing.assert_allclose(both.logits["rgb"][0].numpy(), logits.numpy(), atol=1e-4)
    assert (both.logits["flow"][0] == both.logits["flow"][0, :1]).all()  # four equal stacks


# --- 8. failures are recorded, the rest is done ---------------------------------------------------

def test_corrupt_and_empty_videos_fail_alone(tmp_path):
    stress = shared_data("stress")
    sources = [stress / "result.webm", stress / "corrupted.mp4", stress / "video_90.mov"]
    out = tmp_path / "features.h5"
    args = [*sources, "--out", out, *SMALL, "--streams", "rgb", "--segments", 3, "--resize", 64,
            "--input-size", 56, "--workers", 0]
    code, output = run_cli("extract-features", *args)
    assert code == 3, output  # documented: some videos failed
    assert "1 done, 0 already done, 2 failed" in output and "features.h5.failures.csv" in output
    with open(tmp_path / "features.h5.failures.csv", newline="") as f:
        rows = {row["id"]: row for row in csv.DictReader(f)}
    assert sorted(rows) == ["corrupted", "result"]
    assert "empty file" in rows["result"]["reason"]
    assert "corrupt stream" in rows["corrupted"]["reason"]
    assert rows["result"]["path"] == str(sources[0])
    with FeatureStore(out) as store:
        assert store.ids == ["result", "corrupted", "video_90"]
        assert store.done.tolist() == [False, False, True]
        assert store.num_frames.tolist()[2] == 3
        first = store.load([2], streams=["rgb"])
    # a rerun retries only the failures; the finished video stays in the store, unchanged
    code, output = run_cli("extract-features", *args)
    assert code == 3 and "0 done, 1 already done, 2 failed" in output
    with FeatureStore(out) as store:
        assert store.done.tolist() == [False, False, True]
        again = store.load([2], streams=["rgb"])
    assert torch.equal(first.conv["rgb"], again.conv["rgb"])


# --- 9. stride mode ---------------------------------------------------------------------------------

def test_stride_mode_writes_ragged_rows(tmp_path):
    root = tmp_path / "videos"
    clips = {"long": moving_texture(14, 72, 96, seed=1), "short": moving_texture(9, 72, 96, seed=2)}
    for name, frames in clips.items():
        write_video(root / name / f"{name}.mkv", frames)
    common = [*SMALL, "--stride", 4, "--resize", 64, "--input-size", 56, "--workers", 0]
    out = tmp_path / "stride.h5"
    assert run_cli("extract-features", root, "--out", out, "--streams", "rgb", *common)[0] == 0
    both = tmp_path / "both.h5"
    assert run_cli("extract-features", root, "--out", both, "--flow-short-side", 0,
                   "--flow-algorithm", "dis", *common)[0] == 0
    net = build_backbone("resnet18", seed=0).eval()
    with FeatureStore(out) as store:
        assert store.layout == "ragged" and store.attrs["stride"] == 4
        assert store.ids == ["long/long", "short/short"]
        # starts 0, S, 2S, ... up to T - 1: N = (T - 1) // S + 1
        assert store.length.tolist() == [(14 - 1) // 4 + 1, (9 - 1) // 4 + 1] == [4, 3]
        batch = store.load([0, 1], streams=["rgb"])
        assert batch.mask.tolist() == [[True] * 4, [True] * 3 + [False]]
        assert batch.frame[0].tolist() == [0, 4, 8, 12] and batch.frame[1, :3].tolist() == [0, 4, 8]
        np.testing.assert_allclose(batch.t[0].numpy(), (np.array([0, 4, 8, 12]) + 0.5) / 14)
        frames, _ = read_video(root / "short" / "short.mkv")  # RGB at the source size
        with torch.no_grad():
            _, logits = net(rgb_input(frames[[0, 4, 8]], 64, 56))
        np.testing.assert_allclose(batch.logits["rgb"][1, :3].numpy(), logits.numpy(), atol=1e-4)
        assert not batch.logits["rgb"][1, 3].any()
    with FeatureStore(both) as store:
        # flow: over the T - 1 pairs with L = 5, N = (T - 1 - 5) // S + 1
        assert store.length.tolist() == [(13 - 5) // 4 + 1, (8 - 5) // 4 + 1] == [3, 1]
        batch = store.load([0, 1], streams=["rgb", "flow"])
        assert batch.frame[0].tolist() == [0, 4, 8]
        np.testing.assert_allclose(batch.t[0].numpy(), (np.array([0, 4, 8]) + 2.5) / 13)


# --- 7. shards + merge equal one run ------------------------------------------------------------------

def test_shards_then_merge_equal_one_run(tmp_path, video_dir):
    # batch = segments: every forward holds one video, so batches are alike in every run
    common = [*SMALL, "--segments", 3, "--batch-size", 3, "--resize", 64, "--input-size", 56,
              "--flow-algorithm", "dis", "--flow-short-side", 0, "--workers", 0]
    assert run_cli("extract-features", video_dir, "--out", tmp_path / "one.h5", *common)[0] == 0
    for i in range(3):
        code, output = run_cli("extract-features", video_dir, "--out", tmp_path / "f.h5",
                               "--shard", f"{i}/3", *common)
        assert code == 0, output
    shards = sorted(tmp_path.glob("f.shard*of3.h5"))
    assert len(shards) == 3
    one = per_video(tmp_path / "one.h5")
    assert len(one) == 5
    for copy in ([], ["--copy"]):
        merged = tmp_path / f"merged{len(copy)}.h5"
        code, output = run_cli("merge", *shards, "--out", merged, *copy)
        assert code == 0 and "merged 5 videos from 3 stores" in output, output
        got = per_video(merged)
        assert sorted(got) == sorted(one)
        for vid in one:
            for key in one[vid]:
                np.testing.assert_array_equal(np.asarray(got[vid][key]), np.asarray(one[vid][key]),
                                              err_msg=f"{vid} {key}")
        with FeatureStore(merged) as store, FeatureStore(tmp_path / "one.h5") as ref:
            skip = ("created", "settings", "index_only")
            assert {k: v for k, v in store.attrs.items() if k not in skip} == \
                {k: v for k, v in ref.attrs.items() if k not in skip}
            assert sorted(zip(store.ids, store.labels.tolist())) == sorted(zip(ref.ids, ref.labels.tolist()))
            assert store.class_names == ref.class_names == ["left", "right"]  # the folder's classes
    for shard in shards:
        shard.unlink()
    assert sorted(per_video(tmp_path / "merged1.h5")) == sorted(one)  # --copy is self-contained


# --- 6. resume after a kill -------------------------------------------------------------------------

def _start(args, cwd):
    return subprocess.Popen([sys.executable, "-m", "datp", "extract-features", *map(str, args)],
                            cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True, env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.mark.slow
def test_kill_9_then_resume_equals_an_uninterrupted_run(tmp_path):
    videos = tmp_path / "videos"
    for i in range(8):
        write_video(videos / "c" / f"v{i}.mkv", moving_texture(14, 72, 96, seed=i))
    # TV-L1 (opencv preset) makes each video take a while, so kills land mid-run
    args = [videos, *SMALL, "--segments", 3, "--batch-size", 3, "--resize", 64,
            "--input-size", 56, "--flow-preset", "opencv", "--flow-short-side", 0,
            "--workers", 0]
    reference = tmp_path / "ref.h5"
    code, output = run_cli("extract-features", *args, "--out", reference)
    assert code == 0, output

    out = tmp_path / "killed.h5"
    parts = tmp_path / "killed.h5.parts"
    killed_with = []
    for extra in (0.0, 0.15):  # once as soon as a video is done, once a moment after the next
        before = len(list(parts.glob("*.h5")))
        proc = _start([*args, "--out", out], tmp_path)
        deadline = time.time() + 120
        while time.time() < deadline and len(list(parts.glob("*.h5"))) <= before and proc.poll() is None:
            time.sleep(0.02)
        time.sleep(extra)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        killed_with.append(len(list(parts.glob("*.h5"))))
        if out.exists():  # whatever state it was killed in, the store opens and reads
            with FeatureStore(out, allow_unfinished=True) as store:
                done = store.indices()
                batch = store.load(done, streams=["rgb", "flow"])
                assert batch.mask.sum() == 3 * len(done)
                if len(done):
                    assert batch.conv["flow"].abs().amax((1, 2, 3, 4)).min() > 0
    assert 0 < killed_with[0] < 8 and killed_with[1] < 8, f"parts at the kills: {killed_with}"
    proc = _start([*args, "--out", out], tmp_path)
    assert proc.wait() == 0, proc.stderr.read().decode()
    assert not parts.exists()
    assert_same_store(out, reference)
    with h5py.File(out, "r") as f:  # self-contained at the end
        assert not f["rgb/conv"].is_virtual and not f.attrs["index_only"]
