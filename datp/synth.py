"""A synthetic key-moment benchmark: small videos whose class shows only in a brief event.

Each video has one class. Its class is visible only during a short *event* (`event_fraction` of the
video, at a random time): a bright shape moving in a class-specific way (a disc moving right, left,
up or down, a ring expanding or contracting, a bar rotating, a square moving diagonally). Around it
there is class-agnostic distractor motion (a drifting textured background and small wandering blobs)
and, in most of the remaining time, a *confuser*: a smaller, slower, fainter version of ANOTHER class's
event. Averaging over segments therefore points to the confuser's class; a head that finds and weights
the key moment (DATP) can still get it right. This is the paper's "dive" that looks like "fall floor"
except at the moment of the dive.

`render_video` makes one video's frames (a pure function of the config and the video's place in the
dataset); `generate` writes a whole dataset: lossless FFV1 videos in Matroska, a manifest, mmaction2
lists, event times and, for untrimmed videos, ActivityNet-style ground truth. docs/synth.md has the
details and the reasons.
"""

from __future__ import annotations

import csv
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

import datp
from datp.io.atomic import atomic_path

# (class name, motion, RGB colour). Colours are bright (luma 170-215) on a dark background (luma
# about 60), so the shapes stand out in the grayscale frames that optical flow sees, and differ in hue
# so a single RGB frame also tells the classes apart.
CLASSES = (
    ("disc_right", "right", (250, 230, 60)),
    ("disc_left", "left", (60, 230, 250)),
    ("disc_up", "up", (255, 140, 120)),
    ("disc_down", "down", (140, 250, 120)),
    ("ring_expand", "expand", (250, 130, 250)),
    ("bar_rotate", "rotate", (255, 190, 90)),
    ("ring_contract", "contract", (150, 180, 255)),
    ("square_diagonal", "diagonal", (230, 230, 230)),
)
SPLITS = ("train", "test")
ACTIVITYNET_SUBSETS = {"train": "training", "test": "validation"}
_DIRECTIONS = {"right": (1.0, 0.0), "left": (-1.0, 0.0), "up": (0.0, -1.0), "down": (0.0, 1.0),
               "diagonal": (0.7071, 0.7071)}  # (dx, dy) in image coordinates: y grows downwards
_BACKGROUND = 60.0  # mean background intensity
_TRAVEL = 0.4  # distance a translating event covers, as a fraction of the frame size
_TURN = np.pi / 2  # angle a rotating event turns
_FULL_MOTION_FRAMES = 6  # shorter events move less (a speed limit for optical flow)
_TEXTURE_CUTOFF = 0.06  # background texture: Gaussian low-pass width in cycles per pixel


