"""Deep Adaptive Temporal Pooling (Song, Cheung, Chandrasekhar, Mandal, ACM MM 2018).

An auxiliary ConvNet looks at the whole segment sequence and regresses the parameters of per-segment
weights w_i; the video score pools the per-segment class scores I_i with them:

    w_i = sum_k rho_k / sqrt(2 pi sigma_k^2) * exp(-(t_i - mu_k)^2 / (2 sigma_k^2))     (Eq. 1)
    S   = sum_i w_i I_i / ||w||_2                                                        (Eq. 3)

then cross-entropy on S. The paper's Eq. 1 writes sqrt(2 pi sigma_k); a Gaussian density needs
sigma_k^2, which we use. The gradients (the paper's Eq. 2 and Eq. 4) are what autograd computes;
`tests/pool/heads/test_datp.py` checks them against the closed forms.

Choices the paper leaves open, made here:
- Constraints on the regressed r = (r_rho, r_mu, r_sigma):
  rho = softmax_k(r_rho), so rho_k >= 0 and sum_k rho_k = 1 (S does not change when all rho_k are
  scaled together, so fixing their sum removes a useless degree of freedom);
  mu = sigmoid(r_mu), in (0, 1) like the segment times;
  sigma = min_sigma + softplus(r_sigma) > min_sigma (half the segment spacing, 0.5 / N, by default;
  see "Settings measured" below).
  Unconstrained mu and an exp(r_sigma) were tried first: under Adam the regressed values ran off
  to mu = -25, sigma = 1e-11 within ten steps on a synthetic problem, and the weights became NaN.
- Initialisation: the regression layer (the second fc) starts with zero weights and a bias giving
  rho_k = 1/K, mu_k = k/(K+1) for k = 1..K and sigma_k^2 = 0.2, whatever the input.
- Stability: w is computed in log space (log-sum-exp over the Gaussians) and rescaled by its
  largest entry before Eq. 3; S is invariant to the scale of w, so this is exact and keeps narrow
  Gaussians far from every segment from underflowing to all-zero weights.
- Where the Gaussians go (`locate`). The paper has the auxiliary net regress mu; "fc" does so with
  the fc layers above (mu = sigmoid(r_mu)), which read the flattened sequence, so where a cue sits
  is learnt separately for every slot position. "soft-argmax" (the default) scores every slot with
  one 1x1 conv shared by all slots on the temporal features h_i, plus a learned per-slot prior:
  a_ki = v_k . h_i + b_k + p_ki, and takes mu_k = sum_i softmax_i(a_k) t_i, the expected segment
  time under those scores (a differentiable arg max; still a ConvNet regressing mu). rho and sigma
  come from the fc layers in both. The conv starts at zero and the prior at
  -(c_i - k/(K+1))^2 / 0.1 (slot centres c_i; 0 for K = 1), so the initial mixture is the same for
  every input and the K means start apart, as with "fc".
- What the auxiliary net sees (`aux_center`, default on): each segment's 64 features (or C
  probabilities) minus their mean over the video's real segments, before the temporal convs. A key
  segment showing class y is, in another video, a confuser segment showing y: nothing in a segment
  (or in the 5-segment window of the two kernel-3 temporal convs) tells the two apart, only how the
  segment differs from the rest of its video. Off (`aux_center=False`): the features as they are, as
  first implemented.
- `discrete` generator: the fc regresses one weight per segment slot, w_i = exp(r_i) > 0 (equal
  weights at the start); with `locate="soft-argmax"` the slot scores are the log-weights,
  w_i = exp(a_i).
- The fc layers read the flattened (32 x num_segments) temporal features, so the head is built for
  at most `num_segments` slots; shorter inputs are padded with masked slots at the end, and padded
  slots are zeroed after every layer so they carry nothing into the fc.
- I_i are the segment logits by default (`pooled_scores="logits"`, as TSN's consensus pools
  pre-softmax scores); "probs" pools softmax probabilities, which bounds S_c by sqrt(N) and makes the
  cross-entropy on S weak, so it is offered for comparison only.
- The softmax input of the auxiliary net is softmax(I_i), not detached: with a linear segment
  classifier, the auxiliary net's gradient also reaches it (end-to-end, as in the paper).

Settings measured (issue 13; docs/fidelity.md has the tables). Chosen on seeds 0-3 of twelve
key-moment constructions of `datp.synth.keymoments` (300 / 100 videos, train-head's defaults: Adam
lr 1e-3, batch 32, 30 epochs) and on the demo's store (`datp demo`, seed-0 data, training seeds 0-2:
160 + 40 train videos, lr 3e-3, 100 epochs); reported on held-out seeds (sweep seeds 10-12, 20 in
CI, a demo made with seed 1). Test top-1 below is "K=1 / K=2" on the tuning seeds.
- Why DATP did not learn as first implemented (fc, `min_sigma` 0.01): the Gaussians collapse. sigma
  falls to its floor within a few epochs, a Gaussian that narrow gives one segment all the weight and
  its neighbours exp(-50) of it, d w / d mu is ~0 and mu stays where it was. On the demo's flow store
  (training seed 1, soft-argmax with the 0.01 floor) every test video ended with its whole weight on
  the same segment (slot 4 of 10), top-1 at chance. fc with the old defaults over training seeds 0-2:
  K=1 0.50 / 0.28 / 0.20, K=2 0.55 / 0.35 / 0.65 (max pooling 0.70 / 0.72 / 0.65).
- `min_sigma` 0.5 / N (half the segment spacing; was 0.01) keeps d w / d mu alive. With "fc" it was
  not enough on the demo (0.22 at seed 0); a whole spacing (1 / N) was worse (0.17-0.28).
- `locate="soft-argmax"` with that floor: the demo's flow K=1 0.65 / 0.67 / 0.61 and K=2 0.64 /
  0.67 / 0.59 (training seeds 0-2); `N5-d1.0` 0.92-1.00 (fc, old defaults: 0.77-0.81).
- `aux_center` (on): where no cue marks the key, the auxiliary net without it learnt an order of the
  classes (on `N10-key2-3-d1.0-cue0`, seed 1: the key found whenever its class ranked above the
  confuser's in a fixed order, about half the videos, with the segment classifier right on 94% of
  key segments). Seeds 0-1 at lr / 10: `N10-key2-3-d1.0-cue0` 0.41, 0.40 / 0.48, 0.43 -> 0.96,
  0.78 / 0.96, 0.94; `N5-C5-d1.0-cue0` 0.34, 0.51 / 0.43, 0.28 -> 0.91, 0.49 / 0.82, 0.74;
  512 channels (`N5-d1.0-512ch-map4`) 0.62, 0.60 / 0.39, 0.45 -> 0.90, 0.99 / 0.88, 0.85; the demo's
  flow unchanged (0.63 / 0.64 / 0.62 and 0.70 / 0.63 / 0.62). Centring and scaling to unit std over
  the segments was worse (cue0 0.36-0.72).
- The auxiliary net's Adam step 0.3 x lr (`aux_lr_scale`, was 0.1), reached linearly over the first
  30% of the epochs (`aux_warmup`, was none). Without centring a step of 0.3 x lr collapsed the
  demo's flow K=1 on one training seed of three (0.25); with it the demo held (0.64 / 0.61 / 0.65)
  and the key-moment stores gained (`N5-d1.0-map4` 0.81-0.99 -> 1.00, `N5-d1.0-noise2` 0.68-0.84 ->
  0.94-0.96, `issue13-fixed-key` 0.19-0.81 -> 0.77-0.95), but the cue-less stores fell into the
  class order on one seed of two (0.47-0.53). The warm-up lets the segment classifier learn first:
  cue-less seeds 0-3 0.92-1.00 except `N5-C5-d1.0-cue0` K=1 at seed 1 (0.48), `issue13-d0.7` 0.56-1.00
  (0.46-0.99 without), the demo's flow 0.69 / 0.61 / 0.55 and 0.67 / 0.64 / 0.62; it costs the r < 1
  store whose key is found only by moving before the classifier inverts (`issue13-fixed-key` seeds
  0-3 K=1 0.90, 0.95, 0.97, 0.22 -> 0.70, 0.51, 0.86, 0.22). Warm-ups of 15% and 50% were no better
  (cue-less seed 1: 0.50-0.97 and 0.48-1.00); a step of lr or 0.5 x lr lost `N5-d1.0` on one seed
  (0.62-0.83). The paper uses one rate: `aux_lr_scale=1, aux_max_lr=None, aux_warmup=0`.
- Tried, not taken: Eq. 3 with an L1 norm (weights summing to 1) instead of L2 (fc, 22 store-seeds:
  mean top-1 K=1 0.53 vs 0.56, K=2 0.54 vs 0.55, with the key-moment step 0.71 vs 0.69); a frozen
  per-slot prior (demo and key-moment stores within 0.06 of the learned one); `init_variance` 0.05
  instead of the paper's 0.2 (0.52-0.94, no better); `pooled_scores="probs"`; a slower segment
  classifier (`lr_scales` 0.03-0.1 on `scores.`).

Where DATP cannot learn (measured, docs/fidelity.md): with near-uniform initial weights DATP starts as
average pooling, and the linear segment classifier learns from pooled scores. A class c then gains
about L (C - 1) from the videos it labels (L key segments showing it, weight 1 - p_c = (C-1)/C) and
loses about (N - L) s from the videos where it is the confuser (N - L segments at strength s,
weight p_c = 1/C). When L (C - 1) < (N - L) s the classifier learns the inverted scores (a segment
showing c counts against c: key segments classified right fell from 8% to 0% in 10 epochs), and the
auxiliary net, whose only signal is these scores, then learns to avoid the key (mean mu against key
time: correlation -0.6). With `locate="fc"` this is a stable point of the paper's model trained end to
end from a random segment classifier; lower rates, sharper or broader Gaussians do not leave it
(`tests/pool/test_keymoments.py` checks the inverted classifier with "fc"). The defaults do not leave
it either on the sweep's held-out seeds (issue13: K=1 0.22, K=2 0.23; chance 0.17); near the balance
(r = 1.26) they learn on one seed of three.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from datp.pool.heads.aux import AuxNet
from datp.pool.heads.base import (
    HeadOutput,
    SegmentBatch,
    SegmentScores,
    resolve_mask,
    resolve_times,
    zero_empty_rows,
)

GENERATORS = ("mog", "discrete")
DATP_INPUTS = ("conv", "softmax")
POOLED_SCORES = ("logits", "probs")
LOCATES = ("fc", "soft-argmax")
LOG_SQRT_2PI = 0.5 * math.log(2.0 * math.pi)


class MixtureParams(NamedTuple):
    """Regressed mixture of Gaussians, each (B, K): weights rho >= 0, means mu, std sigma > 0."""

    rho: Tensor
    mu: Tensor
    sigma: Tensor


def mog_log_weights(t: Tensor, log_rho: Tensor, mu: Tensor, log_sigma: Tensor) -> Tensor:
    """log w_i of Eq. 1, computed with log-sum-exp over the Gaussians.

    Args:
        t: (B, N) segment times.
        log_rho, mu, log_sigma: (B, K) each.

    Returns:
        (B, N) log w.
    """
    d = t[:, :, None] - mu[:, None, :]  # (B, N, K)
    log_g = -LOG_SQRT_2PI - log_sigma[:, None, :] - d**2 / (2.0 * torch.exp(2.0 * log_sigma[:, None, :]))
    return torch.logsumexp(log_rho[:, None, :] + log_g, dim=2)


def mog_weights(t: Tensor, rho: Tensor, mu: Tensor, sigma: Tensor) -> Tensor:
    """w_i of Eq. 1: a mixture of K Gaussian densities evaluated at the segment times.

    Args:
        t: (B, N) segment times.
        rho, mu, sigma: (B, K) each, rho >= 0 and sigma > 0.

    Returns:
        (B, N) weights.
    """
    return torch.exp(mog_log_weights(t, torch.log(rho), mu, torch.log(sigma)))


def _inverse_softplus(y: float) -> float:
    return y + math.log(-math.expm1(-y))


def l2_pool(scores: Tensor, w: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Eq. 3: S = sum_i w_i I_i / ||w||_2 over the real segments.

    Args:
        scores: (B, N, C) per-segment class scores I.
        w: (B, N) non-negative weights; masked entries are ignored (taken as 0).
        mask: (B, N) bool.

    Returns:
        S (B, C), and w / ||w||_2 (B, N) (unit L2 norm over the real segments; zero on an all-masked
        row, whose S is zero too).
    """
    w = w.masked_fill(~mask, 0.0)
    scores = scores.masked_fill(~mask[..., None], 0.0)
    norm = torch.sqrt((w * w).sum(dim=1, keepdim=True).clamp_min(torch.finfo(w.dtype).tiny))
    weights = w / norm
    return torch.einsum("bn,bnc->bc", weights, scores), weights


