"""Two-stream ResNet backbones with two taps (last conv map, logits), and their weight files.

A `Backbone` is a torchvision ResNet (any of `BACKBONES`, built with `weights=None`: nothing is ever
downloaded) whose children are registered under torchvision's own names, so its `state_dict()` keys
are torchvision's (`conv1.weight`, `layer4.2.bn2.running_var`, `fc.weight`, ...). Its `forward`
returns the last conv block's output before global pooling and the classifier's logits.

Streams:
- `rgb`: 3 input channels, ImageNet mean/std.
- `flow`: `2 * new_length` input channels (x1, y1, x2, y2, ...: TSN's interleaving), conv1 made by
  cross-modality initialisation (Wang et al., TSN 2016): the RGB conv1 kernel averaged over its 3
  input channels and replicated to every flow channel. Flow is normalised as `(q - 128) / 128` from
  its uint8 form (see `datp.extract.transforms`); on torchvision's [0, 1] scale that is mean = std =
  128 / 255 for every channel, which is what `Backbone.mean` / `Backbone.std` record.

Random initialisation is seeded (`seed`, default 0), so `--weights random` gives the same backbone
in every process, shard and resumed run.

Weight files (`load_weights`, read by `datp.extract.checkpoints.read_weights` with
`torch.load(..., weights_only=True)`):
- a torchvision, mmaction2 (TSN recognizer) or tsn-pytorch state_dict, optionally wrapped as
  `{"model": state_dict}` or `{"state_dict": state_dict}`, its keys mapped onto torchvision's
  (`datp.extract.checkpoints.to_torchvision`, docs/weights.md). For the flow stream an RGB conv1
  (3 input channels) is converted by cross-modality initialisation. `load_backbone` builds the
  classifier as the file has it; a classifier over another class count than the backbone's keeps the
  backbone's seeded new `fc` (fine-tuning on another dataset).
- a datp checkpoint, written by `save_checkpoint` (the finetune stage), a dict:
    `datp_checkpoint`: 1 (format version),
    `backbone`: torchvision name, e.g. "resnet34",
    `stream`: "rgb" or "flow",
    `class_names`: list of str (the fc's classes, in order; may be empty with a 1000-class fc),
    `model`: the backbone's state_dict (torchvision keys, conv1 with the stream's channels),
    `head`: the state_dict of a pooling head trained with it, or None,
    `config`: dict of plain values (`asdict(FinetuneConfig)`), or None.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Literal

import torch
import torchvision
from torch import nn

from datp.extract.checkpoints import read_weights, to_torchvision
from datp.extract.transforms import FLOW_MEAN, FLOW_STD, IMAGENET_MEAN, IMAGENET_STD

BACKBONES = {
    name: torchvision.models.get_model_builder(name)
    for name in torchvision.models.list_models(module=torchvision.models)
    if name.startswith(("resnet", "resnext", "wide_resnet"))
}
CHECKPOINT_VERSION = 1


def cross_modality_conv1(conv: nn.Conv2d, in_channels: int) -> nn.Conv2d:
    """A copy of `conv` taking `in_channels` inputs: its kernel averaged over inputs and replicated.

    Args:
        conv: the RGB conv1; left unchanged.
        in_channels: the new number of input channels (2 * new_length for flow).

    Returns:
        A new conv with weight `conv.weight.mean(dim=1, keepdim=True)` repeated `in_channels` times
        along dim 1, the same bias, stride, padding and dilation.
    """
    new = nn.Conv2d(
        in_channels,
        conv.out_channels,
        conv.kernel_size,
        stride=conv.stride,
        padding=conv.padding,
        dilation=conv.dilation,
        groups=conv.groups,
        bias=conv.bias is not None,
    )
    with torch.no_grad():
        new.weight.copy_(_cross_modality_weight(conv.weight, in_channels))
        if conv.bias is not None:
            new.bias.copy_(conv.bias)
    return new


def _cross_modality_weight(weight: torch.Tensor, in_channels: int) -> torch.Tensor:
    # (O, 3, k, k) -> (O, in_channels, k, k), as TSN's `_construct_flow_model`.
    return weight.mean(dim=1, keepdim=True).expand(-1, in_channels, -1, -1).contiguous()


class Backbone(nn.Module):
    """A torchvision ResNet for one stream, returning its last conv map and its logits.

    Args:
        name: a key of `BACKBONES`, e.g. "resnet34".
        stream: "rgb" (3 channels) or "flow" (2 * new_length channels).
        num_classes: classifier size; None keeps ImageNet's 1000.
        new_length: flow pairs stacked per segment (default 5); must be 1 (the default) for rgb.
        dropout: dropout before the classifier (TSN fine-tunes with 0.8); identity in eval mode.
        seed: seed of the random initialisation.
    """

    input_size = 224

    def __init__(
        self,
        *,
        name: str = "resnet34",
        stream: Literal["rgb", "flow"] = "rgb",
        num_classes: int | None = None,
        new_length: int | None = None,
        dropout: float = 0.0,
        seed: int = 0,
    ):
        super().__init__()
        if name not in BACKBONES:
            raise ValueError(f"unknown backbone {name!r}; choose from {sorted(BACKBONES)}")
        if stream not in ("rgb", "flow"):
            raise ValueError(f"unknown stream {stream!r}; choose from ['flow', 'rgb']")
        new_length = new_length or (5 if stream == "flow" else 1)
        if stream == "rgb" and new_length != 1:
            raise ValueError(f"new_length={new_length} for the rgb stream; rgb reads one frame per segment")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            net = BACKBONES[name](weights=None, num_classes=num_classes or 1000)
        if stream == "flow":
            net.conv1 = cross_modality_conv1(net.conv1, 2 * new_length)
        self.name, self.stream, self.new_length, self.seed = name, stream, new_length, seed
        self.in_channels = net.conv1.in_channels
        self.num_classes = net.fc.out_features
        self.feature_channels = net.fc.in_features
        self.mean = IMAGENET_MEAN if stream == "rgb" else (FLOW_MEAN,) * self.in_channels
        self.std = IMAGENET_STD if stream == "rgb" else (FLOW_STD,) * self.in_channels
        # torchvision's names, so state_dict keys are torchvision's.
        children = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4", "avgpool", "fc")
        for child in children:
            self.add_module(child, getattr(net, child))
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the network, keeping the last conv map.

        Args:
            x: (B, in_channels, H, W) normalised input.

        Returns:
            conv: (B, feature_channels, ceil(H / 32), ceil(W / 32)), the last conv block's output
                before global pooling ((B, 512, 7, 7) for resnet18/34 at 224).
            logits: (B, num_classes), equal to the torchvision model's output.
        """
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        conv = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return conv, self.logits_from_conv(conv)

    def logits_from_conv(self, conv: torch.Tensor) -> torch.Tensor:
        """Logits from a conv map, as in `forward`: global average pooling then the classifier.

        Args:
            conv: (B, feature_channels, h, w).

        Returns:
            (B, num_classes).
        """
        return self.fc(self.dropout(torch.flatten(self.avgpool(conv), 1)))

    def describe(self) -> dict:
        """The settings a feature store records: name, stream, channels, classes, mean/std, size."""
        return {
            "backbone": self.name,
            "stream": self.stream,
            "new_length": self.new_length,
            "in_channels": self.in_channels,
            "feature_channels": self.feature_channels,
            "num_classes": self.num_classes,
            "mean": list(self.mean),
            "std": list(self.std),
            "input_size": self.input_size,
        }


