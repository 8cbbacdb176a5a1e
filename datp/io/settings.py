"""The settings marker: a rerun into an existing output must use the settings it was made with.

extract-flow and extract-features resume: a rerun skips finished videos. Mixing outputs of other
settings into one store would silently give a store of two kinds, so each run compares its
settings (less those that may change between runs, `ignore`) with those recorded by the first
run: a marker file beside the output, or the finished store's own attrs, and refuses to go on
when they differ.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable


def _comparable(settings: dict | None, ignore: Iterable[str]) -> dict:
    plain = json.loads(json.dumps(settings or {}, default=str))  # tuples -> lists, as JSON has them
    skip = set(ignore)
    return {k: v for k, v in plain.items() if k not in skip}


def check_settings(where: Path, old: dict | None, new: dict, *, what: str,
                   ignore: Iterable[str] = ()) -> None:
    """Raise ValueError when `old` settings (None or {}: none recorded) differ from `new`.

    Args:
        where: the output, named in the message.
        old, new: the recorded and this run's settings.
        what: what the output holds ("flow", "features"), for the message.
        ignore: keys that may differ.
    """
    ignore = tuple(ignore)
    a, b = _comparable(old, ignore), _comparable(new, ignore)
    if a and a != b:
        diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
        raise ValueError(f"{where} holds {what} made with other settings ({', '.join(diff)} "
                         "differ); use another --out, or the same settings to resume")


def marked_settings(marker: Path, settings: dict, *, what: str, ignore: Iterable[str] = (),
                    where: Path | None = None, indent: int | None = None) -> None:
    """Check `settings` against the run's marker file, writing it (sorted JSON) on the first run.

    Args:
        marker: the marker file; `where` (default: its folder) is named in the message.
        settings: this run's settings, written as they are.
        what, ignore: as `check_settings`.
        indent: JSON indent of the marker.
    """
    marker = Path(marker)
    if marker.is_file():
        check_settings(where or marker.parent, json.loads(marker.read_text()), settings,
                       what=what, ignore=ignore)
    else:
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(json.dumps(settings, indent=indent, sort_keys=True, default=str))


def read_marker(marker: Path) -> dict | None:
    """The settings in the marker file `marker`, or None when there is none.

    Raises:
        ValueError: the marker is not JSON (named, with what to do).
    """
    marker = Path(marker)
    if not marker.is_file():
        return None
    try:
        return json.loads(marker.read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise ValueError(f"{marker} is damaged ({err}); remove it to resume with this run's "
                         "settings") from None


def write_marker(marker: Path, settings: dict) -> None:
    """Write the marker (sorted JSON) atomically, if there is none yet. Called when a run's first
    video is done, so a run that failed every video binds no later run."""
    from datp.io.atomic import atomic_path

    marker = Path(marker)
    if marker.is_file():
        return
    marker.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(marker) as tmp:
        tmp.write_text(json.dumps(settings, indent=2, sort_keys=True, default=str))
