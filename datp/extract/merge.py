"""`datp merge`: join the shard stores of one run, flow or feature stores alike.

Placed in the extract stage because it dispatches to both store owners: the flow store
(`datp.flows.store.merge_stores`) and the feature store (`datp.extract.store.merge_feature_stores`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from datp.io.h5header import store_kind


def merge_stores(inputs: Sequence[str | Path], out: str | Path, *, copy: bool = False) -> int:
    """Join the shard stores `inputs` (all of the kind of the first) into the store `out`.

    Without `copy` the merged file links to the inputs (they must stay in place); with `copy`
    it is self-contained.

    Returns:
        The number of videos in the merged store.

    Raises:
        ValueError: the first input is neither a flow nor a feature store.
    """
    inputs = [Path(p) for p in inputs]
    kind = store_kind(inputs[0])
    if kind == "features":
        from datp.extract.store import merge_feature_stores as merge
    elif kind == "flow":
        from datp.flows.store import merge_stores as merge
    else:
        raise ValueError(f"{inputs[0]} is neither a flow nor a feature store")
    return merge(inputs, Path(out), copy=copy)