def build_backbone(
    name: str = "resnet34",
    *,
    stream: Literal["rgb", "flow"] = "rgb",
    num_classes: int | None = None,
    new_length: int | None = None,
    dropout: float = 0.0,
    seed: int = 0,
) -> Backbone:
    """`Backbone(name=name, ...)`: a seeded, randomly initialised backbone (see `Backbone`)."""
    return Backbone(
        name=name, stream=stream, num_classes=num_classes, new_length=new_length, dropout=dropout, seed=seed
    )


def file_sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def read_weights_file(path: str | os.PathLike) -> dict:
    """Load a weight file safely (`weights_only=True`, on the CPU; `datp.extract.checkpoints.read_weights`).

    Returns:
        The loaded dict: a datp checkpoint or a (possibly wrapped) state_dict.
    """
    return read_weights(path)


def load_weights(backbone: Backbone, weights: str | os.PathLike) -> dict:
    """Load a torchvision state_dict or a datp checkpoint into `backbone` (in place).

    Args:
        backbone: the backbone to fill.
        weights: a file path, or "random" to keep the seeded initialisation.

    Returns:
        info: `weights` (file name or "random"), `sha256` (of the file, or "random"), `format`
        ("torchvision", "datp" or "random"), `seed`, `fc` ("loaded" or "initial"), and for datp
        checkpoints `class_names`, `head` and `config` (otherwise [], None, None).

    Raises:
        ValueError: one line naming the file and the offending key or setting.
    """
    if str(weights) == "random":
        return _load(backbone, None, None)
    return _load(backbone, read_weights_file(weights), Path(weights))