def l2_pool_log(scores: Tensor, log_w: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Eq. 3 from log-weights: `l2_pool(scores, exp(log_w), mask)`, computed without underflow.

    S does not change when w is scaled, so w is divided by its largest real entry before the exp
    (the maximum is detached: it cancels in S, so no gradient flows through it).

    Args:
        scores: (B, N, C) per-segment class scores I.
        log_w: (B, N) log-weights; masked entries are ignored.
        mask: (B, N) bool.

    Returns:
        S (B, C) and w / ||w||_2 (B, N), as `l2_pool`.
    """
    log_w = log_w.masked_fill(~mask, torch.finfo(log_w.dtype).min)
    w = torch.exp(log_w - log_w.amax(dim=1, keepdim=True).detach())  # largest real w_i is 1
    return l2_pool(scores, w, mask)


def default_min_sigma(num_segments: int, init_variance: float = 0.2) -> float:
    """The default lower bound of sigma (`min_sigma=None`): half the segment spacing,
    0.5 / N (at most half the initial standard deviation); see the module docstring ("Settings measured")."""
    return min(0.5 / max(num_segments, 1), 0.5 * math.sqrt(init_variance))


class DATPHead(nn.Module):
    """Deep Adaptive Temporal Pooling head (see the module docstring for the equations and choices).

    Weights are w / ||w||_2: unit L2 norm over the real segments, so S = sum_i weights_i I_i.

    Args:
        num_classes: C.
        num_segments: segment slots per video (the fc layers read this many; `discrete` regresses
            this many weights).
        in_channels: Cf of the conv features.
        input: what the auxiliary net reads: "conv" maps or "softmax" of the segment scores.
        generator: "mog" (mixture of Gaussians over time) or "discrete" (one weight per slot).
        num_gaussians: K for "mog".
        pooled_scores: I_i are segment "logits" (default) or "probs".
        score_source: segment scores from "cached" logits or a "linear" classifier on conv features.
        hidden: width of the auxiliary net's first fc layer.
        map_size: H (= W) of the conv maps (7 for ResNets at 224); the auxiliary net's spatial conv
            covers min(7, map_size) positions.
        dropout: dropout before the linear segment classifier.
        init_variance: sigma_k^2 at initialisation (the paper's 0.2).
        min_sigma: lower bound of sigma_k; None (default): half the segment spacing, 0.5 / num_segments
            (capped at half the initial sigma). See the module docstring ("Settings measured").
        locate: "soft-argmax" (default) or "fc": how mu is regressed (module docstring).
        aux_lr_scale: the auxiliary net's learning rate relative to the classifier's (`lr_scales`,
            read by `heads.param_groups`).
        aux_max_lr: the largest learning rate of the auxiliary net (`lr_caps`); None: no cap.
        aux_center: the auxiliary net subtracts each video's mean segment features before its
            temporal convs (default; `AuxNet(center=...)`, module docstring).
        aux_warmup: share of the training epochs over which the auxiliary net's rate rises linearly
            to its value (`lr_warmups`, read by `heads.param_groups` and `heads.warm_up`); 0: none.
    """

    uses_scores = True

    def __init__(self, *, num_classes: int, num_segments: int, in_channels: int = 512, input: str = "conv",
                 generator: str = "mog", num_gaussians: int = 2, pooled_scores: str = "logits",
                 score_source: str = "linear", hidden: int = 128, map_size: int = 7, dropout: float = 0.0,
                 init_variance: float = 0.2, min_sigma: float | None = None, aux_lr_scale: float = 0.3,
                 aux_max_lr: float | None = None, locate: str = "soft-argmax", aux_center: bool = True,
                 aux_warmup: float = 0.3):
        super().__init__()
        if min_sigma is None:
            min_sigma = default_min_sigma(num_segments, init_variance)
        if not aux_lr_scale > 0:
            raise ValueError(f"datp aux_lr_scale must be > 0, got {aux_lr_scale}")
        # Per instance: heads.param_groups reads both (see "Settings measured" above).
        self.lr_scales = {"aux.": aux_lr_scale}
        self.lr_caps = {} if aux_max_lr is None else {"aux.": aux_max_lr}
        if not 0 <= aux_warmup <= 1:
            raise ValueError(f"datp aux_warmup is a share of the epochs, in [0, 1]; got {aux_warmup}")
        self.lr_warmups = {"aux.": aux_warmup} if aux_warmup > 0 else {}
        for name, value, choices in (("input", input, DATP_INPUTS), ("generator", generator, GENERATORS),
                                     ("pooled_scores", pooled_scores, POOLED_SCORES),
                                     ("locate", locate, LOCATES)):
            if value not in choices:
                raise ValueError(f"unknown datp {name} {value!r}; choose from {list(choices)}")
        for name, value in (("num_segments", num_segments), ("num_gaussians", num_gaussians)):
            if value < 1:
                raise ValueError(f"datp {name} must be >= 1, got {value}")
        if not 0 < min_sigma < math.sqrt(init_variance):
            raise ValueError(f"datp needs 0 < min_sigma < sqrt(init_variance), got min_sigma={min_sigma}, "
                             f"init_variance={init_variance}")
        self.min_sigma = min_sigma
        self.num_segments = num_segments
        self.input = input
        self.generator = generator
        self.num_gaussians = num_gaussians
        self.pooled_scores = pooled_scores
        self.locate = locate
        self.scores = SegmentScores(source=score_source, num_classes=num_classes,
                                    in_channels=in_channels, dropout=dropout)
        K = num_gaussians
        self.aux = AuxNet(in_channels=in_channels if input == "conv" else num_classes,
                          num_segments=num_segments, out_features=3 * K if generator == "mog" else num_segments,
                          input=input, hidden=hidden, map_size=map_size, center=aux_center)
        # Start from the same weights for every input, as spatial transformers start at identity.
        nn.init.zeros_(self.aux.regress.weight)
        with torch.no_grad():
            bias = self.aux.regress.bias
            bias.zero_()  # discrete: equal weights; mog: rho_k = 1/K
            if generator == "mog":
                mu = torch.arange(1, K + 1, dtype=torch.float64) / (K + 1)
                bias[K:2 * K] = torch.log(mu / (1 - mu))  # sigmoid^-1
                bias[2 * K:] = _inverse_softplus(math.sqrt(init_variance) - min_sigma)
        if locate == "soft-argmax":
            # One score per slot and Gaussian from the temporal features, shared by every slot (a 1x1
            # conv), plus a learned per-slot prior that starts mu_k near k / (K + 1); zero conv at the start.
            rows = K if generator == "mog" else 1
            self.aux.locate = nn.Conv1d(32, rows, 1)
            nn.init.zeros_(self.aux.locate.weight)
            nn.init.zeros_(self.aux.locate.bias)
            centres = (torch.arange(num_segments, dtype=torch.float32) + 0.5) / num_segments
            prior = torch.zeros(rows, num_segments)
            if generator == "mog" and K > 1:
                prior = -(centres[None, :] - torch.arange(1, K + 1)[:, None] / (K + 1)) ** 2 / (2 * 0.05)
            self.aux.prior = nn.Parameter(prior)

    def _segment_scores(self, x: SegmentBatch, mask: Tensor) -> Tensor:
        B, N = mask.shape
        if N > self.num_segments:
            raise ValueError(f"datp head was built for num_segments={self.num_segments} but got {N} "
                             f"segments; build it with num_segments={N} or sample fewer segments")
        return self.scores(x, mask)

    def _regress(self, x: SegmentBatch, mask: Tensor, scores: Tensor) -> tuple[Tensor, Tensor | None]:
        """The fc layers' output (B, 3K or num_segments) and, with locate="soft-argmax", the slot
        scores (B, K or 1, N), the lowest float on masked slots."""
        if self.input == "conv":
            if x.conv is None:
                raise ValueError("datp with input='conv' needs SegmentBatch.conv but it is None; use input='softmax'")
            inputs = x.conv
        else:
            inputs = torch.softmax(scores, dim=-1)
        if self.locate == "fc":
            return self.aux(inputs, mask), None
        h = self.aux.temporal_features(inputs, mask)  # (B, 32, S)
        raw = self.aux.read_out(h)
        N = mask.shape[1]
        slot = (self.aux.locate(h) + self.aux.prior)[:, :, :N]
        # the lowest float, not -inf: a row without real segments gets uniform scores, not NaN
        return raw, slot.masked_fill(~mask[:, None, :], torch.finfo(slot.dtype).min)

    def _mixture(self, x: SegmentBatch, mask: Tensor, scores: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """log rho, mu, log sigma (each (B, K)) of the mog generator. With locate="soft-argmax",
        mu_k = sum_i softmax_i(a_ki) t_i: the expected time under the slot scores a_k."""
        raw, slot = self._regress(x, mask, scores)
        log_rho, mu, log_sigma = self._split(raw)
        if slot is not None:
            mu = (torch.softmax(slot, dim=-1) * resolve_times(x, mask)[:, None, :]).sum(dim=-1)
        return log_rho, mu, log_sigma

    def _split(self, raw: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(B, 3K) regressed values -> log rho, mu, log sigma, each (B, K)."""
        K = self.num_gaussians
        sigma = self.min_sigma + F.softplus(raw[:, 2 * K:])
        return torch.log_softmax(raw[:, :K], dim=1), torch.sigmoid(raw[:, K:2 * K]), torch.log(sigma)

    def mixture_params(self, x: SegmentBatch, mask: Tensor | None = None) -> MixtureParams:
        """The regressed rho, mu, sigma (each (B, K)) of the `mog` generator, for tests and plots."""
        if self.generator != "mog":
            raise ValueError(f"mixture_params needs generator='mog', this head has {self.generator!r}")
        mask = resolve_mask(x, mask)
        log_rho, mu, log_sigma = self._mixture(x, mask, self._segment_scores(x, mask))
        return MixtureParams(torch.exp(log_rho), mu, torch.exp(log_sigma))

    def forward(self, x: SegmentBatch, mask: Tensor | None = None) -> HeadOutput:
        """Pools segment scores with regressed weights.

        Args:
            x: (B, N, ...) segment inputs: `conv` for input="conv" or score_source="linear",
                `logits` for score_source="cached", `t` optional.
            mask: (B, N) bool, True for a real segment; None uses `x.mask`.

        Returns:
            logits S (B, C) and weights w / ||w||_2 (B, N).
        """
        mask = resolve_mask(x, mask)
        B, N = mask.shape
        scores = self._segment_scores(x, mask)  # (B, N, C)
        if self.generator == "mog":
            log_w = mog_log_weights(resolve_times(x, mask), *self._mixture(x, mask, scores))  # (B, N)
        else:
            raw, slot = self._regress(x, mask, scores)
            log_w = raw[:, :N] if slot is None else slot[:, 0]
        pooled = scores if self.pooled_scores == "logits" else torch.softmax(scores, dim=-1)
        logits, weights = l2_pool_log(pooled, log_w, mask)
        return HeadOutput(zero_empty_rows(logits, mask), weights)

    def transfer_layer(self) -> nn.Module | None:
        """TSRNet's fc1: the linear segment classifier on the pooled features (None for cached scores;
        the auxiliary net reads unpooled maps, so it is not used)."""
        return self.scores.transfer_layer()
