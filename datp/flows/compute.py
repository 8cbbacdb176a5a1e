"""Dense optical flow between two grayscale frames: TV-L1, DIS and Farneback with named presets.

A preset is a plain dict of OpenCV parameters, so it can be printed, compared and saved with every
flow store (`FlowComputer.params`). Parameter names are OpenCV's getter/setter names
(`scaleStep` <-> `setScaleStep`) for TV-L1 and DIS, and the argument names of
`cv2.calcOpticalFlowFarneback` for Farneback. The measurements behind the presets are in
`docs/flow-presets.md` (re-run with `python bench/presets.py`).

Two implementations of TV-L1 (`backend`): "opencv" (`cv2.optflow.DualTVL1OpticalFlow`, CPU) and
"torch" (`datp.flows.tvl1_torch`, the same algorithm step by step in PyTorch: batched, CPU or
CUDA); their agreement is measured in docs/flow-presets.md.
"""

from __future__ import annotations

import cv2
import numpy as np

# OpenCV's TV-L1 defaults, unchanged since the TSN era: the flow that TSN, mmaction2 and denseflow
# features were trained on (mmaction2's CPU script runs exactly this; TSN's dense_flow and denseflow
# ran the GPU TV-L1 with the same values, see docs/flow-presets.md). The coarsest pyramid level is
# 0.8**4 = 0.41 of the frame, too fine to follow large motion (Middlebury Urban2).
# tests/flows/test_compute.py checks these values against OpenCV's getters.
_TVL1_OPENCV = {
    "tau": 0.25,
    "lambda": 0.15,
    "theta": 0.3,
    "scalesNumber": 5,
    "warpingsNumber": 5,
    "epsilon": 0.01,
    "innerIterations": 30,
    "outerIterations": 10,
    "scaleStep": 0.8,
    "gamma": 0.0,
    "medianFiltering": 5,
}

FLOW_PRESETS: dict[str, dict[str, dict]] = {
    "tvl1": {
        "opencv": _TVL1_OPENCV,
        # Tuned on the Middlebury pairs (bench/presets.py --grid; docs/flow-presets.md): OpenCV's
        # defaults except a pyramid that halves per level (coarsest 0.5**4 = 1/16 of the frame, so
        # large motion is found) and 3 warps instead of 5. 4x lower mean EPE on those pairs (all
        # from Urban2; equal on FlyingChairs, not tuned on), 2.1-2.4x less CPU time.
        "tuned": {**_TVL1_OPENCV, "scaleStep": 0.5, "warpingsNumber": 3},
        # As "tuned" with 2 warps: another 22-25% less CPU time for 5% more EPE.
        "fast": {**_TVL1_OPENCV, "scaleStep": 0.5, "warpingsNumber": 2},
    },
    # Equal to cv2.DISOpticalFlow_create(cv2.DISOPTICAL_FLOW_PRESET_*) (tests/flows/test_compute.py
    # checks it). coarsestScale is left automatic, as in OpenCV's presets.
    "dis": {
        name: {
            "finestScale": finest,
            "patchSize": 8,
            "patchStride": stride,
            "gradientDescentIterations": descent,
            "variationalRefinementIterations": refinement,
            "variationalRefinementAlpha": 20.0,
            "variationalRefinementDelta": 5.0,
            "variationalRefinementGamma": 10.0,
            "useMeanNormalization": True,
            "useSpatialPropagation": True,
        }
        for name, finest, stride, descent, refinement in [
            ("ultrafast", 2, 4, 12, 0),
            ("fast", 2, 4, 16, 5),
            ("medium", 1, 3, 25, 5),
        ]
    },
    "farneback": {
        # As in mmaction2's tools/misc/flow_extraction.py:
        # cv2.calcOpticalFlowFarneback(x, y, None, 0.5, 3, 15, 3, 5, 1.2, 0).
        "mmaction2": {
            "pyr_scale": 0.5,
            "levels": 3,
            "winsize": 15,
            "iterations": 3,
            "poly_n": 5,
            "poly_sigma": 1.2,
            "flags": 0,
        },
    },
}

DEFAULT_PRESETS: dict[str, str] = {"tvl1": "tuned", "dis": "medium", "farneback": "mmaction2"}
BACKENDS = ("opencv", "torch")  # "torch": TV-L1 only (datp.flows.tvl1_torch)


def set_single_thread() -> None:
    """Makes OpenCV use one thread in this process (call it in each worker of a process pool);
    the torch backend then uses one torch thread too."""
    cv2.setNumThreads(1)


