"""Shared head behaviour (every head), the registry, segment scores, and the avg and max heads."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from datp_testing import assert_close

from datp.pool.heads import (
    HEADS,
    AvgHead,
    MaxHead,
    SegmentBatch,
    build_head,
    default_score_source,
    param_groups,
    warm_up,
)
from datp.pool.heads.base import (
    SegmentScores,
    masked_softmax,
    resolve_mask,
    segment_times,
)

pytestmark = pytest.mark.usefixtures("seeded_one_thread")

B, N, C, CF = 2, 5, 3, 8


def close(actual, expected, what: str = "", atol: float = 1e-6):
    assert_close(actual, expected, atol, what)


# ---------------------------------------------------------------- base types and segment scores


def test_segment_times_spread_over_real_segments():
    mask = torch.tensor([[True, True, True, True, True], [True, False, True, True, False]])
    expected = [[0.1, 0.3, 0.5, 0.7, 0.9], [1 / 6, 0.0, 0.5, 5 / 6, 0.0]]
    close(segment_times(mask), expected, "segment_times")


def test_masked_softmax_ignores_masked_and_zeroes_empty_rows():
    logits = torch.tensor([[1.0, 2.0, 3.0], [1.0, 2.0, 3.0]])
    mask = torch.tensor([[True, False, True], [False, False, False]])
    e = np.exp([1.0, 3.0])
    close(masked_softmax(logits, mask), [[e[0] / e.sum(), 0, e[1] / e.sum()], [0, 0, 0]], "masked_softmax")


def test_resolve_mask_prefers_argument_then_batch_then_all_real():
    x = SegmentBatch(logits=torch.zeros(B, N, C))
    assert resolve_mask(x).all()
    batch_mask = torch.tensor([[True] * N, [True, True, False, False, False]])
    assert torch.equal(resolve_mask(x._replace(mask=batch_mask)), batch_mask)
    assert torch.equal(resolve_mask(x._replace(mask=batch_mask), ~batch_mask), ~batch_mask)
    with pytest.raises(ValueError, match=r"mask must be a \(2, 5\) bool tensor"):
        resolve_mask(x, torch.ones(B, N))


def test_linear_scores_are_a_classifier_on_pooled_conv(make_batch):
    x = make_batch(dtype=torch.float64)
    scores = SegmentScores(source="linear", num_classes=C, in_channels=CF).double()
    mask = torch.tensor([[True] * N, [True, True, True, False, False]])
    pooled = x.conv.numpy().mean(axis=(-2, -1))  # (B, N, Cf)
    expected = pooled @ scores.fc.weight.detach().numpy().T + scores.fc.bias.detach().numpy()
    expected[~mask.numpy()] = 0.0
    close(scores(x, mask), expected, "linear scores")


def test_cached_scores_pass_through_and_check_classes(make_batch):
    x = make_batch()
    mask = torch.ones(B, N, dtype=torch.bool)
    close(SegmentScores(source="cached", num_classes=C)(x, mask), x.logits, "cached scores")
    with pytest.raises(ValueError, match="cached logits have 3 classes but the head has num_classes=7"):
        SegmentScores(source="cached", num_classes=7)(x, mask)
    with pytest.raises(ValueError, match="SegmentBatch.logits but it is None"):
        SegmentScores(source="cached", num_classes=C)(x._replace(logits=None), mask)
    with pytest.raises(ValueError, match=r"unknown score source 'imagenet'; choose from \['cached', 'linear'\]"):
        SegmentScores(source="imagenet", num_classes=C)


def test_default_score_source():
    assert default_score_source(101, 101) == "cached"
    assert default_score_source(1000, 101) == "linear"
    with pytest.raises(ValueError, match="dataset_num_classes must be >= 1, got 0"):
        default_score_source(1000, 0)


# ---------------------------------------------------------------- avg and max by hand


def test_avg_is_the_mean_over_real_segments(make_batch):
    x = make_batch(dtype=torch.float64)
    mask = torch.tensor([[True] * N, [False, True, True, False, True]])
    out = AvgHead(num_classes=C, score_source="cached")(x, mask)
    I = x.logits.numpy()
    expected = np.stack([I[0].mean(axis=0), I[1, [1, 2, 4]].mean(axis=0)])
    close(out.logits, expected, "avg logits")
    close(out.weights, [[0.2] * 5, [0, 1 / 3, 1 / 3, 0, 1 / 3]], "avg weights")


def test_max_takes_the_largest_real_score_and_marks_the_deciding_segment(make_batch):
    x = make_batch(dtype=torch.float64)
    mask = torch.tensor([[True] * N, [True, True, False, True, False]])
    out = MaxHead(num_classes=C, score_source="cached")(x, mask)
    I = x.logits.numpy()
    expected = np.stack([I[0].max(axis=0), I[1, [0, 1, 3]].max(axis=0)])
    close(out.logits, expected, "max logits")
    for b, real in enumerate([[0, 1, 2, 3, 4], [0, 1, 3]]):
        top = expected[b].argmax()
        winner = real[int(I[b, real, top].argmax())]
        close(out.weights[b], np.eye(N)[winner], f"max weights of video {b}")


# ---------------------------------------------------------------- registry


def test_registry_names_and_error():
    assert sorted(HEADS) == ["avg", "datp", "joint-attn", "lstm-attn", "max", "self-attn"]
    with pytest.raises(ValueError) as info:
        build_head("mean", num_classes=C)
    assert str(info.value) == ("unknown head 'mean'; choose from "
                               "['avg', 'datp', 'joint-attn', 'lstm-attn', 'max', 'self-attn']")


@pytest.mark.parametrize("name", sorted(HEADS))
def test_every_head_builds_from_the_store_shape(name):
    head = build_head(name, num_classes=C, num_segments=N, in_channels=CF)
    assert isinstance(head, HEADS[name])


def test_param_groups_scale_datp_auxiliary_net_only(make_head):
    head = make_head("datp")
    groups = param_groups(head, 0.01)
    by_lr = {round(g["lr"], 12): {id(p) for p in g["params"]} for g in groups}
    aux = {id(p) for p in head.aux.parameters()}
    assert by_lr == {0.003: aux, 0.01: {id(p) for p in head.parameters()} - aux}


@pytest.mark.parametrize("warmup, epochs, expected", [
    (0.3, 10, [1 / 3, 2 / 3, 1, 1, 1]),  # W = round(0.3 x 10) = 3 epochs
    (0.3, 30, [1 / 9, 2 / 9, 3 / 9, 4 / 9]),  # train-head's default 30 epochs: full rate from epoch 9
    (0.01, 10, [1, 1]),  # W is at least one epoch: the full rate from the start
    (0.0, 10, [1, 1]),
])
def test_warm_up_raises_the_auxiliary_rate_linearly_and_leaves_the_classifier(make_head, warmup, epochs, expected):
    head = build_head("datp", num_classes=C, num_segments=N, in_channels=CF, aux_warmup=warmup)
    optimizer = torch.optim.Adam(param_groups(head, 0.01))
    aux = {id(p) for p in head.aux.parameters()}
    for epoch, factor in enumerate(expected):
        warm_up(optimizer, epoch, epochs)
        rates = {("aux" if id(g["params"][0]) in aux else "classifier"): g["lr"] for g in optimizer.param_groups}
        assert rates == pytest.approx({"aux": 0.003 * factor, "classifier": 0.01}), f"epoch {epoch}"


# ---------------------------------------------------------------- every head: masks, gradients


def _one_by_one(head, name, x, mask, as_input):
    """Each video cut to its real (leading) segments and run alone."""
    outs = []
    for b in range(mask.shape[0]):
        n = int(mask[b].sum())
        video = SegmentBatch(conv=x.conv[b:b + 1, :n], logits=x.logits[b:b + 1, :n],
                             t=None if x.t is None else x.t[b:b + 1, :n])
        outs.append(head(as_input(name, video)))
    return outs


@pytest.mark.parametrize("times", [True, False], ids=["given-times", "default-times"])
@pytest.mark.parametrize("name", sorted(HEADS))
def test_padded_batch_equals_unpadded_videos(name, times, make_head, make_batch, as_input):
    torch.manual_seed(1)
    head = make_head(name).double().eval()
    if name == "datp":  # leave the start-for-any-input initialisation so the weights depend on the video
        torch.nn.init.normal_(head.aux.regress.weight, std=0.5)
    x = make_batch(b=3, dtype=torch.float64, times=times, seed=3)
    mask = torch.tensor([[True] * 5, [True] * 3 + [False] * 2, [True] + [False] * 4])
    # Padded slots hold NaN: nothing of them may reach a result.
    nan = ~mask[..., None]
    padded = SegmentBatch(conv=x.conv.masked_fill(nan[..., None, None], float("nan")),
                          logits=x.logits.masked_fill(nan, float("nan")),
                          t=None if x.t is None else x.t.masked_fill(~mask, float("nan")), mask=mask)
    out = head(as_input(name, padded))
    for b, alone in enumerate(_one_by_one(head, name, x, mask, as_input)):
        n = int(mask[b].sum())
        close(out.logits[b], alone.logits[0], f"{name} logits of video {b}", atol=1e-10)
        close(out.weights[b, :n], alone.weights[0], f"{name} weights of video {b}", atol=1e-10)
        close(out.weights[b, n:], np.zeros(N - n), f"{name} weights of padded slots of video {b}", atol=0)
    out.logits.sum().backward()
    bad = [p for p, v in head.named_parameters() if v.grad is not None and not torch.isfinite(v.grad).all()]
    assert not bad, f"{name}: NaN padding reached the gradients of {bad}"


@pytest.mark.parametrize("name", sorted(HEADS))
def test_all_masked_row_gives_zero_logits_and_weights(name, make_head, make_batch, as_input):
    head = make_head(name).double()
    x = make_batch(dtype=torch.float64)
    mask = torch.tensor([[True] * N, [False] * N])
    out = head(as_input(name, x._replace(mask=mask)))
    close(out.logits[1], np.zeros(C), f"{name} logits of the empty row", atol=0)
    close(out.weights[1], np.zeros(N), f"{name} weights of the empty row", atol=0)
    alone = head(as_input(name, SegmentBatch(conv=x.conv[:1], logits=x.logits[:1], t=x.t[:1])))
    close(out.logits[0], alone.logits[0], f"{name} logits next to an empty row", atol=1e-10)
    F.cross_entropy(out.logits, torch.tensor([0, 1])).backward()
    assert all(torch.isfinite(p.grad).all() for p in head.parameters() if p.grad is not None), name


@pytest.mark.parametrize("name", sorted(HEADS))
def test_weights_are_normalised_as_documented(name, make_head, make_batch, as_input):
    x = make_batch(b=2)
    mask = torch.tensor([[True] * N, [True, True, True, False, False]])
    weights = make_head(name)(as_input(name, x._replace(mask=mask))).weights
    assert (weights >= 0).all() and (weights[~mask] == 0).all(), name
    if name == "datp":  # unit L2 norm, so that S = sum_i weights_i I_i
        close(weights.norm(dim=1), np.ones(2), "datp weight norms")
    else:  # attention and consensus weights sum to 1
        close(weights.sum(dim=1), np.ones(2), f"{name} weight sums")


@pytest.mark.parametrize("name", sorted(HEADS))
def test_every_parameter_gets_a_gradient(name, make_head, make_batch, as_input):
    head = make_head(name)
    if name == "datp":  # the zero-initialised regression layer blocks gradients to the layers below it
        torch.nn.init.normal_(head.aux.regress.weight, std=0.1)
    out = head(as_input(name, make_batch()))
    F.cross_entropy(out.logits, torch.tensor([0, 2])).backward()
    missing = [p for p, v in head.named_parameters() if v.grad is None or not v.grad.abs().sum() > 0]
    assert not missing, f"{name}: no gradient reaches {missing}"


# ---------------------------------------------------------------- every head learns


@pytest.mark.parametrize("name", sorted(HEADS))
def test_every_head_learns_an_easy_problem(name, make_head, problem, train, score):
    (x, y), (x_test, y_test) = problem("easy", n_train=128, n_test=128, two_streams=name == "joint-attn")
    head = train(make_head(name, num_classes=5), x, y, steps=50)
    acc = score(head, x_test, y_test)
    print(f"easy problem: {name} test accuracy {acc:.3f}")
    assert acc >= 0.95, f"{name} reached {acc:.3f} < 0.95 on the easy problem"


KEY_MOMENT = {"datp": (200, 0.9), "lstm-attn": (150, 0.9), "self-attn": (200, 0.9), "joint-attn": (200, 0.9)}


@pytest.mark.parametrize("name", sorted(KEY_MOMENT))
def test_learned_pooling_finds_the_key_moment(name, make_head, problem, train, score):
    (x, y), (x_test, y_test) = problem("key", two_streams=name == "joint-attn")
    steps, target = KEY_MOMENT[name]
    head = train(make_head(name, num_classes=5), x, y, steps=steps)
    acc = score(head, x_test, y_test)
    print(f"key moment: {name} test accuracy {acc:.3f}")
    assert acc >= target, f"{name} reached {acc:.3f} < {target} on the key-moment problem"


@pytest.mark.parametrize("source", ["linear", "cached"])
def test_average_pooling_misses_the_key_moment(source, make_head, problem, train, score):
    (x, y), (x_test, y_test) = problem("key")
    head = train(make_head("avg", num_classes=5, score_source=source), x, y, steps=200)
    acc = score(head, x_test, y_test)
    print(f"key moment: avg ({source} scores) test accuracy {acc:.3f}")
    assert acc <= 0.5, f"avg reached {acc:.3f} on the key-moment problem; it should stay far below 0.9"