def _load(backbone: Backbone, obj: dict | None, path: Path | None) -> dict:
    info = {"weights": "random", "sha256": "random", "format": "random", "seed": backbone.seed}
    info.update(fc="initial", class_names=[], head=None, config=None)
    if obj is None:
        return info
    info.update(weights=path.name, sha256=file_sha256(path))
    if "datp_checkpoint" in obj:
        state = _checkpoint_state(backbone, obj, path)
        info.update(format="datp", class_names=list(obj["class_names"]))
        info.update(head=obj["head"], config=obj["config"])
    else:
        state = _tensors(obj, path)
        state, info["format"] = to_torchvision(state)
        state = _adapt_torchvision_state(backbone, state)
    _check_state(backbone, state, path)
    backbone.load_state_dict(state)
    info["fc"] = "initial" if state["fc.weight"] is backbone.fc.weight else "loaded"
    return info


def _checkpoint_state(backbone: Backbone, ckpt: dict, path: Path) -> dict:
    if ckpt["datp_checkpoint"] != CHECKPOINT_VERSION:
        version = ckpt["datp_checkpoint"]
        raise ValueError(f"{path} is a datp checkpoint of version {version}; this datp reads {CHECKPOINT_VERSION}")
    for key, want in (("backbone", backbone.name), ("stream", backbone.stream)):
        if ckpt.get(key) != want:
            got = ckpt.get(key)
            raise ValueError(f"{path} is a {got!r} checkpoint, not {key} {want!r}; pass --{key} {got}")
    names = ckpt["class_names"]
    if names and len(names) != backbone.num_classes:
        raise ValueError(
            f"{path} has {len(names)} classes but the backbone has {backbone.num_classes}; "
            f"build it with num_classes={len(names)} (or use load_backbone)"
        )
    return dict(ckpt["model"])


def _adapt_torchvision_state(backbone: Backbone, state: dict) -> dict:
    conv1 = state.get("conv1.weight")
    if backbone.stream == "flow" and conv1 is not None and conv1.ndim == 4 and conv1.shape[1] == 3:
        state["conv1.weight"] = _cross_modality_weight(conv1, backbone.in_channels)
    fc = state.get("fc.weight")
    if fc is not None and fc.shape[0] != backbone.num_classes:
        # A classifier over other classes (ImageNet's 1000, Kinetics' 400) cannot serve these: keep the
        # backbone's seeded new fc (fine-tuning from a model trained on another dataset).
        state["fc.weight"], state["fc.bias"] = backbone.fc.weight, backbone.fc.bias
    return state


