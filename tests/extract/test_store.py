"""The feature store (schema 1): round trips of both layouts, padded batches, clear errors,
crash-safe parts, reruns over a finished store, and merging shard stores."""

import h5py
import numpy as np
import pytest
import torch

from datp.extract import store as fstore
from datp.extract.store import FeatureStore, StoreError, VideoFeatures, VideoRow
from datp.io.atomic import parts_dir

CF, H, W = 2, 3, 3  # conv map (Cf, h, w) of the tiny test stores
C = 5  # classes


def _features(n: int, seed: int, streams=("rgb", "flow")) -> VideoFeatures:
    """One video's random features with n segments."""
    rng = np.random.default_rng(seed)
    return VideoFeatures(
        t=np.sort(rng.random(n)).astype(np.float32),
        frame=np.sort(rng.integers(0, 100, n)),
        streams={s: (rng.standard_normal((n, CF, H, W)).astype(np.float32),
                     rng.standard_normal((n, C)).astype(np.float32)) for s in streams},
        num_frames=100 + seed, fps=25.0 + seed)


def _attrs(layout="fixed", **kw) -> dict:
    size = {"num_segments": 4} if layout == "fixed" else {"stride": 8}
    return fstore.base_attrs(layout=layout, class_names=["a", "b", "c", "d", "e"],
                             new_length={"rgb": 1, "flow": 5}, settings={"seed": 0},
                             **{"backbone": "resnet18", **size, **kw})


VIDEOS = [VideoRow("c/v0", 0, "train"), VideoRow("c/v1", 1, "test"), VideoRow("c/v2", 2, "train"),
          VideoRow("c/v3", -1, "train")]


def _check_video(batch, b, feats: VideoFeatures, streams=("rgb", "flow")):
    """Row b of a padded batch holds `feats` (conv as stored: float16) then zeros, masked."""
    n = len(feats.t)
    assert batch.mask[b].tolist() == [True] * n + [False] * (batch.mask.shape[1] - n)
    np.testing.assert_array_equal(batch.t[b, :n].numpy(), feats.t)
    np.testing.assert_array_equal(batch.frame[b, :n].numpy(), feats.frame)
    for s in streams:
        conv, logits = feats.streams[s]
        want = conv.astype(np.float16).astype(np.float32)  # the store keeps conv in float16
        diff = np.abs(batch.conv[s][b, :n].numpy() - want).max()
        assert diff == 0, f"{s} conv of row {b} differs by {diff}"
        np.testing.assert_array_equal(batch.logits[s][b, :n].numpy(), logits)
        assert not batch.conv[s][b, n:].any() and not batch.logits[s][b, n:].any()
    assert not batch.t[b, n:].any() and not batch.frame[b, n:].any()


def test_fixed_layout_round_trip(tmp_path):
    feats = {"c/v0": _features(4, 0), "c/v2": _features(4, 2), "c/v3": _features(4, 3)}
    out = tmp_path / "features.h5"
    fstore.write_features(out, VIDEOS, feats, _attrs())
    with FeatureStore(out) as store:
        assert store.layout == "fixed" and store.num_segments == 4
        assert store.ids == ["c/v0", "c/v1", "c/v2", "c/v3"]
        assert store.done.tolist() == [True, False, True, True]  # c/v1 has no features
        assert store.labels.tolist() == [0, 1, 2, -1] and store.splits.tolist()[1] == "test"
        assert store.num_frames.tolist() == [100, 0, 102, 103]  # from the features when known
        assert store.fps[2] == 27.0
        assert store.streams == ["rgb", "flow"] and store.num_classes == C
        assert store.conv_shape("flow") == (CF, H, W)
        assert store.class_names == ["a", "b", "c", "d", "e"]
        assert store.indices("train").tolist() == [0, 2, 3]
        assert store.indices().tolist() == [0, 2, 3]
        # unsorted indices come back in the order asked for
        batch = store.load([3, 0, 2], streams=["rgb", "flow"])
        assert batch.index.tolist() == [3, 0, 2] and batch.label.tolist() == [-1, 0, 2]
        for b, vid in enumerate(["c/v3", "c/v0", "c/v2"]):
            _check_video(batch, b, feats[vid])
        assert batch.conv["rgb"].dtype == torch.float32 and batch.conv["rgb"].shape == (3, 4, CF, H, W)
        torch.testing.assert_close(batch.softmax("flow"), batch.logits["flow"].softmax(-1))
        padded = store.load([2], streams=["flow"], pad_to=6, conv=False)
        assert padded.conv["flow"] is None and padded.mask.shape == (1, 6)
        _check_video(padded, 0, VideoFeatures(feats["c/v2"].t, feats["c/v2"].frame,
                                              {"flow": (feats["c/v2"].streams["flow"][0][:0],
                                                        feats["c/v2"].streams["flow"][1])}),
                     streams=())
        np.testing.assert_array_equal(padded.logits["flow"][0, :4].numpy(),
                                      feats["c/v2"].streams["flow"][1])
    with h5py.File(out, "r") as f:
        assert f["rgb/conv"].dtype == np.float16 and f["rgb/logits"].dtype == np.float32
        assert f["rgb/conv"].chunks == (1, 4, CF, H, W)  # one video per chunk
        assert f.attrs["datp_schema"] == 1 and f.attrs["index_only"] == False  # noqa: E712
        assert not f["rgb/conv"][1].any()  # the row of a video without features holds zeros


