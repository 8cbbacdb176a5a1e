"""extract-flow end to end: failures, resume after kill -9, shards + merge, jpg layout."""

import os
import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest

from datp_testing import moving_texture, run_cli, shared_data, write_video
from datp.flows.store import FlowStore, StoreError


def flow_cli(*args):
    return run_cli("extract-flow", *args)


def store_content(path):
    """Everything a store holds except its creation time: ids -> (flow, attrs, timestamps)."""
    with FlowStore(path) as store:
        settings = {k: v for k, v in store.settings.items() if k not in ("workers", "shard", "out")}
        return settings, {vid: (store.flow(vid), store.meta(vid), store.timestamps(vid))
                          for vid in store.ids()}


def assert_same_store(a, b):
    settings_a, videos_a = store_content(a)
    settings_b, videos_b = store_content(b)
    assert settings_a == settings_b
    assert list(videos_a) == list(videos_b)  # same videos, same (dataset) order
    for vid in videos_a:
        np.testing.assert_array_equal(videos_a[vid][0], videos_b[vid][0], err_msg=vid)
        meta_a = {k: v for k, v in videos_a[vid][1].items()}
        meta_b = {k: v for k, v in videos_b[vid][1].items()}
        assert str(meta_a) == str(meta_b)
        np.testing.assert_array_equal(videos_a[vid][2], videos_b[vid][2])


def test_flow_of_a_known_shift_is_stored_with_x_then_y(tmp_path):
    video = write_video(tmp_path / "shift.mkv", moving_texture(4, 64, 80, shift=(3, -2)))
    code, _ = flow_cli(video, "--out", tmp_path / "f.h5", "--short-side", 0, "--quiet")
    assert code == 0
    with FlowStore(tmp_path / "f.h5") as store:
        flow = store.flow("shift", dequantize=True)
        meta = store.meta("shift")
    assert flow.shape == (3, 64, 80, 2) and meta["num_frames"] == 4
    inner = flow[:, 8:-8, 8:-8]
    # frame t+1 is frame t moved by (+3, -2): flow x = +3, y = -2 (within a quantization step)
    assert np.median(inner[..., 0]) == pytest.approx(3, abs=0.2)
    assert np.median(inner[..., 1]) == pytest.approx(-2, abs=0.2)
    assert store_content(tmp_path / "f.h5")[0]["flow_params"]["algorithm"] == "tvl1"


def test_stress_files_fail_alone_and_the_run_goes_on(tmp_path):
    stress = shared_data("stress")
    out = tmp_path / "stress.h5"
    code, output = flow_cli(stress, "--out", out, "--short-side", 32, "--workers", 2,
                           "--algorithm", "dis", "--quiet")
    assert code == 3, output  # documented: some videos failed
    failures = (tmp_path / "stress.h5.failures.csv").read_text().splitlines()
    failed = {line.split(",")[0] for line in failures[1:]}
    assert failed == {"corrupted", "result"}
    assert "empty file" in (tmp_path / "stress.h5.failures.csv").read_text()
    with FlowStore(out) as store:
        assert len(store.ids()) == 10
        assert store.meta("av1_video")["num_frames"] == 125
        assert store.flow("video_90").shape[1:3] == (57, 32)  # upright: 568x320 -> 57x32
    # a rerun redoes only the failures, which fail again; nothing already done is lost
    code, output = flow_cli(stress, "--out", out, "--short-side", 32, "--algorithm", "dis", "--quiet")
    assert code == 3 and "0 done, 10 already done, 2 failed" in output
    # a run on another list keeps the earlier runs' failures, as the store keeps their videos
    code, output = flow_cli(stress / "video_90.mov", "--out", out, "--short-side", 32, "--algorithm", "dis",
                            "--quiet")
    assert code == 0 and "1 already done" in output, output
    failures = (tmp_path / "stress.h5.failures.csv").read_text().splitlines()
    assert failures[0] == "id,path,reason" and {line.split(",")[0] for line in failures[1:]} == {"corrupted", "result"}


def test_missing_video_named_with_its_list_line(tmp_path, video_dir):
    listing = tmp_path / "test.txt"
    listing.write_text("left/clip1.mkv 0\nleft/nope.mkv 0\n")
    code, output = flow_cli(listing, "--root", video_dir, "--out", tmp_path / "f.h5", "--quiet")
    assert code == 2 and "test.txt:2: video" in output and "--skip-missing" in output
    code, output = flow_cli(listing, "--root", video_dir, "--out", tmp_path / "f.h5", "--quiet",
                           "--skip-missing", "--algorithm", "dis")
    assert code == 3 and "1 done" in output
    assert "left/nope,"in (tmp_path / "f.h5.failures.csv").read_text()


def test_other_settings_are_refused_on_the_same_store(tmp_path, video_dir):
    out = tmp_path / "f.h5"
    assert flow_cli(video_dir, "--out", out, "--algorithm", "dis", "--quiet")[0] == 0
    code, output = flow_cli(video_dir, "--out", out, "--algorithm", "farneback", "--quiet")
    assert code == 2 and "other settings" in output


