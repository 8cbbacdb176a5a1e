"""Run a per-video job over many videos in worker processes; the parent alone writes.

Workers call `job(record, emit)`, which sends pieces of the result with `emit(payload)` as they are
made (so an hour-long video never sits whole in memory) and returns the video's metadata. The
parent receives the pieces in `sink.chunk`, then `sink.done` or `sink.fail`, and writes.

One video's failure (a decoder error, an exception, even a worker process that dies in native code)
is recorded with its reason and the run goes on; a replacement worker is started.

`concurrent.futures.ProcessPoolExecutor` would do for whole results, but it cannot stream partial
results, and a worker dying in native code breaks the whole pool (BrokenProcessPool); hence this
small hand-written pool over `multiprocessing` queues.
"""

from __future__ import annotations

import csv
import io
import multiprocessing as mp
import queue
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Protocol

from datp.io.atomic import atomic_path, die_with_parent, write_bytes
from datp.io.datasets import Record

EXIT_OK = 0
EXIT_SOME_FAILED = 3  # documented in the CLI help: some videos failed, see the failures file
EXIT_INTERRUPTED = 130


class Sink(Protocol):
    def chunk(self, record: Record, payload: Any) -> None: ...
    def done(self, record: Record, meta: dict) -> None: ...
    def fail(self, record: Record, reason: str) -> None: ...


@dataclass
class Summary:
    done: int = 0
    skipped: int = 0
    failed: list[tuple[str, str, str]] = field(default_factory=list)  # (id, path, reason)
    units: int = 0  # frame pairs, images... counted by the job
    seconds: float = 0.0
    interrupted: bool = False

    @property
    def exit_code(self) -> int:
        if self.interrupted:
            return EXIT_INTERRUPTED
        return EXIT_SOME_FAILED if self.failed else EXIT_OK


class FailureLog:
    """`<out>.failures.csv`: one row (id, path, reason) per failed video, flushed as it happens.

    Like the store it sits beside, it holds every run's: the rows an earlier run left for videos
    this run does not process (another list, another shard) are kept; the rows of this run's videos
    are this run's to write (a video that failed before and is done now loses its row). A file with
    another header is not datp's and is refused, never overwritten.
    """

    HEADER = ["id", "path", "reason"]

    def __init__(self, path: Path, this_run: Iterable[str] = ()):
        self.path = Path(path)
        self._file = None
        self._earlier: list[list[str]] = []
        if self.path.is_file():
            try:
                with self.path.open(newline="", encoding="utf-8") as f:
                    rows = list(csv.reader(f))
            except (OSError, UnicodeDecodeError, csv.Error) as err:
                raise ValueError(f"{self.path} cannot be read as a datp failures file ({err}); move it away") from None
            if not rows or rows[0] != self.HEADER:
                raise ValueError(f"{self.path} is not a failures file datp wrote (its header is not "
                                 f"{','.join(self.HEADER)}); move it away or choose another --out")
            ids = set(this_run)
            self._earlier = [r for r in rows[1:] if r and r[0] not in ids]

    def _start(self) -> None:
        """The earlier runs' rows written whole (atomically), then this run's appended as they come."""
        text = io.StringIO()
        csv.writer(text).writerows([self.HEADER, *self._earlier])
        with atomic_path(self.path) as tmp:
            write_bytes(tmp, text.getvalue().encode("utf-8"))
        self._file = self.path.open("a", newline="", encoding="utf-8")
        self._writer = csv.writer(self._file)

    def add(self, record: Record, reason: str) -> None:
        if self._file is None:
            self._start()
        self._writer.writerow([record.id, str(record.path), reason])
        self._file.flush()

    def close(self) -> None:
        if self._file is None and self._earlier:
            self._start()  # this run failed nothing; the earlier runs' failures stay
        if self._file is not None:
            self._file.close()
            self._file = None
        elif self.path.exists():
            self.path.unlink()  # a clean rerun leaves no stale failures behind


