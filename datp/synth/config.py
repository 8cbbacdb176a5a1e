"""The synthetic benchmark's classes, constants and settings (`SynthConfig`); see `datp.synth`."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

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
