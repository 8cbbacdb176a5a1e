"""The end-to-end model: a backbone applied to every segment, then a pooling head.

The head receives what a feature store would hold, computed live: `SegmentBatch(conv=(B, N, Cf, h, w)
conv maps, logits=(B, N, C) backbone logits, t=(B, N) segment times)`. Heads that pool class scores
(avg, max, datp) read the backbone's own logits (`score_source="cached"`), so `avg` is exactly TSN's
consensus and the loss reaches the backbone through every segment's logits; `datp` also reaches it
through the conv maps its weight generator reads. Other heads classify pooled conv features with
their own classifier; the backbone's fc is then unused and frozen (its class scores in the
checkpoint stay as loaded).

BatchNorm freezing (`bn_freeze`): "partial" is TSN's partial BN: every BatchNorm but the first
(`bn1`) runs in eval mode (running statistics fixed) with its scale and shift frozen; "all" freezes
every BatchNorm; "none" trains them all.
"""

from __future__ import annotations

import inspect

import torch
from torch import Tensor, nn

from datp.extract.backbones import Backbone, build_backbone, load_weights
from datp.pool.heads import HEADS, HeadOutput, SegmentBatch, build_head


class VideoModel(nn.Module):
    """Backbone per segment + pooling head, trained end to end.

    Args:
        backbone: the per-segment network (its `forward` returns conv maps and logits).
        head: a pooling head built for the backbone's classes and feature channels.
        head_name: the head's `HEADS` name (`joint-attn` gets `{stream: batch}`).
        bn_freeze: "partial", "all" or "none" (module docstring).
    """

    memory_format = torch.contiguous_format  # torch.channels_last on GPU (set by the trainer)

    def __init__(self, *, backbone: Backbone, head: nn.Module, head_name: str, bn_freeze: str = "partial"):
        super().__init__()
        self.backbone, self.head, self.head_name = backbone, head, head_name
        norms = [m for m in backbone.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        self._frozen_bn = {"none": [], "partial": norms[1:], "all": norms}[bn_freeze]
        for m in self._frozen_bn:
            for p in m.parameters():
                p.requires_grad_(False)

    def train(self, mode: bool = True) -> "VideoModel":
        super().train(mode)
        for m in self._frozen_bn:
            m.eval()
        return self

    def forward(self, x: Tensor, t: Tensor | None = None) -> HeadOutput:
        """Classify videos from their segments.

        Args:
            x: (B, N, C_in, S, S) preprocessed segments (C_in = 3, or 2L for flow).
            t: (B, N) segment centre times in [0, 1], or None (evenly spaced).

        Returns:
            The head's logits (B, C) and segment weights (B, N).
        """
        B, N = x.shape[:2]
        images = x.flatten(0, 1).contiguous(memory_format=self.memory_format)  # (B*N, C_in, S, S)
        conv, logits = self.backbone(images)  # (B*N, Cf, h, w), (B*N, C)
        batch = SegmentBatch(conv=conv.unflatten(0, (B, N)), logits=logits.unflatten(0, (B, N)), t=t)
        if self.head_name == "joint-attn":
            return self.head({self.backbone.stream: batch})
        return self.head(batch)


def head_kwargs(name: str, *, num_classes: int, num_segments: int, in_channels: int, stream: str,
                options: dict) -> dict:
    """Constructor arguments of the head: the shapes, then finetune's defaults, then `options`.

    Defaults: score-pooling heads (avg, max, datp) pool the backbone's logits
    (`score_source="cached"`); `joint-attn` runs on the one trained stream.
    """
    if name not in HEADS:
        raise ValueError(f"unknown head {name!r}; choose from {sorted(HEADS)}")
    kwargs = {"num_classes": num_classes, "num_segments": num_segments, "in_channels": in_channels}
    if getattr(HEADS[name], "uses_scores", False):
        kwargs["score_source"] = "cached"
    if name == "joint-attn":
        kwargs["streams"] = [stream]
    return {**kwargs, **options}


def uses_backbone_logits(name: str, kwargs: dict) -> bool:
    """Whether the head pools the backbone's logits (so the backbone's fc is trained)."""
    return getattr(HEADS[name], "uses_scores", False) and kwargs.get("score_source") == "cached"


def build_model(cfg, num_classes: int) -> tuple[VideoModel, dict, dict]:
    """The model of a FinetuneConfig: seeded backbone, `cfg.weights` loaded, seeded head, BN freezing.

    Returns:
        (model, every argument of the head's constructor (defaults included; plain values, so the
        head can be rebuilt), weights info from `load_weights`).
    """
    backbone = build_backbone(cfg.backbone, stream=cfg.stream, num_classes=num_classes,
                              new_length=cfg.new_length if cfg.stream == "flow" else None,
                              dropout=cfg.dropout, seed=cfg.seed)
    info = load_weights(backbone, cfg.weights)
    kwargs = head_kwargs(cfg.head, num_classes=num_classes, num_segments=cfg.num_segments,
                         in_channels=backbone.feature_channels, stream=cfg.stream, options=cfg.head_kwargs())
    try:
        with torch.random.fork_rng(devices=[]):  # seeded like the backbone: same head in every process
            torch.manual_seed(cfg.seed)
            head = build_head(cfg.head, **kwargs)
    except TypeError as err:  # an option the head's constructor does not take
        raise ValueError(f"head {cfg.head!r} does not accept these options ({err}); check --head-option") from None
    # Record every constructor argument, defaults included, so the head rebuilds the same later.
    bound = inspect.signature(HEADS[cfg.head]).bind(**kwargs)
    bound.apply_defaults()
    kwargs = {k: list(v) if isinstance(v, tuple) else v for k, v in bound.arguments.items()}
    if not uses_backbone_logits(cfg.head, kwargs):
        backbone.fc.requires_grad_(False)
    return VideoModel(backbone=backbone, head=head, head_name=cfg.head, bn_freeze=cfg.bn_freeze), kwargs, info


def param_groups(model: VideoModel, *, lr: float, weight_decay: float, conv1_lr_mult: float = 1.0,
                 head_lr_mult: float = 1.0) -> list[dict]:
    """SGD parameter groups as TSN: weight decay on conv/linear weights only (not on biases or
    normalisation parameters), `conv1_lr_mult` on the backbone's conv1, `head_lr_mult` on the head.

    Frozen parameters (requires_grad False) are left out. Groups appear in a fixed order, so an
    optimizer's state_dict loads into a rebuilt one.
    """
    groups: dict[tuple[float, float], list] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        mult = conv1_lr_mult if name == "backbone.conv1.weight" else head_lr_mult if name.startswith("head.") else 1.0
        decay = weight_decay if p.ndim > 1 else 0.0
        groups.setdefault((mult, decay), []).append(p)
    return [{"params": ps, "lr": lr * mult, "weight_decay": decay} for (mult, decay), ps in groups.items()]
