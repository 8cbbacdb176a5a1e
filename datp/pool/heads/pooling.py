"""The score-pooling baselines: `avg` (TSN's consensus) and `max` over the segment class scores."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from datp.pool.heads.base import (
    HeadOutput,
    SegmentBatch,
    SegmentScores,
    resolve_mask,
    zero_empty_rows,
)


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


