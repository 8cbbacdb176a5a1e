"""Attention pooling heads: `lstm-attn`, `self-attn` and the two-stream `joint-attn`.

All three read the globally average-pooled segment features v_i (B, N, Cf) and classify a pooled
feature with their own linear classifier (they do not pool per-segment class scores). Masked
segments get zero attention (`torch.finfo(dtype).min` before the softmax); an all-masked row gives
zero logits and zero weights.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import Tensor, nn

from datp.pool.heads.base import (
    HeadOutput,
    SegmentBatch,
    masked_softmax,
    pooled_features,
    resolve_mask,
    zero_empty_rows,
)

ATTENTIONS = ("softmax", "sigmoid")


class LSTMAttnHead(nn.Module):
    """Temporal attention with a stacked LSTM (Liu, Tian, Wang 2017).

    At step t = 1..T the LSTM reads x_t = sum_i alpha_i^t v_i with

        alpha^t = softmax_i(tanh(w_a . h_{t-1} + u_a . v_i + b_a)),

    h_{t-1} the top layer's hidden state (h_0 = c_0 = 0), w_a and u_a vectors and b_a a scalar. A
    linear classifier reads h_t at every step; the logits are the mean of the classifier outputs of
    the last `average_last` steps, and the weights are the mean of alpha^t over those same steps (so
    they sum to 1 over the real segments). Because tanh bounds the scores to [-1, 1], one segment
    can get at most e^2 times the weight of another.

    Args:
        num_classes: C.
        num_segments: N; the default number of steps.
        in_channels: Cf of the segment features.
        hidden: LSTM cells per layer.
        num_layers: stacked LSTM layers.
        num_steps: T; None means num_segments.
        average_last: how many final steps the prediction averages; None means ceil(T / 2).
        dropout: dropout before the classifier.
    """

    uses_scores = False

    def __init__(self, *, num_classes: int, num_segments: int, in_channels: int = 512, hidden: int = 512,
                 num_layers: int = 2, num_steps: int | None = None, average_last: int | None = None,
                 dropout: float = 0.0):
        super().__init__()
        self.num_steps = num_segments if num_steps is None else num_steps
        self.average_last = math.ceil(self.num_steps / 2) if average_last is None else average_last
        if self.num_steps < 1 or not 1 <= self.average_last <= self.num_steps:
            raise ValueError(f"lstm-attn needs num_steps >= 1 and 1 <= average_last <= num_steps, got "
                             f"num_steps={self.num_steps}, average_last={self.average_last}")
        self.w_a = nn.Linear(hidden, 1, bias=False)
        self.u_a = nn.Linear(in_channels, 1)  # its bias is b_a
        self.lstm = nn.LSTM(in_channels, hidden, num_layers=num_layers, batch_first=True)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(hidden, num_classes)

    def forward(self, x: SegmentBatch, mask: Tensor | None = None) -> HeadOutput:
        """Runs the attention LSTM over the segments.

        Args:
            x: batch with `conv` (B, N, Cf, H, W) or (B, N, Cf).
            mask: (B, N) bool, True for a real segment; None uses `x.mask`.

        Returns:
            logits (B, C) and weights (B, N), the attention averaged over the steps used.
        """
        mask = resolve_mask(x, mask)
        v = pooled_features(x, mask)  # (B, N, Cf)
        B, N, _ = v.shape
        u = self.u_a(v)[..., 0]  # (B, N): u_a . v_i + b_a
        state = None  # zeros
        h_top = v.new_zeros(B, self.lstm.hidden_size)
        step_logits, step_alpha = [], []
        for _ in range(self.num_steps):
            alpha = masked_softmax(torch.tanh(self.w_a(h_top) + u), mask)  # (B, N)
            x_t = torch.einsum("bn,bnc->bc", alpha, v)
            out, state = self.lstm(x_t[:, None, :], state)  # out: (B, 1, hidden)
            h_top = out[:, 0]
            step_logits.append(self.classifier(self.dropout(h_top)))
            step_alpha.append(alpha)
        last = slice(self.num_steps - self.average_last, self.num_steps)
        logits = torch.stack(step_logits[last]).mean(dim=0)
        weights = torch.stack(step_alpha[last]).mean(dim=0)
        return HeadOutput(zero_empty_rows(logits, mask), weights)

    def transfer_layer(self) -> nn.Module:
        """TSRNet's fc1: u_a, the layer that reads each segment's pooled feature v_i (the LSTM reads
        only attention-pooled inputs)."""
        return self.u_a


def temporal_regularizer(weights: Tensor, mask: Tensor | None = None, *, alpha: float, beta: float) -> Tensor:
    """TSRNet's attention regulariser: alpha * sum_i (a_i - a_{i+1})^2 + beta * ||a||_1.

    The smoothness term runs over pairs of neighbouring slots that are both real; the L1 term over
    the real segments. Under softmax attention ||a||_1 = 1 for every video, so only the sigmoid
    attention makes beta do anything.

    Args:
        weights: (B, N) attention a (the `weights` a `SelfAttnHead` returns).
        mask: (B, N) bool; None means all real.
        alpha: weight of the temporal smoothness term.
        beta: weight of the sparsity term.

    Returns:
        Scalar: the mean over the batch of the per-video terms.
    """
    if mask is None:
        mask = torch.ones_like(weights, dtype=torch.bool)
    a = weights.masked_fill(~mask, 0.0)
    pairs = mask[:, 1:] & mask[:, :-1]  # (B, N-1)
    smooth = ((a[:, 1:] - a[:, :-1]) ** 2).masked_fill(~pairs, 0.0).sum(dim=1)
    return (alpha * smooth + beta * a.abs().sum(dim=1)).mean()


class SelfAttnHead(nn.Module):
    """TSRNet's self-attentive pooling: a = softmax(w_2 tanh(W_1 X)), m = X a, classifier on m.

    X is (Cf, N), the segment features as columns; W_1 is (attn_hidden, Cf) and w_2 (1, attn_hidden),
    without biases as in the equation. Train with cross-entropy + `regularizer(weights, mask,
    alpha=..., beta=...)`.

    attention="softmax": a sums to 1 over the real segments, so the L1 (sparsity) term is the
    constant beta. attention="sigmoid": a_i = sigmoid(w_2 tanh(W_1 x_i) + b) in (0, 1) (w_2 gets a
    bias b so the attention level can move), pooled as m = X a / sum_i a_i; the returned weights are
    the raw a_i, on which the sparsity term acts.

    Args:
        num_classes: C.
        num_segments: unused (accepted so every head is built from the same store shape).
        in_channels: Cf of the segment features.
        attn_hidden: rows of W_1.
        attention: "softmax" or "sigmoid".
        dropout: dropout before the classifier.
    """

    uses_scores = False

    def __init__(self, *, num_classes: int, num_segments: int | None = None, in_channels: int = 512,
                 attn_hidden: int = 128, attention: str = "softmax", dropout: float = 0.0):
        super().__init__()
        if attention not in ATTENTIONS:
            raise ValueError(f"unknown self-attn attention {attention!r}; choose from {list(ATTENTIONS)}")
        self.attention = attention
        self.W_1 = nn.Linear(in_channels, attn_hidden, bias=False)
        self.w_2 = nn.Linear(attn_hidden, 1, bias=attention == "sigmoid")
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(in_channels, num_classes)

    def forward(self, x: SegmentBatch, mask: Tensor | None = None) -> HeadOutput:
        """Attends over segments and classifies the pooled feature.

        Args:
            x: batch with `conv` (B, N, Cf, H, W) or (B, N, Cf).
            mask: (B, N) bool, True for a real segment; None uses `x.mask`.

        Returns:
            logits (B, C) and attention a (B, N).
        """
        mask = resolve_mask(x, mask)
        v = pooled_features(x, mask)  # (B, N, Cf)
        e = self.w_2(torch.tanh(self.W_1(v)))[..., 0]  # (B, N)
        if self.attention == "softmax":
            a = masked_softmax(e, mask)
            pool = a
        else:
            a = torch.sigmoid(e).masked_fill(~mask, 0.0)
            pool = a / a.sum(dim=1, keepdim=True).clamp_min(torch.finfo(a.dtype).tiny)
        m = torch.einsum("bn,bnc->bc", pool, v)
        return HeadOutput(zero_empty_rows(self.classifier(self.dropout(m)), mask), a)

    @staticmethod
    def regularizer(weights: Tensor, mask: Tensor | None = None, *, alpha: float, beta: float) -> Tensor:
        """`temporal_regularizer`: alpha * sum_i (a_i - a_{i+1})^2 + beta * ||a||_1, batch mean."""
        return temporal_regularizer(weights, mask, alpha=alpha, beta=beta)

    def transfer_layer(self) -> nn.Module:
        """TSRNet's fc1: W_1, the attention MLP's first layer, which reads the pooled features v_i."""
        return self.W_1


class JointAttnHead(nn.Module):
    """Two-stream attention in the spirit of JNA: one attention from both streams, shared by both.

    With v_i^s the pooled features of stream s and [.;.] concatenation over the streams,

        a = softmax_i(w_2 tanh(W_1 [v_i^rgb; v_i^flow])),   m^s = sum_i a_i v_i^s,
        logits = sum_s (W^s m^s + b^s),

    i.e. every stream is pooled with the same weights a, and the per-stream linear classifiers are
    trained together on the fused (summed) logits, which lets them learn the fusion weights.

    Args:
        num_classes: C.
        num_segments: unused (accepted so every head is built from the same store shape).
        in_channels: Cf of every stream, or {stream: Cf}.
        streams: stream names, the keys `forward` expects.
        attn_hidden: rows of W_1.
        dropout: dropout before the classifiers.
    """

    uses_scores = False

    def __init__(self, *, num_classes: int, num_segments: int | None = None,
                 in_channels: int | Mapping[str, int] = 512, streams: tuple[str, ...] = ("rgb", "flow"),
                 attn_hidden: int = 128, dropout: float = 0.0):
        super().__init__()
        self.streams = tuple(streams)
        channels = in_channels if isinstance(in_channels, Mapping) else {s: in_channels for s in self.streams}
        if set(channels) != set(self.streams):
            raise ValueError(f"joint-attn in_channels has streams {sorted(channels)} but streams={list(self.streams)}")
        self.W_1 = nn.Linear(sum(channels[s] for s in self.streams), attn_hidden, bias=False)
        self.w_2 = nn.Linear(attn_hidden, 1, bias=False)
        self.dropout = nn.Dropout(dropout)
        self.classifiers = nn.ModuleDict({s: nn.Linear(channels[s], num_classes) for s in self.streams})

    def forward(self, x: Mapping[str, SegmentBatch], mask: Tensor | None = None) -> HeadOutput:
        """Attends jointly over both streams' segments and fuses their classifiers.

        Args:
            x: {stream: SegmentBatch with `conv`} for every stream in `streams`, same (B, N).
            mask: (B, N) bool, True for a real segment; None uses the first stream's `mask`.

        Returns:
            fused logits (B, C) and the shared attention a (B, N), summing to 1 over real segments.
        """
        if not isinstance(x, Mapping) or set(x) != set(self.streams):
            got = sorted(x) if isinstance(x, Mapping) else type(x).__name__
            raise ValueError(f"joint-attn needs {{stream: SegmentBatch}} for streams {list(self.streams)}, "
                             f"got {got}; train it on a store holding both streams")
        mask = resolve_mask(x[self.streams[0]], mask)
        for s in self.streams:
            if x[s].shape() != tuple(mask.shape) or (x[s].mask is not None and not torch.equal(x[s].mask, mask)):
                raise ValueError(f"joint-attn stream {s!r} has (B, N) = {x[s].shape()} or a mask unlike "
                                 f"stream {self.streams[0]!r}; give both streams the same segments")
        v = {s: pooled_features(x[s], mask) for s in self.streams}  # each (B, N, Cf_s)
        e = self.w_2(torch.tanh(self.W_1(torch.cat([v[s] for s in self.streams], dim=-1))))[..., 0]
        a = masked_softmax(e, mask)  # (B, N)
        logits = sum(self.classifiers[s](self.dropout(torch.einsum("bn,bnc->bc", a, v[s]))) for s in self.streams)
        return HeadOutput(zero_empty_rows(logits, mask), a)

    def transfer_layer(self) -> nn.Module:
        """TSRNet's fc1: W_1, which reads [v_i^s for s in streams] concatenated in `streams` order."""
        return self.W_1
