"""Rendering one synthetic video: its events, confusers, background and blobs; see `datp.synth`."""

from __future__ import annotations

import numpy as np

from datp.synth.config import (
    _BACKGROUND,
    _DIRECTIONS,
    _FULL_MOTION_FRAMES,
    _TEXTURE_CUTOFF,
    _TRAVEL,
    _TURN,
    CLASSES,
    SPLITS,
    SynthConfig,
)


# ----------------------------------------------------------------------------------- rendering


def render_video(cfg: SynthConfig, *, label: int, split: str, index: int) -> tuple[np.ndarray, dict]:
    """Make the frames of one video; a pure function of its arguments.

    Each video draws from its own generators seeded by (seed, label, split, index), so a video does
    not change when other videos are added or removed.

    Args:
        cfg: the benchmark config.
        label: class of the video, 0 <= label < cfg.num_classes.
        split: "train" or "test".
        index: number of the video within its class and split.

    Returns:
        frames: (T, H, W, 3) uint8 RGB, H = W = cfg.size.
        info: {"label", "class_name", "split", "fps", "num_frames", "duration_s", "events":
            [{"start_frame", "end_frame", "start_s", "end_s"}] (end exclusive), "confuser_label",
            "confusers": [{"start_frame", "end_frame"}]}.
    """
    if not 0 <= label < cfg.num_classes:
        raise ValueError(f"label={label}: use 0 to {cfg.num_classes - 1}")
    if split not in SPLITS:
        raise ValueError(f"split={split!r}: use one of {SPLITS}")
    # Separate streams for the timeline, the background and the drawn motions, so that a difficulty
    # knob changes only what it controls (e.g. distractor_strength leaves the event times and paths).
    seeds = np.random.SeedSequence([cfg.seed, label, SPLITS.index(split), index]).spawn(4)
    timing, scenery, event_rng, confuser_rng = (np.random.default_rng(s) for s in seeds)
    S, E = cfg.size, cfg.event_frames
    if cfg.untrimmed:
        T = round(timing.uniform(*cfg.untrimmed_duration_s) * cfg.fps)
        events = _place_events(T, E, int(timing.integers(1, cfg.max_events + 1)), timing)
    else:
        T = round(cfg.duration_s * cfg.fps)
        events = _place_events(T, E, 1, timing)
    confuser = int((label + timing.integers(1, cfg.num_classes)) % cfg.num_classes)
    stretches = _free_stretches(T, events, E)
    draws = timing.random(len(stretches))
    confusers = [s for s, u in zip(stretches, draws) if u < cfg.confuser_probability]

    frames = _background(T, S, cfg.distractor_strength, scenery)  # (T, S, S) gray
    frames = np.repeat(frames[..., None], 3, axis=-1)  # (T, S, S, 3)
    for start, end in confusers:
        _draw_motion(frames[start:end], confuser, cfg.confuser_strength, E, confuser_rng)
    for start, end in events:
        _draw_motion(frames[start:end], label, 1.0, E, event_rng)
    frames = np.clip(np.rint(frames), 0, 255).astype(np.uint8)

    info = {
        "label": label, "class_name": CLASSES[label][0], "split": split, "fps": cfg.fps,
        "num_frames": T, "duration_s": T / cfg.fps,
        "events": [{"start_frame": s, "end_frame": e, "start_s": s / cfg.fps, "end_s": e / cfg.fps}
                   for s, e in events],
        "confuser_label": confuser,
        "confusers": [{"start_frame": s, "end_frame": e} for s, e in confusers],
    }
    return frames, info


def _place_events(T: int, E: int, count: int, rng: np.random.Generator) -> list[tuple[int, int]]:
    """`count` non-overlapping [start, end) stretches of E frames, at least E frames apart.

    Classic stars and bars: draw the free frames' split points, then lay the events between them.
    A trimmed video (count 1) may have its event touch either end.
    """
    gap = E if count > 1 else 0
    free = T - count * E - (count - 1) * gap
    assert free >= 0, (T, E, count)  # SynthConfig checks this
    offsets = np.sort(rng.integers(0, free + 1, size=count))
    return [(int(o) + i * (E + gap), int(o) + i * (E + gap) + E) for i, o in enumerate(offsets)]


def _free_stretches(T: int, events: list[tuple[int, int]], E: int) -> list[tuple[int, int]]:
    """Cut the time outside the events into [start, end) stretches of E frames.

    A shorter last piece of a gap is kept when it has at least max(2, E / 2) frames.
    """
    stretches = []
    gaps = zip([0] + [e for _, e in events], [s for s, _ in events] + [T])
    for start, stop in gaps:
        for a in range(start, stop, E):
            if min(a + E, stop) - a >= max(2, E / 2):
                stretches.append((a, min(a + E, stop)))
    return stretches


