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


def commit(tmp: Path, final: Path) -> None:
    """Make the closed, verified file `tmp` durable and rename it onto `final`."""
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, final)


_HDF5_FAILED = []  # files whose write failed inside HDF5 (see `hdf5_write_failed`)


def write_error(path: Path, err: Exception, *, hdf5: bool = True) -> OSError:
    """An OSError naming `path` (h5py's often name no file), for the one-line message of a
    failed write (disk full, I/O error); what is finished stays on disk.

    Args:
        hdf5: the write failed inside HDF5, which then cannot close the file cleanly: the
            process should end without HDF5's exit handlers (`hdf5_write_failed`).
    """
    import errno as _errno

    if hdf5:
        _HDF5_FAILED.append(str(path))
    strerror, code = getattr(err, "strerror", None), getattr(err, "errno", None)
    if getattr(err, "filename", None) and "writing it failed" in str(strerror):
        return err  # made here already
    text = strerror or str(err) or type(err).__name__
    reason = text.split(" (file write failed")[0]
    if "error message = '" in text:  # HDF5's message holds the system's reason
        reason += ": " + text.split("error message = '", 1)[1].split("'", 1)[0]
    if code == _errno.ENOSPC and "space" not in reason:
        reason += ": no space left on device"
    return OSError(code or _errno.EIO, f"{reason} (writing it failed; finished videos are "
                   "kept: free space or fix the disk, then rerun the same command)", str(path))


@contextlib.contextmanager
def writing(path: Path) -> Iterator[None]:
    """Turn a failed write of `path` inside the block (h5py's OSError, or its RuntimeError of a
    failed flush) into `write_error(path, ...)`; other errors pass unchanged."""
    import errno as _errno

    try:
        yield
    except OSError as err:
        if err.filename and err.errno == _errno.ENOSPC and "needs about" in str(err.strerror):
            raise  # ensure_space's: said already, nothing half-written
        raise write_error(path, err) from err
    except RuntimeError as err:
        text = str(err)
        if "write failed" in text or "flush" in text.lower():
            raise write_error(path, OSError(_errno.EIO, text)) from err
        raise


def hdf5_write_failed() -> bool:
    """True once a write failed inside HDF5 in this process. HDF5 then may crash when it closes
    its files at exit (a segfault after the error line), so the CLI ends such a process with
    `os._exit` once the message is out; nothing finished depends on those files."""
    return bool(_HDF5_FAILED)


