"""What every command shares: the user-error rule, option defaults from config dataclasses, option
parsers, and the end-of-run summary of the long jobs."""

from __future__ import annotations

import dataclasses
import functools
import os
import signal
import sys
from pathlib import Path

import click

SOURCE_HELP = ("SOURCE: a video, a folder tree root/<class>/<video>, a list file of "
               "'<path> <label>' lines, a UCF101 split folder (classInd.txt + trainlist0K.txt), "
               "an HMDB51 split folder (<class>_test_splitK.txt) or a datp manifest.csv; several "
               "may be given.")


def user_errors(fn):
    """Turn user errors into one clear line on stderr and exit code 2 (no traceback); Ctrl-C and
    SIGTERM into one line and exit code 130.

    User errors are the library's documented ones (ValueError and its subclasses DatasetError,
    StoreError, DecodeError) and operating-system errors on a file (OSError, which h5py also raises
    for files it cannot open: the line names the file). Anything else is a bug and keeps its traceback.
    """

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from datp.flows.store import StoreError
        from datp.io.datasets import DatasetError
        from datp.io.decode import DecodeError

        previous = signal.signal(signal.SIGTERM, _terminate)
        try:
            return fn(*args, **kwargs)
        except (ValueError, DatasetError, StoreError, DecodeError) as err:
            click.echo(f"datp: error: {err}", err=True)
            sys.exit(2)
        except OSError as err:
            where = f"{err.filename}: " if err.filename else ""
            click.echo(f"datp: error: {where}{err.strerror or err}", err=True)
            from datp.io.atomic import hdf5_write_failed

            if hdf5_write_failed():  # HDF5 may crash closing a file whose write failed: skip that
                import multiprocessing.util

                multiprocessing.util._exit_function()  # still stop workers and free semaphores
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(2)
            sys.exit(2)
        except KeyboardInterrupt as err:
            what = "terminated (SIGTERM)" if err.args == ("SIGTERM",) else "interrupted"
            click.echo(f"datp: {what}; finished work is kept, an unfinished run folder is not left behind",
                       err=True)
            sys.exit(130)
        finally:
            signal.signal(signal.SIGTERM, previous)

    return wrapper


def _terminate(signum, frame):
    """SIGTERM (a cluster's time limit, `kill`) unwinds like Ctrl-C: cleanups run, exit code 130."""
    raise KeyboardInterrupt("SIGTERM")


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