def test_shards_then_merge_equal_one_run(tmp_path, video_dir):
    common = ["--algorithm", "dis", "--short-side", 32, "--quiet"]
    assert flow_cli(video_dir, "--out", tmp_path / "one.h5", *common)[0] == 0
    for i in range(3):
        assert flow_cli(video_dir, "--out", tmp_path / "f.h5", "--shard", f"{i}/3", *common)[0] == 0
    shards = sorted(tmp_path.glob("f.shard*of3.h5"))
    assert len(shards) == 3
    code, output = run_cli("merge", *shards, "--out", tmp_path / "merged.h5")
    assert code == 0 and "merged 5 videos" in output
    # merged by links: same content; order follows the shards, so compare per video
    one = store_content(tmp_path / "one.h5")
    merged = store_content(tmp_path / "merged.h5")
    assert one[0] == merged[0] and sorted(one[1]) == sorted(merged[1])
    for vid in one[1]:
        np.testing.assert_array_equal(one[1][vid][0], merged[1][vid][0])
    assert run_cli("merge", *shards, "--out", tmp_path / "copy.h5", "--copy")[0] == 0
    for shard in shards:
        shard.unlink()
    assert sorted(store_content(tmp_path / "copy.h5")[1]) == sorted(one[1])


def test_jpg_folders_and_lists_are_tsn_compatible(tmp_path, video_dir):
    out = tmp_path / "frames"
    code, _ = flow_cli(video_dir, "--out", out, "--format", "jpg", "--rgb", "--algorithm", "dis",
                      "--quiet")
    assert code == 0
    clip = out / "left" / "clip3"  # 9 frames
    names = sorted(os.listdir(clip))
    assert names[:2] == ["flow_x_00001.jpg", "flow_x_00002.jpg"]
    assert sum(n.startswith("img_") for n in names) == 9 and "img_00009.jpg" in names
    assert sum(n.startswith("flow_y_") for n in names) == 8 and "flow_y_00008.jpg" in names
    flow_list = (out / "flow_list.txt").read_text().splitlines()
    rgb_list = (out / "rgb_list.txt").read_text().splitlines()
    assert "left/clip3 8 0" in flow_list and "left/clip3 9 0" in rgb_list
    assert len(flow_list) == len(rgb_list) == 5
    # damaged folders are found when a rerun reuses them (a cut jpg, a missing image), named, redone
    whole = {p.relative_to(out): p.read_bytes() for p in out.rglob("*.jpg")}
    cut = clip / "flow_y_00004.jpg"
    cut.write_bytes(cut.read_bytes()[:-100])
    (out / "right" / "clip0" / "img_00002.jpg").unlink()
    code, output = flow_cli(video_dir, "--out", out, "--format", "jpg", "--rgb", "--algorithm", "dis", "--quiet")
    assert code == 0 and "2 done, 3 already done" in output, output
    assert "flow_y_00004.jpg is not a complete JPEG; the video is redone" in output
    assert "clip0: 5 img_ images for 5 flow pairs (want P + 1 = 6)" in output
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*.jpg")} == whole
    assert (out / "flow_list.txt").read_text().splitlines() == flow_list


def _start(args, cwd):
    return subprocess.Popen([sys.executable, "-m", "datp", "extract-flow", *map(str, args)],
                            cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)


@pytest.mark.slow
def test_kill_9_then_resume_equals_an_uninterrupted_run(tmp_path):
    videos = tmp_path / "videos"
    for i in range(6):
        write_video(videos / "c" / f"v{i}.mkv", moving_texture(14, 72, 96, seed=i))
    args = [videos, "--preset", "opencv", "--short-side", 0, "--quiet"]
    reference = tmp_path / "ref.h5"
    assert _start([*args, "--out", reference], tmp_path).wait() == 0

    out = tmp_path / "killed.h5"
    parts = tmp_path / "killed.h5.parts"
    for delay in (None, 0.9):  # once just after a video finishes, once at an arbitrary moment
        proc = _start([*args, "--out", out], tmp_path)
        deadline = time.time() + 60
        if delay is None:
            while time.time() < deadline and not list(parts.glob("*.h5")):
                time.sleep(0.05)
        else:
            time.sleep(delay)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        if out.exists():  # whatever state it was killed in, the store opens for the run that finishes it
            with FlowStore(out, unfinished=True) as store:
                for vid in store.ids():
                    assert store.flow(vid).shape[0] == store.meta(vid)["num_frames"] - 1
            with h5py.File(out, "r") as f:
                index = bool(f.attrs["index_only"])
            if index:  # and readers (extract-features --flows, finetune) refuse it in one line
                with pytest.raises(StoreError, match="unfinished flow store .*rerun that datp extract-flow"):
                    FlowStore(out)
    assert list(parts.glob("*.h5")), "the first kill came after a finished video"
    assert _start([*args, "--out", out], tmp_path).wait() == 0
    assert not parts.exists()
    assert_same_store(out, reference)
    with h5py.File(out, "r") as f:  # self-contained at the end: no links left
        assert not any(isinstance(f["videos"].get(n, getlink=True), h5py.ExternalLink)
                       for n in f["videos"])
