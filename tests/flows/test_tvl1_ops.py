"""The pieces of the torch TV-L1 against hand computations and against OpenCV itself."""

import cv2
import numpy as np
import pytest
import torch
from datp_testing import assert_close

from datp.flows.tvl1_ops import (
    centered_gradient,
    cubic_coeffs,
    divergence,
    forward_gradient,
    median_blur,
    pyramid_sizes,
    remap_cubic,
    resize_linear,
)


def noise(h, w, seed=0, scale=255.0):
    return np.random.default_rng(seed).uniform(0, scale, (h, w)).astype(np.float32)


def batch(*images):
    return torch.from_numpy(np.stack(images))


def test_cubic_kernel_by_hand():
    # Keys' kernel with a = -0.75: W(d) = (a+2)|d|^3 - (a+3)|d|^2 + 1 for |d| <= 1,
    # a|d|^3 - 5a|d|^2 + 8a|d| - 4a for 1 < |d| < 2; taps at distances 1+t, t, 1-t, 2-t.
    a = -0.75

    def w(d):
        d = abs(d)
        return (a + 2) * d**3 - (a + 3) * d**2 + 1 if d <= 1 else a * d**3 - 5 * a * d**2 + 8 * a * d - 4 * a

    for t in (0.0, 0.25, 0.5, 0.8125):
        want = [w(1 + t), w(t), w(1 - t), w(2 - t)]
        assert_close(cubic_coeffs(torch.tensor(t)), want, atol=1e-6, what=f"cubic weights at t={t}")
    assert_close(cubic_coeffs(torch.tensor(0.5)), [-0.09375, 0.59375, 0.59375, -0.09375], atol=1e-7)


def test_pyramid_sizes_by_hand():
    # 388 * 0.8 = 310.4 -> 310, 584 * 0.8 = 467.2 -> 467; 310 * 0.8 = 248, 467 * 0.8 = 373.6 -> 374 ...
    assert pyramid_sizes(388, 584, 0.8, 5) == [(388, 584), (310, 467), (248, 374), (198, 299), (158, 239)]
    # half to even, as cvRound: 97 * 0.5 = 48.5 -> 48, 75 * 0.5 = 37.5 -> 38
    assert pyramid_sizes(97, 75, 0.5, 2) == [(97, 75), (48, 38)]
    # 128 -> 64 -> 32 -> 16 -> 8: the 8 px level ends the pyramid (sides below 16 px are not used)
    assert pyramid_sizes(128, 170, 0.5, 5) == [(128, 170), (64, 85), (32, 42), (16, 21)]
    assert pyramid_sizes(20, 300, 0.5, 5) == [(20, 300)]


@pytest.mark.parametrize("factor", [0.8, 0.5])
def test_resize_down_equals_opencv(factor):
    img = noise(97, 131)
    want = cv2.resize(img, None, fx=factor, fy=factor, interpolation=cv2.INTER_LINEAR)
    got = resize_linear(batch(img), want.shape, factor=factor)[0]
    assert_close(got, want, atol=1e-3, what=f"resize by {factor}")  # values 0..255


def test_resize_up_equals_opencv():
    small = noise(81, 105, scale=6.0) - 3.0  # a flow field
    want = cv2.resize(small, (131, 101), interpolation=cv2.INTER_LINEAR)
    assert_close(resize_linear(batch(small), (101, 131))[0], want, atol=1e-5, what="flow upsampling")


def test_centered_gradient_by_hand():
    x = np.array([[0, 1, 4, 9], [2, 2, 2, 2], [5, 3, 1, 0]], np.float32)
    dx, dy = centered_gradient(batch(x))
    want_dx = [[0.5, 2.0, 4.0, 2.5], [0, 0, 0, 0], [-1.0, -2.0, -1.5, -0.5]]  # ends: half one-sided
    want_dy = [[1.0, 0.5, -1.0, -3.5], [2.5, 1.0, -1.5, -4.5], [1.5, 0.5, -0.5, -1.0]]
    assert_close(dx[0], want_dx, what="dx")
    assert_close(dy[0], want_dy, what="dy")


