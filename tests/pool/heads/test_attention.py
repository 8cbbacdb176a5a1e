"""Attention heads against numpy implementations of their equations, and the TSRNet regulariser."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from datp_testing import assert_close

from datp.pool.heads import SegmentBatch
from datp.pool.heads.attention import (
    JointAttnHead,
    LSTMAttnHead,
    SelfAttnHead,
    temporal_regularizer,
)

pytestmark = pytest.mark.usefixtures("seeded_one_thread")

B, N, C, CF = 2, 5, 3, 8
MASK = torch.tensor([[True] * N, [True, True, True, False, False]])


def close(actual, expected, what: str = "", atol: float = 1e-10):
    assert_close(actual, expected, atol, what)


def np_(p: torch.Tensor) -> np.ndarray:
    return p.detach().numpy()


def softmax(e: np.ndarray) -> np.ndarray:
    e = np.exp(e - e.max())
    return e / e.sum()


def sigmoid(z):
    return 1 / (1 + np.exp(-z))


def features(x: SegmentBatch, b: int) -> np.ndarray:
    """(n, Cf) pooled features of the real segments of video b."""
    return x.conv[b, : int(MASK[b].sum())].numpy().mean(axis=(-2, -1))


# ---------------------------------------------------------------- lstm-attn


def lstm_attn_by_hand(head: LSTMAttnHead, v: np.ndarray):
    """alpha^t = softmax_i(tanh(w_a . h_{t-1} + u_a . v_i + b_a)), x_t = sum_i alpha_i^t v_i, into a
    stacked LSTM (gates i, f, g, o as torch orders them), classifier on the top h_t."""
    L, H = head.lstm.num_layers, head.lstm.hidden_size
    h, c = np.zeros((L, H)), np.zeros((L, H))
    w_a, u_a, b_a = np_(head.w_a.weight)[0], np_(head.u_a.weight)[0], np_(head.u_a.bias)[0]
    logits, alphas = [], []
    for _ in range(head.num_steps):
        alpha = softmax(np.tanh(w_a @ h[-1] + v @ u_a + b_a))
        inp = alpha @ v
        for layer in range(L):
            get = lambda name: np_(getattr(head.lstm, f"{name}_l{layer}"))  # noqa: E731
            z = get("weight_ih") @ inp + get("bias_ih") + get("weight_hh") @ h[layer] + get("bias_hh")
            i, f, g, o = np.split(z, 4)
            c[layer] = sigmoid(f) * c[layer] + sigmoid(i) * np.tanh(g)
            h[layer] = sigmoid(o) * np.tanh(c[layer])
            inp = h[layer]
        logits.append(np_(head.classifier.weight) @ h[-1] + np_(head.classifier.bias))
        alphas.append(alpha)
    last = slice(head.num_steps - head.average_last, head.num_steps)
    return np.mean(logits[last], axis=0), np.mean(alphas[last], axis=0)


@pytest.mark.parametrize("steps, last", [(None, None), (4, 1), (3, 3)])
def test_lstm_attention_by_hand(steps, last, make_batch):
    head = LSTMAttnHead(num_classes=C, num_segments=N, in_channels=CF, hidden=6, num_steps=steps,
                        average_last=last).double()
    x = make_batch(dtype=torch.float64)
    out = head(x, MASK)
    for b in range(B):
        logits, weights = lstm_attn_by_hand(head, features(x, b))
        close(out.logits[b], logits, f"lstm-attn logits of video {b}")
        close(out.weights[b, : len(weights)], weights, f"lstm-attn weights of video {b}")


def test_lstm_attention_defaults_and_errors():
    head = LSTMAttnHead(num_classes=C, num_segments=7, in_channels=CF)
    assert (head.num_steps, head.average_last, head.lstm.hidden_size, head.lstm.num_layers) == (7, 4, 512, 2)
    with pytest.raises(ValueError, match="1 <= average_last <= num_steps, got num_steps=3, average_last=4"):
        LSTMAttnHead(num_classes=C, num_segments=3, average_last=4)


# ---------------------------------------------------------------- self-attn


@pytest.mark.parametrize("attention", ["softmax", "sigmoid"])
def test_self_attention_by_hand(attention, make_batch):
    head = SelfAttnHead(num_classes=C, in_channels=CF, attn_hidden=4, attention=attention).double()
    x = make_batch(dtype=torch.float64)
    out = head(x, MASK)
    for b in range(B):
        X = features(x, b).T  # (Cf, n): segments as columns, as TSRNet writes it
        e = np_(head.w_2.weight) @ np.tanh(np_(head.W_1.weight) @ X)  # (1, n)
        if attention == "softmax":
            a = softmax(e[0])
            m = X @ a
        else:
            a = sigmoid(e[0] + np_(head.w_2.bias)[0])
            m = X @ a / a.sum()
        close(out.weights[b, : len(a)], a, f"self-attn a ({attention}) of video {b}")
        close(out.logits[b], np_(head.classifier.weight) @ m + np_(head.classifier.bias), f"logits of video {b}")


def test_regularizer_by_hand():
    a = torch.tensor([[0.1, 0.5, 0.2, 0.9, 0.3], [0.4, 0.6, 7.0, 0.1, 0.2]], dtype=torch.float64)
    mask = torch.tensor([[True] * N, [True, True, False, True, True]])  # slot 2 padded: no pair across it
    smooth = [0.4**2 + 0.3**2 + 0.7**2 + 0.6**2, 0.2**2 + 0.1**2]
    l1 = [2.0, 1.3]
    expected = np.mean([0.3 * s + 0.05 * n for s, n in zip(smooth, l1)])
    close(temporal_regularizer(a, mask, alpha=0.3, beta=0.05), expected, "alpha * smoothness + beta * L1")
    close(SelfAttnHead.regularizer(a, mask, alpha=0.3, beta=0.05), expected, "SelfAttnHead.regularizer")


def test_sparsity_is_constant_under_softmax_and_acts_under_sigmoid(make_batch):
    x = make_batch()
    soft = SelfAttnHead(num_classes=C, in_channels=CF, attn_hidden=4)
    l1 = soft.regularizer(soft(x, MASK).weights, MASK, alpha=0.0, beta=1.0)
    close(l1, 1.0, "||a||_1 under softmax", atol=1e-6)
    sig = SelfAttnHead(num_classes=C, in_channels=CF, attn_hidden=4, attention="sigmoid")
    sig.regularizer(sig(x, MASK).weights, MASK, alpha=0.0, beta=1.0).backward()
    assert all(p.grad.abs().sum() > 0 for p in (sig.W_1.weight, sig.w_2.weight, sig.w_2.bias))


def test_self_attention_rejects_unknown_attention():
    with pytest.raises(ValueError, match=r"unknown self-attn attention 'relu'; choose from \['softmax', 'sigmoid'\]"):
        SelfAttnHead(num_classes=C, attention="relu")


# ---------------------------------------------------------------- joint-attn


def test_joint_attention_by_hand(make_batch):
    head = JointAttnHead(num_classes=C, in_channels={"rgb": CF, "flow": 4}, attn_hidden=5).double()
    rgb, flow = make_batch(dtype=torch.float64, seed=0), make_batch(dtype=torch.float64, seed=1, cf=4)
    out = head({"rgb": rgb, "flow": flow}, MASK)
    for b in range(B):
        v = {"rgb": features(rgb, b), "flow": features(flow, b)}  # (n, Cf_s)
        joint = np.concatenate([v["rgb"], v["flow"]], axis=1)
        a = softmax((np.tanh(joint @ np_(head.W_1.weight).T) @ np_(head.w_2.weight).T)[:, 0])
        logits = sum(np_(head.classifiers[s].weight) @ (a @ v[s]) + np_(head.classifiers[s].bias) for s in v)
        close(out.weights[b, : len(a)], a, f"shared attention of video {b}")
        close(out.logits[b], logits, f"fused logits of video {b}")


def test_joint_attention_uses_both_streams(make_batch):
    head = JointAttnHead(num_classes=C, in_channels=CF, attn_hidden=5)
    rgb, flow = make_batch(seed=0), make_batch(seed=1)
    moved = make_batch(seed=2)
    base = head({"rgb": rgb, "flow": flow}).weights
    for stream, batch in (("rgb", {"rgb": moved, "flow": flow}), ("flow", {"rgb": rgb, "flow": moved})):
        assert not torch.allclose(head(batch).weights, base), f"the attention ignores the {stream} stream"


def test_joint_attention_errors_name_the_streams(make_batch):
    head = JointAttnHead(num_classes=C, in_channels=CF)
    x = make_batch()
    with pytest.raises(ValueError, match=r"for streams \['rgb', 'flow'\], got \['rgb'\]; train it on a store"):
        head({"rgb": x})
    with pytest.raises(ValueError, match=r"got SegmentBatch"):
        head(x)
    with pytest.raises(ValueError, match="stream 'flow' has .* a mask unlike stream 'rgb'"):
        head({"rgb": x._replace(mask=MASK), "flow": x._replace(mask=~MASK)})
    with pytest.raises(ValueError, match=r"in_channels has streams \['rgb'\] but streams=\['rgb', 'flow'\]"):
        JointAttnHead(num_classes=C, in_channels={"rgb": CF})
