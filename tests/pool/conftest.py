"""Shared fixtures for the pooling-head tests: tiny batches, head builders, synthetic problems."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from datp.pool.heads import HEADS, SegmentBatch, build_head, param_groups

B, N, C, CF = 2, 5, 3, 8  # the tiny sizes of the unit tests

# Small but complete versions of every head (the LSTM and attention widths shrunk for speed).
SMALL_OPTIONS = {"lstm-attn": {"hidden": 16}, "self-attn": {"attn_hidden": 16}, "joint-attn": {"attn_hidden": 16}}


def small_head(name: str, *, num_classes: int = C, num_segments: int = N, in_channels: int = CF, **options):
    """`build_head` with the tiny sizes; score-pooling heads use the trainable linear scores."""
    kwargs = dict(num_classes=num_classes, num_segments=num_segments, in_channels=in_channels)
    kwargs |= SMALL_OPTIONS.get(name, {})
    if HEADS[name].uses_scores:
        kwargs["score_source"] = "linear"
    return build_head(name, **(kwargs | options))


def random_batch(*, b: int = B, n: int = N, c: int = C, cf: int = CF, size: int = 7, seed: int = 0,
                 dtype: torch.dtype = torch.float32, times: bool = True) -> SegmentBatch:
    """Random conv maps (b, n, cf, size, size), logits (b, n, c) and sorted times in [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    t = torch.sort(torch.rand(b, n, generator=g, dtype=torch.float64), dim=1).values.to(dtype)
    return SegmentBatch(
        conv=torch.randn(b, n, cf, size, size, generator=g, dtype=torch.float64).to(dtype),
        logits=torch.randn(b, n, c, generator=g, dtype=torch.float64).to(dtype),
        t=t if times else None,
    )


def head_input(name: str, x: SegmentBatch, flow: SegmentBatch | None = None):
    """What `forward` of head `name` takes: the batch, or {"rgb", "flow"} for joint-attn."""
    if name != "joint-attn":
        return x
    return {"rgb": x, "flow": x if flow is None else flow}


def _videos(n: int, protos: torch.Tensor, salience: torch.Tensor, g: torch.Generator, *, kind: str,
            two_streams: bool, num_segments: int = 5):
    """n synthetic videos. easy: every segment shows the label's class. key: one or two segments at
    random positions show the label's class and carry a class-independent salience pattern (the key
    moment); the others show one confusing class, drawn per video from the other classes."""
    num_classes = protos.shape[0]
    y = torch.randint(0, num_classes, (n,), generator=g)
    content = y[:, None].repeat(1, num_segments)  # (n, N) class shown by each segment
    key = torch.zeros(n, num_segments, dtype=torch.bool)
    if kind == "key":
        confuser = (y + torch.randint(1, num_classes, (n,), generator=g)) % num_classes
        content = confuser[:, None].repeat(1, num_segments)
        count = torch.randint(1, 3, (n,), generator=g)
        for i in range(n):
            where = torch.randperm(num_segments, generator=g)[: count[i]]
            key[i, where] = True
            content[i, where] = y[i]
    noise = 0.5 * torch.randn(n, num_segments, *protos.shape[1:], generator=g)
    conv = protos[content] + noise  # (n, N, Cf, 7, 7)
    # Cached logits of a frozen backbone that recognises what each segment shows.
    logits = 3.0 * F.one_hot(content, num_classes).float() + torch.randn(n, num_segments, num_classes, generator=g)
    marked = conv + key[..., None, None, None] * salience
    if not two_streams:
        return SegmentBatch(conv=marked, logits=logits), y
    # Two streams: only the flow (motion) stream shows where the key moment is.
    flow = protos[content] + 0.5 * torch.randn(n, num_segments, *protos.shape[1:], generator=g)
    return {"rgb": SegmentBatch(conv=conv, logits=logits),
            "flow": SegmentBatch(conv=flow + key[..., None, None, None] * salience)}, y


def synthetic_problem(kind: str, *, seed: int = 0, num_classes: int = 5, channels: int = CF,
                      n_train: int = 256, n_test: int = 256, two_streams: bool = False):
    """((x_train, y_train), (x_test, y_test)) of an in-memory synthetic feature store.

    Class c's conv maps have a constant 2 on channel c plus a fixed random pattern; the salience of
    key segments is a constant 2 on the last channel plus a pattern. With a random confuser among
    3 classes, a confuser class appears in more segments of each wrong label than the key class in
    its own label, so heads that start from uniform weights learn the anti-correlation first and
    only sometimes recover; with 5 classes they learn the key moment reliably (10 of 10 seeds).
    """
    assert num_classes < channels, "the last channel holds the salience"
    g = torch.Generator().manual_seed(seed)
    protos = 0.5 * torch.randn(num_classes, channels, 7, 7, generator=g)
    protos[torch.arange(num_classes), torch.arange(num_classes)] += 2.0
    salience = 0.5 * torch.randn(channels, 7, 7, generator=g)
    salience[-1] += 2.0
    train = _videos(n_train, protos, salience, g, kind=kind, two_streams=two_streams)
    test = _videos(n_test, protos, salience, g, kind=kind, two_streams=two_streams)
    return train, test


def fit(head, x, y, *, steps: int, lr: float = 1e-2):
    """Full-batch Adam on cross-entropy (with `param_groups`); returns the head in eval mode."""
    params = param_groups(head, lr)
    if params:
        optimizer = torch.optim.Adam(params)
        for _ in range(steps):
            loss = F.cross_entropy(head(x).logits, y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return head.eval()


@torch.no_grad()
def accuracy(head, x, y) -> float:
    return (head(x).logits.argmax(dim=1) == y).double().mean().item()


@pytest.fixture
def seeded_one_thread():
    """Seeded, single-threaded: these tensors are tiny, and on a loaded 2-core machine intra-op
    threads made the training tests 20x slower. The head tests use it through `pytestmark` (not
    autouse, so the other tests in this folder keep their own settings)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    yield
    torch.set_num_threads(threads)


# The helpers above reach the tests as fixtures: `from conftest import ...` would pick whichever
# tests/*/conftest.py Python imported first.
@pytest.fixture
def make_head():
    return small_head


@pytest.fixture
def make_batch():
    return random_batch


@pytest.fixture
def as_input():
    return head_input


@pytest.fixture
def problem():
    return synthetic_problem


@pytest.fixture
def train():
    return fit


@pytest.fixture
def score():
    return accuracy
