import struct
from pathlib import Path

import numpy as np
import pytest

from datp.flows.middlebury import endpoint_error, find_pairs, read_flo, write_flo

FLOW_GT = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "flow-gt"


def test_write_read_round_trip(tmp_path):
    flow = np.random.default_rng(0).normal(size=(5, 7, 2)).astype(np.float32)
    write_flo(tmp_path / "a.flo", flow)
    back = read_flo(tmp_path / "a.flo")
    assert back.shape == (5, 7, 2) and back.dtype == np.float32
    np.testing.assert_array_equal(back, flow)


def test_layout_by_hand(tmp_path):
    # magic, width 3, height 2, then (u, v) per pixel row by row: pixel (y, x) = (10y + x, -(10y + x)).
    values = [c for y in range(2) for x in range(3) for c in (10 * y + x, -(10 * y + x))]
    (tmp_path / "b.flo").write_bytes(struct.pack("<fii", 202021.25, 3, 2) + struct.pack(f"<{len(values)}f", *values))
    flow = read_flo(tmp_path / "b.flo")
    assert flow.shape == (2, 3, 2)
    assert flow[1, 2, 0] == 12 and flow[1, 2, 1] == -12 and flow[0, 1, 0] == 1


def test_rejects_bad_magic(tmp_path):
    path = tmp_path / "bad.flo"
    path.write_bytes(struct.pack("<fii", 1.0, 1, 1) + struct.pack("<2f", 0, 0))
    with pytest.raises(ValueError, match=r"bad\.flo has magic .* expected 202021.25"):
        read_flo(path)


def test_rejects_truncated_file(tmp_path):
    path = tmp_path / "short.flo"
    path.write_bytes(struct.pack("<fii", 202021.25, 4, 4) + struct.pack("<2f", 0, 0))
    with pytest.raises(ValueError, match=r"short\.flo declares 4x4"):
        read_flo(path)


def test_endpoint_error_by_hand_ignores_unknown_pixels():
    gt = np.zeros((1, 3, 2), dtype=np.float32)
    gt[0, 2] = 1e10  # unknown
    flow = np.array([[[3, 4], [0, 1], [100, 100]]], dtype=np.float32)
    # known pixels: |(3, 4)| = 5 and |(0, 1)| = 1 -> mean 3
    assert endpoint_error(flow, gt) == pytest.approx(3.0)


def test_ground_truth_files_read():
    if not FLOW_GT.is_dir():
        pytest.skip(f"no ground-truth data at {FLOW_GT}")
    pairs = find_pairs(FLOW_GT)
    assert [p[0] for p in pairs] == ["flyingchairs-0000000", "Dimetrodon", "Grove2", "RubberWhale", "Urban2"]
    gt = read_flo(FLOW_GT / "middlebury-Dimetrodon" / "flow10.flo")
    assert gt.shape == (388, 584, 2)
    known = np.abs(gt).max(axis=2) < 1e9  # Dimetrodon marks occluded borders unknown
    assert 0.9 < known.mean() < 1.0, f"fraction of known pixels {known.mean()}"
    assert np.abs(gt[known]).max() < 10, "Middlebury motions are a few pixels"