def _configured(obj, params: dict):
    """Sets each parameter through OpenCV's `set<Name>` setter and returns `obj`."""
    for name, value in params.items():
        setter = getattr(obj, "set" + name[0].upper() + name[1:], None)
        if setter is None:
            raise RuntimeError(
                f"OpenCV {cv2.__version__} has no setter for {name!r}; upgrade opencv-contrib-python-headless"
            )
        setter(value)
    return obj


def _checked(prev, next) -> tuple[np.ndarray, np.ndarray]:
    """The two frames, checked (grayscale uint8, one size) and contiguous."""
    for label, frame in (("prev", prev), ("next", next)):
        if not isinstance(frame, np.ndarray) or frame.dtype != np.uint8 or frame.ndim != 2:
            is_array = isinstance(frame, np.ndarray)
            got = f"{frame.dtype} {frame.shape}" if is_array else type(frame).__name__
            raise ValueError(
                f"{label} frame must be a grayscale uint8 array (H, W), got {got}; "
                "convert with cv2.cvtColor(frame, cv2.COLOR_BGR2GRAY)"
            )
    if prev.shape != next.shape:
        raise ValueError(
            f"frames differ in size: prev {prev.shape}, next {next.shape}; resize both alike"
        )
    # DIS asserts contiguous input; crops and flipped views are not (copies only when needed).
    prev, next = np.ascontiguousarray(prev), np.ascontiguousarray(next)
    return prev, next


class FlowComputer:
    """Computes dense flow with one algorithm and preset; the OpenCV object is created once and reused.

    Not thread-safe (OpenCV's flow objects keep buffers); use one instance per process or thread.

    Args:
        algorithm: one of `FLOW_PRESETS` ("tvl1", "dis", "farneback").
        preset: a preset name of that algorithm; None takes `DEFAULT_PRESETS[algorithm]`.
        backend: "opencv", or "torch" (TV-L1 only: `datp.flows.tvl1_torch`).
        device: where the torch backend runs ("auto", "cpu", "cuda[:K]", `datp.io.device`);
            the opencv backend runs on the CPU ("auto" or "cpu").
    """

    def __init__(self, *, algorithm: str = "tvl1", preset: str | None = None,
                 backend: str = "opencv", device: str = "cpu"):
        if algorithm not in FLOW_PRESETS:
            raise ValueError(f"unknown flow algorithm {algorithm!r}; choose from {sorted(FLOW_PRESETS)}")
        preset = DEFAULT_PRESETS[algorithm] if preset is None else preset
        if preset not in FLOW_PRESETS[algorithm]:
            raise ValueError(
                f"unknown {algorithm} preset {preset!r}; choose from {sorted(FLOW_PRESETS[algorithm])}"
            )
        if backend not in BACKENDS:
            raise ValueError(f"unknown flow backend {backend!r}; choose from {sorted(BACKENDS)}")
        if backend == "torch" and algorithm != "tvl1":
            raise ValueError(f"backend 'torch' computes tvl1 only, not {algorithm!r}; use backend 'opencv'")
        if backend == "opencv" and device not in ("auto", "cpu"):
            raise ValueError(f"device {device!r}: the opencv backend runs on the CPU; "
                             "use backend 'torch' for a GPU")
        self.algorithm = algorithm
        self.preset = preset
        self.backend = backend
        self._params = dict(FLOW_PRESETS[algorithm][preset])
        if backend == "torch":
            from datp.io.device import resolve_device

            self.device = resolve_device(device)
            self._flow = None
            return
        self.device = "cpu"
        if algorithm == "tvl1":
            self._flow = _configured(cv2.optflow.DualTVL1OpticalFlow_create(), self._params)
        elif algorithm == "dis":
            # Every parameter a preset differs in is set, so the preset passed to create is immaterial.
            dis = cv2.DISOpticalFlow_create(cv2.DISOPTICAL_FLOW_PRESET_MEDIUM)
            self._flow = _configured(dis, self._params)
        else:
            self._flow = None  # calcOpticalFlowFarneback is a plain function

    @property
    def params(self) -> dict:
        """{"algorithm", "preset", and every OpenCV parameter}: JSON-able, for store attributes."""
        return {"algorithm": self.algorithm, "preset": self.preset, **self._params}

    def __call__(self, prev: np.ndarray, next: np.ndarray) -> np.ndarray:
        """Flow from `prev` to `next`: prev(y, x) ~ next(y + flow[..., 1], x + flow[..., 0]).

        Args:
            prev: grayscale uint8 frame, (H, W).
            next: grayscale uint8 frame, (H, W).

        Returns:
            float32 flow in pixels, (H, W, 2); channel 0 is horizontal (x), channel 1 vertical (y).
        """
        prev, next = _checked(prev, next)
        if self.backend == "torch":
            return self.pairs([(prev, next)])[0]
        if self.algorithm == "farneback":
            flow = cv2.calcOpticalFlowFarneback(prev, next, None, **self._params)
        else:
            flow = self._flow.calc(prev, next, None)
        return flow.astype(np.float32, copy=False)

    def pairs(self, pairs: list[tuple[np.ndarray, np.ndarray]]) -> list[np.ndarray]:
        """Flow of each (prev, next) pair, as `__call__`; the torch backend runs pairs of one size
        as one batch (`datp.flows.tvl1_torch.tvl1_flow`), each pair stopping on its own."""
        if self.backend == "opencv":
            return [self(prev, nxt) for prev, nxt in pairs]
        from datp.flows.tvl1_torch import tvl1_flow

        if not pairs:
            return []
        pairs = [_checked(prev, nxt) for prev, nxt in pairs]
        if len({prev.shape for prev, _ in pairs} | {nxt.shape for _, nxt in pairs}) > 1:
            return [self.pairs([pair])[0] for pair in pairs]
        if self.device.type == "cpu" and cv2.getNumThreads() == 1:
            import torch  # a worker of a process pool (set_single_thread): one torch thread too

            torch.set_num_threads(1)
        prevs = np.stack([prev for prev, _ in pairs])  # (B, H, W)
        nexts = np.stack([nxt for _, nxt in pairs])
        flow = tvl1_flow(prevs, nexts, self._params, device=self.device)  # (B, H, W, 2)
        return list(flow.cpu().numpy())


