"""Crash-safe files: everything datp writes appears whole or not at all.

HDF5 has no journal: a process killed while HDF5 updates a file's metadata can leave a file that
no longer opens. So long jobs never write into the store a user opens. Each finished video goes
into its own small *part* file, written under a temporary name and renamed into place
(`os.replace` is atomic on POSIX); the store itself is rebuilt from the parts under a temporary name
and renamed. A `kill -9` at any moment therefore leaves only whole parts and a whole store, and a
rerun knows what is done by which parts exist.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterator


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary sibling of `path`; rename it onto `path` if the block succeeds.

    On an exception the temporary file (or folder) is removed and `path` is untouched.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    _remove(tmp)
    try:
        yield tmp
        if path.is_dir() and tmp.is_dir():
            # A folder cannot be renamed over a non-empty one: move the old one aside first, so that
            # a crash between the two renames leaves it whole (as `.<name>.old<pid>`), never lost.
            old = path.with_name(f".{path.name}.old{os.getpid()}")
            _remove(old)
            os.replace(path, old)
            os.replace(tmp, path)
            _remove(old)
        else:
            os.replace(tmp, path)
    except BaseException:
        _remove(tmp)
        raise


def _remove(path: Path) -> None:
    if path.is_dir():
        import shutil

        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def parts_dir(out: Path) -> Path:
    """Folder of the per-video part files of the store `out` (`flows.h5` -> `flows.h5.parts/`)."""
    out = Path(out)
    return out.with_name(out.name + ".parts")


def finished_parts(folder: Path, suffix: str = ".h5") -> dict[str, Path]:
    """Part files that were completely written (temporary files are ignored), by file stem."""
    folder = Path(folder)
    if not folder.is_dir():
        return {}
    return {p.name[: -len(suffix)]: p for p in folder.iterdir()
            if p.name.endswith(suffix) and not p.name.startswith(".")}
