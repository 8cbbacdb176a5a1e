"""DATP head: Eq. 1 and Eq. 3 by hand, the paper's gradients (Eq. 2, Eq. 4), initialisation, options."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from datp_testing import assert_close
from torch.autograd.functional import jacobian

from datp.pool.heads import SegmentBatch
from datp.pool.heads.datp import (
    DATPHead,
    l2_pool,
    l2_pool_log,
    mog_log_weights,
    mog_weights,
)

pytestmark = pytest.mark.usefixtures("seeded_one_thread")

B, N, C, CF, K = 2, 5, 3, 8, 2


def close(actual, expected, what: str = "", atol: float = 1e-10):
    assert_close(actual, expected, atol, what)


def datp(**options) -> DATPHead:
    """A float64 head; locate="fc" (mu from the fc layers) unless given, as the tests of Eq. 1-4 read
    the fc regression layer."""
    kwargs = dict(num_classes=C, num_segments=N, in_channels=CF, score_source="cached", locate="fc") | options
    return DATPHead(**kwargs).double()


def eq1(t, rho, mu, sigma):
    """w_i = sum_k rho_k / sqrt(2 pi sigma_k^2) exp(-(t_i - mu_k)^2 / (2 sigma_k^2)), numpy (B, N)."""
    t, rho, mu, sigma = (np.asarray(a.detach() if isinstance(a, torch.Tensor) else a) for a in (t, rho, mu, sigma))
    g = np.exp(-(t[:, :, None] - mu[:, None, :]) ** 2 / (2 * sigma[:, None, :] ** 2))
    return (rho[:, None, :] / np.sqrt(2 * np.pi * sigma[:, None, :] ** 2) * g).sum(axis=2)


def random_mixture(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    t = torch.sort(torch.rand(B, N, generator=g, dtype=torch.float64), dim=1).values
    rho = torch.rand(B, K, generator=g, dtype=torch.float64) + 0.1
    mu = torch.rand(B, K, generator=g, dtype=torch.float64)
    sigma = torch.rand(B, K, generator=g, dtype=torch.float64) * 0.4 + 0.05
    return t, rho, mu, sigma


# ---------------------------------------------------------------- forward by hand


@pytest.mark.parametrize("pooled", ["logits", "probs"])
@pytest.mark.parametrize("generator_input", ["conv", "softmax"])
def test_forward_equals_eq1_and_pooling_by_hand(pooled, generator_input, make_batch):
    head = datp(input=generator_input, pooled_scores=pooled).eval()
    torch.nn.init.normal_(head.aux.regress.weight, std=0.5)  # so that each video gets its own mixture
    x = make_batch(dtype=torch.float64)
    mask = torch.tensor([[True] * N, [True, True, True, True, False]])
    out = head(x, mask)
    rho, mu, sigma = head.mixture_params(x, mask)
    assert not torch.allclose(mu[0], mu[1]), "the regression should depend on the video"
    assert (rho >= 0).all() and torch.allclose(rho.sum(1), torch.ones(B, dtype=torch.float64))
    assert (sigma > 0).all() and ((mu > 0) & (mu < 1)).all()
    I = x.logits.numpy()
    if pooled == "probs":
        I = np.exp(I) / np.exp(I).sum(axis=-1, keepdims=True)
    w = eq1(x.t, rho, mu, sigma) * mask.numpy()  # padded segments get w_i = 0
    norm = np.sqrt((w**2).sum(axis=1, keepdims=True))
    S = (w[..., None] * I).sum(axis=1) / norm
    close(out.logits, S, "S = sum_i w_i I_i / ||w||_2")
    close(out.weights, w / norm, "weights = w / ||w||_2")


def test_discrete_generator_regresses_one_weight_per_slot(make_batch):
    head = datp(generator="discrete").eval()
    torch.nn.init.normal_(head.aux.regress.weight, std=0.5)
    x = make_batch(dtype=torch.float64)
    mask = torch.tensor([[True] * N, [True, True, False, False, False]])
    raw = head.aux(x.conv, mask).detach().numpy()  # (B, N)
    w = np.exp(raw) * mask.numpy()
    norm = np.sqrt((w**2).sum(axis=1, keepdims=True))
    out = head(x, mask)
    close(out.weights, w / norm, "discrete weights")
    close(out.logits, (w[..., None] * x.logits.numpy()).sum(axis=1) / norm, "discrete S")


def test_narrow_gaussians_far_from_every_segment_still_give_weights():
    t = torch.tensor([[0.1, 0.3, 0.5, 0.7, 0.9]], dtype=torch.float64)
    log_w = mog_log_weights(t, torch.zeros(1, 1), torch.tensor([[3.0]]), torch.log(torch.tensor([[0.01]])))
    assert torch.exp(log_w).max() == 0, "the weights underflow if computed directly"
    scores = torch.randn(1, N, C, dtype=torch.float64)
    S, weights = l2_pool_log(scores, log_w, torch.ones(1, N, dtype=torch.bool))
    close(weights, [[0, 0, 0, 0, 1]], "all weight on the segment nearest mu")
    close(S, scores[:, -1], "S = the nearest segment's scores")


@pytest.mark.parametrize("generator_input", ["conv", "softmax"])
def test_padded_slots_carry_nothing_into_the_fc_layers(generator_input, make_batch):
    head = datp(input=generator_input)
    torch.nn.init.normal_(head.aux.regress.weight, std=0.5)
    x = make_batch(dtype=torch.float64)
    mask = torch.tensor([[True, True, True, False, False]] * B)
    head(x, mask).logits.sum().backward()
    grad = head.aux.fc.weight.grad.view(-1, 32, N)  # fc input is the (32, N) temporal features, flattened
    assert grad[:, :, :3].abs().sum() > 0
    close(grad[:, :, 3:], np.zeros((grad.shape[0], 32, 2)), "fc gradient from padded slots", atol=0)


# ---------------------------------------------------------------- gradients: the paper's Eq. 2 and Eq. 4


def test_autograd_equals_eq2():
    """d w_i / d rho_k = g_ik, d w_i / d mu_k = rho_k g_ik (t_i - mu_k) / sigma_k^2,
    d w_i / d sigma_k = rho_k g_ik ((t_i - mu_k)^2 / sigma_k^3 - 1 / sigma_k),
    with g_ik = exp(-(t_i - mu_k)^2 / (2 sigma_k^2)) / sqrt(2 pi sigma_k^2)."""
    t, rho, mu, sigma = random_mixture()
    d_rho, d_mu, d_sigma = jacobian(lambda r, m, s: mog_weights(t, r, m, s), (rho, mu, sigma))  # each (B, N, B, K)
    d = t[:, :, None] - mu[:, None, :]  # (B, N, K)
    g = torch.exp(-(d**2) / (2 * sigma[:, None] ** 2)) / torch.sqrt(2 * math.pi * sigma[:, None] ** 2)
    expected = {
        "rho": g,
        "mu": rho[:, None] * g * d / sigma[:, None] ** 2,
        "sigma": rho[:, None] * g * (d**2 / sigma[:, None] ** 3 - 1 / sigma[:, None]),
    }
    for name, jac in (("rho", d_rho), ("mu", d_mu), ("sigma", d_sigma)):
        diagonal = torch.stack([jac[b, :, b] for b in range(B)])  # (B, N, K)
        close(diagonal, expected[name], f"d w / d {name}")
        off = torch.stack([jac[b, :, 1 - b] for b in range(B)])
        close(off, np.zeros((B, N, K)), f"d w / d {name} across videos", atol=0)


def test_autograd_equals_eq4():
    """d S_c / d I_ic = w_i / ||w||, d S_c / d w_i = I_ic / ||w|| - S_c w_i / ||w||^2 (real i); 0 for
    padded i."""
    g = torch.Generator().manual_seed(1)
    scores = torch.randn(B, N, C, generator=g, dtype=torch.float64)
    w = torch.rand(B, N, generator=g, dtype=torch.float64) + 0.1
    mask = torch.tensor([[True] * N, [True, False, True, True, False]])
    d_scores, d_w = jacobian(lambda i, v: l2_pool(i, v, mask)[0], (scores, w))  # (B, C, B, N, C), (B, C, B, N)
    wm = (w * mask).numpy()
    norm = np.sqrt((wm**2).sum(axis=1))  # (B,)
    S = (wm[..., None] * scores.numpy()).sum(axis=1) / norm[:, None]  # (B, C)
    for b in range(B):
        for c in range(C):
            expected_dI = np.zeros((N, C))
            expected_dI[:, c] = wm[b] / norm[b]
            close(d_scores[b, c, b], expected_dI, f"d S_{c} / d I (video {b})")
            expected_dw = (scores[b, :, c].numpy() / norm[b] - S[b, c] * wm[b] / norm[b] ** 2) * mask[b].numpy()
            close(d_w[b, c, b], expected_dw, f"d S_{c} / d w (video {b})")
            close(d_w[b, c, 1 - b], np.zeros(N), "d S / d w across videos", atol=0)


def test_head_gradient_is_eq4_after_eq2():
    """The head's own path (log-space Eq. 1, rescaled Eq. 3) has the chain-rule gradient
    d S_c / d theta = sum_i (d S_c / d w_i)(d w_i / d theta)."""
    t, rho, mu, sigma = random_mixture(seed=2)
    scores = torch.randn(B, N, C, dtype=torch.float64)
    mask = torch.tensor([[True] * N, [True, True, True, False, False]])

    def head_path(r, m, s):
        return l2_pool_log(scores, mog_log_weights(t, torch.log(r), m, torch.log(s)), mask)[0]

    def reference(r, m, s):  # Eq. 3 on the directly computed Eq. 1
        return l2_pool(scores, mog_weights(t, r, m, s), mask)[0]

    got = jacobian(head_path, (rho, mu, sigma))
    d_S_d_w = jacobian(lambda v: l2_pool(scores, v, mask)[0], mog_weights(t, rho, mu, sigma))  # (B, C, B, N)
    d_w = jacobian(lambda r, m, s: mog_weights(t, r, m, s), (rho, mu, sigma))  # each (B, N, B, K)
    for name, g, dw, ref in zip(("rho", "mu", "sigma"), got, d_w, jacobian(reference, (rho, mu, sigma))):
        chain = torch.einsum("bcxn,xnyk->bcyk", d_S_d_w, dw)
        close(g, chain, f"d S / d {name} through the head's path", atol=1e-9)
        close(g, ref, f"d S / d {name} against the direct formula", atol=1e-9)


# ---------------------------------------------------------------- initialisation


@pytest.mark.parametrize("generator_input", ["conv", "softmax"])
@pytest.mark.parametrize("num_gaussians", [1, 2, 3])
def test_initial_mixture_is_the_documented_one_for_any_input(num_gaussians, generator_input, make_batch):
    head = datp(num_gaussians=num_gaussians, input=generator_input)  # initialised in float32: 1e-7 tolerance
    expected_mu = np.arange(1, num_gaussians + 1) / (num_gaussians + 1)
    for seed, scale in ((0, 1.0), (1, 100.0), (2, 0.0)):
        x = make_batch(dtype=torch.float64, seed=seed)
        x = x._replace(conv=scale * x.conv, logits=scale * x.logits)
        rho, mu, sigma = head.mixture_params(x)
        close(rho, np.full((B, num_gaussians), 1 / num_gaussians), f"initial rho (input scale {scale})", 1e-7)
        close(mu, np.tile(expected_mu, (B, 1)), f"initial mu (input scale {scale})", 1e-7)
        close(sigma**2, np.full((B, num_gaussians), 0.2), f"initial variance (input scale {scale})", 1e-7)


def test_initial_discrete_weights_are_equal(make_batch):
    x = make_batch(dtype=torch.float64)
    mask = torch.tensor([[True] * N, [True, True, False, False, False]])
    weights = datp(generator="discrete")(x, mask).weights
    close(weights, [[1 / math.sqrt(5)] * 5, [1 / math.sqrt(2)] * 2 + [0] * 3], "initial discrete weights")


# ---------------------------------------------------------------- options and errors


def test_too_many_segments_and_small_maps_are_clear_errors(make_batch):
    head = datp()
    with pytest.raises(ValueError, match="built for num_segments=5 but got 6 segments"):
        head(make_batch(n=6))
    with pytest.raises(ValueError, match=r"needs \(B, N, Cf, H>=7, W>=7\) conv maps, got shape \(2, 5, 8, 5, 5\)"):
        head(make_batch(size=5))


def test_small_maps_get_a_conv_over_the_whole_map(make_batch):
    """map_size=4 (a ResNet at 112): the spatial conv is 4x4, so its output at the one position is the
    full contraction of the map with each filter, computed here by hand."""
    head = datp(map_size=4)
    assert head.aux.spatial.kernel_size == (4, 4)
    x = make_batch(size=4, dtype=torch.float64)
    out = head(x)
    assert out.weights.shape == (B, N) and torch.isfinite(out.logits).all()
    conv = head.aux.spatial
    by_hand = torch.einsum("bnchw,ochw->bno", x.conv, conv.weight) + conv.bias
    got = conv(x.conv.flatten(0, 1)).view(B, N, -1)
    assert (got - by_hand).abs().max() < 1e-10
    assert datp().aux.spatial.kernel_size == (7, 7) and datp(map_size=9).aux.spatial.kernel_size == (7, 7)


def test_whole_map_matrix_product_equals_the_convolution(make_batch):
    """AuxNet computes a whole-map conv as one matrix product; it must equal nn.Conv2d's output."""
    head = datp()
    x = make_batch(size=7, dtype=torch.float64)
    mask = torch.ones(B, N, dtype=torch.bool)
    fast = head.aux(x.conv, mask)
    head.aux.kernel = -1  # a kernel that never equals the map: forces the convolution path
    try:
        slow = head.aux(x.conv, mask)
    finally:
        head.aux.kernel = 7
    assert (fast - slow).abs().max() < 1e-10, (fast - slow).abs().max()
    with pytest.raises(ValueError, match="input='conv' needs SegmentBatch.conv"):
        head(SegmentBatch(logits=torch.zeros(B, N, C, dtype=torch.float64)))


