"""The auxiliary ConvNet of the DATP head (`datp.pool.heads.datp`): per-segment features of the conv
maps (or of the segment probabilities), temporal convolutions over the segments, and fc layers that
regress the weight generator's parameters."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


class AuxNet(nn.Module):
    """The auxiliary ConvNet that regresses the weight generator's parameters.

    conv input (B, N, Cf, H, W): a k x k conv to 64 channels + ReLU per segment, k = min(7, map_size);
    (B, N, D) feature vectors (imported I3D features, map_size 1): a linear layer D -> 64 + ReLU per segment:
    the paper's 7x7 conv over the whole 7x7 map of a ResNet at 224; smaller maps (a ResNet at 112 gives
    4x4) get a conv over their whole map (maps larger than k x k
    are averaged over the remaining positions), then the temporal part. softmax input (B, N, C):
    the temporal part directly. With `center`, each segment's vector (64 features or C probabilities)
    has its mean over the video's real segments subtracted first, so the temporal part sees how a
    segment differs from the rest of its video. Temporal part: two convs over segments (kernel 3,
    zero padding) to 32 channels + ReLU, fc to `hidden` + ReLU, fc (the regression layer) to
    `out_features`.

    Args:
        in_channels: Cf (conv input) or C (softmax input).
        num_segments: segment slots the fc layers read.
        out_features: number of regressed parameters.
        input: "conv" or "softmax".
        hidden: width of the first fc layer.
        map_size: H (= W) of the conv maps the head will read (conv input).
        center: subtract each video's mean segment vector before the temporal part.
    """

    def __init__(self, *, in_channels: int, num_segments: int, out_features: int, input: str, hidden: int,
                 map_size: int = 7, center: bool = False):
        super().__init__()
        self.num_segments = num_segments
        self.center = center
        self.kernel = min(7, map_size)
        self.spatial = nn.Conv2d(in_channels, 64, kernel_size=self.kernel) if input == "conv" else None
        width = 64 if input == "conv" else in_channels
        self.temporal = nn.ModuleList([nn.Conv1d(width, 32, 3, padding=1), nn.Conv1d(32, 32, 3, padding=1)])
        self.fc = nn.Linear(32 * num_segments, hidden)
        self.regress = nn.Linear(hidden, out_features)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        """Regresses parameters from a segment sequence.

        Args:
            x: (B, N, Cf, H, W) conv maps or (B, N, C) probabilities, N <= num_segments.
            mask: (B, N) bool.

        Returns:
            (B, out_features).
        """
        return self.read_out(self.temporal_features(x, mask))

    def read_out(self, h: Tensor) -> Tensor:
        """The fc layers on the temporal features (B, 32, num_segments) -> (B, out_features)."""
        return self.regress(F.relu(self.fc(h.flatten(1))))

    def temporal_features(self, x: Tensor, mask: Tensor) -> Tensor:
        """The temporal part's output (B, 32, num_segments), zero on masked and padded slots."""
        B, N = mask.shape
        if self.spatial is not None:
            k = self.kernel
            if x.dim() == 3 and k == 1:  # (B, N, D) feature vectors (map_size 1): a per-segment linear layer
                w = self.spatial.weight.flatten(1)  # (64, D)
                x = F.relu(F.linear(x.masked_fill(~mask[..., None], 0.0), w, self.spatial.bias))  # (B, N, 64)
            else:
                if x.dim() != 5 or x.shape[-1] < k or x.shape[-2] < k:
                    raise ValueError(f"datp with input='conv' needs (B, N, Cf, H>={k}, W>={k}) conv maps, got shape "
                                     f"{tuple(x.shape)} (feature vectors (B, N, D) need map_size=1); store unpooled "
                                     "conv features, build the head with map_size=H, or use input='softmax'")
                x = x.masked_fill(~mask[..., None, None, None], 0.0)
                if x.shape[-2:] == (k, k):
                    # A conv whose kernel covers the whole map is one matrix product with the flattened map;
                    # as a GEMM it runs ~10x faster on CPU than the convolution (same numbers up to rounding).
                    w = self.spatial.weight.flatten(1)  # (64, Cf*k*k)
                    x = F.relu(F.linear(x.flatten(2), w, self.spatial.bias))  # (B, N, 64)
                else:
                    h = F.relu(self.spatial(x.flatten(0, 1)))  # (B*N, 64, H-k+1, W-k+1)
                    x = h.mean(dim=(-2, -1)).view(B, N, -1)  # (B, N, 64)
        x = x.masked_fill(~mask[..., None], 0.0)  # (B, N, width)
        if self.center:  # minus the mean over the real segments (an all-masked row stays zero)
            count = mask.sum(dim=1, keepdim=True).clamp_min(1)[..., None]  # (B, 1, 1)
            x = (x - x.sum(dim=1, keepdim=True) / count).masked_fill(~mask[..., None], 0.0)
        h = x.transpose(1, 2)  # (B, width, N)
        slots = F.pad(mask, (0, self.num_segments - N), value=False)  # (B, S)
        h = F.pad(h, (0, self.num_segments - N))  # (B, width, S): short inputs fill the first slots
        for conv in self.temporal:
            h = F.relu(conv(h)).masked_fill(~slots[:, None, :], 0.0)  # padded slots carry nothing
        return h
