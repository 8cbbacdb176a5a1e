from pathlib import Path

import pytest

from datp_testing import shared_data
from datp.io.datasets import (DatasetError, load_dataset, parse_shard, safe_name,
                              shard_records)


def test_folder_tree_labels_from_sorted_classes(video_dir):
    ds = load_dataset(video_dir)
    assert ds.class_names == ["left", "right"]
    by_id = {r.id: r for r in ds.records}
    assert by_id["left/clip1"].label == 0 and by_id["right/clip0"].label == 1
    assert {r.split for r in ds.records} == {"all"}


def test_list_file_relative_to_list_or_root(tmp_path, video_dir):
    listing = tmp_path / "trainlist.txt"
    listing.write_text("right/clip0.mkv 1\r\nleft/clip1.mkv 0\r\n")
    ds = load_dataset(listing, root=video_dir)
    assert [(r.id, r.label, r.split) for r in ds.records] == [("right/clip0", 1, "train"),
                                                              ("left/clip1", 0, "train")]
    assert ds.missing() == []
    assert load_dataset(listing).missing()  # relative to the list's folder: not there


def test_malformed_list_line_names_file_and_line(tmp_path):
    listing = tmp_path / "test.txt"
    listing.write_text("a.mp4 1\nb.mp4 one\n")
    with pytest.raises(DatasetError, match=r"test.txt:2: expected '<video path> <integer label>'"):
        load_dataset(listing)


def test_ucf101_official_split_files():
    folder = shared_data("splits", "ucf101")
    ds = load_dataset(folder, root="/data/UCF101", split=1)
    assert len(ds.class_names) == 101 and ds.class_names[0] == "ApplyEyeMakeup"
    train = [r for r in ds.records if r.split == "train"]
    test = [r for r in ds.records if r.split == "test"]
    assert (len(train), len(test)) == (9537, 3783)  # UCF101 split 1
    first = train[0]
    assert first.id == "ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01" and first.label == 0
    assert first.path == Path("/data/UCF101/ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01.avi")
    assert test[-1].label == 100  # labels come from classInd (1-based) minus 1


def test_hmdb51_official_split_files():
    folder = shared_data("splits", "hmdb51")
    ds = load_dataset(folder, root="/data/hmdb51", split=1)
    label_map = shared_data("splits", "label_maps", "hmdb51_label_map.txt").read_text().split()
    assert ds.class_names == label_map  # the official label order
    counts = {s: sum(r.split == s for r in ds.records) for s in ("train", "test", "unused")}
    assert counts == {"train": 3570, "test": 1530, "unused": 1666}  # 70/30 per class, split 1
    wave = [r for r in ds.records if r.id.startswith("wave/")]
    assert {r.label for r in wave} == {ds.class_names.index("wave")}


def test_single_video_and_manifest(tmp_path, video_dir):
    video = video_dir / "left" / "clip1.mkv"
    assert [(r.id, r.label) for r in load_dataset(video).records] == [("clip1", -1)]
    manifest = tmp_path / "manifest.csv"
    manifest.write_text(f"id,path,label,split\na,{video},0,train\nb,{video},x,test\n")
    with pytest.raises(DatasetError, match=r"manifest.csv:3: label 'x'"):
        load_dataset(manifest)


def test_duplicate_ids_across_sources_rejected(tmp_path, video_dir):
    listing = tmp_path / "a.txt"
    listing.write_text("right/clip0.mkv 1\n")
    with pytest.raises(DatasetError, match="already listed"):
        load_dataset([listing, listing], root=video_dir)


def test_shards_partition_the_dataset_stably():
    from datp.io.datasets import Record

    records = [Record(f"c/v{i}", Path(f"v{i}.mp4")) for i in range(200)]
    shards = [shard_records(records, i, 3) for i in range(3)]
    ids = [r.id for shard in shards for r in shard]
    assert sorted(ids) == sorted(r.id for r in records)  # a partition: each video once
    assert min(len(s) for s in shards) > 40  # roughly balanced
    # a video stays in its shard when the dataset grows
    grown = records + [Record(f"new{i}", Path("x")) for i in range(50)]
    assert {r.id for r in shard_records(grown, 1, 3)} >= {r.id for r in shards[1]}


def test_parse_shard(monkeypatch):
    assert parse_shard("2/4") == (2, 4)
    with pytest.raises(ValueError, match="0 <= i < n"):
        parse_shard("4/4")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert parse_shard(None) == (1, 2)


def test_safe_name_cannot_escape_a_folder():
    for vid in ["../../etc/passwd", "a/b", ".hidden", "x" * 500]:
        name = safe_name(vid)
        assert "/" not in name and not name.startswith(".") and len(name) <= 200
    assert safe_name("a/b") != safe_name("a_b")