def compute_flow(
    prev: np.ndarray, next: np.ndarray, algorithm: str = "tvl1", preset: str | None = None,
    backend: str = "opencv", device: str = "cpu",
) -> np.ndarray:
    """Dense flow between two grayscale uint8 frames (H, W) -> float32 (H, W, 2).

    Convenience wrapper that builds a `FlowComputer` per call; reuse a `FlowComputer` in loops.
    `backend="torch"` (TV-L1 only) runs `datp.flows.tvl1_torch` on `device`; for batches of pairs
    call `datp.flows.tvl1_torch.tvl1_flow` directly.
    """
    return FlowComputer(algorithm=algorithm, preset=preset, backend=backend, device=device)(prev, next)


def to_gray(rgb: np.ndarray) -> np.ndarray:
    """(H, W, 3) RGB uint8 -> (H, W) uint8 luma (OpenCV's BT.601 weights, as denseflow): the one
    grayscale rule of every flow input."""
    return cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)


def gray_pairs(frames: dict, pairs: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """What `sampled_flow` reads of one video: `(pairs, index, gray)`, the frame numbers `index` (K,)
    of both ends of every pair in `pairs` (N, L) and those frames of `frames` ({number: (H, W, 3) RGB})
    in grayscale (K, H, W) uint8 (`to_gray`, as extract-flow)."""
    pairs = np.asarray(pairs)
    index = np.unique(np.concatenate([pairs.ravel(), pairs.ravel() + 1]))
    return pairs, index, np.stack([to_gray(frames[int(j)]) for j in index])


def sampled_flow(computer: FlowComputer, videos: list[tuple[np.ndarray, np.ndarray, np.ndarray]],
                 bound: float) -> list[np.ndarray]:
    """Quantized flow stacks of the pairs that each video's segments read, from decoded frames.

    The pairs of all `videos` that have one frame size run through `computer.pairs` together (one
    batch for the torch backend), each pair once however many segments read it.

    Args:
        computer: the flow implementation (any backend).
        videos: per video `(pairs, index, gray)` (`gray_pairs`): pairs (N, L) pair indices (pair j
            is frame j to frame j + 1), index (K,) the frame numbers held in gray (K, H, W) uint8,
            which must include j and j + 1 of every pair.
        bound: quantization bound in pixels (`datp.flows.quantize`).

    Returns:
        per video, (N, L, H, W, 2) uint8 stacks, as a flow store's pairs would be read.
    """
    from datp.flows.quantize import quantize

    wanted = []  # (video, pair j, prev, next)
    for v, (pairs, index, gray) in enumerate(videos):
        at = {int(j): k for k, j in enumerate(np.asarray(index).tolist())}
        wanted += [(v, j, gray[at[j]], gray[at[j + 1]]) for j in np.unique(pairs).tolist()]
    tables: list[dict[int, np.ndarray]] = [{} for _ in videos]
    for shape in dict.fromkeys(prev.shape for _, _, prev, _ in wanted):  # one batch per frame size
        group = [w for w in wanted if w[2].shape == shape]
        for (v, j, _, _), flow in zip(group, computer.pairs([(prev, nxt) for _, _, prev, nxt in group])):
            tables[v][j] = quantize(flow, bound)
    return [np.stack([[tables[v][j] for j in row] for row in np.asarray(pairs).tolist()])
            for v, (pairs, _, _) in enumerate(videos)]
