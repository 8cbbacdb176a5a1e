"""extract-features checks the shared memory its DataLoader workers hand videos over in before any
work: too little (Docker's 64 MB default) is one line naming /dev/shm and the fixes, exit 2, and the
run with `--workers 0` that it suggests works."""

import datp.extract.features as features
import datp.io.atomic as atomic
from datp_testing import moving_texture, one_thread, run_cli, write_video  # noqa: F401 (one_thread: autouse)
from datp.extract.store import FeatureStore

ARGS = ["--backbone", "resnet18", "--device", "cpu", "--quiet", "--streams", "rgb", "--segments", 2,
        "--resize", 64, "--input-size", 56]


def test_too_little_shared_memory_is_one_line_before_any_work(tmp_path, monkeypatch):
    video = tmp_path / "c" / "v0.mkv"
    write_video(video, moving_texture(8, 48, 64, seed=0))
    out = tmp_path / "features.h5"
    monkeypatch.setattr(atomic, "SHARED_MEMORY", tmp_path)  # a folder with the disk's free space
    monkeypatch.setattr(features, "_item_bytes", lambda cfg: 1 << 50)  # more than any disk has
    code, output = run_cli("extract-features", video, "--out", out, *ARGS, "--workers", 1)
    assert code == 2, output
    lines = [line for line in output.splitlines() if line.strip()]
    assert len(lines) == 1 and "shared memory" in lines[0] and "--workers 0" in lines[0], output
    assert "--shm-size" in lines[0] and str(tmp_path) in lines[0]
    code, output = run_cli("extract-features", video, "--out", out, *ARGS, "--workers", 0)
    assert code == 0, output
    with FeatureStore(out) as store:
        assert store.done.tolist() == [True]


def test_item_bytes_counts_segments_crops_channels_and_pixels():
    from datp.extract.loader import FeatureConfig

    cfg = FeatureConfig(out="x.h5", streams=("rgb", "flow"), num_segments=10, new_length=5, input_size=224,
                        num_crops=10)
    assert features._item_bytes(cfg) == 10 * 10 * (3 + 10) * 224 * 224 * 4
