"""Per-channel standardisation of conv features (`ChannelNorm`) and its statistics (`fit_norms`)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

FLOAT16_MAX = float(torch.finfo(torch.float16).max)


@dataclass(frozen=True)
class ChannelNorm:
    """Per-channel standardisation of conv maps: `(x - mean[c]) / std[c]`, held at float16 precision.

    Frozen backbones give features whose channels differ in offset and scale, and the streams differ
    by orders of magnitude (a randomly initialised ResNet-18 on the demo's videos: rgb values 1.26 on
    average with channel means spread by 1.23, flow values 0.05 +- 0.07): the small class-dependent
    part is then slow to find for Adam on a few hundred videos (every demo head sat at chance).
    Standardising with the training videos' statistics, as any linear probe does, fixes that; the statistics are saved in the checkpoint and applied to every later input.

    Attributes:
        mean: (Cf,) float32 mean of each channel over the training videos' real segments and positions.
        std: (Cf,) float32 standard deviation of each channel (floored at 1e-6).
    """

    mean: torch.Tensor
    std: torch.Tensor

    def __call__(self, conv: torch.Tensor | None) -> torch.Tensor | None:
        """(B, N, Cf, ...) or (B, N, Cf) conv features -> standardised float32 values rounded to float16.

        The rounding to float16 (the store's own precision; values clamped to its range) is what lets
        `SegmentData` standardise its in-RAM float16 copy once and stream batches with the same bits.
        """
        if conv is None:
            return None
        return self.half(conv).float()

    def half(self, conv: torch.Tensor) -> torch.Tensor:
        """`self(conv)` as float16: `conv * (1 / std) - mean / std` in float32 (one fused multiply-add
        pass: a sub and a div took twice as long on the streamed path), clamped to float16's range.

        On CPU it runs a block of ~1 MiB of float32 at a time, so each block's float32 temporary stays
        in cache: 3x faster than whole-batch passes (12 vs 35 ms for 32 x 10 x 512x7x7 on one thread,
        the reader worker's main cost); the values are the same bits either way (one elementwise
        formula, tested).
        """
        shape = (-1,) + (1,) * (conv.dim() - 3)  # broadcast over the spatial dims, if any
        scale = (1.0 / self.std).view(shape).to(conv.device)
        bias = (-self.mean / self.std).view(shape).to(conv.device)
        out = torch.empty(conv.shape, dtype=torch.float16, device=conv.device)
        rows_in, rows_out = conv.reshape((-1,) + conv.shape[2:]), out.view((-1,) + conv.shape[2:])
        step = max(1, (1 << 18) // max(1, math.prod(conv.shape[2:]))) if conv.device.type == "cpu" else len(rows_in)
        for i in range(0, len(rows_in), max(step, 1)):
            rows_out[i:i + step] = torch.addcmul(bias, rows_in[i:i + step].float(), scale).clamp_(
                -FLOAT16_MAX, FLOAT16_MAX)
        return out

    def state(self) -> dict:
        return {"mean": self.mean.clone(), "std": self.std.clone()}

    @classmethod
    def from_state(cls, state: dict) -> ChannelNorm:
        return cls(state["mean"].float(), state["std"].float())


def fit_norms(data, rows: Sequence[int], *, batch_size: int = 64) -> dict[str, ChannelNorm]:
    """{stream: ChannelNorm} of the raw features: mean and std of each channel over the real segments
    (all positions) of `rows`, accumulated in float64 in one pass over the data for every stream.

    `data` is a `datp.pool.data.SegmentData` (not imported here: data's streaming worker uses
    `ChannelNorm`, so this module stays below data.py)."""
    rows = np.asarray(rows, np.int64)
    sums = {s: [0.0, 0.0, 0] for s in data.streams}  # sum, sum of squares, count per stream
    for start in range(0, len(rows), batch_size):
        batch = data._load(rows[start:start + batch_size])  # as stored: never through data.norm
        for stream, acc in sums.items():
            x = batch.conv[stream][batch.mask].double()  # (S, Cf, ...)
            x = x.transpose(0, 1).reshape(x.shape[1], -1)  # (Cf, S * positions)
            acc[0], acc[1], acc[2] = acc[0] + x.sum(1), acc[1] + (x * x).sum(1), acc[2] + x.shape[1]
    norms = {}
    for stream, (total, total_sq, count) in sums.items():
        if not count:
            raise ValueError(f"no real segments of stream {stream!r} to standardise with; extract features first")
        mean = total / count
        std = (total_sq / count - mean * mean).clamp_min(0).sqrt().clamp_min(1e-6)
        norms[stream] = ChannelNorm(mean.float(), std.float())
    return norms
