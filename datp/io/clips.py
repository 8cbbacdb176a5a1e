"""Small generated clips for tests, benchmarks and fault injection: a lossless writer and a moving
texture whose flow is known. (FFV1 in Matroska keeps RGB exactly, so a decoded clip equals the
frames written, which the equality tests of every stage rely on.)"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def write_video(path: Path, frames: np.ndarray, fps: int = 25) -> Path:
    """Write (T, H, W, 3) uint8 RGB frames losslessly (FFV1 in Matroska, RGB kept exactly)."""
    import av

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("ffv1", rate=fps)
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "bgr0"
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def moving_texture(num_frames: int, height: int = 48, width: int = 64, shift=(2, 1),
                   seed: int = 0) -> np.ndarray:
    """Frames of a smooth random texture translating by `shift` = (dx, dy) pixels per frame."""
    import cv2

    rng = np.random.default_rng(seed)
    big = rng.integers(0, 256, (height + 8 * num_frames, width + 8 * num_frames, 3), np.uint8)
    big = cv2.GaussianBlur(big, (0, 0), 2.0)
    frames = []
    for t in range(num_frames):
        y0, x0 = 4 * num_frames - shift[1] * t, 4 * num_frames - shift[0] * t
        frames.append(big[y0:y0 + height, x0:x0 + width])
    return np.stack(frames)
