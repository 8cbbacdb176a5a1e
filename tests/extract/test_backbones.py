import hashlib

import pytest
import torch
import torchvision
from torch import nn

from datp.extract.backbones import (
    build_backbone,
    cross_modality_conv1,
    file_sha256,
    load_backbone,
    load_weights,
    save_checkpoint,
)
from datp.extract.transforms import FLOW_MEAN, IMAGENET_MEAN
from datp_testing import assert_close


def _same_state(a: dict, b: dict, skip=()):
    assert a.keys() == b.keys()
    for k in a:
        if k not in skip:
            assert torch.equal(a[k], b[k]), f"{k} differs, max |diff| {(a[k].float() - b[k].float()).abs().max()}"


@pytest.fixture(scope="module")
def rgb():
    return build_backbone("resnet18", stream="rgb").eval()


@pytest.fixture(scope="module")
def flow():
    return build_backbone("resnet18", stream="flow", new_length=5).eval()


def test_cross_modality_init(rgb, flow):
    w = rgb.conv1.weight.detach()  # (64, 3, 7, 7)
    v = flow.conv1.weight.detach()  # (64, 10, 7, 7)
    assert v.shape == (64, 10, 7, 7)
    mean = w.mean(dim=1, keepdim=True)
    assert_close(v, mean.expand(-1, 10, -1, -1))  # exact
    assert_close(v[:, 3], (w[:, 0] + w[:, 1] + w[:, 2]) / 3, atol=1e-7)
    # same seed: everything but conv1 is the RGB network's
    _same_state(flow.state_dict(), rgb.state_dict() | {"conv1.weight": v}, skip=("conv1.weight",))
    before = w.clone()
    cross_modality_conv1(rgb.conv1, 4)
    assert_close(rgb.conv1.weight.detach(), before)  # input left unchanged


def test_seeded_init():
    a, b = build_backbone("resnet18", seed=3), build_backbone("resnet18", seed=3)
    _same_state(a.state_dict(), b.state_dict())
    c = build_backbone("resnet18", seed=4)
    assert not torch.equal(a.conv1.weight, c.conv1.weight)


