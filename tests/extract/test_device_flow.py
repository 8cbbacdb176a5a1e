"""extract-features --flow-backend torch: on-the-fly TV-L1 computed in the main process on the
backbone's device (never written) gives the features of a store made by extract-flow --backend torch;
the store records the backend, and a rerun with the other one is refused."""

import numpy as np
from datp_testing import moving_texture, one_thread, run_cli, write_video  # noqa: F401 (one_thread: autouse)

from datp.extract.store import FeatureStore

ARGS = ["--backbone", "resnet18", "--device", "cpu", "--quiet", "--streams", "flow", "--segments", 3,
        "--new-length", 2, "--resize", 64, "--input-size", 56, "--workers", 0]


def _arrays(path):
    with FeatureStore(path) as store:
        batch = store.load(store.indices(), streams=["flow"], conv=True)
        return batch.conv["flow"].numpy(), batch.logits["flow"].numpy(), store.attrs


def test_on_device_flow_equals_features_of_a_torch_flow_store(tmp_path):
    videos = tmp_path / "videos"
    for i, shift in enumerate([(2, -1), (-3, 1)]):
        write_video(videos / "c" / f"v{i}.mkv", moving_texture(10, 40, 56, shift=shift, seed=i))
    flows = tmp_path / "flows.h5"
    code, output = run_cli("extract-flow", videos, "--out", flows, "--short-side", 0, "--backend", "torch",
                           "--device", "cpu", "--quiet")
    assert code == 0, output
    stored, on_device = tmp_path / "stored.h5", tmp_path / "on_device.h5"
    code, output = run_cli("extract-features", videos, "--out", stored, "--flows", flows, *ARGS)
    assert code == 0, output
    code, output = run_cli("extract-features", videos, "--out", on_device, "--flow-backend", "torch",
                           "--flow-short-side", 0, *ARGS)
    assert code == 0, output
    (conv_a, logits_a, _), (conv_b, logits_b, attrs) = _arrays(stored), _arrays(on_device)
    assert conv_a.shape == conv_b.shape == (2, 3, 512, 2, 2)
    np.testing.assert_array_equal(conv_b, conv_a)
    np.testing.assert_array_equal(logits_b, logits_a)
    assert '"backend": "torch"' in attrs["flow"] and '"source": "on-the-fly"' in attrs["flow"], attrs["flow"]
    # the other implementation is another setting: refused on this store, nothing lost
    code, output = run_cli("extract-features", videos, "--out", on_device, "--flow-backend", "opencv",
                           "--flow-short-side", 0, *ARGS)
    assert code == 2 and "other settings (flow differ)" in output, output
    np.testing.assert_array_equal(_arrays(on_device)[0], conv_b)


def test_torch_flow_backend_takes_tvl1_only(tmp_path):
    video = write_video(tmp_path / "a.mkv", moving_texture(4, 32, 40))
    code, output = run_cli("extract-features", video, "--out", tmp_path / "f.h5", "--flow-backend", "torch",
                           "--flow-algorithm", "dis", *ARGS)
    assert code == 2 and "torch computes tvl1 only" in output, output
