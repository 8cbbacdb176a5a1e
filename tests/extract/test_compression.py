"""extract-features --compression: the conv maps are stored with the chosen filter (none by default),
the features are the same bits whatever the choice, and the choice is recorded."""

import h5py
import numpy as np
from datp_testing import moving_texture, one_thread, run_cli, write_video  # noqa: F401 (one_thread: autouse)

from datp.extract.store import FeatureStore

ARGS = ["--backbone", "resnet18", "--device", "cpu", "--quiet", "--streams", "rgb", "--segments", 2,
        "--resize", 64, "--input-size", 56, "--workers", 0]


def test_compression_is_chosen_recorded_and_changes_no_feature(tmp_path):
    video = write_video(tmp_path / "c" / "v0.mkv", moving_texture(8, 48, 64, seed=1))
    got = {}
    for name in ("default", "lzf", "gzip"):
        out = tmp_path / f"{name}.h5"
        extra = [] if name == "default" else ["--compression", name]
        code, output = run_cli("extract-features", video, "--out", out, *ARGS, *extra)
        assert code == 0, output
        with h5py.File(out, "r") as f:
            assert f["rgb/conv"].compression == (None if name == "default" else name)
            assert f.attrs["conv_compression"] == ("none" if name == "default" else name)
        with FeatureStore(out) as store:
            got[name] = store.load([0], streams=["rgb"], conv=True).conv["rgb"].numpy()
    np.testing.assert_array_equal(got["lzf"], got["default"])
    np.testing.assert_array_equal(got["gzip"], got["default"])
    code, output = run_cli("extract-features", video, "--out", tmp_path / "x.h5", *ARGS, "--compression", "zstd")
    assert code == 2 and "zstd" in output, output
