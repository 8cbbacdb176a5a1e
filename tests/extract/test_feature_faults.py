"""extract-features under faults (bench/fault_cases.py): kill -9 at seeded moments, two
writers, a full disk, damaged parts, reruns with other lists, outputs datp must not overwrite, a
dead DataLoader worker; option ranges."""

import pytest

import fault_cases as fi
from datp.extract.loader import FeatureConfig


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("feature-faults")
    return folder, fi.make_dataset(folder, count=4)


def check(outcome: fi.Outcome):
    assert outcome.ok, outcome.detail


@pytest.mark.slow
def test_reruns_with_other_lists_keep_every_video(data):
    check(fi.union("features", data[1], data[0]))


@pytest.mark.slow
def test_sigterm_ends_every_process_of_the_job_and_the_rerun_equals_a_clean_run(data):
    check(fi.sigterm("features", data[1], data[0]))


@pytest.mark.slow
def test_two_writers_one_is_refused_the_other_whole(data):
    check(fi.concurrent("features", data[1], data[0]))


@pytest.mark.slow
@pytest.mark.parametrize("where", ["store", "part"])
def test_a_failed_write_is_one_line_and_the_rerun_equals_a_clean_run(data, where):
    check(fi.disk_full("features", data[1], data[0], where=where))


@pytest.mark.slow
def test_truncated_and_corrupted_parts_are_named_and_redone(data):
    check(fi.damaged_parts("features", data[1], data[0]))


@pytest.mark.slow
def test_an_output_of_another_kind_or_a_foreign_file_is_refused(data):
    check(fi.foreign_out("features", data[1], data[0]))


@pytest.mark.slow
def test_kill_9_at_five_seeded_moments_then_rerun_equals_a_clean_run(data):
    check(fi.kill9("features", data[1], data[0], kills=5, seed=1))


@pytest.mark.slow
def test_a_killed_dataloader_worker_does_not_stop_the_run(data):
    check(fi.dead_worker(data[1], data[0]))


@pytest.mark.parametrize("change,message", [
    ({"batch_size": 0}, "batch-size 0 must be >= 1"), ({"input_size": 0}, "input-size 0"),
    ({"new_length": 0}, "new-length 0"), ({"short_side": -5}, "short-side -5"),
    ({"flow_bound": 0}, "bound 0"), ({"workers": -1}, "workers -1"),
    ({"resize": 100, "input_size": 224}, "resize 100 must be >= 224"), ({"shard": (2, 2)}, "shard")])
def test_options_are_range_checked_in_the_config(change, message):
    with pytest.raises(ValueError, match=message):
        FeatureConfig(out="f.h5", **change)