@dataclass(frozen=True)
class SynthConfig:
    """How to make the benchmark. The defaults make a trimmed set that generates in seconds.

    Attributes:
        seed: seeds everything; the same config gives byte-identical files.
        num_classes: 2 to len(CLASSES) (8); classes are the first `num_classes` of CLASSES.
        videos_per_class_train: training videos per class.
        videos_per_class_test: test videos per class.
        size: frame height = width in pixels (32 to 256).
        fps: frames per second (an integer, so the stream's time base is exact).
        duration_s: length of a trimmed video; also sets the event length in both modes:
            round(event_fraction * duration_s * fps) frames (at least 2).
        event_fraction: fraction of a trimmed video the key event lasts (0 < f <= 0.5).
        distractor_strength: contrast of the drifting background texture and the wandering blobs
            (0 = static flat background, no blobs; 1 = strong).
        confuser_probability: probability that each event-long stretch of non-event time shows the
            confuser (another class's motion).
        confuser_strength: size, speed and opacity of the confuser relative to the event (0 < s <= 1;
            at 1 the confuser is as strong as a real event and the task becomes ambiguous).
        untrimmed: make long videos with 1 to `max_events` events each (for localization).
        untrimmed_duration_s: (min, max) length of an untrimmed video, drawn uniformly per video.
        max_events: most events in one untrimmed video.
    """

    seed: int = 0
    num_classes: int = 6
    videos_per_class_train: int = 16
    videos_per_class_test: int = 8
    size: int = 96
    fps: int = 10
    duration_s: float = 4.0
    event_fraction: float = 0.15
    distractor_strength: float = 0.5
    confuser_probability: float = 0.8
    confuser_strength: float = 0.6
    untrimmed: bool = False
    untrimmed_duration_s: tuple[float, float] = (20.0, 30.0)
    max_events: int = 3

    def __post_init__(self) -> None:
        def check(ok: bool, message: str) -> None:
            if not ok:
                raise ValueError(message)

        check(2 <= self.num_classes <= len(CLASSES),
              f"num_classes={self.num_classes}: choose 2 to {len(CLASSES)}")
        check(self.videos_per_class_train >= 0 and self.videos_per_class_test >= 0,
              "videos_per_class_train and videos_per_class_test must be >= 0")
        check(32 <= self.size <= 256, f"size={self.size}: choose 32 to 256 pixels")
        check(isinstance(self.fps, int) and 1 <= self.fps <= 60, f"fps={self.fps!r}: use an int 1-60")
        check(0 < self.event_fraction <= 0.5, f"event_fraction={self.event_fraction}: use 0 < f <= 0.5")
        check(self.event_frames >= 2, f"the event lasts {self.event_frames} frame(s); raise "
              f"duration_s ({self.duration_s}), fps ({self.fps}) or event_fraction")
        check(0 <= self.distractor_strength <= 1,
              f"distractor_strength={self.distractor_strength}: use 0 to 1")
        check(0 <= self.confuser_probability <= 1,
              f"confuser_probability={self.confuser_probability}: use 0 to 1")
        check(0 < self.confuser_strength <= 1,
              f"confuser_strength={self.confuser_strength}: use 0 < s <= 1")
        check(self.max_events >= 1, f"max_events={self.max_events}: use 1 or more")
        if self.untrimmed:
            low, high = self.untrimmed_duration_s
            # Room for max_events events, each followed by a gap as long as an event.
            need = 2 * self.max_events * self.event_frames / self.fps
            check(need <= low <= high, f"untrimmed_duration_s={self.untrimmed_duration_s}: need "
                  f"{need:g} <= min <= max to fit {self.max_events} events of {self.event_frames} "
                  "frames; lengthen the videos or lower max_events")

    @property
    def event_frames(self) -> int:
        """Frames one event lasts."""
        return round(self.event_fraction * self.duration_s * self.fps)

    @property
    def class_names(self) -> list[str]:
        return [name for name, _, _ in CLASSES[: self.num_classes]]


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


# ------------------------------------------------------------------------------------- writing


