"""Fault injection for the long jobs (extract-flow, extract-features): each case runs the real CLI
in subprocesses, does something bad to it (kill -9 at seeded moments, a second writer, a full disk,
damaged parts, reruns with other lists) and checks the promise of docs/architecture.md ("Guarantees
of long jobs"): nothing finished is lost, nothing is mixed, and the rerun's store equals an
uninterrupted run's, byte for byte.

Used by bench/faults.py (which prints the table) and by tests/flows/test_flow_faults.py and
tests/extract/test_feature_faults.py (which import it from bench/: it needs nothing of the tests). Every case returns `Outcome(ok, detail)`.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import resource
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from datp.io.clips import moving_texture, write_video

ROOT = Path(__file__).resolve().parents[1]
COMMON = {
    "flow": ["--short-side", "32", "--workers", "1", "--quiet"],
    "features": ["--backbone", "resnet18", "--weights", "random", "--device", "cpu",
                 "--segments", "2", "--new-length", "2", "--resize", "32", "--input-size", "32",
                 "--flow-algorithm", "dis", "--flow-short-side", "32", "--workers", "1",
                 "--batch-size", "4", "--quiet"],
}
COMMAND = {"flow": "extract-flow", "features": "extract-features"}
PART_LIMIT = {"flow": 10_000, "features": 30_000}  # bytes: index < limit < part


@dataclass
class Outcome:
    ok: bool
    detail: str


def make_dataset(folder: Path, count: int = 5, frames: int = 10) -> dict[str, Path]:
    """`count` tiny lossless clips in two classes, and list files: a.txt (the first three),
    b.txt (the others), all.txt (all, a's first), sub.txt (the first of a)."""
    folder = Path(folder)
    lines = []
    for i in range(count):
        path = write_video(folder / "v" / f"c{i % 2}" / f"v{i}.mkv",
                           moving_texture(frames + i, 48, 64, seed=i))
        lines.append(f"{path.relative_to(folder)} {i % 2}\n")
    lists = {"a": lines[:3], "b": lines[3:], "all": lines, "sub": lines[:1]}
    for name, rows in lists.items():
        (folder / f"{name}.txt").write_text("".join(rows))
    return {name: folder / f"{name}.txt" for name in lists}


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def start(kind: str, sources, out: Path, *extra, file_limit: int | None = None) -> subprocess.Popen:
    """Start `datp extract-flow|extract-features` in its own session (pgid = pid).

    Args:
        file_limit: RLIMIT_FSIZE in bytes: any write past it fails with EFBIG inside HDF5 or
            OpenCV (an injected disk-full that no free-space check sees).
    """
    def limit():
        if file_limit is not None:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (file_limit, file_limit))

    sources = [sources] if isinstance(sources, (str, Path)) else list(sources)
    args = [sys.executable, "-m", "datp", COMMAND[kind], *map(str, sources), "--out", str(out),
            *COMMON[kind], *map(str, extra)]
    return subprocess.Popen(args, cwd=Path(out).parent, env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True,
                            preexec_fn=limit)


def run(kind: str, sources, out: Path, *extra, file_limit: int | None = None,
        timeout: float = 600) -> tuple[int, str]:
    proc = start(kind, sources, out, *extra, file_limit=file_limit)
    _, err = proc.communicate(timeout=timeout)
    return proc.returncode, err


def content(path: Path) -> dict:
    """What a store holds, less what may differ between runs (creation time, out, workers,
    shard): {dataset path: sha256 of its bytes, "attrs:<path>": its attrs as text}."""
    found = {}
    with h5py.File(path, "r") as f:
        def visit(name, obj):
            if isinstance(obj, h5py.Dataset):
                data = obj[()]
                raw = (repr(np.asarray(data).tolist()).encode() if np.asarray(data).dtype == object
                       else np.ascontiguousarray(data).tobytes())  # strings by value, not pointer
                found[name] = hashlib.sha256(raw).hexdigest()
            attrs = {k: v for k, v in obj.attrs.items() if k not in ("created", "settings", "path")}
            if "settings" in obj.attrs:
                settings = json.loads(obj.attrs["settings"])
                attrs["settings"] = {k: v for k, v in settings.items()
                                     if k not in ("out", "workers", "shard")}
            found[f"attrs:{name}"] = str(sorted(attrs.items()))

        visit("/", f)
        f.visititems(visit)
    return found


