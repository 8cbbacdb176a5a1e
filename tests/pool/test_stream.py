"""Streaming stage two: batches read ahead by a worker process (or a thread) are the in-RAM batches,
bit for bit, standardisation included; the worker stops with its reader."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import datp.pool.data as data_module
from datp.extract.store import FeatureStore, VideoFeatures, VideoRow, base_attrs, write_features
from datp.pool.config import HeadConfig
from datp.pool.data import SegmentData
from datp.pool.runs import load_run
from datp.pool.standardize import ChannelNorm, fit_norms
from datp.pool.train import train_head

pytestmark = pytest.mark.usefixtures("seeded_one_thread")


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """30 videos of 3 classes, 5 segments of 6x3x3 maps with channel offsets and scales far from 0 and 1."""
    path = tmp_path_factory.mktemp("stream") / "features.h5"
    rng = np.random.default_rng(0)
    rows, feats = [], {}
    scale = rng.uniform(0.1, 10.0, size=(6, 1, 1))
    for i in range(30):
        conv = (rng.normal(size=(5, 6, 3, 3)) * scale + 3.0).astype(np.float32)
        conv[:, i % 3] += 2.0
        rows.append(VideoRow(f"v{i:02d}", i % 3, "train" if i < 20 else "test", 50, 25.0))
        feats[f"v{i:02d}"] = VideoFeatures(t=(np.arange(5) + 0.5) / 5, frame=np.arange(5) * 10,
                                           streams={"rgb": (conv, rng.normal(size=(5, 3)).astype(np.float32))})
    attrs = base_attrs(layout="fixed", class_names=["a", "b", "c"], new_length={"rgb": 1}, settings={"t": 1},
                       num_segments=5, backbone="synthetic", weights="random", logits_match_labels=False)
    write_features(path, rows, feats, attrs)
    return path


def _batches(data: SegmentData, rows) -> list:
    return [(b.conv["rgb"].clone(), b.logits["rgb"].clone(), b.mask.clone(), b.label.clone())
            for b in data.batches(rows, 4)]


@pytest.mark.parametrize("reader", ["process", "thread"])
def test_streamed_batches_equal_the_standardised_ram_copy_bit_for_bit(store, reader, monkeypatch):
    if reader == "process":
        monkeypatch.setattr(data_module, "PROCESS_READER_BYTES", 0)
    with FeatureStore(store) as fs:
        rows = fs.indices("train")
        ram = SegmentData(fs, rows, streams=["rgb"], conv=True, pad_to=5, max_ram_gb=1.0)
        norm = fit_norms(ram, rows)
        raw = ram._load(rows[:4]).conv["rgb"].clone()
        ram.norm = norm
        streamed = SegmentData(fs, rows, streams=["rgb"], conv=True, pad_to=5, max_ram_gb=0.0, norm=norm)
        order = np.random.default_rng(1).permutation(rows)
        want = _batches(ram, order)
        for _ in range(2):  # the persistent worker serves a second pass in another order too
            got = _batches(streamed, order)
            assert all(torch.equal(a, b) for w, g in zip(want, got) for a, b in zip(w, g))
            order = order[::-1].copy()
            want = _batches(ram, order)
        assert (streamed._reader is not None) == (reader == "process")
        streamed.close()
        assert streamed._reader is None
    # the in-RAM copy holds exactly ChannelNorm of the raw maps (float16 values, clamped to its range)
    by_hand = ((raw.double() - norm["rgb"].mean.double().view(-1, 1, 1)) / norm["rgb"].std.double().view(-1, 1, 1))
    assert want[0][0].dtype == torch.float32
    stored = SegmentData(FeatureStore(store), rows[:4], streams=["rgb"], conv=True, pad_to=5, max_ram_gb=1.0,
                         norm=norm).load(rows[:4]).conv["rgb"]
    assert torch.equal(stored, stored.half().float())  # float16 values
    # float16 rounding of the float32 multiply-add x / std - mean / std, whose own rounding is a float32
    # ulp of its two terms (cancellation near the mean)
    m, s = norm["rgb"].mean.double().view(-1, 1, 1), norm["rgb"].std.double().view(-1, 1, 1)
    bound = 2.0**-11 * by_hand.abs() + 2.0**-22 * (raw.double().abs() + m.abs()) / s + 2.0**-24
    assert torch.all((stored.double() - by_hand).abs() <= bound), (stored.double() - by_hand).abs().max()


def test_norm_is_set_once(store):
    with FeatureStore(store) as fs:
        data = SegmentData(fs, fs.indices("train"), streams=["rgb"], conv=True, pad_to=5, max_ram_gb=1.0)
        norm = {"rgb": ChannelNorm(torch.zeros(6), torch.ones(6))}
        data.norm = norm
        with pytest.raises(RuntimeError, match="set once"):
            data.norm = norm


def test_train_head_streamed_by_a_worker_equals_ram(store, tmp_path, monkeypatch):
    common = dict(features=str(store), head="datp", score_source="linear", epochs=3, batch_size=4, lr=1e-2,
                  gaussians=1)
    ram = train_head(HeadConfig(out=str(tmp_path / "ram"), **common), progress=False)
    monkeypatch.setattr(data_module, "PROCESS_READER_BYTES", 0)
    streamed = train_head(HeadConfig(out=str(tmp_path / "stream"), max_ram_gb=0.0, **common), progress=False)
    assert [h["train_loss"] for h in streamed["history"]] == [h["train_loss"] for h in ram["history"]]
    assert streamed["top1"] == ram["top1"] and streamed["best_epoch"] == ram["best_epoch"]
    a, b = load_run(tmp_path / "ram").head.state_dict(), load_run(tmp_path / "stream").head.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("shape", [(3, 10, 600, 7, 7), (2, 5, 6, 3, 3), (4, 7, 1000), (0, 5, 6, 3, 3)])
def test_blockwise_norm_is_the_whole_batch_formula_bit_for_bit(shape):
    """`ChannelNorm.half` runs ~1 MiB blocks on CPU; every block boundary (shape 1 splits a batch into
    8-row blocks) must give the bits of one float32 multiply-add over the batch, clamp included."""
    g = torch.Generator().manual_seed(0)
    conv = (torch.randn(shape, generator=g) * 50).half()
    c = shape[2]
    norm = ChannelNorm(torch.randn(c, generator=g), torch.rand(c, generator=g) * 1e-3 + 1e-6)  # some overflow
    view = (-1,) + (1,) * (len(shape) - 3)
    whole = torch.addcmul((-norm.mean / norm.std).view(view), conv.float(), (1.0 / norm.std).view(view))
    want = whole.clamp(-65504.0, 65504.0).half()
    got = norm.half(conv)
    assert got.dtype == torch.float16 and got.shape == conv.shape
    assert torch.equal(got, want)
    if conv.numel():
        assert bool((want.abs() == 65504.0).any())  # the clamp was exercised
    assert torch.equal(norm(conv), want.float())


def test_worker_ring_grows_for_a_larger_batch_and_stays_exact(store, monkeypatch):
    """The worker's shared batch buffers are sized by the first batch; a later pass with larger
    batches gets a new ring, and every batch of either pass equals the in-RAM batch."""
    monkeypatch.setattr(data_module, "PROCESS_READER_BYTES", 0)
    with FeatureStore(store) as fs:
        rows = fs.indices("train")
        ram = SegmentData(fs, rows, streams=["rgb"], conv=True, pad_to=5, max_ram_gb=1.0)
        norm = fit_norms(ram, rows)
        ram.norm = norm
        streamed = SegmentData(fs, rows, streams=["rgb"], conv=True, pad_to=5, max_ram_gb=0.0, norm=norm)
        order = np.random.default_rng(2).permutation(rows)
        for size in (3, 7, 2, 20):  # more batches than buffers, then larger, smaller, and all at once
            want = [(b.conv["rgb"], b.logits["rgb"], b.t, b.mask, b.label, b.index) for b in ram.batches(order, size)]
            got = [(b.conv["rgb"], b.logits["rgb"], b.t, b.mask, b.label, b.index)
                   for b in streamed.batches(order, size)]
            assert len(got) == len(want) == -(-len(order) // size)
            assert all(torch.equal(a, b) for w, g in zip(want, got) for a, b in zip(w, g))
        streamed.close()
