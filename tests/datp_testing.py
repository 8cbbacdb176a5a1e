"""Test helpers shared by every test folder: tiny lossless videos, the shared real data, tensor
comparison, running the CLI, and one torch thread per test.

A plain module (not a conftest.py): several folders have a conftest.py, and `from conftest
import ...` would pick whichever pytest imported first."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from datp.io.clips import moving_texture, write_video  # noqa: F401 (re-exported for the tests)

SHARED = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"


def shared_data(*parts: str) -> Path:
    """A path under ../shared/data; skips the test when the shared folder is absent."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} is absent (the read-only ../shared/data folder is not beside the repo)")
    return path


def eval_resnet18(seed: int):
    """A torchvision resnet18 with random weights and non-trivial BatchNorm statistics (so eval mode
    must use them), in eval mode: the network the features-equal-torchvision tests compare against."""
    import torch
    import torchvision

    torch.manual_seed(seed)
    net = torchvision.models.resnet18(weights=None)
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 2.0)
    return net.eval()


def assert_close(got, want, atol=0.0, what: str = ""):
    """`got` and `want` (tensors, arrays, lists or numbers) have one shape and differ by at most `atol`
    anywhere, compared in float64; the message names `what` and the largest difference."""
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
