"""TSN's test protocol (25 segments x 10 crops, scores averaged over crops) and strides in
seconds: the ten crops checked by hand and against torchvision's TenCrop, the protocol end to end,
and the frames a stride in seconds picks on videos of known frame rate."""

import json

import numpy as np
import pytest
import torch
import torchvision.transforms.v2 as T

from datp_testing import moving_texture, one_thread, run_cli, shared_data, write_video  # noqa: F401 (one_thread: an autouse fixture)
from datp.extract.backbones import build_backbone
from datp.extract.loader import FeatureConfig
from datp.extract.sampling import seconds_indices, segment_indices
from datp.extract.store import FeatureStore
from datp.extract.transforms import crop_views
from datp.io.decode import read_video

SMALL = ["--backbone", "resnet18", "--device", "cpu", "--workers", 0, "--quiet", "--streams", "rgb"]
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def ten_crops_by_hand(x: torch.Tensor, S: int) -> torch.Tensor:
    """TSN's GroupOverSample / torchvision's ten_crop: 4 corners + centre, then the same five of
    the mirrored image. (N, C, H, W) -> (N, 10, C, S, S)."""
    H, W = x.shape[-2:]
    top, left = round((H - S) / 2.0), round((W - S) / 2.0)  # torchvision center_crop
    def five(img):
        return [img[..., :S, :S], img[..., :S, W - S:], img[..., H - S:, :S], img[..., H - S:, W - S:],
                img[..., top:top + S, left:left + S]]
    return torch.stack(five(x) + five(x.flip(-1)), 1)


@pytest.mark.parametrize("H, W, S", [(9, 13, 5), (10, 15, 5), (240, 320, 224), (256, 340, 224), (7, 7, 7)])
def test_ten_crops_by_hand_and_torchvision(H, W, S):
    x = torch.rand(2, 3, H, W, generator=torch.Generator().manual_seed(H * W))
    got = crop_views(x, resize=None, crop=S, num_crops=10)
    assert got.shape == (2, 10, 3, S, S)
    torch.testing.assert_close(got, ten_crops_by_hand(x, S), rtol=0, atol=0)
    want = torch.stack(T.TenCrop(S)(x), 1)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert not torch.equal(got[:, 0], got[:, 3]) or H == W == S


def test_protocol_sets_its_fields():
    cfg = FeatureConfig(out="x.h5", protocol="tsn")
    assert (cfg.num_segments, cfg.num_crops) == (25, 10)
    with pytest.raises(ValueError, match="unknown protocol 'i3d'; choose from"):
        FeatureConfig(out="x.h5", protocol="i3d")
    with pytest.raises(ValueError, match="drop --stride"):
        FeatureConfig(out="x.h5", protocol="tsn", stride=4)


def test_protocol_conflicting_options_are_one_line(tmp_path):
    clip = write_video(tmp_path / "c.mkv", moving_texture(4, 72, 96))
    code, output = run_cli("extract-features", clip, "--out", tmp_path / "f.h5", "--protocol", "tsn",
                           "--segments", 5, *SMALL)
    assert code == 2 and "--protocol tsn sets --segments; drop them or the protocol" in output


@pytest.mark.slow
def test_tsn_protocol_end_to_end(tmp_path):
    """25 segments x 10 crops: logits are the mean over the ten views of the network's logits on
    crops the test takes by hand, per segment; recorded in the store."""
    frames = moving_texture(40, 72, 96, seed=4)
    clip = write_video(tmp_path / "c.mkv", frames)
    out = tmp_path / "tsn.h5"
    code, output = run_cli("extract-features", clip, "--out", out, "--protocol", "tsn",
                           "--resize", 64, "--input-size", 56, *SMALL)
    assert code == 0, output
    decoded, _ = read_video(clip)
    np.testing.assert_array_equal(decoded, frames)  # lossless clip
    starts = segment_indices(40, 25, 1, "test")
    x = torch.from_numpy(frames[starts]).permute(0, 3, 1, 2).float() / 255
    views = ten_crops_by_hand(T.functional.resize(x, 64, antialias=True), 56)  # (25, 10, 3, 56, 56)
    views = T.functional.normalize(views.flatten(0, 1), MEAN, STD)
    net = build_backbone("resnet18", seed=0).eval()
    with torch.no_grad():
        _, logits = net(views)
    want = logits.reshape(25, 10, -1).mean(1).numpy()
    with FeatureStore(out) as store:
        batch = store.load([0], streams=["rgb"])
        assert store.attrs["num_segments"] == 25 and store.attrs["crop"] == "ten-crop"
        assert store.attrs["protocol"] == "tsn"
        settings = json.loads(store.attrs["settings"])
        assert (settings["protocol"], settings["num_segments"], settings["num_crops"]) == ("tsn", 25, 10)
        assert json.loads(store.attrs["preprocess"])["crop"]["views"] == 10
    assert batch.frame[0].tolist() == starts.tolist()
    np.testing.assert_allclose(batch.logits["rgb"][0].numpy(), want, atol=1e-4)


