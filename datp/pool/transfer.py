"""TSRNet's knowledge transfer in `train-head --transfer-from`: the trimmed store's batches
(`Transfer`, `open_transfer`); the MMD loss itself is `datp.pool.mmd`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
from torch import nn

from datp.extract.store import Batch, FeatureStore
from datp.pool.config import HeadConfig
from datp.pool.data import SegmentData, store_summary
from datp.pool.mmd import DEFAULT_SCALES, MAX_ROWS


@dataclass
class Transfer:
    """TSRNet's trimmed-to-untrimmed transfer term of one run (docs/detection.md, "Knowledge transfer").

    Attributes:
        data: the trimmed store's videos of split "train", with conv maps.
        rows: those videos' rows in the trimmed store.
        seed: `HeadConfig.seed`.
        layer: fc1, the head's `transfer_layer()` (set once the head is built).
    """

    data: SegmentData
    rows: np.ndarray
    seed: int
    layer: nn.Module | None = None

    def batches(self, epoch: int, *, steps: int, batch_size: int) -> Iterator[Batch]:
        """`steps` batches of min(batch_size, videos) distinct trimmed videos for one epoch: consecutive
        windows over a permutation seeded by (seed, epoch), cycled when the epoch has more steps."""
        size = min(batch_size, len(self.rows))
        order = np.random.default_rng([self.seed, epoch, 2]).permutation(self.rows)
        return self.data.batches(order[np.arange(steps * size) % len(order)], size)


def open_transfer(cfg: HeadConfig, store: FeatureStore, trimmed: FeatureStore, *, streams: Sequence[str],
                  max_ram_gb: float, progress: bool = False) -> tuple[Transfer, dict]:
    """The trimmed store's training videos for `cfg`'s transfer term, checked against the untrimmed store.

    Returns:
        The `Transfer` (without its layer) and config.json's "transfer" entry.

    Raises:
        ValueError: the trimmed store lacks a stream, has another conv channel count, or has no done
            videos of split "train".
    """
    for stream in streams:
        if stream not in trimmed.streams:
            raise ValueError(f"--transfer-from {trimmed.path} has no '{stream}/conv' but {store.path} is trained on "
                             f"{stream}; extract the trimmed features with --streams {stream}")
        ours, theirs = store.conv_shape(stream)[0], trimmed.conv_shape(stream)[0]
        if ours != theirs:
            raise ValueError(f"--transfer-from {trimmed.path} has {theirs}-channel {stream} features but {store.path} "
                             f"has {ours}; extract both stores with the same backbone")
    rows = trimmed.indices("train")
    if not len(rows):
        raise ValueError(f"--transfer-from {trimmed.path} has no done videos of split 'train'; the transfer draws "
                         "its trimmed batches from that split")
    data = SegmentData(trimmed, rows, streams=streams, conv=True, pad_to=int(trimmed.lengths(rows).max()),
                       max_ram_gb=max_ram_gb, progress=progress)
    summary = {"from": str(trimmed.path.resolve()), "mmd_weight": cfg.mmd_weight, "videos": len(rows),
               "bandwidth": f"median heuristic x {list(DEFAULT_SCALES)} per batch and term", "max_rows": MAX_ROWS,
               "data": "ram" if data.in_ram else "streamed", "store": store_summary(trimmed)}
    return Transfer(data, rows, cfg.seed), summary