def test_divergence_is_minus_the_adjoint_of_the_forward_gradient():
    # sum(grad u . p) = -sum(u div p) for p with p1 = 0 on the last column and p2 = 0 on the last
    # row, which holds for every dual variable TV-L1 makes (they start at 0 and follow grad u).
    u = batch(noise(7, 9, seed=1))
    p1, p2 = forward_gradient(batch(noise(7, 9, seed=2)))
    ux, uy = forward_gradient(u)
    lhs = (ux.double() * p1 + uy.double() * p2).sum()
    rhs = -(u.double() * divergence(p1, p2)).sum()
    assert abs(float(lhs - rhs)) < 1e-6 * float(lhs.abs()), f"<grad u, p> {lhs} vs -<u, div p> {rhs}"
    assert float(ux[0, :, -1].abs().max()) == 0 and float(uy[0, -1].abs().max()) == 0


@pytest.mark.parametrize("ksize", [3, 5])
def test_median_equals_opencv(ksize):
    img = noise(23, 31)
    img[:3, :3] = 7.0  # ties, and a corner where replicated borders decide
    assert_close(median_blur(batch(img), ksize)[0], cv2.medianBlur(img, ksize), what=f"median {ksize}")


def test_median_rejects_other_sizes():
    with pytest.raises(ValueError, match="OpenCV takes 3 or 5"):
        median_blur(torch.zeros(1, 8, 8), 7)


def test_remap_cubic_by_hand_and_against_opencv():
    img = noise(20, 24, seed=3)
    rng = np.random.default_rng(4)
    map_x = (np.arange(24)[None] + rng.uniform(-5, 5, (20, 24))).astype(np.float32)
    map_y = (np.arange(20)[:, None] + rng.uniform(-5, 5, (20, 24))).astype(np.float32)
    map_x[0, 0], map_y[0, 0] = 7.3, 8.6
    map_x[0, 1] = 1000.0  # far outside: 0
    map_x[0, 2], map_y[0, 2] = -1.5, 3.0  # half outside: outer taps count as 0
    got = remap_cubic(batch(img)[:, None], batch(map_x), batch(map_y))[0, 0].numpy()
    cx, cy = cubic_coeffs(torch.tensor(0.3)).numpy(), cubic_coeffs(torch.tensor(0.6)).numpy()
    by_hand = sum(cy[i] * cx[j] * img[8 - 1 + i, 7 - 1 + j] for i in range(4) for j in range(4))
    assert abs(got[0, 0] - by_hand) < 1e-3, f"bicubic at (7.3, 8.6): {got[0, 0]} vs hand {by_hand}"
    assert got[0, 1] == 0
    cx = cubic_coeffs(torch.tensor(0.5)).numpy()
    by_hand = sum(cx[j] * img[3, -2 - 1 + j] for j in range(4) if -2 - 1 + j >= 0)
    assert abs(got[0, 2] - by_hand) < 1e-3, f"half outside: {got[0, 2]} vs hand {by_hand}"
    want = cv2.remap(img, map_x, map_y, cv2.INTER_CUBIC, borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    assert_close(got, want, atol=1e-3, what="remap against the installed OpenCV")


def test_remap_table_rounds_positions_to_a_32nd():
    img = batch(noise(12, 12, seed=5))[:, None]
    ys = torch.full((1, 12, 12), 5.0)
    at = remap_cubic(img, torch.full((1, 12, 12), 4.0 + 10.4 / 32), ys, tab_size=32)
    rounded = remap_cubic(img, torch.full((1, 12, 12), 4.0 + 10 / 32), ys)
    assert_close(at, rounded, atol=1e-4, what="10.4/32 rounds to 10/32")
    tie = remap_cubic(img, torch.full((1, 12, 12), 4.0 + 10.5 / 32), ys, tab_size=32)
    assert_close(tie, rounded, atol=1e-4, what="10.5/32 rounds half to even, to 10/32")
