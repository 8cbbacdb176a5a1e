"""The image operations of OpenCV's CPU TV-L1, in PyTorch, on batches (B, H, W) of float32 images.

Each function follows the OpenCV code that `cv2.optflow.DualTVL1OpticalFlow` calls (opencv_contrib
`modules/optflow/src/tvl1flow.cpp`, opencv `imgproc` resize, remap and medianBlur) so that
`datp.flows.tvl1_torch` can retrace the OpenCV solver step by step; `tests/flows/test_tvl1_ops.py`
checks each one against a hand computation or against OpenCV itself.

- `pyramid_sizes`: level sizes as `cv::resize(src, dst, Size(), s, s)` rounds them
  (`cvRound(w * s)`, half to even), stopping as TV-L1 does once a side is below 16 px.
- `resize_linear`: `cv::resize(..., INTER_LINEAR)`: sample at `(d + 0.5) * scale - 0.5` (in double),
  where `scale` is 1 / the given factor (down the pyramid) or the size ratio (up it); edges replicate.
- `centered_gradient`: `0.5 * (f[x+1] - f[x-1])` inside, `0.5 * (f[1] - f[0])` and
  `0.5 * (f[-1] - f[-2])` on the first and last row/column (half a one-sided difference).
- `forward_gradient`, `divergence`: the discrete gradient and its negative adjoint of the dual step.
- `remap_cubic`: `cv::remap(..., INTER_CUBIC, BORDER_CONSTANT, 0)` with float maps: the 4x4 Keys
  kernel (A = -0.75), taps outside the image count as 0. OpenCV 4.x rounds each position to 1/32 px
  and reads the kernel from a 32-entry table; OpenCV 5.0 (installed here, measured) takes the
  exact fraction. Both are available (`tab_size`); the exact one is the default.
- `median_blur`: `cv::medianBlur(src, 3 or 5)` on float32: exact median, replicated borders.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

CUBIC_A = -0.75  # OpenCV's bicubic kernel parameter (Keys' a)
MIN_LEVEL_SIDE = 16  # TV-L1 stops the pyramid once a level's side is below this


def pyramid_sizes(height: int, width: int, scale_step: float, scales: int) -> list[tuple[int, int]]:
    """The (H, W) of every pyramid level OpenCV's TV-L1 uses, finest first.

    Level s + 1 is `(round(H_s * scale_step), round(W_s * scale_step))` with round half to even
    (C's `cvRound` of a double, as `cv::resize` with `Size()` and a factor computes it). A level
    with a side below 16 px ends the pyramid and is not used (so a 20 px frame has one level).

    Args:
        height, width: the frame size.
        scale_step: the factor between levels (0 < scale_step < 1).
        scales: the most levels (`scalesNumber`).
    """
    sizes = [(height, width)]
    for _ in range(1, scales):
        h, w = sizes[-1]
        h, w = round(h * scale_step), round(w * scale_step)  # Python rounds half to even, as cvRound
        if h < MIN_LEVEL_SIDE or w < MIN_LEVEL_SIDE:
            break
        sizes.append((h, w))
    return sizes


def _linear_taps(n_in: int, n_out: int, scale: float, reset_edge: bool, device):
    """Source indices (i0, i1) and weights (w0, w1) of `cv::resize` INTER_LINEAR along one axis."""
    d = torch.arange(n_out, dtype=torch.float64)
    pos = (d + 0.5) * scale - 0.5  # in double: OpenCV 5.0 (measured; 4.x rounds it to float first)
    i0 = torch.floor(pos)
    frac = (pos - i0).to(torch.float32)
    i0 = i0.to(torch.int64)
    if reset_edge:  # the horizontal pass: OpenCV sets fx = 0 at both ends
        frac = torch.where((i0 < 0) | (i0 >= n_in - 1), torch.zeros_like(frac), frac)
        i0 = i0.clamp(0, n_in - 1)
        i1 = (i0 + 1).clamp(max=n_in - 1)
    else:  # the vertical pass: the rows are clamped, the weights kept
        i1 = (i0 + 1).clamp(0, n_in - 1)
        i0 = i0.clamp(0, n_in - 1)
    return i0.to(device), i1.to(device), (1 - frac).to(device), frac.to(device)


def resize_linear(x: torch.Tensor, size: tuple[int, int], factor: float | None = None) -> torch.Tensor:
    """`cv::resize` with INTER_LINEAR of float32 images.

    Args:
        x: (B, H, W) float32.
        size: the output (H', W').
        factor: the factor passed to OpenCV (`Size()`, fx = fy = factor): then the sampling step is
            1 / factor; None: the size was passed, and the step is H / H' and W / W'.

    Returns:
        (B, H', W') float32; the horizontal pass first, then the vertical one, as OpenCV.
    """
    _, H, W = x.shape
    out_h, out_w = size
    scale_x = 1.0 / factor if factor else 1.0 / (out_w / W)  # OpenCV: 1 / inv_scale
    scale_y = 1.0 / factor if factor else 1.0 / (out_h / H)
    x0, x1, a0, a1 = _linear_taps(W, out_w, scale_x, True, x.device)
    rows = x[:, :, x0] * a0 + x[:, :, x1] * a1  # (B, H, W')
    y0, y1, b0, b1 = _linear_taps(H, out_h, scale_y, False, x.device)
    return rows[:, y0, :] * b0[:, None] + rows[:, y1, :] * b1[:, None]  # (B, H', W')


def centered_gradient(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(dx, dy) of (B, H, W) images with TV-L1's border rule (module docstring); H, W >= 3."""
    dx = torch.empty_like(x)
    dy = torch.empty_like(x)
    dx[:, :, 1:-1] = 0.5 * (x[:, :, 2:] - x[:, :, :-2])
    dx[:, :, 0] = 0.5 * (x[:, :, 1] - x[:, :, 0])
    dx[:, :, -1] = 0.5 * (x[:, :, -1] - x[:, :, -2])
    dy[:, 1:-1, :] = 0.5 * (x[:, 2:, :] - x[:, :-2, :])
    dy[:, 0, :] = 0.5 * (x[:, 1, :] - x[:, 0, :])
    dy[:, -1, :] = 0.5 * (x[:, -1, :] - x[:, -2, :])
    return dx, dy


def forward_gradient(u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(u[x+1] - u[x], u[y+1] - u[y]) of (B, H, W), 0 on the last column / row."""
    dx = F.pad(u[:, :, 1:] - u[:, :, :-1], (0, 1))
    dy = F.pad(u[:, 1:, :] - u[:, :-1, :], (0, 0, 0, 1))
    return dx, dy


def divergence(v1: torch.Tensor, v2: torch.Tensor) -> torch.Tensor:
    """Backward differences v1[x] - v1[x-1] + v2[y] - v2[y-1] of (B, H, W), with v[-1] = 0."""
    return v1 - F.pad(v1[:, :, :-1], (1, 0)) + v2 - F.pad(v2[:, :-1, :], (0, 0, 1, 0))


def cubic_coeffs(t: torch.Tensor) -> torch.Tensor:
    """OpenCV's `interpolateCubic`: the 4 weights of the taps at -1, 0, 1, 2 for a fraction t.

    Args:
        t: (...,) float32 fractions in [0, 1).

    Returns:
        (..., 4) float32; the last weight is 1 minus the other three, as in OpenCV.
    """
    a = CUBIC_A
    c0 = ((a * (t + 1) - 5 * a) * (t + 1) + 8 * a) * (t + 1) - 4 * a
    c1 = ((a + 2) * t - (a + 3)) * t * t + 1
    c2 = ((a + 2) * (1 - t) - (a + 3)) * (1 - t) * (1 - t) + 1
    return torch.stack([c0, c1, c2, 1 - c0 - c1 - c2], dim=-1)


def remap_cubic(images: torch.Tensor, map_x: torch.Tensor, map_y: torch.Tensor,
                tab_size: int | None = None) -> torch.Tensor:
    """`cv::remap(img, map_x, map_y, INTER_CUBIC)` with a constant 0 border, C images at once.

    Args:
        images: (B, C, H, W) float32.
        map_x, map_y: (B, H, W) float32 source positions in pixels.
        tab_size: None: weights from the exact fraction of each position, as OpenCV 5.0's remap
            (measured: `tests/flows/test_tvl1_ops.py`); 32: positions rounded to 1/32 px first
            (`cvRound(x * 32)`), as OpenCV 4.x's remap with its 32-entry kernel table.

    Returns:
        (B, C, H, W) float32: out(y, x) = sum of the 4x4 taps around (map_y, map_x); taps outside
        the image count as 0.
    """
    B, C, H, W = images.shape
    if tab_size is None:
        ix, iy = torch.floor(map_x), torch.floor(map_y)
        fx, fy = map_x - ix, map_y - iy
    else:  # round half to even, then the integer part (arithmetic shift) and the 1/tab fraction
        qx = torch.round(map_x * tab_size).clamp(-(2 ** 30), 2 ** 30)
        qy = torch.round(map_y * tab_size).clamp(-(2 ** 30), 2 ** 30)
        ix, iy = torch.floor(qx / tab_size), torch.floor(qy / tab_size)
        fx = (qx - ix * tab_size) * (1.0 / tab_size)
        fy = (qy - iy * tab_size) * (1.0 / tab_size)
    cx = cubic_coeffs(fx).reshape(B, 1, H * W, 4)
    cy = cubic_coeffs(fy).reshape(B, 1, H * W, 4)
    # Taps ix-1..ix+2 in an image padded with 4 zeros; positions further out see only zeros.
    pad = 4
    ix = ix.clamp(-3, W + 1).long() + (pad - 1)
    iy = iy.clamp(-3, H + 1).long() + (pad - 1)
    padded = F.pad(images, (pad, pad, pad, pad)).reshape(B, C, -1)  # (B, C, Hp*Wp)
    wp = W + 2 * pad
    out = None
    for i in range(4):  # row by row, as OpenCV sums
        row = ((iy + i) * wp + ix).reshape(B, 1, H * W)
        for j in range(4):
            taps = torch.gather(padded, 2, (row + j).expand(B, C, H * W))  # (B, C, HW)
            term = taps * (cy[..., i] * cx[..., j])
            out = term if out is None else out + term
    return out.reshape(B, C, H, W)


def median_blur(x: torch.Tensor, ksize: int) -> torch.Tensor:
    """`cv::medianBlur` of (B, H, W) float32 images: the median of each ksize x ksize window,
    borders replicated. OpenCV takes ksize 3 or 5 for float32 images; so does this."""
    if ksize not in (3, 5):
        raise ValueError(f"medianFiltering {ksize} on float flow: OpenCV takes 3 or 5 (or <= 1: off)")
    r = ksize // 2
    padded = F.pad(x[:, None], (r, r, r, r), mode="replicate")[:, 0]  # (B, H + 2r, W + 2r)
    windows = padded.unfold(1, ksize, 1).unfold(2, ksize, 1)  # (B, H, W, k, k)
    return windows.reshape(*x.shape, ksize * ksize).median(dim=-1).values  # odd count: exact