def _background(T: int, S: int, strength: float, rng: np.random.Generator) -> np.ndarray:
    """(T, S, S) float32: a smooth texture drifting at a constant velocity, plus wandering blobs."""
    # A band-limited periodic texture can be shifted by fractional pixels exactly with a phase ramp in
    # Fourier space; bilinear interpolation would blur it and make the flow non-uniform.
    ky, kx = np.fft.fftfreq(S), np.fft.rfftfreq(S)
    lowpass = np.exp(-0.5 * (ky[:, None] ** 2 + kx[None, :] ** 2) / _TEXTURE_CUTOFF**2)  # (S, S//2+1)
    spectrum = np.fft.rfft2(rng.standard_normal((S, S))) * lowpass
    angle, speed = rng.uniform(0, 2 * np.pi), rng.uniform(0.3, 1.0)  # pixels per frame
    t = np.arange(T)
    dx, dy = speed * np.cos(angle) * t, speed * np.sin(angle) * t  # (T,)
    shift_y = np.exp(-2j * np.pi * ky[None, :] * dy[:, None])  # (T, S)
    shift_x = np.exp(-2j * np.pi * kx[None, :] * dx[:, None])  # (T, S//2+1)
    texture = np.fft.irfft2(spectrum[None] * shift_y[:, :, None] * shift_x[:, None, :], s=(S, S))
    texture /= texture[0].std() + 1e-12
    frames = (_BACKGROUND + 25.0 * strength * np.clip(texture, -2.5, 2.5)).astype(np.float32)

    # Blobs: small gray Gaussians moving in straight lines, bouncing off the borders.
    y, x = _grid(S)
    sigma = 0.035 * S
    for _ in range(3 if strength > 0 else 0):
        start, velocity = rng.uniform(0, S, 2), rng.uniform(0.5, 1.5) * _unit(rng)
        pos = _bounce(start[None] + velocity[None] * t[:, None], S)  # (T, 2) as (x, y)
        amplitude = rng.choice([-1.0, 1.0]) * 70.0 * strength
        d2 = (x[None] - pos[:, 0, None, None]) ** 2 + (y[None] - pos[:, 1, None, None]) ** 2
        frames += amplitude * np.exp(-0.5 * d2 / sigma**2)
    return frames


def _draw_motion(frames: np.ndarray, label: int, strength: float, length: int,
                 rng: np.random.Generator) -> None:
    """Draw class `label`'s motion over `frames` ((T, S, S, 3) float, changed in place).

    The whole motion takes `length` frames; a shorter stretch (T < length) shows its beginning. The
    shape's size, the distance or angle it covers (hence its speed) and its opacity scale with
    `strength` (1 for a real event, cfg.confuser_strength for a confuser). Events shorter than
    _FULL_MOTION_FRAMES cover proportionally less, so that no motion is faster than TV-L1 with
    OpenCV's defaults can follow (about S/15 pixels per frame; docs/synth.md).
    """
    T, S = frames.shape[0], frames.shape[1]
    _, motion, colour = CLASSES[label]
    y, x = _grid(S)
    p = (np.arange(T) + 0.5) / length  # progress through the motion, (T,)
    centre = S / 2 + rng.uniform(-0.08, 0.08, 2) * S
    reach = rng.uniform(0.85, 1.15) * min(1.0, length / _FULL_MOTION_FRAMES)  # per-event variation
    if motion in _DIRECTIONS:
        direction = np.array(_DIRECTIONS[motion])
        travel = _TRAVEL * S * strength * reach
        pos = centre[None] + (p[:, None] - 0.5) * travel * direction[None]  # (T, 2) as (x, y)
        qx, qy = x[None] - pos[:, 0, None, None], y[None] - pos[:, 1, None, None]  # (T, S, S)
        radius = 0.12 * S * strength
        dist = np.maximum(abs(qx), abs(qy)) if motion == "diagonal" else np.hypot(qx, qy)
        alpha = np.clip(radius - dist + 0.5, 0, 1)
        # Shading that moves with the shape gives the flow something to track inside it. It is not
        # periodic: a pattern that repeats every few pixels lets flow lock onto the wrong repeat.
        shade = 0.75 + 0.25 * np.clip(1 - (qx + qy) / (2 * radius), 0, 1)
    elif motion in ("expand", "contract"):
        grow = p if motion == "expand" else 1 - p
        ring = (0.06 + 0.28 * grow * reach) * S * strength  # (T,)
        dist = np.hypot(x - centre[0], y - centre[1])[None]
        alpha = np.clip(0.035 * S - abs(dist - ring[:, None, None]) + 0.5, 0, 1)
        shade = np.ones_like(alpha)
    elif motion == "rotate":
        theta = rng.uniform(0, np.pi) + p * _TURN * strength * reach
        ux, uy = np.cos(theta)[:, None, None], np.sin(theta)[:, None, None]
        qx, qy = x[None] - centre[0], y[None] - centre[1]
        along = qx * ux + qy * uy  # (T, S, S)
        half = 0.3 * S * strength
        dist = np.hypot(qx - np.clip(along, -half, half) * ux, qy - np.clip(along, -half, half) * uy)
        alpha = np.clip(0.04 * S - dist + 0.5, 0, 1)
        shade = 0.75 + 0.25 * (along / half + 1) / 2  # one end brighter
    else:
        raise AssertionError(motion)
    alpha = (alpha * strength)[..., None]  # (T, S, S, 1): a weaker motion is also fainter
    frames *= 1 - alpha
    frames += alpha * shade[..., None] * np.asarray(colour, dtype=np.float32)


def _grid(S: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates (y, x), each (S, S) float32."""
    y, x = np.mgrid[0:S, 0:S].astype(np.float32)
    return y, x


def _unit(rng: np.random.Generator) -> np.ndarray:
    angle = rng.uniform(0, 2 * np.pi)
    return np.array([np.cos(angle), np.sin(angle)])


def _bounce(pos: np.ndarray, S: int) -> np.ndarray:
    """Fold free positions into [0, S] as if reflected at the borders."""
    folded = np.mod(pos, 2 * S)
    return np.where(folded > S, 2 * S - folded, folded)
