"""`train-head --transfer-from TRIMMED.h5 --mmd-weight L`: TSRNet's trimmed-to-untrimmed MMD term.

Two tiny stores with shifted feature distributions: untrimmed videos (ragged, stride mode) whose
class shows only in a few event segments, and trimmed videos (fixed layout) whose every segment shows
the class, plus a constant offset on two channels that the untrimmed videos lack (the domain shift).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from datp.cli import main
from datp.extract.store import (
    FeatureStore,
    VideoFeatures,
    VideoRow,
    base_attrs,
    write_features,
)
from datp.pool.config import HeadConfig
from datp.pool.heads import SegmentBatch, build_head
from datp.pool.mmd import MAX_ROWS, mmd2, segment_rows, transfer_loss
from datp.pool.runs import load_run
from datp.pool.train import train_head

pytestmark = pytest.mark.usefixtures("seeded_one_thread")

CLASSES = ["a", "b", "c"]
CF = 8  # conv channels; 5 and 6 carry the trimmed store's offset
SHIFT = (5, 6)


def write_untrimmed(path, *, videos: int = 30, channels: int = CF, seed: int = 0):
    """Ragged store: 8-12 segments per video, 2-3 consecutive event segments show the class."""
    rng = np.random.default_rng(seed)
    rows, feats = [], {}
    for i in range(videos):
        n, y = int(rng.integers(8, 13)), i % len(CLASSES)
        conv = 0.5 * rng.standard_normal((n, channels, 2, 2))
        start = int(rng.integers(0, n - 3))
        conv[start:start + int(rng.integers(2, 4)), y] += 2.0
        vid = f"u{i:03d}"
        rows.append(VideoRow(vid, y, "train" if i < 24 else "test", 2 * n, 5.0))
        feats[vid] = VideoFeatures(t=(np.arange(n) + 0.5) / n, frame=2 * np.arange(n), num_frames=2 * n, fps=5.0,
                                   streams={"rgb": (conv, rng.standard_normal((n, len(CLASSES))))})
    write_features(path, rows, feats, base_attrs(layout="ragged", class_names=CLASSES, new_length={"rgb": 1},
                                                 settings={"kind": "untrimmed"}, stride=2))
    return path


def write_trimmed(path, *, videos: int = 18, channels: int = CF, streams=("rgb",), split: str = "train",
                  seed: int = 1):
    """Fixed store of 4 segments per video: the class in every segment, plus the offset on SHIFT."""
    rng = np.random.default_rng(seed)
    rows, feats = [], {}
    for i in range(videos):
        y = i % len(CLASSES)
        conv = 0.5 * rng.standard_normal((4, channels, 2, 2))
        conv[:, y] += 2.0
        conv[:, list(SHIFT)] += 1.5
        vid = f"t{i:03d}"
        rows.append(VideoRow(vid, y, split, 40, 10.0))
        feats[vid] = VideoFeatures(t=(np.arange(4) + 0.5) / 4, frame=10 * np.arange(4), num_frames=40, fps=10.0,
                                   streams={s: (conv, rng.standard_normal((4, len(CLASSES)))) for s in streams})
    write_features(path, rows, feats, base_attrs(layout="fixed", class_names=CLASSES, num_segments=4,
                                                 new_length={s: 1 for s in streams},
                                                 settings={"kind": "trimmed"}))
    return path


def config(untrimmed, out, **overrides) -> HeadConfig:
    """self-attn with sigmoid attention, one step per epoch (all 24 train videos in one batch)."""
    options = dict(features=str(untrimmed), out=str(out), head="self-attn", attention="sigmoid", attn_hidden=8,
                   epochs=30, batch_size=32, lr=1e-2, val_fraction=0.0, device="cpu", max_ram_gb=1.0)
    return HeadConfig(**(options | overrides))


def all_rows(path, split: str, run_dir) -> torch.Tensor:
    """(R, CF) pooled features of every real segment of a store's split, standardised as the run's
    head saw them (train-head standardises with the untrimmed train rows' statistics, both sides)."""
    with FeatureStore(path) as store:
        batch = store.load(store.indices(split))
    conv = load_run(run_dir).norm["rgb"](batch.conv["rgb"])
    return segment_rows(SegmentBatch(conv=conv, mask=batch.mask))


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """(untrimmed store, trimmed store, run without transfer, run with --mmd-weight 1) and their results."""
    root = tmp_path_factory.mktemp("transfer")
    untrimmed, trimmed = write_untrimmed(root / "untrimmed.h5"), write_trimmed(root / "trimmed.h5")
    off = train_head(config(untrimmed, root / "off"), progress=False)
    on = train_head(config(untrimmed, root / "on", transfer_from=str(trimmed), mmd_weight=1.0), progress=False)
    return untrimmed, trimmed, root / "off", root / "on", off, on


def test_first_step_loss_is_cross_entropy_plus_weighted_term(pair):
    """Epoch 1 is one step from the seeded initial head: its loss is the transfer-off loss plus
    L * transfer_loss(all trimmed rows, all untrimmed rows, initial W_1), which the test recomputes
    (MMD is a function of the two sets, so the runs' row orders do not matter; no cap applies here)."""
    untrimmed, trimmed, off_dir, on_dir, off, on = pair
    T, U = all_rows(trimmed, "train", on_dir), all_rows(untrimmed, "train", on_dir)
    assert len(T) <= MAX_ROWS and len(U) <= MAX_ROWS, (len(T), len(U))
    options = json.loads((on_dir / "config.json").read_text())["resolved"]["head_options"]
    torch.manual_seed(0)
    initial = build_head("self-attn", **options)
    expected = transfer_loss(T, U, initial.W_1).item()
    first_on, first_off = on["history"][0], off["history"][0]
    assert abs(first_on["mmd"] - expected) < 1e-5, f"epoch-1 mmd {first_on['mmd']} vs by hand {expected}"
    diff = abs(first_on["train_loss"] - (first_off["train_loss"] + 1.0 * first_on["mmd"]))
    assert diff < 1e-6, f"loss with transfer - (loss without + L * mmd) = {diff}"
    assert first_on["mmd"] > 0.1, f"the shifted stores should start far apart, mmd {first_on['mmd']}"


def test_transfer_pulls_fc1_outputs_of_the_two_domains_together(pair):
    untrimmed, trimmed, off_dir, on_dir, off, on = pair
    T, U = all_rows(trimmed, "train", on_dir), all_rows(untrimmed, "train", on_dir)
    norms = [load_run(d).norm["rgb"] for d in (off_dir, on_dir)]  # same train rows: same statistics
    assert torch.equal(norms[0].mean, norms[1].mean) and torch.equal(norms[0].std, norms[1].std)
    with torch.no_grad():
        gaps = {name: mmd2(load_run(d).head.W_1(T), load_run(d).head.W_1(U)).item()
                for name, d in (("off", off_dir), ("on", on_dir))}
    mmds = [h["mmd"] for h in on["history"]]
    print(f"MMD^2(fc1(T), fc1(U)) after training: off {gaps['off']:.4f}, on {gaps['on']:.4f}; "
          f"transfer term per epoch {mmds[0]:.4f} -> {mmds[-1]:.4f}; test top-1 off {off['top1']:.3f}, "
          f"on {on['top1']:.3f}")
    assert gaps["on"] < 0.5 * gaps["off"], f"with transfer {gaps['on']:.4f}, without {gaps['off']:.4f}"
    assert mmds[-1] < 0.8 * mmds[0], f"the transfer term went from {mmds[0]:.4f} to {mmds[-1]:.4f}"


def test_transfer_is_recorded_and_off_runs_carry_nothing_of_it(pair):
    untrimmed, trimmed, off_dir, on_dir, off, on = pair
    cfg = json.loads((on_dir / "config.json").read_text())
    t = cfg["transfer"]
    assert t["from"] == str(trimmed.resolve()) and t["mmd_weight"] == 1.0 and t["fc1"] == "W_1"
    assert t["videos"] == 18 and t["max_rows"] == MAX_ROWS and t["store"]["settings"] == {"kind": "trimmed"}
    assert cfg["config"]["transfer_from"] == str(trimmed) and cfg["config"]["mmd_weight"] == 1.0
    assert all("mmd" in h for h in on["history"])
    assert json.loads((off_dir / "config.json").read_text())["transfer"] is None
    assert not any("mmd" in h for h in off["history"])


def test_transfer_runs_are_reproducible_and_streaming_equals_ram(pair, tmp_path):
    """Same seed: identical weights; the trimmed batches read from the store equal the RAM copy."""
    untrimmed, trimmed, *_ = pair
    kwargs = dict(transfer_from=str(trimmed), mmd_weight=0.5, epochs=3, batch_size=8)
    runs = {"a": {}, "b": {}, "streamed": {"max_ram_gb": 0.0}, "seed1": {"seed": 1}}
    results = {n: train_head(config(untrimmed, tmp_path / n, **(kwargs | o)), progress=False) for n, o in runs.items()}
    states = {n: torch.load(tmp_path / n / "checkpoint.pt", weights_only=True)["state_dict"] for n in runs}
    assert results["streamed"]["timing"]["data"] == "streamed"
    assert json.loads((tmp_path / "streamed" / "config.json").read_text())["transfer"]["data"] == "streamed"
    for other in ("b", "streamed"):
        diff = max((states["a"][k] - states[other][k]).abs().max().item() for k in states["a"])
        assert diff == 0.0, f"{other}: weights differ from run a by {diff}"
        assert results["a"]["history"] == results[other]["history"]
    assert any(not torch.equal(states["a"][k], states["seed1"][k]) for k in states["a"])


@pytest.mark.parametrize("head, options, layer", [
    ("avg", {"score_source": "linear"}, "scores.fc"),
    ("datp", {"score_source": "linear", "datp_input": "softmax"}, "scores.fc"),
    ("lstm-attn", {"hidden": 8}, "u_a"),
])
def test_every_head_names_its_fc1(pair, tmp_path, head, options, layer):
    untrimmed, trimmed, *_ = pair
    options = {"attention": "softmax", "attn_hidden": 128} | options  # the self-attn defaults of `config`
    result = train_head(config(untrimmed, tmp_path, head=head, epochs=2, transfer_from=str(trimmed),
                               mmd_weight=1.0, **options), progress=False)
    assert json.loads((tmp_path / "config.json").read_text())["transfer"]["fc1"] == layer
    assert all(h["mmd"] > 0 for h in result["history"]), result["history"]


def test_joint_attn_transfers_both_streams(tmp_path):
    """joint-attn's W_1 reads [v_rgb; v_flow]: the term's rows hold both streams' features."""
    rng = np.random.default_rng(0)
    rows, feats = [], {}
    for i in range(12):
        conv = rng.standard_normal((5, CF, 2, 2))
        rows.append(VideoRow(f"u{i}", i % 3, "train", 10, 5.0))
        feats[f"u{i}"] = VideoFeatures(t=(np.arange(5) + 0.5) / 5, frame=2 * np.arange(5), num_frames=10, fps=5.0,
                                       streams={s: (conv, rng.standard_normal((5, 3))) for s in ("rgb", "flow")})
    write_features(tmp_path / "u.h5", rows, feats, base_attrs(layout="fixed", class_names=CLASSES, num_segments=5,
                                                               new_length={"rgb": 1, "flow": 1}, settings={}))
    trimmed = write_trimmed(tmp_path / "t.h5", streams=("rgb", "flow"))
    result = train_head(config(tmp_path / "u.h5", tmp_path / "run", head="joint-attn", stream="both",
                               attention="softmax", epochs=2, transfer_from=str(trimmed), mmd_weight=1.0),
                        progress=False)
    assert json.loads((tmp_path / "run" / "config.json").read_text())["transfer"]["fc1"] == "W_1"
    assert all(h["mmd"] > 0 for h in result["history"])


# ---------------------------------------------------------------- user errors


def test_mismatched_stores_and_settings_give_one_line(pair, tmp_path):
    untrimmed, trimmed, *_ = pair
    with pytest.raises(ValueError, match=r"^--transfer-from t.h5 needs --mmd-weight > 0 \(got 0\)"):
        config(untrimmed, tmp_path, transfer_from="t.h5")
    with pytest.raises(ValueError, match=r"^--mmd-weight 1 needs --transfer-from TRIMMED.h5"):
        config(untrimmed, tmp_path, mmd_weight=1.0)
    with pytest.raises(ValueError, match=r"^--mmd-weight -1.0 must be >= 0$"):
        config(untrimmed, tmp_path, transfer_from=str(trimmed), mmd_weight=-1.0)

    wide = write_trimmed(tmp_path / "wide.h5", channels=16)
    with pytest.raises(ValueError) as err:
        train_head(config(untrimmed, tmp_path / "r", transfer_from=str(wide), mmd_weight=1.0), progress=False)
    message = str(err.value)
    assert "\n" not in message and str(wide) in message and str(untrimmed) in message, message
    assert "has 16-channel rgb features but" in message, message
    assert "has 8; extract both stores with the same backbone" in message, message

    flow_only = write_trimmed(tmp_path / "flow.h5", streams=("flow",))
    with pytest.raises(ValueError, match=r"flow.h5 has no 'rgb/conv' but .*untrimmed.h5 is trained on rgb; extract"):
        train_head(config(untrimmed, tmp_path / "r", transfer_from=str(flow_only), mmd_weight=1.0), progress=False)
    test_only = write_trimmed(tmp_path / "test_only.h5", split="test")
    with pytest.raises(ValueError, match=r"test_only.h5 has no done videos of split 'train'"):
        train_head(config(untrimmed, tmp_path / "r", transfer_from=str(test_only), mmd_weight=1.0), progress=False)
    with pytest.raises(ValueError, match="avg on cached scores has none; use --score-source linear"):
        train_head(config(untrimmed, tmp_path / "r", head="avg", attention="softmax", attn_hidden=128,
                          score_source="cached", transfer_from=str(trimmed), mmd_weight=1.0), progress=False)


def test_cli_round_trip(pair, tmp_path):
    """`datp train-head --transfer-from --mmd-weight` gives the library's run; errors are one line, exit 2."""
    untrimmed, trimmed, *_ = pair
    args = ["train-head", str(untrimmed), "--head", "self-attn", "--attention", "sigmoid", "--attn-hidden", "8",
            "--epochs", "2", "--batch-size", "8", "--lr", "0.01", "--val-fraction", "0", "--device", "cpu",
            "--max-ram-gb", "1", "--quiet", "--transfer-from", str(trimmed), "--mmd-weight", "0.5"]
    result = CliRunner().invoke(main, args + ["--out", str(tmp_path / "cli")], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    library = train_head(config(untrimmed, tmp_path / "lib", epochs=2, batch_size=8, transfer_from=str(trimmed),
                                mmd_weight=0.5), progress=False)
    cli = json.loads((tmp_path / "cli" / "metrics.json").read_text())
    assert cli["history"] == library["history"] and cli["history"][0]["mmd"] > 0
    assert json.loads((tmp_path / "cli" / "config.json").read_text())["transfer"]["mmd_weight"] == 0.5

    bad = CliRunner().invoke(main, [a for a in args if a != str(trimmed) and a != "--transfer-from"]
                             + ["--out", str(tmp_path / "bad")])
    assert bad.exit_code == 2, bad.output
    assert bad.output.strip() == "datp: error: --mmd-weight 0.5 needs --transfer-from TRIMMED.h5 (the trimmed " \
                                 "videos' feature store); pass it, or drop --mmd-weight", bad.output
    help_text = CliRunner().invoke(main, ["train-head", "--help"]).output
    assert "--transfer-from" in help_text and "median distance" in help_text
