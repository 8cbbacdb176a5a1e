"""datp.finetune.data: validation carving, splits, epoch order, deterministic TSN clips."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from datp.extract.sampling import frame_indices, segment_indices, segment_times
from datp.extract.transforms import flow_to_tensor, rgb_to_tensor
from datp.finetune.data import (
    ClipDataset,
    EpochSampler,
    epoch_order,
    flow_counts,
    hold_out,
    split_dataset,
)
from datp.finetune.config import FinetuneConfig
from datp.flows.store import FlowStore
from datp.io.datasets import Dataset, Record, load_dataset
from datp.io.decode import read_video
from datp.io.splits import carve_validation
from ft_fixtures import flows, manifest
from datp_testing import assert_close, one_thread  # noqa: F401 (one_thread: an autouse fixture)


def _records(labels, split="train"):
    return [Record(f"v{i}", Path(f"v{i}.mp4"), label, split) for i, label in enumerate(labels)]


def test_hold_out_is_train_heads_stratified_seeded_split():
    records = _records([0] * 5 + [1] * 5 + [2] * 5)
    train, val = hold_out(records, 0.4, seed=0)
    # ceil(0.4 * 15) = 6 held out, stratified: 2 of each class
    assert Counter(r.label for r in val) == {0: 2, 1: 2, 2: 2}
    assert sorted(r.id for r in train + val) == sorted(r.id for r in records)
    assert [r.id for r in train] == [r.id for r in records if r in train]  # input order
    assert [r.id for r in val] == [r.id for r in records if r in val]
    rows = carve_validation([r.label for r in records], 0.4, seed=0)  # the shared rule itself
    assert ([records[i] for i in rows[0]], [records[i] for i in rows[1]]) == (train, val)
    assert hold_out(records, 0.4, seed=0) == (train, val)
    picks = {tuple(r.id for r in hold_out(records, 0.4, seed=s)[1]) for s in range(6)}
    assert len(picks) > 1, "the seed does not change the held-out videos"
    # a class with a single video cannot be stratified: the plain seeded split, same count
    train, val = hold_out(_records([0] * 5 + [1] * 3 + [2]), 0.4, seed=0)
    assert len(val) == 4 and len(train) == 5
    train, val = hold_out(_records([0, 0, 1]), 0.0, seed=0)
    assert len(train) == 3 and val == []


def test_split_dataset_holds_out_a_fifth_by_default():
    splits = split_dataset(Dataset(_records([0] * 5 + [1] * 5)), seed=0)
    assert len(splits.val) == 2 and Counter(r.label for r in splits.val) == {0: 1, 1: 1}
    assert FinetuneConfig(sources=("a",), out="b").val_fraction == 0.2


def test_split_uses_val_records_when_present_and_never_test():
    records = _records([0, 1, 0, 1]) + [Record("val0", Path("a"), 0, "val"), Record("t0", Path("b"), 1, "test")]
    splits = split_dataset(Dataset(records), val_fraction=0.5, seed=0)
    assert [r.id for r in splits.val] == ["val0"]
    assert [r.id for r in splits.train] == ["v0", "v1", "v2", "v3"]
    assert [r.id for r in splits.test] == ["t0"]
    carved = split_dataset(Dataset(records[:4] + records[5:]), val_fraction=0.5, seed=0)
    assert len(carved.val) == 2 and "t0" not in {r.id for r in carved.train + carved.val}
    with pytest.raises(ValueError, match="no videos of split 'train'"):
        split_dataset(Dataset(_records([0, 1], split="all")))
    with pytest.raises(ValueError, match="has no label"):
        split_dataset(Dataset(_records([0, -1])))


def test_epoch_order_shards_like_a_distributed_sampler():
    n, world = 10, 3
    shards = [epoch_order(n, seed=1, epoch=4, rank=r, world_size=world) for r in range(world)]
    assert {len(s) for s in shards} == {4}  # ceil(10 / 3): every rank takes the same number of steps
    perm = np.random.default_rng([1, 4]).permutation(n)
    padded = np.concatenate([perm, perm[:2]])  # 12 = 4 * 3 slots: the first two repeat
    for r in range(world):
        np.testing.assert_array_equal(shards[r], padded[r::world])
    np.testing.assert_array_equal(epoch_order(n, seed=1, epoch=4), perm)
    assert not np.array_equal(epoch_order(n, seed=1, epoch=5), perm)
    sampler = EpochSampler(n, seed=1, rank=2, world_size=world)
    sampler.set_epoch(4)
    assert list(sampler) == [(4, int(i)) for i in shards[2]] and len(sampler) == 4


def _rgb(records, train, **kw):
    return ClipDataset(records, stream="rgb", train=train, num_segments=3, short_side=64, resize=64,
                       input_size=56, seed=0, **kw)


def test_train_clips_depend_only_on_seed_epoch_and_index():
    records = load_dataset(manifest()).records[:3]
    clips = _rgb(records, True)
    a, b = clips[(0, 1)], _rgb(records, True)[(0, 1)]
    assert_close(a["x"], b["x"])
    assert torch.equal(a["t"], b["t"]) and a["label"] == records[1].label
    later = clips[(1, 1)]
    assert not torch.equal(a["x"], later["x"]), "another epoch must draw other offsets / crops"


def test_eval_clips_are_tsn_test_sampling_and_centre_crop():
    record = load_dataset(manifest()).records[2]
    item = _rgb([record], False)[(7, 0)]  # the epoch is ignored in eval mode
    frames, _ = read_video(record.path, short_side=64)
    starts = segment_indices(len(frames), 3, 1, "test")
    assert_close(item["x"], rgb_to_tensor(frames[starts], resize=64, crop=56)[:, 0])
    assert_close(item["t"], torch.from_numpy(segment_times(starts, 1, len(frames))))


def test_rgb_decoding_with_a_known_frame_count_stops_early_and_reads_the_same_frames():
    records = load_dataset(manifest()).records[:2]
    counts = {r.id: len(read_video(r.path)[0]) - 1 for r in records}  # as a flow store gives: T - 1
    for train in (True, False):
        full, early = _rgb(records, train), _rgb(records, train, flow_pairs=counts)
        for key in ((0, 0), (3, 1)):
            assert_close(early[key]["x"], full[key]["x"])


def test_flow_clips_read_the_sampled_pairs_from_a_store_and_from_jpg_folders():
    records = load_dataset(manifest()).records[:2]
    for source in (flows("h5"), flows("jpg")):
        counts = flow_counts(records, str(source))
        clips = ClipDataset(records, stream="flow", train=False, num_segments=3, new_length=5, flows=str(source),
                            flow_pairs=counts, resize=48, input_size=40)
        for i, record in enumerate(records):
            P = counts[record.id]
            pairs = frame_indices(segment_indices(P, 3, 5, "test"), 5, P)  # (3, 5)
            if source.suffix == ".h5":
                with FlowStore(source) as store:
                    assert store.meta(record.id)["num_frames"] - 1 == P
                    stacks = store.flow(record.id)[pairs]  # all pairs, then the sampled ones
            else:  # jpg files count pairs from 1
                folder = source / record.id
                stacks = np.stack([[np.stack([cv2.imread(str(folder / f"flow_{a}_{j + 1:05d}.jpg"), 0)
                                              for a in "xy"], -1) for j in row] for row in pairs])
            assert_close(clips[(0, i)]["x"], flow_to_tensor(stacks, resize=48, crop=40)[:, 0])


def test_flow_counts_names_a_video_without_flow():
    record = Record("nowhere/clip", Path("clip.mkv"), 0, "train")
    with pytest.raises(ValueError, match="no flow for video 'nowhere/clip'"):
        flow_counts([record], str(flows("h5")))
    with pytest.raises(ValueError, match="no flow for video 'nowhere/clip'"):
        flow_counts([record], str(flows("jpg")))
