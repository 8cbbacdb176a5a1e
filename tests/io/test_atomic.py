"""datp.io.atomic: the one-writer lock, the free-space check, work in a child process."""

import errno
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from datp.io.atomic import OutputLocked, ensure_space, isolated, lock_path, output_lock

ROOT = Path(__file__).resolve().parents[2]
HOLD = """
import sys, time
from datp.io.atomic import output_lock
with output_lock(sys.argv[1]):
    print("locked", flush=True)
    time.sleep(60)
"""


def test_a_second_writer_is_refused_with_the_holders_pid(tmp_path):
    out = tmp_path / "f.h5"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], stdout=subprocess.PIPE,
                              text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(OutputLocked, match=f"another datp process \\(pid {holder.pid}\\) is "
                                               f"writing {out}"):
            with output_lock(out):
                pass
    finally:
        holder.kill()
        holder.wait()
    # the holder died by SIGKILL and left its lock file: it is taken over, and removed after
    assert lock_path(out).read_text().strip() == str(holder.pid)
    with output_lock(out):
        assert lock_path(out).read_text().strip() == str(os.getpid())
    assert not lock_path(out).exists()


def test_free_space_is_checked_before_writing(tmp_path):
    ensure_space(tmp_path / "small.h5", 1)
    with pytest.raises(OSError) as info:
        ensure_space(tmp_path / "huge.h5", 1 << 60)
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(tmp_path / "huge.h5")
    assert "free space, then rerun" in info.value.strerror


def _answer(x):
    return x + 1


def _fail(x):
    raise ValueError(f"bad {x}")


def _die(x):
    os._exit(7)


def test_isolated_returns_raises_and_names_the_output_of_a_dead_child(tmp_path):
    assert isolated(_answer, 1, out=tmp_path / "s.h5") == 2
    with pytest.raises(ValueError, match="bad 3"):
        isolated(_fail, 3, out=tmp_path / "s.h5")
    t0 = time.perf_counter()
    with pytest.raises(OSError, match="died") as info:
        isolated(_die, 0, out=tmp_path / "s.h5")
    assert info.value.filename == str(tmp_path / "s.h5") and time.perf_counter() - t0 < 60