@pytest.mark.parametrize("stream", ["rgb", "flow"])
def test_taps_equal_torchvision(stream, rgb, flow):
    backbone = rgb if stream == "rgb" else flow
    net = torchvision.models.resnet18(weights=None)
    net.conv1 = nn.Conv2d(backbone.in_channels, 64, 7, stride=2, padding=3, bias=False)
    net.load_state_dict(backbone.state_dict())
    net.eval()
    x = torch.randn(2, backbone.in_channels, 96, 128, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        conv, logits = backbone(x)
        want_conv = nn.Sequential(*list(net.children())[:-2])(x)  # up to layer4
        want_logits = net(x)
    assert conv.shape == (2, 512, 3, 4)  # (B, 512, H / 32, W / 32)
    assert_close(conv, want_conv)
    assert_close(logits, want_logits)
    assert_close(backbone.logits_from_conv(conv), logits)


def test_attributes(rgb, flow):
    assert (rgb.in_channels, rgb.feature_channels, rgb.num_classes, rgb.new_length) == (3, 512, 1000, 1)
    assert (flow.in_channels, flow.new_length) == (10, 5)
    assert rgb.mean == IMAGENET_MEAN and flow.mean == (FLOW_MEAN,) * 10 == flow.std
    assert flow.describe()["input_size"] == 224
    assert build_backbone("resnet50", num_classes=7).feature_channels == 2048
    with pytest.raises(ValueError, match="unknown backbone 'vgg16'"):
        build_backbone("vgg16")
    with pytest.raises(ValueError, match="new_length=5"):
        build_backbone("resnet18", stream="rgb", new_length=5)


def test_torchvision_state_dict_round_trip(tmp_path, rgb):
    source = torchvision.models.resnet18(weights=None)  # an "ImageNet" file, unrelated init
    path = tmp_path / "resnet18-imagenet.pth"
    torch.save(source.state_dict(), path)
    backbone = build_backbone("resnet18")
    info = load_weights(backbone, path)
    _same_state(backbone.state_dict(), source.state_dict())
    assert info["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest() == file_sha256(path)
    assert (info["weights"], info["format"], info["fc"]) == ("resnet18-imagenet.pth", "torchvision", "loaded")

    # flow stream with 5 classes: conv1 by cross-modality init, the ImageNet fc is not used
    flow = build_backbone("resnet18", stream="flow", num_classes=5, new_length=3)
    fc_before = flow.fc.weight.detach().clone()
    info = load_weights(flow, path)
    assert_close(flow.conv1.weight.detach(), source.conv1.weight.mean(1, keepdim=True).expand(-1, 6, -1, -1).detach())
    assert_close(flow.layer3[0].conv2.weight.detach(), source.layer3[0].conv2.weight.detach())
    assert_close(flow.fc.weight.detach(), fc_before)
    assert info["fc"] == "initial"

    info = load_weights(rgb, "random")
    assert (info["weights"], info["sha256"], info["format"]) == ("random", "random", "random")


def test_bad_weight_files(tmp_path):
    state = torchvision.models.resnet18(weights=None).state_dict()
    cases = {
        "shape": ({**state, "layer2.0.conv1.weight": torch.zeros(128, 64, 3, 1)}, "'layer2.0.conv1.weight' has shape"),
        "missing": ({k: v for k, v in state.items() if k != "layer4.1.bn2.weight"}, "lacks key 'layer4.1.bn2.weight'"),
        "unexpected": ({**state, "head.weight": torch.zeros(3)}, "unexpected key 'head.weight'"),
    }
    backbone = build_backbone("resnet18")
    for name, (bad, message) in cases.items():
        path = tmp_path / f"{name}.pth"
        torch.save(bad, path)
        with pytest.raises(ValueError, match=message) as err:
            load_weights(backbone, path)
        assert str(path) in str(err.value) and "\n" not in str(err.value)
    (tmp_path / "garbage.pth").write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="not a loadable weights file"):
        load_weights(backbone, tmp_path / "garbage.pth")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_weights(backbone, tmp_path / "nope.pth")
    # files from before torch 0.4.1 have no BatchNorm counters; they load
    path = tmp_path / "old.pth"
    torch.save({k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}, path)
    assert load_weights(backbone, path)["fc"] == "loaded"


def test_datp_checkpoint_round_trip(tmp_path):
    trained = build_backbone("resnet18", stream="flow", num_classes=3, new_length=2, seed=9)
    head = {"mu": torch.tensor([0.25, 0.75])}
    path = tmp_path / "flow.pt"
    save_checkpoint(path, trained, class_names=["a", "b", "c"], head=head, config={"lr": 0.001, "epochs": 2})
    backbone, info = load_backbone("resnet18", stream="flow", weights=path, new_length=2)
    _same_state(backbone.state_dict(), trained.state_dict())
    assert not backbone.training
    assert (info["format"], info["class_names"], info["config"]) == ("datp", ["a", "b", "c"], {"lr": 0.001, "epochs": 2})
    assert_close(info["head"]["mu"], head["mu"])
    with pytest.raises(ValueError, match="not stream 'rgb'"):
        load_backbone("resnet18", stream="rgb", weights=path)
    with pytest.raises(ValueError, match="has 3 classes but the backbone has 4"):
        load_weights(build_backbone("resnet18", stream="flow", num_classes=4, new_length=2), path)
    with pytest.raises(ValueError, match="2 \\* new_length"):
        load_backbone("resnet18", stream="flow", weights=path, new_length=5)
    ckpt = torch.load(path, weights_only=True)
    torch.save({**ckpt, "datp_checkpoint": 2}, path)
    with pytest.raises(ValueError, match="version 2"):
        load_backbone("resnet18", stream="flow", weights=path, new_length=2)
