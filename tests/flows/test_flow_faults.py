"""extract-flow under faults (bench/fault_cases.py): kill -9 at seeded moments, two writers,
a full disk, damaged parts, reruns with other lists, outputs datp must not overwrite; the jpg
lists' union; option ranges; settings bound only by a run that finished a video."""

import os

import pytest

import fault_cases as fi
from datp_testing import run_cli, write_video, moving_texture
from datp.flows.extract import FlowConfig


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("flow-faults")
    return folder, fi.make_dataset(folder)


def check(outcome: fi.Outcome):
    assert outcome.ok, outcome.detail


def test_reruns_with_other_lists_keep_every_video(data):
    check(fi.union("flow", data[1], data[0]))


def test_sigterm_ends_every_process_of_the_job_and_the_rerun_equals_a_clean_run(data):
    check(fi.sigterm("flow", data[1], data[0]))


def test_two_writers_one_is_refused_the_other_whole(data):
    check(fi.concurrent("flow", data[1], data[0]))


@pytest.mark.parametrize("where", ["store", "part"])
def test_a_failed_write_is_one_line_and_the_rerun_equals_a_clean_run(data, where):
    check(fi.disk_full("flow", data[1], data[0], where=where))


def test_truncated_and_corrupted_parts_are_named_and_redone(data):
    check(fi.damaged_parts("flow", data[1], data[0]))


def test_an_output_of_another_kind_or_a_foreign_file_is_refused(data):
    check(fi.foreign_out("flow", data[1], data[0]))


@pytest.mark.slow
def test_kill_9_at_five_seeded_moments_then_rerun_equals_a_clean_run(data):
    check(fi.kill9("flow", data[1], data[0], kills=5, seed=0))


def test_jpg_lists_are_the_union_of_all_runs(data):
    folder, lists = data
    out = folder / "frames"
    for name in ("a", "b", "sub"):
        code, output = run_cli("extract-flow", lists[name], "--out", out, "--format", "jpg",
                               "--algorithm", "dis", "--short-side", 32, "--quiet")
        assert code == 0, output
    listed = sorted(line.split()[0] for line in (out / "flow_list.txt").read_text().splitlines())
    assert listed == [f"v/c{i % 2}/v{i}" for i in sorted(range(5), key=lambda i: f"v/c{i % 2}/v{i}")]
    # a jpg folder holding files datp did not write is refused
    (folder / "mine").mkdir()
    (folder / "mine" / "notes.txt").write_text("x")
    code, output = run_cli("extract-flow", lists["sub"], "--out", folder / "mine", "--format", "jpg",
                           "--quiet")
    assert code == 2 and "datp did not write" in output


@pytest.mark.parametrize("change,message", [
    ({"short_side": -5}, "short-side -5 must be >= 0"), ({"bound": 0}, "bound 0 must be > 0"),
    ({"shard": (7, 2)}, "shard"), ({"size": (0, 10)}, "size")])
def test_options_are_range_checked_in_the_config(change, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        FlowConfig(out="f.h5", **change)


def test_a_run_that_failed_every_video_binds_no_settings(tmp_path):
    bad = tmp_path / "bad.mkv"
    bad.write_bytes(b"not a video")
    out = tmp_path / "f.h5"
    code, _ = run_cli("extract-flow", bad, "--out", out, "--bound", 5, "--quiet")
    assert code == 3
    good = write_video(tmp_path / "good.mkv", moving_texture(5))
    code, output = run_cli("extract-flow", good, "--out", out, "--bound", 20, "--short-side", 32,
                           "--quiet")
    assert code == 0, output


def test_merge_refuses_an_out_that_exists_or_is_an_input_and_folders(data, tmp_path):
    folder, lists = data
    ref = fi.reference("flow", lists, folder)
    before = ref.read_bytes()
    for args, message in [([ref, "--out", ref], "is one of the inputs"),
                          ([ref, "--out", folder / "a.txt"], "exists"),
                          ([folder, "--out", tmp_path / "m.h5"], "is a folder"),
                          ([lists["a"], "--out", tmp_path / "m.h5"], "not a readable")]:
        code, output = run_cli("merge", *args)
        assert code == 2 and message in output and len(output.strip().splitlines()) == 1, output
    assert ref.read_bytes() == before and not os.path.exists(tmp_path / "m.h5")