def same(path: Path, reference: Path) -> Outcome:
    if not Path(path).is_file():
        return Outcome(False, f"{path} is missing")
    a, b = content(path), content(reference)
    if a == b:
        return Outcome(True, "equal to the uninterrupted run")
    diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
    return Outcome(False, f"differs from the uninterrupted run in {diff[:4]}")


def _one_line(err: str) -> bool:
    lines = [line for line in err.strip().splitlines() if line.strip()]
    return len(lines) == 1 and lines[0].startswith("datp: error:")


def reference(kind: str, lists: dict, folder: Path) -> Path:
    out = Path(folder) / f"ref-{kind}.h5"
    if not out.exists():
        code, err = run(kind, lists["all"], out)
        assert code == 0, err
    return out


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


def _parts(folder: Path) -> int:
    """Finished parts in a parts folder (0 when it is absent or vanishes: a run ending removes it)."""
    try:
        return len(list(Path(folder).glob("*.h5")))
    except FileNotFoundError:
        return 0


def kill9(kind: str, lists: dict, folder: Path, *, kills: int = 5, seed: int = 0) -> Outcome:
    """kill -9 the parent (only) at `kills` seeded moments of successive runs on one output;
    its workers must die with it; then the rerun must equal the uninterrupted run.

    A moment is either a time in [0, one whole run] after the start (start-up, index writes...)
    or, mostly, a seeded delay (0-0.3 s) after the run's next part appears (mid-video, mid-index);
    a run that finished before its kill is started afresh for the next moment.
    """
    ref = reference(kind, lists, folder)
    t0 = time.perf_counter()
    run(kind, lists["all"], folder / f"timing-{kind}.h5")
    span = time.perf_counter() - t0
    rng = random.Random(seed)
    out = folder / f"killed-{kind}.h5"
    parts_dir = Path(f"{out}.parts")
    landed = []
    for _ in range(kills):
        if out.exists() and not parts_dir.exists():  # the last run finished: start afresh
            out.unlink()
        before = _parts(parts_dir)
        proc = start(kind, lists["all"], out)
        if rng.random() < 0.3:
            moment = rng.uniform(0, span)
            time.sleep(moment)
            what = f"{moment:.1f}s"
        else:
            delay, deadline = rng.uniform(0, 0.3), time.time() + 300
            while (proc.poll() is None and time.time() < deadline
                   and _parts(parts_dir) <= before):
                time.sleep(0.01)
            time.sleep(delay)
            what = f"part+{delay:.2f}s"
        running = proc.poll() is None
        if running:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        deadline = time.time() + 10
        while _group_alive(proc.pid) and time.time() < deadline:
            time.sleep(0.1)
        if _group_alive(proc.pid):
            os.killpg(proc.pid, signal.SIGKILL)
            return Outcome(False, f"a worker outlived its parent killed at {what}")
        parts = _parts(parts_dir)
        landed.append(f"{what} {'mid-run, ' + str(parts) + ' parts' if running else 'too late'}")
    ok, detail = _rerun_equals(kind, lists, out, ref)
    mid = sum("mid-run" in x for x in landed)
    return Outcome(ok and mid >= 1, f"{detail}; {mid} of {kills} kills mid-run "
                   f"({'; '.join(landed)}); no worker outlived its parent")


def _rerun_equals(kind: str, lists: dict, out: Path, ref: Path) -> tuple[bool, str]:
    """Rerun the whole list into `out`: (ok, detail), ok when it exits 0 and `out` equals `ref`, the
    uninterrupted run."""
    code, err = run(kind, lists["all"], out)
    if code != 0:
        return False, f"rerun exit {code}: {err.strip()[-300:]}"
    result = same(out, ref)
    return result.ok, f"rerun {result.detail}"


