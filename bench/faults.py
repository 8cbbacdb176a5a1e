"""Fault injection table for extract-flow, extract-features, train-head and finetune: case -> outcome.

Runs the cases of bench/fault_cases.py (kill -9 of the parent at seeded moments, two writers,
a full disk, damaged parts, reruns with other lists, a foreign --out, a dead DataLoader worker)
and, where this machine allows a user namespace, a real ENOSPC on a small tmpfs.

    PYTHONPATH=. python bench/faults.py [--kills 5] [--seed 0] [--videos 5]
        [--only flow|features|train-head|finetune]
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]

import fault_cases as fi  # noqa: E402 (beside this file)
import run_fault_cases as rf  # noqa: E402


def tmpfs_enospc(kind: str, lists: dict, folder: Path, size: str = "400k") -> fi.Outcome:
    """A real full disk: the run writes into a small tmpfs (a private mount namespace)."""
    if shutil.which("unshare") is None:
        return fi.Outcome(True, "skipped: no unshare")
    ref = fi.reference(kind, lists, folder)
    mount = folder / f"tmpfs-{kind}"
    mount.mkdir(exist_ok=True)
    out = mount / "out.h5"
    args = [sys.executable, "-m", "datp", fi.COMMAND[kind], str(lists["all"]), "--out", str(out),
            *fi.COMMON[kind]]
    script = (f"mount -t tmpfs -o size={size} none {mount} || exit 99; {' '.join(args)}; "
              f"code=$?; cp -a {mount}/. {folder}/enospc-{kind}/; exit $code")
    (folder / f"enospc-{kind}").mkdir(exist_ok=True)
    proc = subprocess.run(["unshare", "-rm", "sh", "-c", script], env=fi._env(), cwd=folder,
                          capture_output=True, text=True)
    if proc.returncode == 99:
        return fi.Outcome(True, "skipped: cannot mount a tmpfs here")
    if proc.returncode != 2 or not fi._one_line(proc.stderr):
        return fi.Outcome(False, f"exit {proc.returncode}: {proc.stderr.strip()[-300:]}")
    copy = folder / f"enospc-{kind}" / "out.h5"  # the same state, now on a roomy disk
    code, err = fi.run(kind, lists["all"], copy)
    if code != 0:
        return fi.Outcome(False, f"rerun exit {code}: {err.strip()[-300:]}")
    result = fi.same(copy, ref)
    return fi.Outcome(result.ok, f"exit 2 with {proc.stderr.strip()[12:80]!r}...; rerun "
                      f"{result.detail}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--videos", type=int, default=5)
    parser.add_argument("--only", choices=["flow", "features", "train-head", "finetune"], default=None)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="datp-faults-") as tmp:
        folder = Path(tmp)
        lists = fi.make_dataset(folder, count=args.videos)
        inputs = rf.make_inputs(folder) if args.only in (None, "train-head", "finetune") else {}
        for kind in [args.only] if args.only else ["flow", "features", "train-head", "finetune"]:
            if kind in rf.ARGS:  # the run-folder commands
                cases = [(f"kill -9 at {args.kills} seeded moments (seed {args.seed})",
                          lambda: rf.kill9(kind, inputs, folder, kills=args.kills, seed=args.seed)),
                         ("two runs on one --out", lambda: rf.concurrent(kind, inputs, folder))]
            else:
                cases = []
            cases = cases or [
                (f"kill -9 at {args.kills} seeded moments (seed {args.seed})",
                 lambda: fi.kill9(kind, lists, folder, kills=args.kills, seed=args.seed)),
                ("SIGTERM mid-run", lambda: fi.sigterm(kind, lists, folder)),
                ("two runs on one --out", lambda: fi.concurrent(kind, lists, folder)),
                ("final store write fails (EFBIG in HDF5)",
                 lambda: fi.disk_full(kind, lists, folder, where="store")),
                ("first part write fails (EFBIG in HDF5)",
                 lambda: fi.disk_full(kind, lists, folder, where="part")),
                ("ENOSPC on a 400 kB tmpfs", lambda: tmpfs_enospc(kind, lists, folder)),
                ("truncated part + zeroed block in a part",
                 lambda: fi.damaged_parts(kind, lists, folder)),
                ("reruns with other lists (a, b, subset)", lambda: fi.union(kind, lists, folder)),
                ("--out is another store / a text file", lambda: fi.foreign_out(kind, lists, folder)),
            ]
            if kind == "features":
                cases.append(("kill -9 of the DataLoader worker",
                              lambda: fi.dead_worker(lists, folder)))
            for name, case in cases:
                t0 = time.perf_counter()
                try:
                    outcome = case()
                except Exception as err:  # a broken case is a row of the table, not the end
                    outcome = fi.Outcome(False, f"case crashed: {type(err).__name__}: {err}")
                rows.append((kind, name, outcome, time.perf_counter() - t0))
                print(f"{kind:9s} {name:45s} {'ok  ' if outcome.ok else 'FAIL'} "
                      f"{outcome.detail} ({rows[-1][3]:.0f}s)", flush=True)
    print("\n| command | case | outcome |\n|---|---|---|")
    for kind, name, outcome, _ in rows:
        print(f"| {fi.COMMAND.get(kind, kind)} | {name} | {'ok' if outcome.ok else 'FAIL'}: {outcome.detail} |")
    return 0 if all(o.ok for _, _, o, _ in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