def unique_tmp(path: Path) -> Path:
    """A temporary sibling name of `path` that no other process uses (`.<name>.tmp<pid>`)."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


class OutputLocked(ValueError):
    """Another live process holds the lock of an output."""


def lock_path(out: Path) -> Path:
    """The lock file of the output `out`: `<out>.lock` beside it."""
    out = Path(out)
    return out.with_name(out.name + ".lock")


@contextlib.contextmanager
def output_lock(out: Path, lock: Path | None = None) -> Iterator[None]:
    """Hold the one-writer lock of `out` for the block (`fcntl.flock` on `<out>.lock`, holding
    the pid).

    The kernel drops a flock when its process dies, so a lock file left by a killed process is
    simply taken over. The lock file is removed when the block ends.

    Raises:
        OutputLocked: another live process holds it (the message names its pid and `out`).
    """
    import fcntl

    lock = Path(lock) if lock is not None else lock_path(out)
    lock.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = os.read(fd, 32).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise OutputLocked(f"another datp process (pid {pid}) is writing {out}; wait for it "
                               "to end (or stop it), or use another --out") from None
        try:  # the previous holder may have removed the file we locked: lock the one on disk
            same = os.stat(lock).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            lock.unlink()
        os.close(fd)


def die_with_parent() -> None:
    """In a worker process: ask Linux to SIGKILL it when its parent dies (even by kill -9), so no
    worker outlives its job. A no-op elsewhere."""
    import ctypes
    import signal
    import sys

    if not sys.platform.startswith("linux"):
        return
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        PR_SET_PDEATHSIG = 1
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() == 1:  # the parent died before prctl took effect
            os._exit(1)


RESERVE_BYTES = 1 << 20  # room HDF5 needs to close a file cleanly (its metadata)


def ensure_space(path: Path, nbytes: int) -> None:
    """Raise OSError(ENOSPC) naming `path` when its disk has less than `nbytes` (plus a small
    reserve) free, before anything is written.

    HDF5 cannot recover from a write that fails inside it (the file stays half-flushed and the
    library may crash at exit), so the long jobs check first; a failure that still happens (the
    disk filled by someone else meanwhile) is reported the same way, and the CLI exits at once.
    """
    import errno as _errno
    import shutil

    path = Path(path)
    folder = path.parent if path.parent.exists() else Path(".")
    free = shutil.disk_usage(folder).free
    if free < nbytes + RESERVE_BYTES:
        raise OSError(_errno.ENOSPC, f"No space left on device: writing it needs about "
                      f"{(nbytes + RESERVE_BYTES) / 2**20:.1f} MiB, {free / 2**20:.1f} MiB are free "
                      "(finished videos are kept: free space, then rerun the same command)",
                      str(path))


SHARED_MEMORY = Path("/dev/shm")


def ensure_shared_memory(nbytes: int, *, workers: int) -> None:
    """Raise OSError(ENOSPC) when the shared memory that DataLoader workers hand their items over in
    (`/dev/shm` on Linux) has less than `nbytes` free: a worker that cannot write its item there dies
    of SIGBUS or stalls mid-run, the classic failure in containers (Docker's default is 64 MB).
    Nothing is checked where there is no /dev/shm."""
    import errno as _errno
    import shutil

    if workers <= 0 or not SHARED_MEMORY.is_dir():
        return
    free = shutil.disk_usage(SHARED_MEMORY).free
    if free < nbytes:
        raise OSError(_errno.ENOSPC, f"{workers} worker(s) need about {nbytes / 2**20:.0f} MiB of shared "
                      f"memory to hand over their videos and {free / 2**20:.0f} MiB are free: free it, enlarge it "
                      "(docker run --shm-size=2g), or pass --workers 0", str(SHARED_MEMORY))


def isolated(fn, *args, out: Path, **kwargs):
    """`fn(*args, **kwargs)` in a spawned child process: for writing a whole store, where HDF5
    can crash the process (a double free, a segfault) when a write fails inside it. The child's
    exception is raised here; a child that dies is an OSError naming `out`.
    """
    import errno as _errno
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    receive, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_isolated_main, args=(send, fn, args, kwargs), daemon=True)
    proc.start()
    send.close()
    try:
        try:
            kind, value = receive.recv()
        except EOFError:
            proc.join()
            raise write_error(out, OSError(_errno.EIO, "the process writing it died (exit code "
                                           f"{proc.exitcode})"), hdf5=False) from None
        proc.join()
    finally:
        if proc.is_alive():  # interrupted here: the child's temporary file is never renamed
            proc.terminate()
            proc.join()
    if kind == "err":
        raise value
    return value


def _isolated_main(send, fn, args, kwargs) -> None:
    import pickle

    die_with_parent()
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)  # HDF5's or libc's last words if it crashes: the parent says it in one line
    try:
        message = ("ok", fn(*args, **kwargs))
    except BaseException as err:  # sent to the parent, which raises it
        try:
            pickle.dumps(err)
            message = ("err", err)
        except Exception:  # an exception that does not pickle: its text
            message = ("err", OSError(getattr(err, "errno", None), str(err)))
    send.send(message)
    send.close()
    os._exit(0)  # HDF5's exit handlers may crash after a failed write; the answer is out


def write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` and fsync it; a failure is an OSError naming `path`.

    Small HDF5 files (parts of features, the index of a running store) are built in memory
    (`h5py.File(io.BytesIO())`) and written with this: HDF5 never sees a failing disk, which it
    cannot recover from.
    """
    try:
        with open(path, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except OSError as err:
        Path(path).unlink(missing_ok=True)
        raise write_error(path, err, hdf5=False) from err


def read_back(tmp: Path, check) -> None:
    """Check a part just written with its store's `check(path)` (which raises StoreError when the part
    does not read back); such a part is a failed write, raised as `write_error`."""
    import errno

    from datp.io.h5header import StoreError

    try:
        check(tmp)
    except StoreError as err:
        raise write_error(tmp, OSError(errno.EIO, f"it does not read back ({err})")) from None