def test_seconds_indices_formula():
    # 25 fps, 0.3 s = 7.5 frames: nearest frames to 0, 0.3, 0.6, ... s, half up
    assert seconds_indices(60, 0.3, 25.0).tolist() == [0, 8, 15, 23, 30, 38, 45, 53]
    # 29.97 fps, 1 s: no drift (a frame stride of 30 would reach 510 at k = 17; the time gives 509)
    got = seconds_indices(600, 1.0, 30000 / 1001)
    assert got[17] == 509 and got.tolist() == [int(np.floor(k * 30000 / 1001 + 0.5)) for k in range(len(got))]
    assert got[-1] <= 599 and len(got) == 21
    # the last start leaves room for a stack of L; shorter than one stack: the start 0
    assert seconds_indices(20, 0.2, 25.0, new_length=5).tolist() == [0, 5, 10, 15]
    assert seconds_indices(3, 1.0, 25.0, new_length=5).tolist() == [0]
    assert seconds_indices(10, 0.01, 25.0).tolist() == list(range(10))  # closer than a frame: once
    with pytest.raises(ValueError, match="no frame rate"):
        seconds_indices(10, 1.0, 0.0)


@pytest.mark.slow
@pytest.mark.parametrize("fps, seconds", [(25, 0.3), (30, 0.5)])
def test_stride_seconds_picks_the_frames_the_seconds_give(tmp_path, fps, seconds):
    frames = moving_texture(31, 72, 96, seed=fps)
    clip = write_video(tmp_path / "c.mkv", frames, fps=fps)
    out = tmp_path / "s.h5"
    code, output = run_cli("extract-features", clip, "--out", out, "--stride-seconds", seconds,
                           "--resize", 64, "--input-size", 56, *SMALL)
    assert code == 0, output
    want = [int(np.floor(k * (seconds * fps) + 0.5)) for k in range(40)]  # the documented formula
    want = [i for i in want if i <= 30]
    net = build_backbone("resnet18", seed=0).eval()
    x = T.functional.normalize(T.functional.center_crop(T.functional.resize(
        torch.from_numpy(frames[want]).permute(0, 3, 1, 2).float() / 255, 64, antialias=True), 56), MEAN, STD)
    with torch.no_grad():
        _, logits = net(x)
    with FeatureStore(out) as store:
        assert store.layout == "ragged" and store.fps[0] == pytest.approx(fps)
        assert store.attrs["stride_seconds"] == seconds
        assert json.loads(store.attrs["settings"])["stride_seconds"] == seconds
        batch = store.load([0], streams=["rgb"])
        assert store.length.tolist() == [len(want)]
    assert batch.frame[0, :len(want)].tolist() == want
    np.testing.assert_allclose(batch.logits["rgb"][0, :len(want)].numpy(), logits.numpy(), atol=1e-4)


def test_stride_seconds_needs_a_frame_rate(tmp_path):
    """Rawframe folders carry no frame rate: the video fails with the reason, pointing to --stride."""
    images = shared_data("clips", "mmaction2", "tests_data", "imgs")
    (tmp_path / "list.txt").write_text(f"{images} 5 0\n")
    out = tmp_path / "f.h5"
    code, output = run_cli("extract-features", tmp_path / "list.txt", "--out", out,
                           "--stride-seconds", 0.5, "--resize", 64, "--input-size", 56, *SMALL)
    assert code != 0
    failures = (tmp_path / "f.h5.failures.csv").read_text()
    assert "no frame rate" in failures and "--stride in frames" in failures
    code, output = run_cli("extract-features", tmp_path / "list.txt", "--out", tmp_path / "g.h5",
                           "--stride", 2, "--stride-seconds", 0.5, *SMALL)
    assert code == 2 and "not both" in output