def _worker_main(wid: int, job, init, tasks, results) -> None:
    die_with_parent()  # no worker outlives its job, even after a kill -9 of the parent
    if init is not None:
        init()
    while True:
        item = tasks.get()
        if item is None:
            return
        index, record = item
        results.put(("start", index, wid))
        try:
            meta = job(record, lambda payload: results.put(("chunk", index, payload)))
            results.put(("done", index, meta))
        except Exception as err:  # any per-video failure is data, not a crash of the run
            reason = f"{type(err).__name__}: {err}".replace("\n", " ")
            if not isinstance(err, (OSError, ValueError, RuntimeError)):
                reason += " | " + traceback.format_exc(limit=3).replace("\n", " | ")
            results.put(("fail", index, reason))


def run_jobs(records: list[Record], job: Callable, sink: Sink, *, workers: int = 1,
             init: Callable | None = None, progress: Callable | None = None,
             units_of: Callable[[dict], int] | None = None, failure_log: FailureLog | None = None
             ) -> Summary:
    """Run `job` over `records` in `workers` processes.

    Args:
        records: the videos to do (already filtered to what is not yet done).
        job: picklable `job(record, emit) -> meta dict`, run in a worker.
        sink: receives chunks, completions and failures in the parent.
        workers: processes (>= 1); each calls `init()` first (e.g. one OpenCV thread).
        progress: called as `progress(n_videos_finished, units)` after each video.
        units_of: counts the work units (frame pairs, images) of a finished video's meta.
        failure_log: where failures are recorded as they happen.

    Returns:
        Summary of the run; `interrupted` is set on Ctrl-C (finished videos are kept).
    """
    summary = Summary()
    start = time.perf_counter()
    if not records:
        return summary
    ctx = mp.get_context("spawn")  # fork after torch/OpenCV threads start can deadlock
    tasks = ctx.Queue()
    results = ctx.Queue(maxsize=8 * workers)  # bounded: workers wait if the writer falls behind
    for item in enumerate(records):
        tasks.put(item)
    procs: dict[int, Any] = {}
    current: dict[int, int] = {}  # worker id -> record index it is working on
    next_wid = 0

    def spawn() -> None:
        nonlocal next_wid
        proc = ctx.Process(target=_worker_main, args=(next_wid, job, init, tasks, results),
                           daemon=True)
        proc.start()
        procs[next_wid] = proc
        next_wid += 1

    def finish(index: int, reason: str | None, meta: dict | None = None) -> None:
        record = records[index]
        if reason is None:
            sink.done(record, meta or {})
            summary.done += 1
            summary.units += units_of(meta or {}) if units_of else 0
        else:
            sink.fail(record, reason)
            summary.failed.append((record.id, str(record.path), reason))
            if failure_log is not None:
                failure_log.add(record, reason)
        if progress is not None:
            progress(summary.done + len(summary.failed), summary.units)

    remaining = len(records)
    idle_deaths = 0
    for _ in range(min(workers, remaining)):
        spawn()
    try:
        while remaining:
            try:
                kind, index, payload = results.get(timeout=1.0)
            except queue.Empty:
                for wid, proc in list(procs.items()):
                    if not proc.is_alive():
                        del procs[wid]
                        if wid in current:  # died in native code (decoder crash, OOM kill)
                            finish(current.pop(wid),
                                   f"worker process died (exit code {proc.exitcode}) "
                                   "while decoding or computing this video")
                            remaining -= 1
                        else:
                            idle_deaths += 1
                            if idle_deaths > workers + 2:
                                raise RuntimeError("worker processes keep dying before taking a "
                                                   f"video (last exit code {proc.exitcode})")
                        if remaining:
                            spawn()
                continue
            if kind == "start":
                current[payload] = index
            elif kind == "chunk":
                sink.chunk(records[index], payload)
            else:
                for wid, idx in list(current.items()):
                    if idx == index:
                        del current[wid]
                finish(index, None if kind == "done" else payload, payload if kind == "done" else None)
                remaining -= 1
    except KeyboardInterrupt:
        summary.interrupted = True
    finally:
        for _ in procs:
            tasks.put(None)
        for proc in procs.values():
            if summary.interrupted:
                proc.terminate()
            proc.join(timeout=5)
            if proc.is_alive():
                proc.kill()
        tasks.cancel_join_thread()
        results.cancel_join_thread()
        summary.seconds = time.perf_counter() - start
    return summary