def sigterm(kind: str, lists: dict, folder: Path) -> Outcome:
    """SIGTERM to the parent mid-run (a cluster's time limit): exit 130 with one line, no process
    of the job left, and the rerun equals the uninterrupted run."""
    ref = reference(kind, lists, folder)
    out = folder / f"term-{kind}.h5"
    parts_dir = Path(f"{out}.parts")
    proc = start(kind, lists["all"], out)
    deadline = time.time() + 300
    while proc.poll() is None and time.time() < deadline and not _parts(parts_dir):
        time.sleep(0.01)
    if proc.poll() is not None:
        return Outcome(False, f"the run ended (exit {proc.returncode}) before a part appeared")
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    deadline = time.time() + 30  # DataLoader workers notice a dead parent on their next watchdog poll (5 s)
    while _group_alive(proc.pid) and time.time() < deadline:
        time.sleep(0.1)
    if _group_alive(proc.pid):
        os.killpg(proc.pid, signal.SIGKILL)
        return Outcome(False, "a process of the job outlived SIGTERM")
    if proc.returncode != 130 or "Traceback" in err:
        return Outcome(False, f"exit {proc.returncode}: {err.strip()[-3000:]}")
    ok, detail = _rerun_equals(kind, lists, out, ref)
    return Outcome(ok, f"exit 130, no process left; {detail}")


def concurrent(kind: str, lists: dict, folder: Path) -> Outcome:
    """Two runs on one output at once: one is refused with one line, the other's output whole."""
    ref = reference(kind, lists, folder)
    out = folder / f"two-{kind}.h5"
    procs = [start(kind, lists["all"], out) for _ in range(2)]
    results = [(p.wait(timeout=600), p.stderr.read()) for p in procs]
    codes = sorted(code for code, _ in results)
    refused = [err for code, err in results if code == 2]
    if codes != [0, 2] or not refused or "another datp process (pid" not in refused[0] \
            or not _one_line(refused[0]):
        return Outcome(False, f"exit codes {codes}: {[e.strip()[-200:] for _, e in results]}")
    result = same(out, ref)
    return Outcome(result.ok, f"one refused ({refused[0].strip()[12:80]}...); other: "
                   f"{result.detail}")


def disk_full(kind: str, lists: dict, folder: Path, *, where: str) -> Outcome:
    """Writes past a size fail (EFBIG inside HDF5, unseen by any free-space check), so that
    `where` = "store" (the final store; the parts fit) or "part" (the first part) cannot be
    written: one line, exit 2, the parts kept; the rerun without the limit equals the
    uninterrupted run."""
    ref = reference(kind, lists, folder)
    # "part": above the size of a running store's index, below a part's (make_dataset's clips)
    limit = ref.stat().st_size // 2 if where == "store" else PART_LIMIT[kind]
    out = folder / f"full-{where}-{kind}.h5"
    # the limit holds for child processes too: DataLoader workers, whose tensors travel through
    # shared-memory files, would stall on it; with --workers 0 they decode in the main process
    extra = ["--workers", "0"] if kind == "features" and where == "part" else []
    code, err = run(kind, lists["all"], out, *extra, file_limit=limit, timeout=300)
    if code != 2 or not _one_line(err) or "Traceback" in err or (
            where == "part" and ".parts/" not in err):
        return Outcome(False, f"exit {code}, stderr {err.strip()[-300:]!r}")
    kept = len(list(Path(f"{out}.parts").glob("*.h5")))
    ok, detail = _rerun_equals(kind, lists, out, ref)
    return Outcome(ok, f"exit 2 with {err.strip()[12:90]!r}...; {kept} parts kept; {detail}")


