"""What every head reads and returns, and the per-segment class scores I_i.

The heads live beside this module (`pooling.py`, `datp.py`, `attention.py`); the types they share live
here (and are re-exported by `datp.pool.heads`) so that those modules import this one and never each other.

One interface for every head: `forward(x, mask=None) -> HeadOutput(logits, weights)` where `x` is a
`SegmentBatch` (the two-stream `joint-attn` head takes a `{stream: SegmentBatch}` mapping). A
`SegmentBatch` carries everything a head may read, so a trainer builds it once from the feature
store and hands the same object to any head.

Conventions:
- `mask` is (B, N) bool, True for a real segment. When `forward` gets `mask=None` it uses `x.mask`,
  and when that is None too every segment is real.
- Masked positions never influence a result: their scores and features are overwritten before use
  (`masked_fill`, so even NaN padding is harmless), they get zero weight, and logits before a
  softmax over segments are set to `torch.finfo(dtype).min`.
- A row whose segments are all masked gives zero logits and zero weights, for every head.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

SCORE_SOURCES = ("cached", "linear")


class HeadOutput(NamedTuple):
    """What every head returns.

    Attributes:
        logits: (B, C) video class scores (before softmax; the loss is cross-entropy on them).
        weights: (B, N) how much each segment counts, zero on masked segments. Each head documents
            how its weights are normalised.
    """

    logits: Tensor
    weights: Tensor


class SegmentBatch(NamedTuple):
    """Per-segment inputs of a batch of B videos with N segment slots.

    Attributes:
        conv: (B, N, Cf, H, W) backbone feature maps (e.g. 512x7x7), or (B, N, Cf) features that are
            already globally average-pooled. None when the store has no conv features.
        logits: (B, N, C) cached per-segment class scores of the backbone, or None.
        t: (B, N) segment centre times normalised to [0, 1] (as `datp.extract.sampling.segment_times`
            computes them). None means `segment_times(mask)`: evenly spaced over the real segments.
        mask: (B, N) bool, True for a real segment; None means all are real.
    """

    conv: Tensor | None = None
    logits: Tensor | None = None
    t: Tensor | None = None
    mask: Tensor | None = None

    def to(self, device: torch.device | str) -> SegmentBatch:
        """Returns a copy with every tensor moved to `device`."""
        return SegmentBatch(*(None if v is None else v.to(device) for v in self))

    def shape(self) -> tuple[int, int]:
        """(B, N) read from the first tensor present."""
        for v in self:
            if v is not None:
                return int(v.shape[0]), int(v.shape[1])
        raise ValueError("SegmentBatch holds no tensor; give it conv, logits, t or mask")


def resolve_mask(x: SegmentBatch, mask: Tensor | None = None) -> Tensor:
    """The (B, N) bool mask a head uses: `mask`, else `x.mask`, else all True."""
    B, N = x.shape()
    mask = x.mask if mask is None else mask
    if mask is None:
        device = next(v.device for v in x if v is not None)
        return torch.ones(B, N, dtype=torch.bool, device=device)
    if mask.shape != (B, N) or mask.dtype != torch.bool:
        raise ValueError(
            f"mask must be a ({B}, {N}) bool tensor like the batch, got {tuple(mask.shape)} {mask.dtype}"
        )
    return mask


def segment_times(mask: Tensor) -> Tensor:
    """Evenly spaced segment centre times over the real segments of each row.

    The j-th real segment (in slot order) of a row with n real segments gets t = (j + 0.5) / n, the
    same as `datp.extract.sampling.segment_times` for n equal segments. Masked slots get 0. A video
    cut to its real segments therefore gets the same times as its padded row.

    Args:
        mask: (B, N) bool.

    Returns:
        (B, N) float32 times in (0, 1).
    """
    rank = mask.long().cumsum(dim=1) - 1  # (B, N) index of each real segment among the real ones
    count = mask.sum(dim=1, keepdim=True).clamp_min(1)
    return torch.where(mask, (rank + 0.5) / count, torch.zeros((), device=mask.device)).float()


def resolve_times(x: SegmentBatch, mask: Tensor) -> Tensor:
    """`x.t` (0 on masked slots), or `segment_times(mask)` when the batch has none; (B, N)."""
    if x.t is None:
        return segment_times(mask)
    if x.t.shape != mask.shape:
        raise ValueError(f"t must have shape {tuple(mask.shape)} like the mask, got {tuple(x.t.shape)}")
    return x.t.masked_fill(~mask, 0.0)


def pooled_features(x: SegmentBatch, mask: Tensor) -> Tensor:
    """Globally average-pooled segment features v_i, zero on masked segments.

    Args:
        x: batch whose `conv` is (B, N, Cf, H, W), or (B, N, Cf) already pooled.
        mask: (B, N) bool.

    Returns:
        (B, N, Cf).
    """
    if x.conv is None:
        raise ValueError("this head needs conv features but SegmentBatch.conv is None; "
                         "extract features with conv maps")
    if x.conv.dim() == 5:
        v = x.conv.mean(dim=(-2, -1))
    elif x.conv.dim() == 3:
        v = x.conv
    else:
        raise ValueError(f"conv must be (B, N, Cf, H, W) or (B, N, Cf), got shape {tuple(x.conv.shape)}")
    return v.masked_fill(~mask[..., None], 0.0)


def masked_softmax(logits: Tensor, mask: Tensor) -> Tensor:
    """Softmax over the last dim (segments) with masked entries at zero weight.

    Args:
        logits: (B, N).
        mask: (B, N) bool.

    Returns:
        (B, N) weights summing to 1 over the real segments of each row; an all-masked row is all
        zeros.
    """
    filled = logits.masked_fill(~mask, torch.finfo(logits.dtype).min)
    return torch.softmax(filled, dim=-1).masked_fill(~mask, 0.0)


def zero_empty_rows(logits: Tensor, mask: Tensor) -> Tensor:
    """(B, C) logits with the rows whose segments are all masked set to zero."""
    return logits.masked_fill(~mask.any(dim=1, keepdim=True), 0.0)


def default_score_source(store_num_classes: int, dataset_num_classes: int) -> str:
    """Which per-segment class scores a head should pool by default.

    Args:
        store_num_classes: classes of the logits cached in the feature store (1000 for an ImageNet
            backbone, the dataset's classes for a fine-tuned one).
        dataset_num_classes: classes of the dataset the head is trained on.

    Returns:
        "cached" when the cached logits are over the dataset's classes (the backbone was trained on
        them, so its scores are the paper's segment classifier), else "linear".
    """
    for name, value in (("store_num_classes", store_num_classes), ("dataset_num_classes", dataset_num_classes)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    return "cached" if store_num_classes == dataset_num_classes else "linear"


class SegmentScores(nn.Module):
    """Per-segment class scores I_i, pooled by the `avg`, `max` and `datp` heads.

    `source="cached"`: the backbone's cached logits, used as they are (frozen; no parameters).
    `source="linear"`: a trainable linear classifier (after optional dropout, as in TSN) on the
    globally average-pooled conv features; needed when the cache holds ImageNet logits.

    Args:
        source: "cached" or "linear" (`default_score_source` picks one from the store).
        num_classes: C.
        in_channels: Cf of the conv features (used by "linear").
        dropout: dropout probability before the linear classifier.
    """

    def __init__(self, *, source: str, num_classes: int, in_channels: int = 512, dropout: float = 0.0):
        super().__init__()
        if source not in SCORE_SOURCES:
            raise ValueError(f"unknown score source {source!r}; choose from {list(SCORE_SOURCES)}")
        self.source = source
        self.num_classes = num_classes
        if source == "linear":
            self.dropout = nn.Dropout(dropout)
            self.fc = nn.Linear(in_channels, num_classes)

    def forward(self, x: SegmentBatch, mask: Tensor) -> Tensor:
        """Per-segment scores.

        Args:
            x: batch with `logits` (cached) or `conv` (linear).
            mask: (B, N) bool.

        Returns:
            (B, N, C) scores, zero on masked segments.
        """
        if self.source == "linear":
            return self.fc(self.dropout(pooled_features(x, mask))).masked_fill(~mask[..., None], 0.0)
        if x.logits is None:
            raise ValueError("score_source='cached' needs SegmentBatch.logits but it is None; "
                             "use score_source='linear'")
        if x.logits.shape[-1] != self.num_classes:
            raise ValueError(
                f"cached logits have {x.logits.shape[-1]} classes but the head has num_classes="
                f"{self.num_classes}; use score_source='linear' (see default_score_source)"
            )
        return x.logits.masked_fill(~mask[..., None], 0.0)

    def transfer_layer(self) -> nn.Module | None:
        """The linear classifier on the pooled features ("linear"), or None ("cached" scores)."""
        return self.fc if self.source == "linear" else None

