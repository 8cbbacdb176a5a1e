"""Cost of `train-head` on a large feature store, and of DATP against the backbone it sits on.

On a synthetic feature store of V videos x N segments x 512x7x7 float16 (default 10,000 x 10, about
5 GB before compression; written in blocks to a temporary folder, with the conv-map compression of
`datp extract-features`'s stores, `--compression` to pick another):

1. Epoch time of `train_head --head datp --datp-input conv` (linear segment classifier) against the
   same model stepping over in-memory tensors (a float16 tensor already in RAM, one `.float()` per
   batch): target <= 1.2x (loading costs at most 20%). Both modes of `train_head` are timed: the
   default (arrays loaded into RAM once, that load reported apart) and streaming from the store
   (`max_ram_gb=0`). Each measurement runs in its own spawned process, so its peak resident memory
   (`resource.getrusage().ru_maxrss`) is its own; the three run in turn for `--rounds` rounds and
   the best epoch of each is compared, so load from other processes on a shared machine hits all
   three alike.
2. DATP's forward time as a fraction of a ResNet-34 forward over the same segments (`--videos-fwd`
   videos x N segments at 224 px, batch of B*N images; median of `--repeats`): target < 2%.

`--threads` sets torch's intra-op threads of every measurement (default 1: on a shared 2-core box,
two threads per op make every small op wait for a busy core, which inflated DATP's forward 20x).

Run: python bench/heads.py [--videos 10000] [--segments 10] [--rounds 2] [--epochs 1]
     [--batch-size 32] [--threads 1] [--dir /tmp] [--keep]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from datp.extract.store import FeatureStore, base_attrs  # noqa: E402
from datp.extract.store.schema import CONV_COMPRESSION, DEFAULT_CONV_COMPRESSION  # noqa: E402

NUM_CLASSES = 101
CF, H, W = 512, 7, 7
BLOCK = 200  # videos generated and written at a time


COMPRESSION = CONV_COMPRESSION  # the feature store's choices: none (its default), lzf, gzip (level 1)


def write_store(path: Path, videos: int, segments: int, seed: int = 0,
                compression: str = DEFAULT_CONV_COMPRESSION) -> float:
    """A fixed-layout feature store in the documented schema, written block by block with h5py.

    `datp.extract.store.build_store` takes every video in memory or as part files; a 5 GB bench store
    is written directly instead (same datasets, dtypes, chunks and compression as its final stores),
    so it is never held in RAM. Conv maps: ReLU of class prototype + noise (half zeros, like real
    post-ReLU maps). Returns the seconds it took.
    """
    import h5py

    started = time.perf_counter()
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, NUM_CLASSES, videos)
    protos = rng.standard_normal((NUM_CLASSES, CF, 1, 1), dtype=np.float32)
    attrs = base_attrs(layout="fixed", class_names=[f"class{i:03d}" for i in range(NUM_CLASSES)],
                       new_length={"rgb": 1}, settings={"bench": "heads", "seed": seed}, num_segments=segments,
                       backbone="synthetic", weights="random", logits_match_labels=False)
    string = h5py.string_dtype("utf-8")
    with h5py.File(path, "w") as f:
        f.attrs.update(attrs)
        f.attrs["index_only"] = False
        f["videos/id"] = np.array([f"v{i:06d}" for i in range(videos)], dtype=object).astype(string)
        f["videos/label"] = labels.astype(np.int64)
        f["videos/split"] = np.array(["train"] * videos, dtype=object).astype(string)
        f["videos/num_frames"] = np.full(videos, 10 * segments, np.int64)
        f["videos/fps"] = np.full(videos, 25.0, np.float32)
        f["done"] = np.ones(videos, bool)
        f["segments/t"] = np.tile((np.arange(segments, dtype=np.float32) + 0.5) / segments, (videos, 1))
        f["segments/frame"] = np.tile(np.arange(segments, dtype=np.int64) * 10, (videos, 1))
        conv = f.create_dataset("rgb/conv", shape=(videos, segments, CF, H, W), dtype=np.float16,
                                chunks=(1, segments, CF, H, W), **COMPRESSION[compression])
        logits = f.create_dataset("rgb/logits", shape=(videos, segments, 1000), dtype=np.float32)
        for start in range(0, videos, BLOCK):
            stop = min(start + BLOCK, videos)
            block = rng.standard_normal((stop - start, segments, CF, H, W), dtype=np.float32)
            block += protos[labels[start:stop]][:, None]
            np.maximum(block, 0.0, out=block)
            conv[start:stop] = block.astype(np.float16)
            logits[start:stop] = rng.standard_normal((stop - start, segments, 1000), dtype=np.float32)
            del block
    return time.perf_counter() - started


def _peak_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def _baseline(store_path: str, out: str, epochs: int, batch_size: int, queue) -> None:
    """The same model and optimiser as train_head, stepping over a float16 tensor already in RAM."""
    import torch.nn.functional as F

    from datp.pool.heads import SegmentBatch, param_groups
    from datp.pool.config import HeadConfig, head_options
    from datp.pool.data import split_rows
    from datp.pool.runs import rebuild_head

    cfg = HeadConfig(features=store_path, out=out, head="datp", score_source="linear", batch_size=batch_size)
    with FeatureStore(store_path) as store:
        train, _, _, _ = split_rows(store, cfg.val_fraction, cfg.seed)
        N = store.num_segments
        conv = torch.empty((len(train), N, CF, H, W), dtype=torch.float16)
        for i in range(0, len(train), 64):
            conv[i:i + 64] = torch.from_numpy(store._file["rgb/conv"][train[i:i + 64]])
        labels = torch.from_numpy(store.labels[train])
        t = torch.from_numpy(store._file["segments/t"][:][train])
    mask = torch.ones(batch_size, N, dtype=torch.bool)
    torch.manual_seed(0)
    head = rebuild_head("datp", head_options(cfg, score_source="linear", num_classes=NUM_CLASSES, num_segments=N,
                                       in_channels=CF))
    optimizer = torch.optim.Adam(param_groups(head, cfg.lr))
    seconds = []
    for epoch in range(epochs):
        order = torch.from_numpy(np.random.default_rng([0, epoch]).permutation(len(train)))
        started = time.perf_counter()
        head.train()
        for i in range(0, len(train), batch_size):
            idx = order[i:i + batch_size]
            x = SegmentBatch(conv=conv[idx].float(), t=t[idx], mask=mask[:len(idx)])
            loss = F.cross_entropy(head(x).logits, labels[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        seconds.append(time.perf_counter() - started)
    queue.put({"epoch_seconds": seconds, "videos": len(train), "peak_rss_gib": _peak_gib()})


def _train_head(store_path: str, out: str, epochs: int, batch_size: int, max_ram_gb: float | None, queue) -> None:
    from datp.pool.config import HeadConfig
    from datp.pool.train import train_head

    ram = {} if max_ram_gb is None else {"max_ram_gb": max_ram_gb}  # None: train_head's default
    cfg = HeadConfig(features=store_path, out=out, head="datp", datp_input="conv", score_source="linear",
                     epochs=epochs, batch_size=batch_size, device="cpu", **ram)
    result = train_head(cfg, progress=False)
    timing = result["timing"]
    queue.put({"epoch_seconds": [e["train_seconds"] for e in timing["epochs"]],
               "val_seconds": [e["val_seconds"] for e in timing["epochs"]], "load_seconds": timing["load_seconds"],
               "data": timing["data"], "videos": result["split"]["train"], "peak_rss_gib": _peak_gib()})


def _drop_page_cache() -> None:
    """Write back and drop the kernel's page cache, so the next read of the store comes from disk."""
    import os

    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError as err:
        raise SystemExit(f"--cold needs root on Linux to drop the page cache ({err})") from None


