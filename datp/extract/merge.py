"""`datp merge`: join the shard stores of one run, flow or feature stores alike.

Placed in the extract stage because it dispatches to both store owners: the flow store
(`datp.flows.store.merge_stores`) and the feature store (`datp.extract.store.merge_feature_stores`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from datp.io.h5header import StoreError, store_kind


def merge_stores(inputs: Sequence[str | Path], out: str | Path, *, copy: bool = False) -> int:
    """Join the shard stores `inputs` (all of the kind of the first) into the store `out`.

    Without `copy` the merged file links to the inputs (they must stay in place); with `copy`
    it is self-contained.

    Returns:
        The number of videos in the merged store.

    Raises:
        ValueError: the first input is neither a flow nor a feature store.
        StoreError: an input is not a store file, or `out` exists or is an input (never
            overwritten).
    """
    inputs, out = [Path(p) for p in inputs], Path(out)
    if not inputs:
        raise ValueError("no input stores given")
    for path in inputs:
        if not path.is_file():
            raise StoreError(f"{path} is {'a folder' if path.is_dir() else 'missing'}; merge "
                             "takes store files (e.g. out.shard0of2.h5 out.shard1of2.h5)")
    if any(out.resolve() == p.resolve() for p in inputs):
        raise StoreError(f"--out {out} is one of the inputs; write the merged store elsewhere")
    if out.exists():
        raise StoreError(f"--out {out} exists; datp merge never overwrites: remove it or choose "
                         "another --out")
    kind = store_kind(inputs[0])
    if kind == "features":
        from datp.extract.store import merge_feature_stores as merge
    elif kind == "flow":
        from datp.flows.store import merge_stores as merge
    else:
        raise ValueError(f"{inputs[0]} is neither a flow nor a feature store")
    return merge(inputs, Path(out), copy=copy)
