"""Weight files of other tools: mmaction2 TSN recognizers, tsn-pytorch checkpoints and torchvision
state_dicts of any classifier size load into the same backbone as the torchvision original."""

from __future__ import annotations

import datetime
import re

import numpy as np
import pytest
import torch
import torchvision

from datp.extract.backbones import load_backbone
from datp.extract.checkpoints import to_torchvision


def _torchvision_state(num_classes: int = 7, in_channels: int = 3, seed: int = 0) -> dict:
    torch.manual_seed(seed)
    model = torchvision.models.resnet18(weights=None, num_classes=num_classes)
    if in_channels != 3:
        model.conv1 = torch.nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False)
    return {k: v.clone() for k, v in model.state_dict().items()}


def _as_mmaction2(state: dict) -> dict:
    """mmaction2's ResNet names (ConvModule conv/bn; downsample conv/bn) and TSNHead's fc_cls."""
    out = {}
    for key, value in state.items():
        if key.startswith("fc."):
            out["cls_head.fc_cls." + key[3:]] = value
            continue
        key = re.sub(r"^conv1\.", "conv1.conv.", key)
        key = re.sub(r"^bn1\.", "conv1.bn.", key)
        key = re.sub(r"\.conv(\d)\.", r".conv\1.conv.", key)
        key = re.sub(r"\.bn(\d)\.", r".conv\1.bn.", key)
        key = re.sub(r"\.downsample\.0\.", ".downsample.conv.", key)
        key = re.sub(r"\.downsample\.1\.", ".downsample.bn.", key)
        out["backbone." + key] = value
    return out


def _as_tsn_pytorch(state: dict) -> dict:
    return {("module.new_fc." + k[3:]) if k.startswith("fc.") else "module.base_model." + k: v for k, v in state.items()}


@pytest.mark.parametrize("layout", ["torchvision", "mmaction2", "tsn-pytorch", "dataparallel"])
def test_every_layout_loads_the_same_backbone(layout, tmp_path):
    state = _torchvision_state(num_classes=7)
    if layout == "mmaction2":
        saved = {"meta": {"epoch": 3, "best": np.float64(0.5), "dtype": np.dtype("float32")},
                 "state_dict": _as_mmaction2(state)}
    elif layout == "tsn-pytorch":
        saved = {"epoch": 80, "arch": "resnet18", "state_dict": _as_tsn_pytorch(state), "best_prec1": 85.0}
    elif layout == "dataparallel":
        saved = {"module." + k: v for k, v in state.items()}
    else:
        saved = state
    torch.save(saved, tmp_path / "w.pth")
    backbone, info = load_backbone("resnet18", weights=tmp_path / "w.pth")
    assert info["format"] == ("torchvision" if layout == "dataparallel" else layout) and info["fc"] == "loaded"
    assert backbone.num_classes == 7  # the classifier is built as the file has it
    own = backbone.state_dict()
    for key, value in state.items():
        assert torch.equal(own[key], value), key
    reference = torchvision.models.resnet18(weights=None, num_classes=7)
    reference.load_state_dict(state)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        conv, logits = backbone(x)
        assert torch.allclose(logits, reference.eval()(x), atol=1e-5)


def test_a_ten_channel_flow_conv1_is_taken_as_it_is(tmp_path):
    state = _torchvision_state(num_classes=400, in_channels=10)
    torch.save({"state_dict": _as_mmaction2(state)}, tmp_path / "flow.pth")
    backbone, info = load_backbone("resnet18", stream="flow", weights=tmp_path / "flow.pth", new_length=5)
    assert info["format"] == "mmaction2" and backbone.num_classes == 400
    assert torch.equal(backbone.state_dict()["conv1.weight"], state["conv1.weight"])


def test_metadata_that_is_not_safe_to_unpickle_is_one_line_with_what_to_do(tmp_path):
    torch.save({"meta": {"time": datetime.datetime(2024, 1, 1)}, "state_dict": _torchvision_state()}, tmp_path / "m.pth")
    with pytest.raises(ValueError) as err:
        load_backbone("resnet18", weights=tmp_path / "m.pth")
    message = str(err.value)
    assert "non-tensor metadata" in message and "datetime" in message and "weights_only=False" in message
    assert "\n" not in message


def test_key_map_by_hand():
    state = {"backbone.conv1.conv.weight": 1, "backbone.conv1.bn.running_var": 2,
             "backbone.layer3.1.conv2.bn.bias": 3, "backbone.layer2.0.downsample.conv.weight": 4,
             "backbone.layer2.0.downsample.bn.weight": 5, "cls_head.fc_cls.bias": 6}
    out, layout = to_torchvision(state)
    assert layout == "mmaction2" and out == {"conv1.weight": 1, "bn1.running_var": 2, "layer3.1.bn2.bias": 3,
                                             "layer2.0.downsample.0.weight": 4, "layer2.0.downsample.1.weight": 5,
                                             "fc.bias": 6}