def _available_gib() -> float:
    """MemAvailable of /proc/meminfo (Linux), in GiB."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 2**20
    return float("nan")


def _forward_ratio(videos: int, segments: int, repeats: int, queue) -> None:
    import torchvision

    from datp.pool.heads import SegmentBatch
    from datp.pool.config import HeadConfig, head_options
    from datp.pool.runs import rebuild_head

    torch.manual_seed(0)
    resnet = torchvision.models.resnet34(weights=None).eval()
    trunk = torch.nn.Sequential(*list(resnet.children())[:-2])  # conv maps (B*N, 512, 7, 7)
    cfg = HeadConfig(features="-", out="-", head="datp", score_source="linear")
    head = rebuild_head("datp", head_options(cfg, score_source="linear", num_classes=NUM_CLASSES, num_segments=segments,
                                       in_channels=CF)).eval()
    images = torch.randn(videos * segments, 3, 224, 224)

    def timed(fn) -> float:
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            fn()
            times.append(time.perf_counter() - started)
        return statistics.median(times)

    with torch.no_grad():
        maps = trunk(images)
        x = SegmentBatch(conv=maps.view(videos, segments, CF, H, W))
        head(x)  # warm-up
        t_resnet = timed(lambda: resnet(images))
        t_datp = timed(lambda: head(x))
    queue.put({"resnet34_seconds": t_resnet, "datp_seconds": t_datp, "images": videos * segments})


def _read_speed(store_path: str, videos: int, queue) -> None:
    """Videos/s of reading conv rows as the streamed reader does (`FeatureStore.load`, 32 at a time)."""
    with FeatureStore(store_path) as store:
        rows = store.indices()[:videos]
        started = time.perf_counter()
        for i in range(0, len(rows), 32):
            store.load(rows[i:i + 32], streams=["rgb"], conv=True)
        queue.put({"videos_per_s": len(rows) / (time.perf_counter() - started)})


STUDY = (("avg", {}), ("max", {}), ("datp", {"gaussians": 1}), ("datp", {"gaussians": 2}),
         ("datp", {"generator": "discrete"}), ("lstm-attn", {"hidden": 128}), ("self-attn", {}))


def _study(store_path: str, out: str, epochs: int, batch_size: int, together: bool, queue) -> None:
    """The demo's seven heads on one stream: one study (`train_heads`) or seven `train_head` runs."""
    from datp.pool.config import HeadConfig
    from datp.pool.train import train_head, train_heads

    from datp.pool.heads import HEADS

    cfgs = [HeadConfig(features=store_path, out=f"{out}/{i}", head=h, epochs=epochs, batch_size=batch_size,
                       device="cpu", **({"score_source": "linear"} if HEADS[h].uses_scores else {}), **o)
            for i, (h, o) in enumerate(STUDY)]
    started = time.perf_counter()
    if together:
        train_heads(cfgs, progress=False)
    else:
        for cfg in cfgs:
            train_head(cfg, progress=False)
    queue.put({"seconds": time.perf_counter() - started, "peak_rss_gib": _peak_gib()})