def _tensors(obj: dict, path: Path) -> dict:
    """The state_dict of a loaded file: itself, or under "model" / "state_dict" (tsn-pytorch, mmengine)."""
    state = obj.get("model", obj.get("state_dict", obj))
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path} is neither a state_dict of tensors nor a datp checkpoint")
    return state


def file_classes(obj: dict | None) -> int | None:
    """The class count of a loaded weight file's classifier (None: random weights or no classifier)."""
    if obj is None:
        return None
    if "datp_checkpoint" in obj:
        return len(obj["class_names"]) or None
    state, _ = to_torchvision(_tensors(obj, Path("?")))
    fc = state.get("fc.weight")
    return int(fc.shape[0]) if fc is not None and fc.ndim == 2 else None


def _check_state(backbone: Backbone, state: dict, path: Path) -> None:
    own = backbone.state_dict()
    # Files saved before torch 0.4.1 (torchvision's ImageNet ResNets) lack BatchNorm's counter;
    # load_state_dict fills it in.
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in own]
    for keys, what in ((missing, "lacks key"), (unexpected, "has unexpected key")):
        if keys:
            more = f" (and {len(keys) - 1} more)" if len(keys) > 1 else ""
            kind = f"{backbone.name} {backbone.stream}"
            raise ValueError(f"{path} {what} {keys[0]!r}{more} for a {kind} backbone")
    for key, value in state.items():
        if value.shape != own[key].shape:
            hint = " (flow conv1 has 2 * new_length input channels)" if key == "conv1.weight" else ""
            raise ValueError(
                f"{path}: {key!r} has shape {tuple(value.shape)} but the {backbone.name} {backbone.stream} "
                f"backbone expects {tuple(own[key].shape)}{hint}"
            )


def load_backbone(
    name: str = "resnet34",
    *,
    stream: Literal["rgb", "flow"] = "rgb",
    weights: str | os.PathLike = "random",
    num_classes: int | None = None,
    new_length: int | None = None,
    seed: int = 0,
) -> tuple[Backbone, dict]:
    """Build a backbone and load `weights`, its classifier sized as the file's (any class count; a datp
    checkpoint's class names, or the fc of a torchvision, mmaction2 or tsn-pytorch file).

    Returns:
        (backbone in eval mode, info from `load_weights`).
    """
    obj = None if str(weights) == "random" else read_weights_file(weights)
    if num_classes is None:  # the classifier is built as the file has it (any class count)
        num_classes = file_classes(obj)
    backbone = build_backbone(name, stream=stream, num_classes=num_classes, new_length=new_length, seed=seed)
    info = _load(backbone, obj, None if obj is None else Path(weights))
    return backbone.eval(), info


def save_checkpoint(
    path: str | os.PathLike,
    backbone: Backbone,
    *,
    class_names: list[str],
    head: dict | None = None,
    config: dict | None = None,
) -> None:
    """Write a datp checkpoint (format in the module docstring), atomically.

    Args:
        path: output file.
        backbone: the fine-tuned backbone.
        class_names: the classifier's classes in order (len == backbone.num_classes), or [].
        head: a pooling head's state_dict, or None.
        config: plain values only (str, int, float, bool, None, lists, dicts), e.g. asdict(config)
            with paths as str, so that `weights_only=True` can read it back.
    """
    if class_names and len(class_names) != backbone.num_classes:
        raise ValueError(f"{len(class_names)} class_names for a backbone with {backbone.num_classes} classes")
    ckpt = {
        "datp_checkpoint": CHECKPOINT_VERSION,
        "backbone": backbone.name,
        "stream": backbone.stream,
        "class_names": list(class_names),
        "model": backbone.state_dict(),
        "head": head,
        "config": config,
    }
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(ckpt, tmp)
    os.replace(tmp, path)
