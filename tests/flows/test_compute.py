import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from datp.flows.compute import DEFAULT_PRESETS, FLOW_PRESETS, FlowComputer, compute_flow, set_single_thread
from datp.flows.middlebury import evaluate_presets

FLOW_GT = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "flow-gt"

# Mean EPE on Dimetrodon + Urban2, measured (bench/presets.py, docs/flow-presets.md) then times ~1.3.
EPE_BOUNDS = {
    ("tvl1", "opencv"): 2.44,  # measured (0.180 + 3.572) / 2 = 1.876
    ("tvl1", "tuned"): 0.39,  # (0.183 + 0.421) / 2 = 0.302
    ("tvl1", "fast"): 0.40,  # (0.184 + 0.439) / 2 = 0.312
    ("dis", "ultrafast"): 1.04,  # (0.371 + 1.226) / 2 = 0.799
    ("dis", "fast"): 0.85,  # (0.302 + 0.999) / 2 = 0.651
    ("dis", "medium"): 0.52,  # (0.153 + 0.652) / 2 = 0.403
    ("farneback", "mmaction2"): 1.54,  # (0.937 + 1.426) / 2 = 1.182
}


def shifted_texture(dx: int, dy: int, size: int = 128) -> tuple[np.ndarray, np.ndarray]:
    """Smoothed noise and the same image moved by (dx, dy) pixels: flow from first to second is (dx, dy)."""
    big = np.random.default_rng(0).uniform(0, 255, size=(size + 16, size + 16)).astype(np.float32)
    big = cv2.GaussianBlur(big, (0, 0), sigmaX=2.0)
    big = cv2.normalize(big, None, 0, 255, cv2.NORM_MINMAX).astype(np.uint8)
    # prev(y, x) = big(y + 8, x + 8) = next(y + dy, x + dx)
    prev = big[8 : 8 + size, 8 : 8 + size]
    nxt = big[8 - dy : 8 - dy + size, 8 - dx : 8 - dx + size]
    return prev, nxt


@pytest.mark.parametrize(
    "algorithm, preset",
    [("tvl1", None), ("tvl1", "opencv"), ("dis", None), ("farneback", None)],
)
def test_known_shift_gives_median_flow(algorithm, preset):
    prev, nxt = shifted_texture(3, 0)
    flow = compute_flow(prev, nxt, algorithm=algorithm, preset=preset)
    assert flow.shape == (128, 128, 2) and flow.dtype == np.float32
    interior = flow[16:-16, 16:-16].reshape(-1, 2)  # borders see pixels that left the frame
    median = np.median(interior, axis=0)
    error = np.abs(median - [3.0, 0.0]).max()
    assert error < 0.1, f"{algorithm}/{preset}: median flow {median}, expected (3, 0), off by {error}"


def test_vertical_shift_sign():
    prev, nxt = shifted_texture(0, -2)
    median = np.median(compute_flow(prev, nxt)[16:-16, 16:-16].reshape(-1, 2), axis=0)
    assert np.abs(median - [0.0, -2.0]).max() < 0.1, f"median flow {median}, expected (0, -2)"


def test_opencv_preset_equals_opencv_defaults():
    created = cv2.optflow.DualTVL1OpticalFlow_create()
    for name, value in FLOW_PRESETS["tvl1"]["opencv"].items():
        got = getattr(created, "get" + name[0].upper() + name[1:])()
        assert got == pytest.approx(value), f"OpenCV default {name} = {got}, preset says {value}"


@pytest.mark.parametrize("preset", sorted(FLOW_PRESETS["dis"]))
def test_dis_presets_equal_opencv_presets(preset):
    created = cv2.DISOpticalFlow_create(getattr(cv2, f"DISOPTICAL_FLOW_PRESET_{preset.upper()}"))
    for name, value in FLOW_PRESETS["dis"][preset].items():
        got = getattr(created, "get" + name[0].upper() + name[1:])()
        assert got == pytest.approx(value), f"OpenCV DIS {preset} {name} = {got}, preset says {value}"


