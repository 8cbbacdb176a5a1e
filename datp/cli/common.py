"""What every command shares: the user-error rule, option defaults from config dataclasses, option
parsers, and the end-of-run summary of the long jobs."""

from __future__ import annotations

import dataclasses
import functools
import sys
from pathlib import Path

import click

SOURCE_HELP = ("SOURCE: a video, a folder tree root/<class>/<video>, a list file of "
               "'<path> <label>' lines, a UCF101 split folder (classInd.txt + trainlist0K.txt), "
               "an HMDB51 split folder (<class>_test_splitK.txt) or a datp manifest.csv; several "
               "may be given.")


def user_errors(fn):
    """Turn user errors into one clear line on stderr and exit code 2 (no traceback)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from datp.flows.store import StoreError
        from datp.io.datasets import DatasetError
        from datp.io.decode import DecodeError

        try:
            return fn(*args, **kwargs)
        except (ValueError, DatasetError, StoreError, DecodeError, FileNotFoundError,
                KeyError) as err:
            message = err.args[0] if isinstance(err, KeyError) and err.args else err
            click.echo(f"datp: error: {message}", err=True)
            sys.exit(2)

    return wrapper


def defaults(config_class) -> dict:
    """{field: default} of a config dataclass: the single source of every option's default."""
    return {f.name: f.default for f in dataclasses.fields(config_class)
            if f.default is not dataclasses.MISSING}


def size(text: str | None) -> tuple[int, int] | None:
    """"340x256" -> (340, 256); None stays None."""
    if text is None:
        return None
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise click.BadParameter(f"{text!r} must be WxH, e.g. 340x256") from None
    return w, h


def finish(summary, failures_path: Path, what: str) -> None:
    """Print a long job's summary (done, already done, failed, where failures are) and exit with its code."""
    click.echo(f"{what}: {summary.done} done, {summary.skipped} already done, "
               f"{len(summary.failed)} failed in {summary.seconds:.1f}s", err=True)
    if summary.failed:
        click.echo(f"failures (id, path, reason) are listed in {failures_path}", err=True)
    if summary.interrupted:
        click.echo("interrupted: finished videos are kept; run the same command to resume",
                   err=True)
    sys.exit(summary.exit_code)