def _leave_parts(kind: str, lists: dict, out: Path) -> list[Path]:
    """A run whose final store cannot be written: every part stays on disk."""
    run(kind, lists["all"], out, file_limit=reference(kind, lists, out.parent).stat().st_size // 2)
    return sorted(p for p in Path(f"{out}.parts").glob("*.h5"))


def _corrupt_data(part: Path) -> None:
    """Zero 64 bytes in the middle of the largest dataset's first chunk (its data, not metadata)."""
    with h5py.File(part, "r") as f:
        sets = []
        f.visititems(lambda n, o: sets.append(o) if isinstance(o, h5py.Dataset) else None)
        big = max(sets, key=lambda d: d.id.get_storage_size())
        info = big.id.get_chunk_info(0)
        offset, size = info.byte_offset, info.size
    with open(part, "r+b") as f:
        f.seek(offset + size // 2 - 32)
        f.write(bytes(64))


def damaged_parts(kind: str, lists: dict, folder: Path) -> Outcome:
    """A truncated part and one with a zeroed block of data: both named, redone, rerun equal."""
    ref = reference(kind, lists, folder)
    out = folder / f"damaged-{kind}.h5"
    parts = _leave_parts(kind, lists, out)
    if len(parts) < 2:
        return Outcome(False, f"the setup left {len(parts)} parts")
    truncated, zeroed = parts[0], parts[1]
    with open(truncated, "r+b") as f:
        f.truncate(truncated.stat().st_size // 2)
    _corrupt_data(zeroed)
    code, err = run(kind, lists["all"], out)
    named = [p.name for p in (truncated, zeroed) if p.name in err]
    if code != 0 or len(named) != 2:
        return Outcome(False, f"exit {code}, named {named}: {err.strip()[-300:]}")
    result = same(out, ref)
    return Outcome(result.ok, f"both named and redone; {result.detail}")


def union(kind: str, lists: dict, folder: Path) -> Outcome:
    """Runs with list a, then b, then a subset of a: the store holds all, as one run of all."""
    ref = reference(kind, lists, folder)
    out = folder / f"union-{kind}.h5"
    for name in ("a", "b", "sub"):
        code, err = run(kind, lists[name], out)
        if code != 0:
            return Outcome(False, f"run of {name}.txt exit {code}: {err.strip()[-200:]}")
    result = same(out, ref)
    return Outcome(result.ok, f"a, b, subset of a: {result.detail}")


def foreign_out(kind: str, lists: dict, folder: Path) -> Outcome:
    """An --out that is another kind of store or a file datp did not write: refused, kept."""
    other = reference("flow" if kind == "features" else "features", lists, folder)
    text = folder / f"notes-{kind}.h5"
    text.write_text("my notes\n")
    before = {p: p.read_bytes() for p in (other, text)}
    for path in before:
        code, err = run(kind, lists["sub"], path)
        if code != 2 or not _one_line(err) or path.read_bytes() != before[path]:
            return Outcome(False, f"{path.name}: exit {code}, {err.strip()[-200:]}")
    return Outcome(True, "another kind of store and a text file: refused (exit 2), untouched")


def dead_worker(lists: dict, folder: Path) -> Outcome:
    """kill -9 extract-features' DataLoader worker mid-run: the run goes on (the video is redone
    alone) and equals the uninterrupted run."""
    ref = reference("features", lists, folder)
    out = folder / "deadworker-features.h5"
    proc = start("features", lists["all"], out)
    victim, deadline = None, time.time() + 120
    while victim is None and time.time() < deadline and proc.poll() is None:
        for child in _children(proc.pid):
            cmdline = Path(f"/proc/{child}/cmdline").read_bytes()
            if b"spawn_main" in cmdline and _children(child) == [] and _loaded(child):
                victim = child
                break
        time.sleep(0.05)
    if victim is None:
        proc.kill()
        return Outcome(False, "found no DataLoader worker to kill")
    os.kill(victim, signal.SIGKILL)
    _, err = proc.communicate(timeout=600)
    if proc.returncode not in (0, 3):
        return Outcome(False, f"exit {proc.returncode}: {err.strip()[-300:]}")
    result = same(out, ref)
    return Outcome(result.ok and proc.returncode == 0, f"exit {proc.returncode}; {result.detail}")


def _children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(c) for c in text.split()]


def _loaded(pid: int) -> bool:
    """The worker has imported torch (it is past start-up, likely decoding a video)."""
    try:
        return "libtorch" in Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return False
