"""Test helpers shared by every test folder: tiny lossless videos, the shared real data, tensor
comparison, running the CLI, and one torch thread per test.

A plain module (not a conftest.py): several folders have a conftest.py, and `from conftest
import ...` would pick whichever pytest imported first."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

SHARED = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"


def shared_data(*parts: str) -> Path:
    """A path under ../shared/data; skips the test when the shared folder is absent."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} is absent (the read-only ../shared/data folder is not beside the repo)")
    return path


def write_video(path: Path, frames: np.ndarray, fps: int = 25) -> Path:
    """Write (T, H, W, 3) uint8 RGB frames losslessly (FFV1 in Matroska, RGB kept exactly)."""
    import av

    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("ffv1", rate=fps)
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "bgr0"
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def moving_texture(num_frames: int, height: int = 48, width: int = 64, shift=(2, 1),
                   seed: int = 0) -> np.ndarray:
    """Frames of a smooth random texture translating by `shift` = (dx, dy) pixels per frame."""
    rng = np.random.default_rng(seed)
    big = rng.integers(0, 256, (height + 8 * num_frames, width + 8 * num_frames, 3), np.uint8)
    import cv2

    big = cv2.GaussianBlur(big, (0, 0), 2.0)
    frames = []
    for t in range(num_frames):
        y0, x0 = 4 * num_frames - shift[1] * t, 4 * num_frames - shift[0] * t
        frames.append(big[y0:y0 + height, x0:x0 + width])
    return np.stack(frames)


def assert_close(got, want, atol=0.0, what: str = ""):
    """`got` and `want` (tensors, arrays, lists or numbers) have one shape and differ by at most `atol`
    anywhere, compared in float64; the message names `what` and the largest difference."""
    import numpy as np
    import torch

    def as_array(x):
        return np.asarray(x.detach().cpu() if isinstance(x, torch.Tensor) else x, dtype=np.float64)

    got, want = as_array(got), as_array(want)
    label = f"{what}: " if what else ""
    assert got.shape == want.shape, f"{label}shape {got.shape} != {want.shape}"
    diff = float(np.abs(got - want).max()) if got.size else 0.0
    assert diff <= atol, f"{label}max |diff| {diff:.3g} > {atol}"


def run_cli(*args):
    """Run `datp ARGS...` in-process (arguments str()-ed); (exit code, output)."""
    from click.testing import CliRunner

    from datp.cli import main

    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    return result.exit_code, result.output


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread during each test of a module that imports this fixture (autouse there):
    on 2 shared cores more threads than free cores only adds waiting."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
