"""Features from a torchvision weights file equal torchvision's own eval pipeline
(Resize(256, antialias=True) + CenterCrop(224) + Normalize) on the same decoded frames, on clips
that need resizing up (320x240 UCF101/mmaction2, 560x240 HMDB51) and down (480x360), and on
340x256; the transform is recorded. Decoding at a reduced size first (--short-side 256, the old
behaviour) is shown to break that agreement, so the comparison can fail."""

import json

import numpy as np
import pytest
import torch
import torchvision
import torchvision.transforms.v2 as T
from torch import nn

from datp_testing import eval_resnet18, one_thread, run_cli, shared_data  # noqa: F401 (one_thread: an autouse fixture)
from datp.extract.store import FeatureStore
from datp.io.decode import read_video

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CLIPS = {  # (path under shared/data, width x height)
    "v_SoccerJuggling_g23_c01": (("clips", "torchvision", "v_SoccerJuggling_g23_c01.avi"), (320, 240)),
    "test_avi": (("clips", "mmaction2", "tests_data", "test.avi"), (320, 240)),
    "RATRACE_wave_f_nm_np1_fr_goo_37": (("clips", "torchvision", "RATRACE_wave_f_nm_np1_fr_goo_37.avi"), (560, 240)),
    "v_ZNVhz7ctTq0": (("clips", "misc", "v_ZNVhz7ctTq0.mp4"), (480, 360)),
    "test": (("clips", "mmaction2", "tests_data", "test.mp4"), (340, 256)),
}
SEGMENTS = 2


def torchvision_eval(frames: np.ndarray) -> torch.Tensor:
    """torchvision's ImageClassification eval steps, written out by the test, on float frames."""
    x = torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 255  # (n, 3, H, W) in [0, 1]
    steps = T.Compose([T.Resize(256, interpolation=T.InterpolationMode.BILINEAR, antialias=True),
                       T.CenterCrop(224), T.Normalize(MEAN, STD)])
    return steps(x)


def conv_maps(net: nn.Module, x: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return nn.Sequential(*list(net.children())[:-2])(x).numpy()  # (n, 512, 7, 7): up to layer4


def tsn_starts(T_: int, N: int) -> list[int]:
    tick = T_ / N
    return [int(tick / 2 + tick * k) for k in range(N)]


@pytest.fixture(scope="module")
def weights_and_clips(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pre")
    clips = {}
    for name, (parts, size) in CLIPS.items():
        path = shared_data(*parts)
        link = tmp / "clips" / f"{name}{path.suffix}"  # unique ids (two clips are called test)
        link.parent.mkdir(exist_ok=True)
        link.symlink_to(path)
        clips[name] = (link, size)
    net = eval_resnet18(3)
    weights = tmp / "resnet18-7class.pth"
    torch.save(net.state_dict(), weights)
    return tmp, net, weights, clips


def _extract(tmp, weights, clips, out, *extra):
    code, output = run_cli("extract-features", *[p for p, _ in clips.values()], "--out", out,
                           "--backbone", "resnet18", "--weights", weights, "--streams", "rgb",
                           "--segments", SEGMENTS, "--device", "cpu", "--workers", 0, "--quiet",
                           *extra)
    assert code == 0, output


def _relative_errors(out, net, clips) -> dict:
    errors = {}
    with FeatureStore(out) as store:
        for name, (path, size) in clips.items():
            frames, info = read_video(path)
            assert (info.width, info.height) == size
            index = tsn_starts(len(frames), SEGMENTS)
            want = conv_maps(net, torchvision_eval(frames[index]))
            i = store.ids.index(name)
            batch = store.load([i], streams=["rgb"])
            assert batch.frame[0].tolist() == index
            got = batch.conv["rgb"][0].numpy()
            errors[name] = float(np.abs(got - want).max() / np.abs(want).max())
    return errors


@pytest.mark.slow
def test_features_equal_torchvision_eval_pipeline(weights_and_clips):
    tmp, net, weights, clips = weights_and_clips
    out = tmp / "features.h5"
    _extract(tmp, weights, clips, out)  # defaults: --resize 256 --input-size 224, source-size decoding
    errors = _relative_errors(out, net, clips)
    print("relative max |diff| of conv maps to torchvision's pipeline:", errors)
    bad = {k: v for k, v in errors.items() if v > 1e-3}
    assert not bad, f"max relative difference to torchvision's pipeline > 1e-3: {bad} (all: {errors})"
    with FeatureStore(out) as store:
        pre = json.loads(store.attrs["preprocess"])
    assert pre["library"] == "torchvision.transforms.v2.functional"
    assert pre["torchvision"] == torchvision.__version__
    assert pre["resize"] == {"op": "resize", "size": 256, "edge": "short side",
                             "interpolation": "bilinear", "antialias": True, "dtype": "float32"}
    assert pre["crop"]["op"] == "center_crop" and pre["crop"]["size"] == 224
    assert pre["rgb"]["decode"] == "source size"
    assert pre["rgb"]["normalize"] == {"mean": list(MEAN), "std": list(STD)}


@pytest.mark.slow
def test_decoder_resize_breaks_the_agreement(weights_and_clips):
    """The old path (swscale shrinking to short side 256 inside the decoder, then resize) is what
    the comparison above rejects: on the clips that need resizing it differs by more than 1e-3."""
    tmp, net, weights, clips = weights_and_clips
    chosen = {k: clips[k] for k in ("v_SoccerJuggling_g23_c01", "v_ZNVhz7ctTq0")}
    out = tmp / "decoder_resized.h5"
    _extract(tmp, weights, chosen, out, "--short-side", 256)
    errors = _relative_errors(out, net, chosen)
    print("with --short-side 256 (decoder resize):", errors)
    assert min(errors.values()) > 1e-3, errors
    with FeatureStore(out) as store:
        assert "swscale area" in json.loads(store.attrs["preprocess"])["rgb"]["decode"]
