"""MMD: hand-computed values, zero for identical samples, monotone in the shift, and gradients."""

import math

import pytest
import torch
from datp_testing import assert_close
from torch import nn

from datp.pool.mmd import DEFAULT_SCALES, mmd2, transfer_loss


def _close(actual, expected, tol=1e-12):
    assert_close(actual, expected, tol)


def test_one_sample_each_by_hand():
    # x = (0, 0), y = (3, 4): |x - y|^2 = 25. k(x, x) = k(y, y) = 1, so MMD^2 = 2 - 2 k(x, y).
    x = torch.tensor([[0.0, 0.0]], dtype=torch.float64)
    y = torch.tensor([[3.0, 4.0]], dtype=torch.float64)
    _close(mmd2(x, y, bandwidth=5.0), 2 - 2 * math.exp(-25 / 50))
    # Two bandwidths average their kernels: k(x, y) = (exp(-25/50) + exp(-25/200)) / 2.
    _close(mmd2(x, y, bandwidth=[5.0, 10.0]), 2 - (math.exp(-0.5) + math.exp(-0.125)))


def test_median_heuristic_by_hand():
    # Pooled points 0, 1 | 3: squared distances 1, 9, 4 -> median 4 -> sigma_med = 2, sigmas 1, 2, 4.
    x = torch.tensor([[0.0], [1.0]], dtype=torch.float64)
    y = torch.tensor([[3.0]], dtype=torch.float64)

    def k(sq):
        return sum(math.exp(-sq / (2 * (s * 2.0) ** 2)) for s in DEFAULT_SCALES) / len(DEFAULT_SCALES)

    k_xx = (2 * k(0) + 2 * k(1)) / 4
    k_yy = k(0)
    k_xy = (k(9) + k(4)) / 2
    _close(mmd2(x, y), k_xx + k_yy - 2 * k_xy)


def test_identical_samples_give_zero():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(37, 16, generator=gen)
    # 0 in exact arithmetic; cdist's matmul form for > 25 rows may round, so allow 1e-6.
    _close(mmd2(x, x.clone()), 0.0, tol=1e-6)
    _close(mmd2(x, x.clone(), bandwidth=[0.1, 3.0]), 0.0, tol=1e-6)
    _close(mmd2(x[:5], x[:5].clone()), 0.0, tol=0.0)  # few rows: cdist takes exact differences
    _close(mmd2(x, x[torch.randperm(37, generator=gen)]), 0.0, tol=1e-6)  # same set, other order
    same_point = torch.ones(4, 3)
    assert mmd2(same_point, same_point).item() == 0.0  # every distance 0: defined, not NaN


def test_larger_shift_gives_larger_mmd():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, 8, generator=gen, dtype=torch.float64)
    noise = torch.randn(64, 8, generator=gen, dtype=torch.float64)
    for bandwidth in (None, 2.0):
        values = [mmd2(x, noise + shift, bandwidth=bandwidth).item() for shift in (0.0, 0.5, 1.0, 2.0)]
        assert all(a < b for a, b in zip(values, values[1:])), f"bandwidth {bandwidth}: {values}"
        assert values[1] > 0


def test_gradient_matches_analytic_derivative():
    # MMD^2 = 2 - 2 exp(-|x - y|^2 / (2 s^2)); d/dx = 2 exp(-|x - y|^2 / (2 s^2)) (x - y) / s^2.
    x = torch.tensor([[0.5, -1.0, 2.0]], dtype=torch.float64, requires_grad=True)
    y = torch.tensor([[1.5, 0.0, 0.0]], dtype=torch.float64, requires_grad=True)
    sigma = 1.7
    mmd2(x, y, bandwidth=sigma).backward()
    diff = (x - y).detach()
    expected = 2 * torch.exp(-diff.pow(2).sum() / (2 * sigma**2)) * diff / sigma**2
    _close(x.grad, expected)
    _close(y.grad, -expected)


def test_gradcheck_fixed_bandwidth():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(5, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    y = (torch.randn(4, 3, generator=gen, dtype=torch.float64) + 0.5).requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: mmd2(a, b, bandwidth=[0.7, 1.5]), (x, y))


def test_gradient_flows_with_median_bandwidth_and_duplicate_rows():
    x = torch.tensor([[0.0, 0.0], [0.0, 0.0], [1.0, 0.0]], requires_grad=True)  # a zero distance
    y = torch.tensor([[2.0, 1.0], [3.0, 0.0]], requires_grad=True)
    mmd2(x, y).backward()
    for name, g in (("x", x.grad), ("y", y.grad)):
        assert torch.isfinite(g).all() and g.abs().sum() > 0, f"{name}.grad = {g}"


def test_transfer_loss_is_the_two_mmd_terms_and_trains_fc1():
    torch.manual_seed(0)
    fc1 = nn.Linear(6, 4).double()
    T = torch.randn(8, 6, dtype=torch.float64, requires_grad=True)
    U = (torch.randn(10, 6, dtype=torch.float64) + 0.7).requires_grad_()
    loss = transfer_loss(T, U, fc1, bandwidth=[1.0, 2.0])
    with torch.no_grad():
        expected = mmd2(T, U, bandwidth=[1.0, 2.0]) + mmd2(fc1(T), fc1(U), bandwidth=[1.0, 2.0])
    _close(loss, expected)
    loss.backward()
    for name, g in (("T", T.grad), ("U", U.grad), ("fc1.weight", fc1.weight.grad), ("fc1.bias", fc1.bias.grad)):
        assert g is not None and torch.isfinite(g).all(), f"{name}.grad = {g}"
    assert fc1.weight.grad.abs().sum() > 0
    # The bias shifts both batches equally, which no MMD term can see: its gradient is 0.
    _close(fc1.bias.grad, torch.zeros(4), tol=1e-12)

    # fc1.weight's gradient agrees with a central finite difference on one entry.
    eps = 1e-6
    with torch.no_grad():
        fc1.weight[1, 2] += eps
        up = transfer_loss(T, U, fc1, bandwidth=[1.0, 2.0])
        fc1.weight[1, 2] -= 2 * eps
        down = transfer_loss(T, U, fc1, bandwidth=[1.0, 2.0])
        fc1.weight[1, 2] += eps
    _close(fc1.weight.grad[1, 2], (up - down) / (2 * eps), tol=1e-7)


def test_transfer_loss_accepts_segment_batches():
    # (n, N, D) rows through a layer on the last dim: flattened per row after fc1.
    fc1 = nn.Linear(5, 3)
    T, U = torch.randn(4, 2, 5), torch.randn(6, 2, 5)
    loss = transfer_loss(T, U, fc1)
    expected = mmd2(T.reshape(4, -1), U.reshape(6, -1)) + mmd2(fc1(T).reshape(4, -1), fc1(U).reshape(6, -1))
    _close(loss.detach(), expected.detach(), tol=1e-6)


def test_bad_inputs():
    with pytest.raises(ValueError, match="same d"):
        mmd2(torch.zeros(3, 2), torch.zeros(3, 4))
    with pytest.raises(ValueError, match="at least one sample"):
        mmd2(torch.zeros(0, 2), torch.zeros(3, 2))
    with pytest.raises(ValueError, match="positive sigma"):
        mmd2(torch.zeros(3, 2), torch.ones(3, 2), bandwidth=0.0)