def _with_threads(threads: int, target, *args) -> None:
    torch.set_num_threads(threads)
    try:
        target(*args)
    except BaseException as err:  # the parent waits on the queue: hand it the error instead of hanging
        args[-1].put({"error": f"{type(err).__name__}: {err}"})
        raise


def _child(threads: int, target, *args):
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_with_threads, args=(threads, target, *args, queue))
    proc.start()
    result = queue.get()
    proc.join()
    if "error" in result:
        raise SystemExit(f"{target.__name__} failed: {result['error']}")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--videos", type=int, default=10000)
    parser.add_argument("--segments", type=int, default=10)
    parser.add_argument("--epochs", type=int, default=1, help="epochs per measurement")
    parser.add_argument("--rounds", type=int, default=2, help="rounds of the three epoch measurements")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--videos-fwd", type=int, default=4, help="videos per forward in part 2")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dir", default=None, help="folder for the temporary store (default: the system's)")
    parser.add_argument("--keep", action="store_true", help="keep the store and runs")
    parser.add_argument("--compression", choices=sorted(COMPRESSION), default=DEFAULT_CONV_COMPRESSION,
                        help="compression of the bench store's conv maps (default: what extract-features writes)")
    parser.add_argument("--large-videos", type=int, default=0,
                        help="also stream one epoch from a store of this many videos (e.g. 44000: ~24 GB, more "
                             "than the RAM of a 24 GB box), against the bare rate of part 1 (0: skip)")
    parser.add_argument("--cold", action="store_true",
                        help="drop the page cache before each streamed run (needs root; Linux)")
    parser.add_argument("--compare-videos", type=int, default=300,
                        help="videos per store in the compression comparison (0: skip it)")
    parser.add_argument("--study-videos", type=int, default=400,
                        help="videos of the study comparison, seven heads (0: skip it)")
    args = parser.parse_args()

    folder = Path(tempfile.mkdtemp(prefix="datp_bench_heads_", dir=args.dir))
    store = folder / "features.h5"
    raw_gb = args.videos * args.segments * CF * H * W * 2 / 1e9
    print(f"scale: {args.videos} videos x {args.segments} segments x {CF}x{H}x{W} float16 = {raw_gb:.2f} GB of conv "
          f"maps; torch threads {args.threads}, {mp.cpu_count()} CPUs, {args.rounds} rounds of {args.epochs} "
          "epoch(s)", flush=True)
    modes = {"base": (_baseline, ()), "ram": (_train_head, (None,)), "stream": (_train_head, (0.0,))}
    runs = {name: [] for name in modes}
    try:
        compare = {}
        for name in (sorted(COMPRESSION) if args.compare_videos else []):
            path = folder / f"compare_{name}.h5"
            write_store(path, args.compare_videos, args.segments, compression=name)
            reads = [_child(args.threads, _read_speed, str(path), args.compare_videos)["videos_per_s"]
                     for _ in range(args.rounds)]
            compare[name] = {"bytes": path.stat().st_size, "videos_per_s": max(reads)}
            path.unlink()
        study = {}
        if args.study_videos:
            path = folder / "study.h5"
            write_store(path, args.study_videos, args.segments, compression=args.compression)
            for round_ in range(args.rounds):
                for together in (True, False):
                    key = "one study" if together else "seven runs"
                    r = _child(args.threads, _study, str(path), str(folder / f"study{round_}{together}"), args.epochs,
                               args.batch_size, together)
                    study.setdefault(key, []).append(r)
            path.unlink()
        seconds = write_store(store, args.videos, args.segments, compression=args.compression)
        print(f"store written in {seconds:.0f} s: {store.stat().st_size / 1e9:.2f} GB on disk ({args.compression})",
              flush=True)
        for round_ in range(args.rounds):
            for name, (target, extra) in modes.items():
                if args.cold and name == "stream":
                    _drop_page_cache()
                runs[name].append(_child(args.threads, target, str(store), str(folder / f"{name}{round_}"),
                                         args.epochs, args.batch_size, *extra))
                print(f"round {round_ + 1} {name}: epochs {[round(e, 1) for e in runs[name][-1]['epoch_seconds']]} s",
                      flush=True)
        large = None
        if args.large_videos:
            store.unlink()  # its disk space, and no part of it left in the page cache
            path = folder / "large.h5"
            seconds = write_store(path, args.large_videos, args.segments, compression=args.compression)
            large = {"videos": args.large_videos, "bytes": path.stat().st_size, "write_seconds": seconds}
            _drop_page_cache() if args.cold else None
            large["available_gib"] = _available_gib()
            print(f"large store written in {seconds:.0f} s: {large['bytes'] / 2**30:.1f} GiB on disk, "
                  f"{large['available_gib']:.1f} GiB of RAM available", flush=True)
            large["run"] = _child(args.threads, _train_head, str(path), str(folder / "large"), 1, args.batch_size, 0.0)
            path.unlink()
        fwd = _child(args.threads, _forward_ratio, args.videos_fwd, args.segments, args.repeats)
    finally:
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)

    def best(name, key="epoch_seconds"):
        return min(v for r in runs[name] for v in r[key])

    b, videos = best("base"), runs["base"][0]["videos"]
    print(f"\n1. one epoch over {videos} training videos, batch {args.batch_size} (best of "
          f"{args.rounds * args.epochs}):")
    print(f"   model stepping over in-memory tensors: {b:.1f} s ({videos / b:.0f} videos/s), peak RSS "
          f"{max(r['peak_rss_gib'] for r in runs['base']):.2f} GiB")
    for name, label in (("ram", "train_head, arrays in RAM"), ("stream", "train_head, streamed from the store")):
        e = best(name)
        print(f"   {label} ({runs[name][0]['data']}): {e:.1f} s = {e / b:.2f}x (target <= 1.2x); validation "
              f"{best(name, 'val_seconds'):.1f} s; one-off load {min(r['load_seconds'] for r in runs[name]):.1f} s; "
              f"peak RSS {max(r['peak_rss_gib'] for r in runs[name]):.2f} GiB")
    if large:
        per_video = b / videos  # the bare seconds per training video of part 1
        run = large["run"]
        e = run["epoch_seconds"][0]
        print(f"\n5. streamed from a large store: {large['videos']} videos, {large['bytes'] / 2**30:.1f} GiB on disk, "
              f"{large['available_gib']:.1f} GiB of RAM available: one epoch over {run['videos']} training videos "
              f"{e:.0f} s ({run['videos'] / e:.0f} videos/s) = {e / (per_video * run['videos']):.2f}x the bare rate of "
              f"part 1; validation {run['val_seconds'][0]:.0f} s; peak RSS {run['peak_rss_gib']:.2f} GiB")
    if compare:
        base = compare["gzip"]
        print(f"\n3. conv-map compression ({args.compare_videos} videos, read 32 at a time; best of {args.rounds}):")
        for name, c in compare.items():
            print(f"   {name:>5}: {c['bytes'] / 1e6:7.0f} MB ({c['bytes'] / base['bytes']:.2f}x gzip's size), "
                  f"{c['videos_per_s']:6.0f} videos/s ({c['videos_per_s'] / base['videos_per_s']:.2f}x gzip's speed)")
    if study:
        one, seven = (min(r["seconds"] for r in study[k]) for k in ("one study", "seven runs"))
        print(f"\n4. seven heads ({', '.join(h for h, _ in STUDY)}) x {args.epochs} epoch(s) on {args.study_videos} "
              f"videos: one study {one:.1f} s, seven runs {seven:.1f} s = {seven / one:.2f}x")
    frac = fwd["datp_seconds"] / fwd["resnet34_seconds"]
    print(f"\n2. forward over {fwd['images']} segments (224 px): ResNet-34 {fwd['resnet34_seconds'] * 1e3:.0f} ms, "
          f"DATP head {fwd['datp_seconds'] * 1e3:.2f} ms = {100 * frac:.2f}% (target < 2%)")
    print(json.dumps({**runs, "forward": fwd, "compression": compare, "study": study, "large": large}))


if __name__ == "__main__":
    main()
