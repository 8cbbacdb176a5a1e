"""Maximum mean discrepancy (MMD) with Gaussian kernels, and TSRNet's trimmed-to-untrimmed transfer loss.

The estimator is the biased one (a V-statistic, Gretton et al. 2012, eq. 5):

    MMD^2(X, Y) = mean_ij k(x_i, x_j) + mean_ij k(y_i, y_j) - 2 mean_ij k(x_i, y_j),

which is the squared RKHS distance between the two empirical mean embeddings, so it is >= 0 and is 0
when X and Y hold the same samples (the unbiased U-statistic can go negative and is not 0 there). In
floating point it is 0 up to rounding for identical samples (exactly 0 in the tests), and it is
clamped at 0 so rounding never makes it negative.

Bandwidth: the kernel is an average of Gaussians `k(a, b) = mean_s exp(-|a - b|^2 / (2 sigma_s^2))`
over several bandwidths, as in DAN's multi-kernel MMD (Long et al. 2015), so no single choice has to be
right. With `bandwidth=None`, `sigma_s = scale_s * sigma_med` for `scale_s` in `DEFAULT_SCALES`
(0.5, 1, 2), where `sigma_med^2` is the median of the non-zero squared distances between all distinct
pairs of the pooled samples X u Y (the median heuristic). sigma_med is computed without gradient, so the
loss moves the features, not the yardstick.

`segment_rows` turns a batch into the rows the transfer loss compares (the pooled features of the real
segments) and `cap_rows` draws at most `MAX_ROWS` of them, as `datp train-head --transfer-from` does.
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import nn

from datp.pool.heads import SegmentBatch
from datp.pool.heads.base import pooled_features, resolve_mask

DEFAULT_SCALES = (0.5, 1.0, 2.0)
MAX_ROWS = 256  # segment rows per side of the transfer loss: the kernel matrix is at most 512 x 512


def median_bandwidth(sq_dists: torch.Tensor) -> torch.Tensor:
    """sigma_med: the square root of the median non-zero squared distance between distinct samples.

    Args:
        sq_dists: (P, P) squared distances between pooled samples.

    Returns:
        A detached scalar; 1.0 when every sample is the same point (then any bandwidth gives MMD 0).
    """
    P = sq_dists.shape[0]
    upper = sq_dists.detach()[torch.triu_indices(P, P, offset=1, device=sq_dists.device).unbind()]
    upper = upper[upper > 0]
    if upper.numel() == 0:
        return torch.ones((), dtype=sq_dists.dtype, device=sq_dists.device)
    return upper.median().sqrt()


def mmd2(x: torch.Tensor, y: torch.Tensor, *, bandwidth: float | Sequence[float] | None = None) -> torch.Tensor:
    """Biased estimate of the squared MMD between samples x and y with a multi-bandwidth Gaussian kernel.

    Args:
        x: (n, d) samples, one per row.
        y: (m, d) samples.
        bandwidth: Gaussian sigma(s) to average over; None uses `DEFAULT_SCALES` times the median
            heuristic (see the module docstring).

    Returns:
        A scalar tensor >= 0, differentiable with respect to x and y.
    """
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1]:
        raise ValueError(f"x {tuple(x.shape)} and y {tuple(y.shape)} must be (n, d) and (m, d) with the same d")
    if x.shape[0] == 0 or y.shape[0] == 0:
        raise ValueError(f"mmd2 needs at least one sample on each side; got n={x.shape[0]}, m={y.shape[0]}")
    n = x.shape[0]
    z = torch.cat([x, y])  # (n + m, d)
    # cdist's default mode uses the fast |a|^2 + |b|^2 - 2ab form for more than 25 rows (the exact
    # difference form is ~15x slower with its backward at 512 x 2048); rounding then stays ~1e-7.
    sq = torch.cdist(z, z).pow(2)  # (n + m, n + m)
    if bandwidth is None:
        sigmas = [scale * median_bandwidth(sq) for scale in DEFAULT_SCALES]
    else:
        sigmas = [float(b) for b in ([bandwidth] if isinstance(bandwidth, numbers.Real) else bandwidth)]
        if not sigmas or any(b <= 0 for b in sigmas):
            raise ValueError(f"bandwidth={bandwidth} must be a positive sigma or a non-empty list of them")
    kernel = sum(torch.exp(-sq / (2 * sigma**2)) for sigma in sigmas) / len(sigmas)
    k_xx, k_yy, k_xy = kernel[:n, :n].mean(), kernel[n:, n:].mean(), kernel[:n, n:].mean()
    return (k_xx + k_yy - 2 * k_xy).clamp(min=0)


def transfer_loss(
    trimmed_feats: torch.Tensor,
    untrimmed_feats: torch.Tensor,
    fc1: nn.Module,
    *,
    bandwidth: float | Sequence[float] | None = None,
) -> torch.Tensor:
    """TSRNet's knowledge-transfer loss `MMD^2(T, U) + MMD^2(fc1(T), fc1(U))`.

    It pulls the untrimmed batch's features, and their image under the head's first fully connected
    layer, towards the trimmed batch's distribution. Gradients reach both inputs and fc1's parameters.

    Args:
        trimmed_feats: (n, ...) features of trimmed videos, one sample per row (only valid rows: drop
            padded segments before calling).
        untrimmed_feats: (m, ...) features of untrimmed videos, same trailing shape.
        fc1: the layer applied to each batch; its output is flattened to (rows, -1).
        bandwidth: passed to `mmd2` for both terms.

    Returns:
        A scalar tensor >= 0.
    """
    T, U = trimmed_feats, untrimmed_feats
    if T.shape[1:] != U.shape[1:]:
        raise ValueError(f"trimmed {tuple(T.shape)} and untrimmed {tuple(U.shape)} features differ after the first dim")
    raw = mmd2(T.reshape(T.shape[0], -1), U.reshape(U.shape[0], -1), bandwidth=bandwidth)
    fT, fU = fc1(T), fc1(U)
    return raw + mmd2(fT.reshape(fT.shape[0], -1), fU.reshape(fU.shape[0], -1), bandwidth=bandwidth)


def segment_rows(x: SegmentBatch | Mapping[str, SegmentBatch]) -> torch.Tensor:
    """The globally average-pooled features of a batch's real segments, one row per segment.

    Args:
        x: a batch with `conv` (B, N, Cf, H, W) or (B, N, Cf) and `mask` (B, N); or {stream: batch}
            with the same mask, whose features are concatenated in the mapping's order (what the
            joint-attn head's W_1 reads).

    Returns:
        (R, D) rows of the R real segments, in batch then segment order (padding left out).
    """
    parts = x if isinstance(x, Mapping) else {"": x}
    first = next(iter(parts.values()))
    mask = resolve_mask(first)
    v = torch.cat([pooled_features(b, mask) for b in parts.values()], dim=-1)  # (B, N, D)
    return v[mask]


def cap_rows(x: torch.Tensor, max_rows: int, rng: np.random.Generator) -> torch.Tensor:
    """At most `max_rows` rows of x: x itself when it has no more, else distinct rows drawn by `rng`
    (kept in their original order), so that the (n + m)^2 kernel matrix of `mmd2` stays small."""
    if x.shape[0] <= max_rows:
        return x
    keep = np.sort(rng.choice(x.shape[0], size=max_rows, replace=False))
    return x[torch.from_numpy(keep).to(x.device)]