def generate(cfg: SynthConfig, out_dir: Path, *, progress: bool = True) -> Path:
    """Write the benchmark into `out_dir` and return `out_dir`.

    Layout (paths in the lists are relative to `out_dir`; a video's id is its path without suffix,
    e.g. `videos/disc_right/train_0003`, the id `datp.io.datasets` gives it from either list):
        videos/<class name>/<split>_<index>.mkv   FFV1 (lossless, bgr0) in Matroska, cfg.fps
        manifest.csv        id,path,label,split
        classes.txt         class names, one a line, in label order
        train.txt, test.txt mmaction2 video lists: `<path> <label>`
        events.json         {id: render_video's info} (event and confuser frames and seconds)
        ground_truth.json   untrimmed only: ActivityNet-style {"database": {id: {"subset",
                            "duration", "annotations": [{"segment": [start_s, end_s], "label"}]}}},
                            subset "training" for train videos and "validation" for test videos
        synth_config.json   asdict(cfg) and the datp version; written last, it marks a finished set

    Rerunning with the same config returns at once when the set is complete (synth_config.json
    matches and every listed video exists); otherwise it is written again over what is there.

    Raises:
        ValueError: `out_dir` holds a finished set made with a different config or datp version.
    """
    out_dir = Path(out_dir)
    record = _config_record(cfg)
    marker = out_dir / "synth_config.json"
    if marker.is_file():
        found = json.loads(marker.read_text())
        if found != record:
            changed = sorted(k for k in record.keys() | found.keys() if record.get(k) != found.get(k))
            raise ValueError(f"{out_dir} holds a synthetic set made with a different config "
                             f"(differs in {', '.join(changed)}); choose another folder or delete it")
        if _is_complete(out_dir, cfg):
            return out_dir
        marker.unlink()  # incomplete: regenerate

    jobs = [(split, label, index) for split in SPLITS for label in range(cfg.num_classes)
            for index in range(cfg.videos_per_class_train if split == "train"
                               else cfg.videos_per_class_test)]
    rows, infos = [], {}
    from tqdm import tqdm

    for split, label, index in tqdm(jobs, desc="synth", unit="video", disable=not progress):
        frames, info = render_video(cfg, label=label, split=split, index=index)
        path = f"videos/{CLASSES[label][0]}/{split}_{index:04d}.mkv"
        video_id = path[: -len(".mkv")]
        (out_dir / path).parent.mkdir(parents=True, exist_ok=True)
        write_video(out_dir / path, frames, fps=cfg.fps)
        rows.append((video_id, path, label, split))
        infos[video_id] = info

    _write_text(out_dir / "classes.txt", "".join(f"{name}\n" for name in cfg.class_names))
    for split in SPLITS:
        _write_text(out_dir / f"{split}.txt",
                    "".join(f"{path} {label}\n" for _, path, label, s in rows if s == split))
    lines = ["id,path,label,split\n"]
    lines += [",".join(map(str, row)) + "\n" for row in rows]  # ids and paths hold no commas
    _write_text(out_dir / "manifest.csv", "".join(lines))
    _write_text(out_dir / "events.json", json.dumps(infos, indent=1) + "\n")
    if cfg.untrimmed:
        database = {
            video_id: {
                "subset": ACTIVITYNET_SUBSETS[info["split"]],
                "duration": info["duration_s"],
                "annotations": [{"segment": [e["start_s"], e["end_s"]], "label": info["class_name"]}
                                for e in info["events"]],
            }
            for video_id, info in infos.items()
        }
        _write_text(out_dir / "ground_truth.json", json.dumps({"database": database}, indent=1) + "\n")
    _write_text(marker, json.dumps(record, indent=1) + "\n")
    return out_dir


def write_video(path: Path, frames: np.ndarray, *, fps: int) -> None:
    """Write (T, H, W, 3) uint8 RGB frames losslessly: FFV1 (bgr0) in Matroska.

    Every frame decodes back bit-exactly with PyAV and with OpenCV, and `bitexact` keeps FFmpeg from
    writing a random segment id or its version into the file, so equal frames give equal bytes.
    """
    import av

    T, H, W, _ = frames.shape
    with atomic_path(path) as tmp, av.open(str(tmp), "w", format="matroska",
                                           options={"fflags": "+bitexact"}) as container:
        stream = container.add_stream("ffv1", rate=fps)
        stream.width, stream.height, stream.pix_fmt = W, H, "bgr0"
        stream.codec_context.flags |= av.codec.context.Flags.bitexact
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())


def _config_record(cfg: SynthConfig) -> dict:
    """asdict(cfg) as it reads back from JSON (tuples become lists), plus the datp version."""
    return json.loads(json.dumps({**asdict(cfg), "datp_version": datp.__version__}))


def _is_complete(out_dir: Path, cfg: SynthConfig) -> bool:
    names = ["manifest.csv", "classes.txt", "train.txt", "test.txt", "events.json"]
    names += ["ground_truth.json"] if cfg.untrimmed else []
    if not all((out_dir / name).is_file() for name in names):
        return False
    with (out_dir / "manifest.csv").open(newline="") as f:
        return all((out_dir / row["path"]).is_file() for row in csv.DictReader(f))


def _write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8", newline="\n")
