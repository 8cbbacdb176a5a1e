"""The head registry: `HEADS` (name -> class), `build_head(name, **kwargs)`, `param_groups` and `warm_up`."""

from __future__ import annotations

import torch
from torch import nn

from datp.pool.heads.attention import JointAttnHead, LSTMAttnHead, SelfAttnHead
from datp.pool.heads.datp import DATPHead
from datp.pool.heads.pooling import AvgHead, MaxHead

__all__ = ["HEADS", "AvgHead", "MaxHead", "build_head", "param_groups", "warm_up"]


HEADS: dict[str, type[nn.Module]] = {
    "avg": AvgHead,
    "max": MaxHead,
    "datp": DATPHead,
    "lstm-attn": LSTMAttnHead,
    "self-attn": SelfAttnHead,
    "joint-attn": JointAttnHead,
}


def param_groups(head: nn.Module, lr: float) -> list[dict]:
    """Optimizer parameter groups: `lr` for every parameter, times `head.lr_scales[prefix]` for the
    parameters whose name starts with one of that head's prefixes, at most `head.lr_caps[prefix]`,
    and warmed up over the first `head.lr_warmups[prefix]` of the epochs (`warm_up`).

    DATP's auxiliary net steps at 0.3 x lr by default, reached after 30% of the epochs
    (`DATPHead(aux_lr_scale=..., aux_max_lr=..., aux_warmup=...)`); build the optimizer as
    `torch.optim.Adam(param_groups(head, lr))` and call `warm_up(optimizer, epoch, epochs)` before
    each epoch.

    Returns:
        A list of {"params": [...], "lr": float, "peak_lr": float, "warmup": float} dicts, empty
        groups left out ("warmup": the share of the epochs over which "lr" rises to "peak_lr").
    """
    scales = dict(getattr(head, "lr_scales", {}))
    caps = dict(getattr(head, "lr_caps", {}))
    warmups = dict(getattr(head, "lr_warmups", {}))
    groups: dict[tuple[float, float], list[nn.Parameter]] = {}
    for name, param in head.named_parameters():
        scale = next((s for prefix, s in scales.items() if name.startswith(prefix)), 1.0)
        cap = next((c for prefix, c in caps.items() if name.startswith(prefix)), float("inf"))
        warmup = next((w for prefix, w in warmups.items() if name.startswith(prefix)), 0.0)
        groups.setdefault((min(lr * scale, cap), warmup), []).append(param)
    return [{"params": params, "lr": group_lr, "peak_lr": group_lr, "warmup": warmup}
            for (group_lr, warmup), params in groups.items()]


def warm_up(optimizer: torch.optim.Optimizer, epoch: int, epochs: int) -> None:
    """Sets each group's rate for epoch `epoch` (0-based) of `epochs`: a group with warmup f > 0 steps
    at peak_lr x (epoch + 1) / W for the first W = max(1, round(f x epochs)) epochs, then at peak_lr
    (a linear warm-up, per epoch as the rest of train-head's schedule); groups without those keys
    (not from `param_groups`) are left as they are."""
    for group in optimizer.param_groups:
        if group.get("warmup", 0.0) > 0 and "peak_lr" in group:
            span = max(1, round(group["warmup"] * epochs))
            group["lr"] = group["peak_lr"] * min(1.0, (epoch + 1) / span)


def build_head(name: str, **kwargs) -> nn.Module:
    """Builds the head registered as `name` with keyword arguments for its constructor.

    Raises:
        ValueError: `name` is not in `HEADS`.
    """
    if name not in HEADS:
        raise ValueError(f"unknown head {name!r}; choose from {sorted(HEADS)}")
    return HEADS[name](**kwargs)
