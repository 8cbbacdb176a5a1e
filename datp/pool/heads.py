"""Pooling heads: the shared interface, the registry, and the `avg` and `max` baselines.

Every head is an `nn.Module` with `forward(x, mask=None) -> HeadOutput(logits (B, C), weights (B, N))`
where `x` is a `SegmentBatch` (`joint-attn` takes `{stream: SegmentBatch}`); see `segment_scores.py`
for the conventions on masks and all-masked rows.

Every constructor is keyword-only and accepts `num_classes`, `num_segments` and `in_channels`, so
`build_head(name, num_classes=C, num_segments=N, in_channels=Cf, **options)` works for any name.
Heads that pool per-segment class scores (`uses_scores = True`: avg, max, datp) also take
`score_source` ("cached" or "linear", see `default_score_source`); the attention heads classify
pooled features with their own classifier and do not.

`head.transfer_layer()` returns the first fully connected layer that reads the pooled segment
features v_i (TSRNet's fc1, used by `train-head --transfer-from`; see docs/detection.md), or None
when the head has none (avg, max and datp on cached scores).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from datp.pool.attention import JointAttnHead, LSTMAttnHead, SelfAttnHead
from datp.pool.datp_head import DATPHead
from datp.pool.segment_scores import (
    HeadOutput,
    SegmentBatch,
    SegmentScores,
    default_score_source,
    resolve_mask,
    zero_empty_rows,
)

__all__ = [
    "HEADS", "AvgHead", "HeadOutput", "MaxHead", "SegmentBatch", "build_head", "default_score_source", "param_groups",
]


class AvgHead(nn.Module):
    """TSN consensus: the mean of the per-segment class scores over the real segments.

    Weights are 1/n on each of the n real segments (they sum to 1).

    Args:
        num_classes: C.
        num_segments: unused (accepted so every head is built from the same store shape).
        in_channels: Cf of the conv features, for `score_source="linear"`.
        score_source: "cached" (frozen backbone logits; the head then has no parameters) or "linear".
        dropout: dropout before the linear segment classifier.
    """

    uses_scores = True

    def __init__(self, *, num_classes: int, num_segments: int | None = None, in_channels: int = 512,
                 score_source: str = "linear", dropout: float = 0.0):
        super().__init__()
        self.scores = SegmentScores(source=score_source, num_classes=num_classes,
                                    in_channels=in_channels, dropout=dropout)

    def forward(self, x: SegmentBatch, mask: Tensor | None = None) -> HeadOutput:
        """Averages segment scores.

        Args:
            x: (B, N, ...) segment inputs.
            mask: (B, N) bool, True for a real segment; None uses `x.mask`.

        Returns:
            logits (B, C) and weights (B, N).
        """
        mask = resolve_mask(x, mask)
        scores = self.scores(x, mask)  # (B, N, C), zero on masked segments
        weights = mask.to(scores.dtype) / mask.sum(dim=1, keepdim=True).clamp_min(1)
        logits = (weights[..., None] * scores).sum(dim=1)
        return HeadOutput(zero_empty_rows(logits, mask), weights)

    def transfer_layer(self) -> nn.Module | None:
        """TSRNet's fc1: the linear segment classifier on the pooled features (None for cached scores)."""
        return self.scores.transfer_layer()


class MaxHead(nn.Module):
    """Max pooling: each class takes its largest score over the real segments.

    Weights are one-hot on the segment holding the maximum of the predicted (argmax) class, the
    first such segment on ties; so they sum to 1 and show which segment decided the prediction.

    Args:
        num_classes: C.
        num_segments: unused (accepted so every head is built from the same store shape).
        in_channels: Cf of the conv features, for `score_source="linear"`.
        score_source: "cached" or "linear".
        dropout: dropout before the linear segment classifier.
    """

    uses_scores = True

    def __init__(self, *, num_classes: int, num_segments: int | None = None, in_channels: int = 512,
                 score_source: str = "linear", dropout: float = 0.0):
        super().__init__()
        self.scores = SegmentScores(source=score_source, num_classes=num_classes,
                                    in_channels=in_channels, dropout=dropout)

    def forward(self, x: SegmentBatch, mask: Tensor | None = None) -> HeadOutput:
        """Max-pools segment scores.

        Args:
            x: (B, N, ...) segment inputs.
            mask: (B, N) bool, True for a real segment; None uses `x.mask`.

        Returns:
            logits (B, C) and weights (B, N).
        """
        mask = resolve_mask(x, mask)
        scores = self.scores(x, mask)  # (B, N, C)
        filled = scores.masked_fill(~mask[..., None], torch.finfo(scores.dtype).min)
        logits, argmax = filled.max(dim=1)  # (B, C) each
        logits = zero_empty_rows(logits, mask)
        winner = argmax.gather(1, logits.argmax(dim=1, keepdim=True))  # (B, 1) segment of the top class
        weights = nn.functional.one_hot(winner[:, 0], scores.shape[1]).to(scores.dtype)
        weights = weights.masked_fill(~mask, 0.0)
        return HeadOutput(logits, weights)

    def transfer_layer(self) -> nn.Module | None:
        """TSRNet's fc1: the linear segment classifier on the pooled features (None for cached scores)."""
        return self.scores.transfer_layer()


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