@pytest.mark.parametrize("algorithm", ["tvl1", "dis"])
def test_parameters_reach_the_opencv_object(algorithm):
    for preset, params in FLOW_PRESETS[algorithm].items():
        computer = FlowComputer(algorithm=algorithm, preset=preset)
        for name, value in params.items():
            got = getattr(computer._flow, "get" + name[0].upper() + name[1:])()
            assert got == pytest.approx(value), f"{algorithm}/{preset} {name}: object has {got}, preset says {value}"


def test_params_are_recordable():
    params = FlowComputer().params
    assert params["algorithm"] == "tvl1" and params["preset"] == DEFAULT_PRESETS["tvl1"]
    assert set(params) == {"algorithm", "preset", *FLOW_PRESETS["tvl1"][DEFAULT_PRESETS["tvl1"]]}
    assert json.loads(json.dumps(params)) == params


def test_every_default_exists():
    assert set(DEFAULT_PRESETS) == set(FLOW_PRESETS)
    for algorithm, preset in DEFAULT_PRESETS.items():
        assert preset in FLOW_PRESETS[algorithm]


def test_reused_computer_gives_identical_results():
    prev, nxt = shifted_texture(3, 0, size=64)
    computer = FlowComputer(algorithm="tvl1")
    first = computer(prev, nxt)
    computer(nxt, prev)  # state from another pair must not leak into the next call
    np.testing.assert_array_equal(computer(prev, nxt), first)


def test_rejects_unknown_names():
    with pytest.raises(ValueError, match=r"unknown tvl1 preset 'best'; choose from \['fast', 'opencv', 'tuned'\]"):
        FlowComputer(preset="best")
    with pytest.raises(ValueError, match=r"unknown flow algorithm 'raft'; choose from \['dis', 'farneback', 'tvl1'\]"):
        FlowComputer(algorithm="raft")


@pytest.mark.parametrize(
    "prev, nxt, message",
    [
        (np.zeros((8, 8, 3), np.uint8), np.zeros((8, 8, 3), np.uint8), r"prev frame must be a grayscale uint8 array \(H, W\), got uint8 \(8, 8, 3\)"),
        (np.zeros((8, 8), np.uint8), np.zeros((8, 8), np.float32), r"next frame must be .* got float32 \(8, 8\)"),
        (np.zeros((8, 8), np.uint8), np.zeros((8, 9), np.uint8), r"frames differ in size: prev \(8, 8\), next \(8, 9\)"),
    ],
)
def test_rejects_bad_frames(prev, nxt, message):
    with pytest.raises(ValueError, match=message):
        FlowComputer(algorithm="dis")(prev, nxt)


def test_set_single_thread():
    before = cv2.getNumThreads()
    try:
        set_single_thread()
        assert cv2.getNumThreads() == 1
    finally:
        cv2.setNumThreads(before)


@pytest.fixture(scope="module")
def middlebury_rows():
    if not FLOW_GT.is_dir():
        pytest.skip(f"no ground-truth data at {FLOW_GT}")
    # Two of the four pairs keep this near 20 s of CPU: Urban2 (large motion, where "opencv" fails)
    # and Dimetrodon (small motion, with unknown ground-truth pixels).
    return evaluate_presets(FLOW_GT, list(EPE_BOUNDS), names=["Dimetrodon", "Urban2"])


def test_every_preset_has_an_epe_bound():
    assert set(EPE_BOUNDS) == {(a, p) for a in FLOW_PRESETS for p in FLOW_PRESETS[a]}


def test_middlebury_epe_below_bound(middlebury_rows):
    for row in middlebury_rows:
        bound = EPE_BOUNDS[row["algorithm"], row["preset"]]
        assert row["mean_epe"] < bound, f"{row['algorithm']}/{row['preset']}: EPE {row['epe']} mean {row['mean_epe']:.3f} >= {bound}"


def test_default_tvl1_beats_opencv_preset(middlebury_rows):
    by_preset = {row["preset"]: row for row in middlebury_rows}
    default, opencv = by_preset[DEFAULT_PRESETS["tvl1"]], by_preset["opencv"]
    assert default["mean_epe"] < opencv["mean_epe"], f"default EPE {default['epe']} vs opencv {opencv['epe']}"