@pytest.mark.parametrize("option, value, message", [
    ("generator", "uniform", r"unknown datp generator 'uniform'; choose from \['mog', 'discrete'\]"),
    ("input", "rgb", r"unknown datp input 'rgb'; choose from \['conv', 'softmax'\]"),
    ("pooled_scores", "softmax", r"unknown datp pooled_scores 'softmax'; choose from \['logits', 'probs'\]"),
    ("num_gaussians", 0, "datp num_gaussians must be >= 1, got 0"),
    ("min_sigma", 0.5, "datp needs 0 < min_sigma < sqrt"),
])
def test_bad_options_are_named(option, value, message):
    with pytest.raises(ValueError, match=message):
        datp(**{option: value})


def test_mixture_params_need_the_mog_generator(make_batch):
    with pytest.raises(ValueError, match="mixture_params needs generator='mog'"):
        datp(generator="discrete").mixture_params(make_batch(dtype=torch.float64))


def test_larger_maps_are_averaged_after_the_7x7_conv(make_batch):
    head = datp()
    torch.nn.init.normal_(head.aux.regress.weight, std=0.5)
    out = head(make_batch(size=9, dtype=torch.float64))
    assert torch.isfinite(out.logits).all() and out.logits.shape == (B, C)


# ---------------------------------------------------------------- locate="soft-argmax"


