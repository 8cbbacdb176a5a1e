"""Shards: which part of a dataset a process does (`--shard i/n`, torchrun's or Slurm's variables),
and the output name of each part. Re-exported by `datp.io.datasets`."""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

# Where a scheduler says which shard a process is: (rank, world size) variables, looked up in order.
# Slurm arrays number tasks from SLURM_ARRAY_TASK_MIN (e.g. --array=1-8), so the rank is counted from it.
SHARD_ENV = (("RANK", "WORLD_SIZE"), ("SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT"),
             ("SLURM_PROCID", "SLURM_NTASKS"))


def parse_shard(text: str | None) -> tuple[int, int]:
    """Parse `i/n` (0 <= i < n). Without text: torchrun's RANK/WORLD_SIZE, else a Slurm array's
    SLURM_ARRAY_TASK_ID/SLURM_ARRAY_TASK_COUNT (from SLURM_ARRAY_TASK_MIN), else Slurm's
    SLURM_PROCID/SLURM_NTASKS (srun tasks), else 0/1.

    Raises:
        ValueError: a malformed `i/n`, or variables that are not integers with 0 <= rank < size
            (the message names them).
    """
    if text is None:
        for rank_name, world_name in SHARD_ENV:
            if rank_name not in os.environ and world_name not in os.environ:
                continue
            rank, world = os.environ.get(rank_name, "0"), os.environ.get(world_name, "1")
            first = os.environ.get("SLURM_ARRAY_TASK_MIN", "0") if rank_name == "SLURM_ARRAY_TASK_ID" else "0"
            if not (rank.isdigit() and world.isdigit() and first.isdigit()
                    and 0 <= int(rank) - int(first) < int(world)):
                base = f" - SLURM_ARRAY_TASK_MIN={first}" if first != "0" else ""
                raise ValueError(f"{rank_name}={rank}{base} {world_name}={world} (used as the shard) must be "
                                 f"integers with 0 <= {rank_name}{' - min' if base else ''} < {world_name}; fix "
                                 "them or pass --shard i/n")
            return int(rank) - int(first), int(world)
        return 0, 1
    match = re.fullmatch(r"(\d+)/(\d+)", text.strip())
    if not match or not 0 <= int(match[1]) < int(match[2]):
        raise ValueError(f"shard {text!r} must be i/n with 0 <= i < n, e.g. 0/4")
    return int(match[1]), int(match[2])


def check_shard(shard) -> None:
    """Raise ValueError unless `shard` is (i, n) with 0 <= i < n."""
    if len(shard) != 2 or not 0 <= int(shard[0]) < int(shard[1]):
        raise ValueError(f"shard {shard} must be (i, n) with 0 <= i < n")


def shard_out(out: str | Path, shard: tuple[int, int], *, shared: bool = False) -> Path:
    """The output of shard (i, n): `x.h5` with shard (2, 4) -> `x.shard2of4.h5`.

    One shard of one (n == 1), or an output `shared` by all shards (a folder of per-video files,
    e.g. extract-flow's jpg folders), keeps `out` itself.
    """
    out = Path(out)
    if shard[1] == 1 or shared:
        return out
    return out.with_name(f"{out.stem}.shard{shard[0]}of{shard[1]}{out.suffix}")


def shard_records(records: list, index: int, count: int) -> list:
    """The records (`datp.io.datasets.Record`) of shard `index` of `count`, by a stable hash of the id.

    A hash (not position) keeps every video in the same shard when the dataset grows, so a shard's
    finished work stays valid across runs and machines.
    """
    if count == 1:
        return list(records)
    return [r for r in records
            if int.from_bytes(hashlib.sha1(r.id.encode()).digest()[:8], "big") % count == index]
