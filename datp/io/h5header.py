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
    with open_h5(path, "datp store") as f:
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


def open_h5(path: str | Path, noun: str = "HDF5 file"):
    """`h5py.File(path, "r")`, with a file that is not readable HDF5 (a text file, a truncated or
    damaged store, a folder) as a StoreError naming it."""
    import h5py

    path = Path(path)
    if path.is_dir():
        raise StoreError(f"{path} is a folder, not a {noun}")
    if not path.is_file():
        raise StoreError(f"{path}: no such {noun}")
    try:
        return h5py.File(path, "r")
    except OSError as err:
        raise StoreError(f"{path} is not a readable {noun} (not HDF5, truncated or damaged: "
                         f"{err})") from None


def check_output(path: str | Path, *, kind: str, noun: str) -> None:
    """Refuse an `--out` that datp must not overwrite: a folder, or a file that is not a `kind`
    store (a store of another kind, or a file datp did not write). A missing one is fine.

    Raises:
        StoreError: naming the file and what to do.
    """
    path = Path(path)
    if path.is_dir():
        raise StoreError(f"{path} is a folder; --out must be a {noun} file")
    if not path.exists():
        return
    try:
        with open_h5(path) as f:
            found = f.attrs.get("datp_kind")
    except StoreError:
        found = None
    if found != kind:
        what = f"a datp {found} store" if found else "a file datp did not write"
        raise StoreError(f"{path} exists and is {what}, not a {noun}; datp does not overwrite "
                         "it: choose another --out or remove it")
