"""Rawframes into extract-features: RGB from `img_*.jpg` and flow from another tool's jpgs (in the
frame folders, or --flows DIR without datp's settings file), on mmaction2's own test data; the
list's offset, frame counts, labels and the flow bound are kept and recorded."""

import json
import shutil

import cv2
import numpy as np
import pytest
import torch
import torchvision.transforms.v2 as T

from datp_testing import moving_texture, one_thread, run_cli, shared_data, write_video  # noqa: F401 (one_thread: an autouse fixture)
from datp.extract.backbones import build_backbone
from datp.extract.loader import FeatureConfig, VideoItems, flow_settings
from datp.extract.sampling import segment_indices
from datp.extract.store import FeatureStore
from datp.io.datasets import load_dataset

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
SMALL = ["--backbone", "resnet18", "--device", "cpu", "--workers", 0, "--quiet", "--resize", 128,
         "--input-size", 112]


def mm(*parts):
    return shared_data("clips", "mmaction2", "tests_data", *parts)


def rgb_reference(numbers) -> torch.Tensor:
    """The test's own reading of img_<n>.jpg (OpenCV, BGR -> RGB) and torchvision's eval steps."""
    frames = np.stack([cv2.imread(str(mm("imgs", f"img_{n:05d}.jpg")))[..., ::-1] for n in numbers])
    x = torch.from_numpy(frames.copy()).permute(0, 3, 1, 2).float() / 255
    return T.Compose([T.Resize(128, antialias=True), T.CenterCrop(112), T.Normalize(MEAN, STD)])(x)


def flow_reference(numbers) -> torch.Tensor:
    """(N, L) image numbers -> (N, 2L, 112, 112): x_<n>.jpg / y_<n>.jpg interleaved, (q - 128) / 128."""
    stacks = np.stack([[np.stack([cv2.imread(str(mm("imgs", f"{c}_{n:05d}.jpg")), cv2.IMREAD_GRAYSCALE)
                                  for c in "xy"], 0) for n in row] for row in numbers])  # (N, L, 2, H, W)
    N, L, _, H, W = stacks.shape
    x = (torch.from_numpy(stacks).reshape(N, 2 * L, H, W).float() - 128) / 128
    return T.Compose([T.Resize(128, antialias=True), T.CenterCrop(112)])(x)


@pytest.mark.parametrize("name, fmt, offset", [("rawframe_test_list.txt", "auto", 0),
                                               ("rawframe_test_list_with_offset.txt", "rawframes-offset", 2)])