def test_every_video_type_in_a_tree_and_a_gif_source(tmp_path, video_dir):
    (video_dir / "left" / "wave.gif").write_bytes(b"GIF89a")
    (video_dir / "right" / "jump.webm").write_bytes(b"")
    ds = load_dataset(video_dir)
    assert {"left/wave", "right/jump"} <= {r.id for r in ds.records}
    single = load_dataset(video_dir / "left" / "wave.gif")  # a video, not a list file
    assert [(r.id, r.label) for r in single.records] == [("wave", -1)]


def test_a_tree_with_videos_at_its_root_and_class_folders_is_an_error(video_dir):
    (video_dir / "stray.mp4").write_bytes(b"")
    with pytest.raises(DatasetError, match="videos at its root .*stray.mp4.* and class folders"):
        load_dataset(video_dir)


def test_labels_are_unknown_or_within_the_class_list(tmp_path):
    listing = tmp_path / "test.txt"
    listing.write_text("a.mp4 1\nb.mp4 -5\n")
    with pytest.raises(DatasetError, match=r"test.txt:2: label -5 must be -1"):
        load_dataset(listing)
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("id,path,label,split\na,a.mp4,0,train\nb,b.mp4,99,test\n")
    (tmp_path / "classes.txt").write_text("run\nwalk\n")
    with pytest.raises(DatasetError, match=r"manifest.csv:3: label 99 is not a class index "
                                           r"\(the dataset has 2 classes"):
        load_dataset(manifest)


def test_labels_that_leave_most_classes_empty_are_warned_about(tmp_path, capsys):
    """Without a class list the classes are 0..max label: 99 among 0-2 makes 100 classes, 97 of them
    empty: one warning naming the line; labels that fill their range (or half of it) are quiet."""
    listing = tmp_path / "train.txt"
    listing.write_text("a.mp4 0\nb.mp4 1\nc.mp4 2\nd.mp4 99\n")
    dataset = load_dataset(listing)
    assert [r.label for r in dataset.records] == [0, 1, 2, 99]
    err = capsys.readouterr().err
    assert err.count("warning") == 1 and "labels go up to 99 (" in err and "train.txt:4" in err, err
    assert "only 4 of the 100 classes" in err and "none for 3" in err
    for quiet in ("a.mp4 0\nb.mp4 1\nc.mp4 2\n", "a.mp4 0\nb.mp4 3\n", "a.mp4 -1\n"):
        listing.write_text(quiet)
        load_dataset(listing)
        assert capsys.readouterr().err == "", quiet
    manifest = tmp_path / "manifest.csv"  # a class list names the classes: nothing to guess
    manifest.write_text("id,path,label,split\na,a.mp4,0,train\nb,b.mp4,9,test\n")
    (tmp_path / "classes.txt").write_text("\n".join(f"c{i}" for i in range(10)) + "\n")
    load_dataset(manifest)
    assert capsys.readouterr().err == ""


def test_a_manifest_row_with_a_missing_field_is_named(tmp_path):
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("id,path,label,split\na,a.mp4,0,train\nb,b.mp4,1\n")
    with pytest.raises(DatasetError, match=r"manifest.csv:3: field 'split' is missing"):
        load_dataset(manifest)


@pytest.mark.parametrize("rank,world", [("7", "2"), ("x", "2"), ("0", "0")])
def test_torchrun_rank_and_world_size_are_checked_and_named(monkeypatch, rank, world):
    monkeypatch.setenv("RANK", rank)
    monkeypatch.setenv("WORLD_SIZE", world)
    with pytest.raises(ValueError, match=f"RANK={rank} WORLD_SIZE={world}"):
        parse_shard(None)


def test_shards_from_torchrun_and_slurm(monkeypatch):
    from datp.io.datasets import SHARD_ENV, parse_shard

    for rank_name, world_name in SHARD_ENV + (("SLURM_ARRAY_TASK_MIN", "SLURM_ARRAY_TASK_MIN"),):
        monkeypatch.delenv(rank_name, raising=False)
        monkeypatch.delenv(world_name, raising=False)
    assert parse_shard(None) == (0, 1)
    monkeypatch.setenv("SLURM_PROCID", "3")
    monkeypatch.setenv("SLURM_NTASKS", "4")
    assert parse_shard(None) == (3, 4)
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "8")  # --array=1-8: the array wins over srun's task
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "8")
    monkeypatch.setenv("SLURM_ARRAY_TASK_MIN", "1")
    assert parse_shard(None) == (7, 8)
    monkeypatch.setenv("RANK", "1")  # torchrun inside the allocation wins
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert parse_shard(None) == (1, 2)
    assert parse_shard("2/5") == (2, 5)
    monkeypatch.setenv("RANK", "7")
    with pytest.raises(ValueError, match="RANK=7 WORLD_SIZE=2"):
        parse_shard(None)
    monkeypatch.delenv("RANK")
    monkeypatch.delenv("WORLD_SIZE")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "9")
    with pytest.raises(ValueError, match="SLURM_ARRAY_TASK_ID=9 - SLURM_ARRAY_TASK_MIN=1 SLURM_ARRAY_TASK_COUNT=8"):
        parse_shard(None)