def test_ragged_layout_round_trip(tmp_path):
    lengths = {"c/v0": 3, "c/v1": 1, "c/v3": 5}  # c/v2 not done
    feats = {vid: _features(n, i) for i, (vid, n) in enumerate(lengths.items())}
    out = tmp_path / "stride.h5"
    fstore.write_features(out, VIDEOS, feats, _attrs("ragged"))
    with h5py.File(out, "r") as f:
        assert f["segments/length"][:].tolist() == [3, 1, 0, 5]
        assert f["segments/offset"][:].tolist() == [0, 3, 4, 4]
        assert f["rgb/conv"].shape == (9, CF, H, W) and f["segments/t"].shape == (9,)
        # video v owns rows offset[v] : offset[v] + length[v] of the flat arrays
        np.testing.assert_array_equal(f["flow/logits"][4:9], feats["c/v3"].streams["flow"][1])
    with FeatureStore(out) as store:
        assert store.layout == "ragged" and store.num_segments is None
        assert store.done.tolist() == [True, True, False, True]
        assert store.lengths([3, 1]).tolist() == [5, 1]
        batch = store.load([1, 3, 0], streams=["rgb", "flow"])
        assert batch.mask.shape == (3, 5)  # padded to the longest video of the batch
        for b, vid in enumerate(["c/v1", "c/v3", "c/v0"]):
            _check_video(batch, b, feats[vid])
        # a padded batch holds what each video alone holds
        for b, i in enumerate([1, 3, 0]):
            alone = store.load([i], streams=["rgb"])
            n = int(alone.mask.sum())
            np.testing.assert_array_equal(alone.conv["rgb"][0].numpy(), batch.conv["rgb"][b, :n].numpy())
        assert store.load([0], streams=["rgb"], pad_to=7).mask[0].tolist() == [True] * 3 + [False] * 4


def test_wrong_schema_missing_stream_and_other_files_are_named(tmp_path):
    out = tmp_path / "features.h5"
    fstore.write_features(out, VIDEOS[:1], {"c/v0": _features(4, 0, streams=("rgb",))}, _attrs())
    with FeatureStore(out) as store:
        with pytest.raises(StoreError) as err:
            store.load([0], streams=["rgb", "flow"])
    message = str(err.value)
    assert "features.h5 has no 'flow/conv'" in message
    assert "run datp extract-features --streams flow first" in message and "has: rgb" in message

    with h5py.File(out, "r+") as f:
        f.attrs["datp_schema"] = 2
    with pytest.raises(StoreError, match=r"schema 2; this datp reads schema 1: re-extract") as err:
        FeatureStore(out)
    assert "\n" not in str(err.value)

    flow_store = tmp_path / "flows.h5"
    with h5py.File(flow_store, "w") as f:
        f.attrs.update(datp_schema=1, datp_kind="flow")
    with pytest.raises(StoreError, match=r"flows.h5 is not a feature store \(datp_kind='flow'\)"):
        FeatureStore(flow_store)
    with pytest.raises(StoreError, match="no such feature store; run datp extract-features first"):
        FeatureStore(tmp_path / "absent.h5")
    with pytest.raises(StoreError, match="'c/v0' has 3 segments; the store has 4"):
        fstore.write_features(tmp_path / "bad.h5", VIDEOS[:1], {"c/v0": _features(3, 0)}, _attrs())