def test_soft_argmax_mu_is_the_expected_time_under_the_slot_scores(make_batch):
    head = datp(locate="soft-argmax").eval()
    torch.nn.init.normal_(head.aux.locate.weight, std=0.5)  # so that each video gets its own scores
    x = make_batch(dtype=torch.float64)
    mask = torch.tensor([[True] * N, [True, True, True, False, False]])
    rho, mu, sigma = head.mixture_params(x, mask)
    h = head.aux.temporal_features(x.conv, mask)
    a = (torch.einsum("oc,bcs->bos", head.aux.locate.weight[:, :, 0], h) + head.aux.locate.bias[None, :, None]
         + head.aux.prior[None]).detach().numpy()  # (B, K, S): the 1x1 conv by hand
    t = x.t.numpy()
    for b in range(B):
        n = int(mask[b].sum())
        p = np.exp(a[b, :, :n]) / np.exp(a[b, :, :n]).sum(axis=1, keepdims=True)  # padded slots take no share
        close(mu[b], p @ t[b, :n], f"mu = sum_i softmax(a)_i t_i (video {b})")
    assert not torch.allclose(mu[0], mu[1]), "mu should depend on the video"
    out = head(x, mask)
    w = eq1(x.t, rho, mu, sigma) * mask.numpy()
    close(out.weights, w / np.sqrt((w**2).sum(axis=1, keepdims=True)), "Eq. 1 then Eq. 3 with these mu")