def test_rawframe_inputs_are_the_listed_images(name, fmt, offset):
    """Segment inputs are the listed frames: T = total_frames (5), frame i is img_{offset + 1 + i};
    the flow pairs are those of the folder from the offset on (5 - offset), capped at T - 1 = 4."""
    dataset = load_dataset(mm("annotations", name), root=mm(), list_format=fmt)
    L = 2
    cfg = FeatureConfig(out="unused.h5", backbone="resnet18", num_segments=3, new_length=L,
                        resize=128, input_size=112, workers=0)
    flow = flow_settings(cfg, dataset.records)
    assert flow["source"] == "rawframes" and flow["algorithm"] == "external" and flow["bound"] == 20.0
    assert (flow["layout"]["x"], flow["layout"]["y"], flow["layout"]["start"]) == ("x_", "y_", 1)
    item = VideoItems(dataset.records, cfg, flow)[0]
    assert item["ok"], item.get("reason")
    P = min(5 - offset, 5 - 1)
    starts = segment_indices(P, 3, L, "test")
    assert item["num_frames"] == 5 and item["fps"] == 0.0
    assert item["frame"].tolist() == starts.tolist()
    rgb_numbers = offset + 1 + np.minimum(starts + L // 2, 4)  # the middle frame of each stack
    diff = (item["rgb"][:, 0] - rgb_reference(rgb_numbers)).abs().max().item()
    assert diff < 1e-6, f"rgb input differs by {diff}"
    pair_numbers = offset + 1 + np.minimum(starts[:, None] + np.arange(L), P - 1)
    diff = (item["flow"][:, 0] - flow_reference(pair_numbers)).abs().max().item()
    assert diff < 1e-6, f"flow input differs by {diff}"


@pytest.mark.slow
def test_extract_features_from_mmaction2_rawframes(tmp_path):
    """The multi-label list end to end: both streams from imgs/, labels (first of each line), frame
    counts, the user's bound and the detected layout recorded; features equal the network on the
    test's own reading of the images."""
    out = tmp_path / "rf.h5"
    code, output = run_cli("extract-features", mm("annotations", "rawframe_test_list_multi_label.txt"),
                           "--root", mm(), "--out", out, "--segments", 3, "--new-length", 2,
                           "--bound", 15, *SMALL)
    assert code == 0, output
    net = build_backbone("resnet18", seed=0).eval()
    with FeatureStore(out) as store:
        assert store.ids == ["imgs#1", "imgs#2"]
        assert store.labels.tolist() == [1, 3]  # `label` is the first; every label in the multi-hot column
        want = [[int(c in {int(x) for x in line.split()[2:]}) for c in range(store.multi_hot().shape[1])]
                for line in mm("annotations", "rawframe_test_list_multi_label.txt").read_text().splitlines()]
        assert store.multi_label and store.multi_hot().tolist() == want
        assert store.num_frames.tolist() == [5, 5]
        flow = json.loads(store.attrs["flow"])
        assert flow["bound"] == 15.0 and flow["algorithm"] == "external"
        assert (flow["layout"]["x"], flow["layout"]["start"]) == ("x_", 1)
        batch = store.load([0], streams=["rgb"])
    starts = segment_indices(4, 3, 2, "test")
    assert batch.frame[0].tolist() == starts.tolist()
    with torch.no_grad():
        _, logits = net(rgb_reference(1 + starts + 1))
    np.testing.assert_allclose(batch.logits["rgb"][0].numpy(), logits.numpy(), atol=1e-4)


@pytest.mark.slow
def test_foreign_flow_folders_equal_datp_folders(tmp_path):
    """A datp jpg flow folder renamed the denseflow way (flow_x_00000.jpg, from 0) and the
    mmaction2 way (x_00001.jpg), without datp's settings file, gives the same flow features as
    datp's own folder; the bound given is what the store records."""
    video = write_video(tmp_path / "v" / "clip.mkv", moving_texture(9, 72, 96, shift=(2, 1)))
    ours = tmp_path / "ours"
    code, output = run_cli("extract-flow", video, "--out", ours, "--format", "jpg",
                           "--algorithm", "dis", "--short-side", 0, "--quiet")
    assert code == 0, output
    renamed = {"denseflow": ("flow_x_", "flow_y_", 0), "mmaction2": ("x_", "y_", 1)}
    for tool, (x, y, first) in renamed.items():
        folder = tmp_path / tool / "clip"
        folder.mkdir(parents=True)
        for j in range(8):
            for src, dst in (("flow_x_", x), ("flow_y_", y)):
                shutil.copy(ours / "clip" / f"{src}{j + 1:05d}.jpg", folder / f"{dst}{first + j:05d}.jpg")
    stores = {}
    for name in ("ours", *renamed):
        stores[name] = tmp_path / f"{name}.h5"
        code, output = run_cli("extract-features", video, "--flows", tmp_path / name, "--streams",
                               "flow", "--out", stores[name], "--segments", 2, "--new-length", 3,
                               *SMALL)
        assert code == 0, output
    arrays = {}
    for name, path in stores.items():
        with FeatureStore(path) as store:
            arrays[name] = store.load([0], streams=["flow"]).conv["flow"].numpy()
            flow = json.loads(store.attrs["flow"])
        if name != "ours":
            assert flow["layout"]["start"] == renamed[name][2] and flow["bound"] == 20.0
    for name in renamed:
        np.testing.assert_array_equal(arrays[name], arrays["ours"], err_msg=name)


def test_ambiguous_flow_folder_is_one_line(tmp_path):
    folder = tmp_path / "flows" / "clip"
    folder.mkdir(parents=True)
    for n in (1, 2):
        for prefix in ("flow_x_", "flow_y_", "x_", "y_"):
            cv2.imwrite(str(folder / f"{prefix}{n:05d}.jpg"), np.zeros((8, 8), np.uint8))
    video = write_video(tmp_path / "clip.mkv", moving_texture(3, 72, 96))
    code, output = run_cli("extract-features", video, "--flows", tmp_path / "flows", "--streams",
                           "flow", "--out", tmp_path / "f.h5", *SMALL)
    assert code == 2 and "two namings" in output and "--flow-prefixes X,Y" in output
    code, output = run_cli("extract-features", video, "--flows", tmp_path / "flows", "--streams",
                           "flow", "--out", tmp_path / "f.h5", "--flow-prefixes", "x_,y_",
                           "--new-length", 1, *SMALL)
    assert code == 0, output
