"""Middlebury `.flo` files, end-point error, and preset evaluation on ground-truth pairs.

The `.flo` format (Baker et al., IJCV 2011): float32 magic 202021.25, int32 width, int32 height,
then H*W*2 float32 values (u, v interleaved per pixel, row-major), all little-endian. Values above
1e9 in the ground truth mark pixels whose flow is unknown. Read with `np.fromfile`-style parsing
(no pickle); OpenCV's `cv2.readOpticalFlow` does the same but raises opaque errors on bad files.
"""

from __future__ import annotations

import time
from pathlib import Path

import cv2
import numpy as np

from datp.flows.compute import FlowComputer

FLO_MAGIC = 202021.25
UNKNOWN_FLOW_THRESHOLD = 1e9


def read_flo(path: str | Path) -> np.ndarray:
    """Reads a Middlebury `.flo` file.

    Args:
        path: the `.flo` file.

    Returns:
        float32 flow of shape (H, W, 2), channel 0 = horizontal (x), channel 1 = vertical (y).

    Raises:
        ValueError: the magic number or the size does not match the format.
    """
    path = Path(path)
    data = path.read_bytes()
    if len(data) < 12:
        raise ValueError(f"{path} is {len(data)} bytes, too short for a .flo header (12 bytes)")
    magic = np.frombuffer(data, dtype="<f4", count=1)[0]
    if magic != np.float32(FLO_MAGIC):
        raise ValueError(f"{path} has magic {magic!r}, expected {FLO_MAGIC} (not a Middlebury .flo file)")
    width, height = (int(v) for v in np.frombuffer(data, dtype="<i4", count=2, offset=4))
    expected = 12 + width * height * 2 * 4
    if width <= 0 or height <= 0 or len(data) != expected:
        raise ValueError(
            f"{path} declares {width}x{height} (expects {expected} bytes) but has {len(data)} bytes; "
            "the file is truncated or corrupt"
        )
    flow = np.frombuffer(data, dtype="<f4", offset=12).reshape(height, width, 2)
    return flow.astype(np.float32)  # a writable native-endian copy


def write_flo(path: str | Path, flow: np.ndarray) -> None:
    """Writes flow as a Middlebury `.flo` file (inverse of `read_flo`).

    Args:
        path: the output file.
        flow: array of shape (H, W, 2); stored as little-endian float32.
    """
    flow = np.asarray(flow)
    if flow.ndim != 3 or flow.shape[2] != 2:
        raise ValueError(f"flow must have shape (H, W, 2), got {flow.shape}")
    height, width = flow.shape[:2]
    header = np.array([FLO_MAGIC], dtype="<f4").tobytes() + np.array([width, height], dtype="<i4").tobytes()
    Path(path).write_bytes(header + flow.astype("<f4").tobytes())


def endpoint_error(flow: np.ndarray, gt: np.ndarray) -> float:
    """Mean end-point error ||flow - gt||_2 over the pixels whose ground truth is known.

    Args:
        flow: estimated flow, (H, W, 2).
        gt: ground truth, (H, W, 2); a pixel is unknown when |u| or |v| >= 1e9.

    Returns:
        the mean EPE in pixels (NaN when no pixel is known).
    """
    if flow.shape != gt.shape:
        raise ValueError(f"flow shape {flow.shape} differs from ground truth shape {gt.shape}")
    known = np.all(np.abs(gt) < UNKNOWN_FLOW_THRESHOLD, axis=2)  # (H, W)
    if not known.any():
        return float("nan")
    diff = flow[known].astype(np.float64) - gt[known]  # (K, 2)
    return float(np.sqrt((diff**2).sum(axis=1)).mean())


def find_pairs(root: str | Path) -> list[tuple[str, Path, Path, Path]]:
    """Finds ground-truth pairs under `root` (the `flow-gt` folder).

    Recognises Middlebury folders `middlebury-<name>/{frame10.png, frame11.png, flow10.flo}` and
    FlyingChairs folders holding `<id>-img0.ppm`, `<id>-img1.ppm`, `<id>-gt.flo`.

    Returns:
        sorted (name, first frame, second frame, ground truth) tuples.
    """
    pairs = []
    for folder in sorted(Path(root).iterdir()):
        if (folder / "flow10.flo").is_file():
            name = folder.name.removeprefix("middlebury-")
            pairs.append((name, folder / "frame10.png", folder / "frame11.png", folder / "flow10.flo"))
        for gt in sorted(folder.glob("*-gt.flo")):
            stem = gt.name.removesuffix("-gt.flo")
            name = f"{folder.name}-{stem}"
            pairs.append((name, folder / f"{stem}-img0.ppm", folder / f"{stem}-img1.ppm", gt))
    if not pairs:
        raise ValueError(
            f"no ground-truth pairs found under {root}; expected middlebury-*/flow10.flo folders"
        )
    return pairs


def read_gray(path: Path) -> np.ndarray:
    """Reads an image as grayscale uint8 (H, W), the input of `FlowComputer`."""
    image = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    if image is None:
        raise ValueError(f"cannot read image {path}")
    return image


def evaluate_presets(
    pairs_dir: str | Path,
    algorithms_presets: list[tuple[str, str]],
    *,
    names: list[str] | None = None,
    repeats: int = 1,
) -> list[dict]:
    """Runs each (algorithm, preset) on every ground-truth pair and measures EPE and time.

    Presets are run side by side pair by pair (all presets on pair 1, then on pair 2, ...) so that
    load changes on a shared machine affect them alike. Both wall-clock and CPU time (of this
    process: equal to the work done when OpenCV runs one thread, and far less sensitive to other
    processes on a shared machine) are the best of `repeats` runs.

    Args:
        pairs_dir: folder holding the pairs (see `find_pairs`).
        algorithms_presets: (algorithm, preset name) tuples, e.g. [("tvl1", "opencv")].
        names: evaluate only the pairs with these names (default: all).
        repeats: timing repeats per pair; the minimum is reported.

    Returns:
        one row per (algorithm, preset): {"algorithm", "preset", "epe": {pair: epe},
        "seconds": {pair: wall s}, "cpu_seconds": {pair: CPU s}, "mean_epe", "mean_seconds",
        "mean_cpu_seconds"}.
    """
    pairs = [p for p in find_pairs(pairs_dir) if names is None or p[0] in names]
    if not pairs:
        raise ValueError(f"none of the pairs {names} found under {pairs_dir}")
    computers = [FlowComputer(algorithm=a, preset=p) for a, p in algorithms_presets]
    rows = [
        {"algorithm": c.algorithm, "preset": c.preset, "epe": {}, "seconds": {}, "cpu_seconds": {}}
        for c in computers
    ]
    for name, first, second, gt_path in pairs:
        prev, nxt, gt = read_gray(first), read_gray(second), read_flo(gt_path)
        for computer, row in zip(computers, rows):
            wall, cpu = float("inf"), float("inf")
            for _ in range(repeats):
                start_wall, start_cpu = time.perf_counter(), time.process_time()
                flow = computer(prev, nxt)
                wall = min(wall, time.perf_counter() - start_wall)
                cpu = min(cpu, time.process_time() - start_cpu)
            row["epe"][name] = endpoint_error(flow, gt)
            row["seconds"][name] = wall
            row["cpu_seconds"][name] = cpu
    for row in rows:
        for key in ("epe", "seconds", "cpu_seconds"):
            row[f"mean_{key}"] = float(np.mean(list(row[key].values())))
    return rows