def test_soft_argmax_starts_input_independent_with_mu_near_k_over_k_plus_1(make_batch):
    head = datp(locate="soft-argmax", num_gaussians=2).eval()
    x = make_batch(dtype=torch.float64)
    x = x._replace(t=((torch.arange(N, dtype=torch.float64) + 0.5) / N).expand(B, N))
    mask = torch.ones(B, N, dtype=torch.bool)
    rho, mu, sigma = head.mixture_params(x, mask)
    assert torch.allclose(mu[0], mu[1]) and torch.allclose(sigma, torch.full_like(sigma, math.sqrt(0.2)))
    assert mu[0, 0] < 0.45 < 0.55 < mu[0, 1], mu  # the two Gaussians start apart, so they can differ
    loss = head(x, mask).logits.logsumexp(1).sum()
    loss.backward()
    assert head.aux.locate.weight.grad.abs().sum() > 0, "the slot scorer must get a gradient at the start"


def test_discrete_soft_argmax_pools_with_the_slot_scores(make_batch):
    head = datp(generator="discrete", locate="soft-argmax").eval()
    torch.nn.init.normal_(head.aux.locate.weight, std=0.5)
    x = make_batch(dtype=torch.float64)
    mask = torch.tensor([[True] * N, [True, True, False, False, False]])
    _, slot = head._regress(x, mask, head._segment_scores(x, mask))
    w = torch.exp(slot[:, 0]).masked_fill(~mask, 0.0)
    close(head(x, mask).weights, w / w.norm(dim=1, keepdim=True), "weights = exp(a_i) / ||exp(a)||_2")


