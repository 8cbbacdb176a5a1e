"""Pooling heads: one interface, one registry.

Every head is an `nn.Module` with `forward(x, mask=None) -> HeadOutput(logits (B, C), weights (B, N))`
where `x` is a `SegmentBatch` (`joint-attn` takes `{stream: SegmentBatch}`); `base.py` holds the types
and the conventions on masks and all-masked rows.

- `base.py`: `SegmentBatch`, `HeadOutput`, masks and times, the per-segment class scores I_i
  (`SegmentScores`: cached logits or a trainable linear classifier).
- `pooling.py`: the `avg` (TSN consensus) and `max` baselines.
- `datp.py`: Deep Adaptive Temporal Pooling (mixture of Gaussians or discrete weights).
- `attention.py`: `lstm-attn`, `self-attn` (with TSRNet's regulariser) and `joint-attn`.
- `registry.py`: `HEADS`, `build_head(name, **kwargs)`, `param_groups(head, lr)`, `warm_up(optimizer, epoch, epochs)`.

Every constructor is keyword-only and accepts `num_classes`, `num_segments` and `in_channels`, so
`build_head(name, num_classes=C, num_segments=N, in_channels=Cf, **options)` works for any name.
Heads that pool per-segment class scores (`uses_scores = True`: avg, max, datp) also take
`score_source` ("cached" or "linear", see `default_score_source`); the attention heads classify
pooled features with their own classifier and do not.

`head.transfer_layer()` returns the first fully connected layer that reads the pooled segment
features v_i (TSRNet's fc1, used by `train-head --transfer-from`; see docs/detection.md), or None
when the head has none (avg, max and datp on cached scores).
"""

from datp.pool.heads.base import HeadOutput, SegmentBatch, default_score_source
from datp.pool.heads.pooling import AvgHead, MaxHead
from datp.pool.heads.registry import HEADS, build_head, param_groups, warm_up

__all__ = [
    "HEADS", "AvgHead", "HeadOutput", "MaxHead", "SegmentBatch", "build_head", "default_score_source", "param_groups", "warm_up",
]