def _arrays(path) -> dict:
    """Every dataset of a store as numpy arrays (reading through virtual datasets)."""
    with h5py.File(path, "r") as f:
        out = {}
        f.visititems(lambda k, v: out.update({k: v[()]}) if isinstance(v, h5py.Dataset) else None)
    return out


def _assert_same_arrays(a: dict, b: dict):
    assert sorted(a) == sorted(b)
    for key in a:
        assert a[key].dtype == b[key].dtype and a[key].shape == b[key].shape, key
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


@pytest.mark.parametrize("layout", ["fixed", "ragged"])
def test_parts_index_and_rerun_keep_every_finished_row(tmp_path, layout):
    n = {"c/v0": 4, "c/v1": 4, "c/v2": 4, "c/v3": 4} if layout == "fixed" else \
        {"c/v0": 2, "c/v1": 3, "c/v2": 1, "c/v3": 4}
    feats = {vid: _features(m, i) for i, (vid, m) in enumerate(n.items())}
    attrs = _attrs(layout)
    reference = tmp_path / "reference.h5"
    fstore.write_features(reference, VIDEOS[:3], {k: feats[k] for k in ("c/v0", "c/v2")}, attrs)

    out = tmp_path / "features.h5"
    for vid in ("c/v0", "c/v2"):
        fstore.write_part(out, vid, feats[vid])
    assert fstore.done_ids(out) == {"c/v0", "c/v2"}
    assert fstore.build_store(out, VIDEOS[:3], attrs, ["rgb", "flow"], final=False) == 2
    with h5py.File(out, "r") as f:  # during a run: an index over the parts, nothing copied
        assert f.attrs["index_only"] and f["rgb/conv"].is_virtual
    _assert_same_arrays(_arrays(out), _arrays(reference))
    fstore.build_store(out, VIDEOS[:3], attrs, ["rgb", "flow"], final=True)
    assert not parts_dir(out).exists()
    _assert_same_arrays(_arrays(out), _arrays(reference))

    # a rerun over the finished store adds c/v1 and c/v3; the store keeps opening throughout
    everything = tmp_path / "everything.h5"
    fstore.write_features(everything, VIDEOS, feats, attrs)
    assert fstore.done_ids(out) == {"c/v0", "c/v2"}
    fstore.write_part(out, "c/v1", feats["c/v1"])
    fstore.build_store(out, VIDEOS, attrs, ["rgb", "flow"], final=False)
    assert (parts_dir(out) / fstore.BASE_NAME).is_file()  # the finished store, moved aside
    assert fstore.done_ids(out) == {"c/v0", "c/v1", "c/v2"}
    with pytest.raises(StoreError, match="unfinished.*rerun the same extract-features"):
        FeatureStore(out)  # stage two refuses it
    with FeatureStore(out, allow_unfinished=True) as store:
        assert store.done.tolist() == [True, True, True, False]
        batch = store.load([0, 1, 2], streams=["rgb", "flow"])
        for b, vid in enumerate(["c/v0", "c/v1", "c/v2"]):
            _check_video(batch, b, feats[vid])
    fstore.write_part(out, "c/v3", feats["c/v3"])
    fstore.build_store(out, VIDEOS, attrs, ["rgb", "flow"], final=True)
    assert not parts_dir(out).exists()
    with h5py.File(out, "r") as f:
        assert not f["rgb/conv"].is_virtual and not f.attrs["index_only"]
    _assert_same_arrays(_arrays(out), _arrays(everything))