def test_head_checkpoints_without_the_new_options_rebuild_as_the_paper(make_batch):
    from datp.pool.runs import rebuild_head

    head = rebuild_head("datp", {"num_classes": C, "num_segments": N, "in_channels": CF, "score_source": "cached"})
    assert (head.locate, head.min_sigma, head.aux.center) == ("fc", 0.01, False)


def test_centering_subtracts_each_videos_mean_over_its_real_segments():
    from datp.pool.heads.aux import AuxNet

    g = torch.Generator().manual_seed(3)
    x = torch.rand(B, N, C, generator=g, dtype=torch.float64)
    mask = torch.tensor([[True] * N, [True, True, True, False, False]])
    centred = AuxNet(in_channels=C, num_segments=N, out_features=4, input="softmax", hidden=8, center=True).double()
    plain = AuxNet(in_channels=C, num_segments=N, out_features=4, input="softmax", hidden=8).double()
    plain.load_state_dict(centred.state_dict())
    by_hand = x.clone()
    by_hand[0] -= x[0].mean(dim=0)
    by_hand[1, :3] -= x[1, :3].mean(dim=0)  # padded slots 3, 4 do not count, whatever they hold
    by_hand[1, 3:] = 1e3
    close(centred.temporal_features(x, mask), plain.temporal_features(by_hand, mask), "centred = x - mean of real")
    same = x[:, :1].expand(B, N, C)  # every segment alike: nothing to tell them apart
    close(centred.temporal_features(same, mask), plain.temporal_features(torch.zeros_like(x), mask),
          "identical segments = zero input")
