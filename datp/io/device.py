"""Which torch device a command runs on: the one rule every stage uses."""

from __future__ import annotations

import torch


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """"auto" -> cuda when available, else cpu; "cuda" without an index -> cuda:local_rank.

    Raises:
        ValueError: a cuda device was asked for and there is no CUDA GPU.
    """
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {name}: no CUDA GPU is available; use --device cpu")
        if device.index is None:
            device = torch.device("cuda", local_rank)
    return device
