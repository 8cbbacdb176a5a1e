"""The head registry: `HEADS` (name -> class), `build_head(name, **kwargs)` and `param_groups`."""

from __future__ import annotations

from torch import nn

from datp.pool.heads.attention import JointAttnHead, LSTMAttnHead, SelfAttnHead
from datp.pool.heads.datp import DATPHead
from datp.pool.heads.pooling import AvgHead, MaxHead

__all__ = [
    "HEADS", "AvgHead", "HeadOutput", "MaxHead", "SegmentBatch", "build_head", "default_score_source", "param_groups",
]


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
    parameters whose name starts with one of that head's prefixes, and at most `head.lr_caps[prefix]`.

    DATP's auxiliary net steps at min(lr, 1e-3) by default (`DATPHead(aux_lr_scale=..., aux_max_lr=...)`);
    build the optimizer as `torch.optim.Adam(param_groups(head, lr))`.

    Returns:
        A list of {"params": [...], "lr": float} dicts, empty groups left out.
    """
    scales = dict(getattr(head, "lr_scales", {}))
    caps = dict(getattr(head, "lr_caps", {}))
    groups: dict[float, list[nn.Parameter]] = {}
    for name, param in head.named_parameters():
        scale = next((s for prefix, s in scales.items() if name.startswith(prefix)), 1.0)
        cap = next((c for prefix, c in caps.items() if name.startswith(prefix)), float("inf"))
        groups.setdefault(min(lr * scale, cap), []).append(param)
    return [{"params": params, "lr": group_lr} for group_lr, params in groups.items()]


def build_head(name: str, **kwargs) -> nn.Module:
    """Builds the head registered as `name` with keyword arguments for its constructor.

    Raises:
        ValueError: `name` is not in `HEADS`.
    """
    if name not in HEADS:
        raise ValueError(f"unknown head {name!r}; choose from {sorted(HEADS)}")
    return HEADS[name](**kwargs)