@pytest.mark.parametrize("layout", ["fixed", "ragged"])
@pytest.mark.parametrize("copy", [False, True])
def test_merge_equals_one_store(tmp_path, layout, copy):
    n = [4, 4, 4, 4] if layout == "fixed" else [2, 3, 1, 4]
    feats = {row.id: _features(m, i) for i, (row, m) in enumerate(zip(VIDEOS, n))}
    attrs = _attrs(layout)
    one = tmp_path / "one.h5"
    fstore.write_features(one, VIDEOS, feats, attrs)
    shards = []
    for i, rows in enumerate([VIDEOS[:1], VIDEOS[1:]]):
        shards.append(tmp_path / f"f.shard{i}of2.h5")
        fstore.write_features(shards[-1], rows, {r.id: feats[r.id] for r in rows},
                              {**attrs, "settings": f'{{"shard": [{i}, 2]}}'})
    merged = tmp_path / "merged.h5"
    assert fstore.merge_feature_stores(shards, merged, copy=copy) == 4
    if copy:
        for shard in shards:
            shard.unlink()  # self-contained
    a, b = _arrays(one), _arrays(merged)
    _assert_same_arrays(a, b)
    with h5py.File(merged, "r") as f:
        assert f["rgb/conv"].is_virtual != copy

    with pytest.raises(StoreError, match="two of the inputs"):
        fstore.merge_feature_stores([one, one], tmp_path / "twice.h5")
    other = tmp_path / "other.h5"
    fstore.write_features(other, VIDEOS[:1], {"c/v0": feats["c/v0"]}, _attrs(layout, backbone="resnet50"))
    with pytest.raises(StoreError, match="other settings"):
        fstore.merge_feature_stores([other, one], tmp_path / "mixed.h5")


def test_merge_with_a_shard_whose_videos_all_failed(tmp_path):
    feats = {"c/v0": _features(4, 0), "c/v2": _features(4, 2)}
    attrs = _attrs()
    fstore.write_features(tmp_path / "a.h5", [VIDEOS[0], VIDEOS[2]], feats, attrs)
    # a shard whose one video failed, as extract-features leaves it: streams without a shape
    fstore.build_store(tmp_path / "b.h5", [VIDEOS[1]], attrs, ["rgb", "flow"], final=True)
    a, b = tmp_path / "a.h5", tmp_path / "b.h5"
    for copy in (False, True):
        for order, ids in (([a, b], ["c/v0", "c/v2", "c/v1"]), ([b, a], ["c/v1", "c/v0", "c/v2"])):
            merged = tmp_path / f"merged{copy}{order[0].stem}.h5"
            assert fstore.merge_feature_stores(order, merged, copy=copy) == 2
            with FeatureStore(merged) as store:
                assert store.ids == ids and store.done.tolist() == [i != "c/v1" for i in ids]
                assert store.conv_shape("rgb") == (CF, H, W)
                batch = store.load([ids.index("c/v2"), ids.index("c/v0")], streams=["rgb", "flow"])
                _check_video(batch, 0, feats["c/v2"])
                _check_video(batch, 1, feats["c/v0"])


def test_merge_stores_dispatches_by_the_kind_of_the_first_input(tmp_path):
    from datp.extract.merge import merge_stores
    from datp.io.h5header import store_kind

    feats = {"c/v0": _features(4, 0), "c/v1": _features(4, 1)}
    shards = []
    for i, row in enumerate(VIDEOS[:2]):
        shards.append(tmp_path / f"f.shard{i}of2.h5")
        fstore.write_features(shards[-1], [row], {row.id: feats[row.id]}, _attrs())
    assert store_kind(shards[0]) == "features"
    assert merge_stores(shards, tmp_path / "merged.h5") == 2
    with FeatureStore(tmp_path / "merged.h5") as store:
        assert store.ids == ["c/v0", "c/v1"]
    plain = tmp_path / "plain.h5"
    with h5py.File(plain, "w") as f:
        f["x"] = 1
    assert store_kind(plain) is None
    with pytest.raises(ValueError, match="neither a flow nor a feature store"):
        merge_stores([plain], tmp_path / "never.h5")
    assert not (tmp_path / "never.h5").exists()


# --- what the reader refuses (stage two never reads an unfinished or inconsistent store) ---------

def test_an_index_whose_parts_moved_is_refused_naming_the_missing_file(tmp_path):
    out = tmp_path / "features.h5"
    for i, vid in enumerate(("c/v0", "c/v1")):
        fstore.write_part(out, vid, _features(4, i))
    fstore.build_store(out, VIDEOS[:2], _attrs(), ["rgb", "flow"], final=False)
    parts_dir(out).rename(tmp_path / "elsewhere")
    with pytest.raises(StoreError, match=r"reads .*features.h5.parts/c%2Fv0.h5, which is missing"):
        FeatureStore(out, allow_unfinished=True)


