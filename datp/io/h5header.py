"""The header every datp HDF5 store carries, and the one place that sniffs a store's kind.

File attrs common to the flow store (`datp.flows.store`) and the feature store
(`datp.extract.store`): `datp_schema` (the layout's version), `datp_kind` ("flow" or
"features"), `datp_version` (the datp that wrote it) and `created` (ISO time, UTC). Each store
module adds its own attrs and owns its layout; this module only writes and checks the header.
"""

from __future__ import annotations

import datetime
from pathlib import Path

import datp


class StoreError(ValueError):
    """A store that is missing, of another kind or schema, or lacks what is asked for."""


def header(kind: str, schema: int) -> dict:
    """The common file attrs of a new store of `kind`, layout version `schema`."""
    return {"datp_schema": schema, "datp_kind": kind, "datp_version": datp.__version__,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def store_kind(path: str | Path) -> str | None:
    """The `datp_kind` of the HDF5 file `path` ("flow", "features"), or None when it has none."""
    import h5py

    with h5py.File(path, "r") as f:
        kind = f.attrs.get("datp_kind")
    return None if kind is None else str(kind)


def check_header(attrs, path: Path, *, kind: str, schema: int, noun: str, fix: str) -> None:
    """Raise StoreError unless `attrs` (a file's) are those of a `kind` store of `schema`.

    Args:
        attrs: the opened file's attrs.
        path: the file, for the message.
        kind, schema: what the reader expects.
        noun: "flow store" / "feature store"; fix: what to do about another schema.
    """
    if attrs.get("datp_kind") != kind:
        raise StoreError(f"{path} is not a {noun} (datp_kind={attrs.get('datp_kind')!r})")
    if attrs.get("datp_schema") != schema:
        raise StoreError(f"{path} has {noun} schema {attrs.get('datp_schema')}; this datp reads "
                         f"schema {schema}: {fix}")
