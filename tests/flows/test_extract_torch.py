"""extract-flow --backend torch: the store says which implementation and device made the flow,
the flow matches OpenCV's, and a rerun with the other implementation is refused."""

import numpy as np
from datp_testing import moving_texture, one_thread, run_cli, write_video  # noqa: F401 (autouse)

from datp.flows.store import FlowStore


def test_torch_backend_is_recorded_and_agrees_with_opencv(tmp_path):
    video = write_video(tmp_path / "shift.mkv", moving_texture(4, 48, 64, shift=(3, -2)))
    flows = {}
    for backend in ("opencv", "torch"):
        out = tmp_path / f"{backend}.h5"
        code, output = run_cli("extract-flow", video, "--out", out, "--short-side", 0, "--backend",
                               backend, "--device", "cpu", "--quiet")
        assert code == 0, output
        with FlowStore(out) as store:
            meta, settings = store.meta("shift"), store.settings
            flows[backend] = store.flow("shift").astype(int)
        assert meta["backend"] == backend and meta["device"] == "cpu", meta
        assert settings["backend"] == backend and settings["device"] == "cpu", settings
    steps = np.abs(flows["torch"] - flows["opencv"]).max(axis=-1)  # (T-1, H, W) uint8 steps
    assert (steps <= 1).mean() >= 0.99, f"within one step on {(steps <= 1).mean():.4f} of pixels"


def test_rerun_with_the_other_backend_is_refused(tmp_path):
    video = write_video(tmp_path / "a.mkv", moving_texture(3, 32, 40))
    out = tmp_path / "f.h5"
    assert run_cli("extract-flow", video, "--out", out, "--backend", "torch", "--quiet")[0] == 0
    code, output = run_cli("extract-flow", video, "--out", out, "--backend", "opencv", "--quiet")
    assert code == 2 and "other settings (backend differ)" in output, output


def test_torch_backend_takes_tvl1_only(tmp_path):
    video = write_video(tmp_path / "a.mkv", moving_texture(3, 32, 40))
    code, output = run_cli("extract-flow", video, "--out", tmp_path / "f.h5", "--algorithm", "dis",
                           "--backend", "torch", "--quiet")
    assert code == 2 and "backend 'torch' computes tvl1 only" in output, output