@pytest.mark.parametrize("damage,message", [
    ("offset", "do not tile"), ("label", "videos/label has shape"), ("text", "not a readable")])
def test_inconsistent_or_unreadable_stores_are_refused(tmp_path, damage, message):
    out = tmp_path / "features.h5"
    feats = {"c/v0": _features(2, 0), "c/v1": _features(3, 1)}
    fstore.write_features(out, VIDEOS[:2], feats, _attrs("ragged"))
    if damage == "text":
        out.write_text("not a store\n")
    else:
        with h5py.File(out, "r+") as f:
            if damage == "offset":
                f["segments/offset"][1] = 1  # overlaps video 0's rows
            else:
                del f["videos/label"]
                f["videos/label"] = np.zeros(3, np.int64)
    with pytest.raises(StoreError, match=message):
        FeatureStore(out)


def test_parts_are_checked_when_reused(tmp_path):
    out = tmp_path / "features.h5"
    good = fstore.write_part(out, "c/v0", _features(4, 0))
    bad = fstore.write_part(out, "c/v1", _features(4, 1))
    with h5py.File(bad, "r") as f:
        info = f["rgb/conv"].id.get_chunk_info(0)
    with open(bad, "r+b") as f:  # zero a block inside the conv data
        f.seek(info.byte_offset + 8)
        f.write(bytes(32))
    notes = []
    assert fstore.done_ids(out, report=notes.append) == {"c/v0"}
    assert good.exists() and not bad.exists()
    assert len(notes) == 1 and "damaged part" in notes[0] and bad.name in notes[0]


def test_a_rerun_with_other_videos_keeps_the_earlier_rows(tmp_path):
    out = tmp_path / "features.h5"
    feats = {vid: _features(4, i) for i, vid in enumerate(v.id for v in VIDEOS)}
    for rows in (VIDEOS[:2], VIDEOS[2:], VIDEOS[:1]):  # list a, list b, a subset of a
        for row in rows:
            fstore.write_part(out, row.id, feats[row.id], label=row.label, split=row.split)
        fstore.build_store(out, rows, _attrs(), ["rgb", "flow"], final=False, union=True)
        fstore.build_store(out, rows, _attrs(), ["rgb", "flow"], final=True, union=True)
    everything = tmp_path / "everything.h5"
    fstore.write_features(everything, VIDEOS, feats, _attrs())
    _assert_same_arrays(_arrays(out), _arrays(everything))


@pytest.mark.parametrize("name,filter_", [(None, None), ("none", None), ("lzf", "lzf"), ("gzip", "gzip")])
@pytest.mark.parametrize("layout", ["fixed", "ragged"])
def test_conv_compression_is_the_recorded_choice_and_reads_the_same(tmp_path, name, filter_, layout):
    """The conv maps are stored with the filter the `conv_compression` attr names (default none, the
    fastest to read); every choice reads back the same values."""
    n = 4 if layout == "fixed" else 3
    feats = {"c/v0": _features(n, 0), "c/v2": _features(n, 2)}
    out = tmp_path / f"{name}.h5"
    fstore.write_features(out, VIDEOS, feats, _attrs(layout, **({} if name is None else {"conv_compression": name})))
    with h5py.File(out, "r") as f:
        assert f["rgb/conv"].compression == filter_ and f["flow/conv"].compression == filter_
        assert f["rgb/logits"].compression is None
    with FeatureStore(out) as store:
        rows = [store.ids.index(v) for v in feats]
        batch = store.load(rows, streams=["rgb", "flow"], conv=True)
        for b, v in enumerate(feats):
            _check_video(batch, b, feats[v])


def test_an_unknown_conv_compression_is_one_clear_error(tmp_path):
    with pytest.raises(ValueError, match="'zstd' is not one of none, lzf, gzip"):
        fstore.write_features(tmp_path / "x.h5", VIDEOS, {"c/v0": _features(4, 0)}, _attrs(conv_compression="zstd"))
