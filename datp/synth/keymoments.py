"""Key-moment feature stores: synthetic conv features whose class shows in a few adjacent segments.

Unlike `datp.synth` (which renders videos for the whole pipeline), this writes a feature store
directly, so pooling heads can be compared on many constructions in seconds. Each video has a label
y; `key_length` adjacent segments (the key moment) show class y's content and, optionally, a
class-agnostic cue; the other segments show a distractor (one confusing class per video, a random
other class per segment, or nothing) at `distractor_strength` times the key's strength. With a
confuser stronger than the key, averaging over segments points to the confuser; a head has to find
the key moment to be right.

Features of one segment (Cf channels, map_size x map_size):

    conv = class_strength * P[content] * s + cue_strength * Q * [key] + noise * N(0, 1)

where P[c] = 0.5 * (m_c (per channel, constant over the map) + z_c (a spatial pattern)), m_c and
z_c standard normal; s is 1 on key segments and `distractor_strength` elsewhere; Q is a fixed
pattern on `cue_channels` channels (1 + 0.5 N(0, 1), the same for every class). The stored logits
are a fixed random linear map of the spatially pooled features to `logit_classes` unrelated classes
(as a backbone trained on other classes gives), so `train-head` trains a linear segment classifier
(`logits_match_labels` False); `logits="labels"` stores logits over the dataset's classes instead.

Everything follows from the config (numpy `default_rng(seed)`); the store's "settings" attribute holds
the config and "key_segments" the key segments of every video (JSON {video id: [segment indices]}).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from datp.extract.store import VideoFeatures, VideoRow, base_attrs, write_features

DISTRACTORS = ("confuser", "random", "none")
KEY_POSITIONS = ("random", "fixed")
LOGITS = ("random", "labels")


@dataclass(frozen=True)
class KeyMomentConfig:
    """How to build a key-moment store.

    Attributes:
        num_classes: classes of the dataset (>= 2).
        num_segments: N segments per video.
        key_length: (min, max) adjacent key segments, drawn uniformly per video (1 <= min <= max <= N).
        key_position: "random" (the key starts anywhere it fits) or "fixed" (always centred).
        distractor: what non-key segments show: "confuser" (one other class per video),
            "random" (a random other class per segment) or "none" (noise only).
        distractor_strength: strength of the distractor content relative to the key's.
        cue_strength: strength of the class-agnostic cue on key segments (0: key segments differ from
            the others only by their class content).
        cue_channels: channels that carry the cue.
        class_strength: strength of the class content.
        noise: standard deviation of the per-element Gaussian noise.
        channels: Cf.
        map_size: H = W of the conv maps (4 as a ResNet at 112 px, 7 at 224 px).
        n_train, n_test: videos per split.
        streams: streams to write; with two, only "flow" carries the cue (rgb shows the content).
        logits: "random" (over `logit_classes` unrelated classes) or "labels" (over the dataset's classes).
        logit_classes: classes of the random logits.
        seed: seeds everything.
    """

    num_classes: int = 6
    num_segments: int = 10
    key_length: tuple[int, int] = (1, 2)
    key_position: str = "random"
    distractor: str = "confuser"
    distractor_strength: float = 1.3
    cue_strength: float = 1.0
    cue_channels: int = 4
    class_strength: float = 1.0
    noise: float = 1.0
    channels: int = 64
    map_size: int = 7
    n_train: int = 720
    n_test: int = 180
    streams: tuple[str, ...] = ("flow",)
    logits: str = "random"
    logit_classes: int = 10
    seed: int = 0

    def __post_init__(self):
        lo, hi = self.key_length
        if not 1 <= lo <= hi <= self.num_segments:
            raise ValueError(f"key_length {self.key_length} must satisfy 1 <= min <= max <= num_segments")
        for name, value, choices in (("key_position", self.key_position, KEY_POSITIONS),
                                     ("distractor", self.distractor, DISTRACTORS), ("logits", self.logits, LOGITS)):
            if value not in choices:
                raise ValueError(f"{name} {value!r} is not one of {list(choices)}")
        if self.num_classes < 2 or self.channels < self.cue_channels or self.map_size < 1:
            raise ValueError("need num_classes >= 2, channels >= cue_channels and map_size >= 1")
        if not set(self.streams) <= {"rgb", "flow"} or not self.streams:
            raise ValueError(f"streams {self.streams} must be a non-empty subset of ('rgb', 'flow')")


@dataclass(frozen=True)
class KeyMomentVideos:
    """What `generate` made, in memory.

    Attributes:
        ids: (V,) video ids; labels (V,); splits (V,) "train" | "test".
        key: (V, N) bool, True on key segments.
        content: (V, N) class each segment shows (-1: nothing).
        conv: {stream: (V, N, Cf, H, W) float16}; logits: {stream: (V, N, L) float32}.
    """

    ids: list[str]
    labels: np.ndarray
    splits: list[str]
    key: np.ndarray
    content: np.ndarray
    conv: dict[str, np.ndarray]
    logits: dict[str, np.ndarray]


def _key_starts(cfg: KeyMomentConfig, lengths: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    if cfg.key_position == "fixed":
        return (cfg.num_segments - lengths) // 2
    return np.array([rng.integers(0, cfg.num_segments - n + 1) for n in lengths])


def generate(cfg: KeyMomentConfig) -> KeyMomentVideos:
    """Draws every video of `cfg` (deterministic in `cfg`)."""
    rng = np.random.default_rng(cfg.seed)
    C, N, Cf, S = cfg.num_classes, cfg.num_segments, cfg.channels, cfg.map_size
    protos = 0.5 * (rng.standard_normal((C, Cf, 1, 1)) + rng.standard_normal((C, Cf, S, S)))
    cue = np.zeros((Cf, S, S))
    cue[rng.choice(Cf, cfg.cue_channels, replace=False)] = 1.0 + 0.5 * rng.standard_normal((cfg.cue_channels, S, S))
    logit_classes = C if cfg.logits == "labels" else cfg.logit_classes
    readout = rng.standard_normal((Cf, logit_classes)) / np.sqrt(Cf)
    V = cfg.n_train + cfg.n_test
    labels = rng.integers(0, C, V)
    lengths = rng.integers(cfg.key_length[0], cfg.key_length[1] + 1, V)
    starts = _key_starts(cfg, lengths, rng)
    key = (np.arange(N)[None] >= starts[:, None]) & (np.arange(N)[None] < (starts + lengths)[:, None])
    other = (labels[:, None] + rng.integers(1, C, (V, N))) % C  # a class other than the label, per segment
    if cfg.distractor == "confuser":
        other = np.repeat(other[:, :1], N, axis=1)
    elif cfg.distractor == "none":
        other = np.full((V, N), -1)
    content = np.where(key, labels[:, None], other)
    strength = np.where(key, 1.0, cfg.distractor_strength) * cfg.class_strength * (content >= 0)
    conv, logits = {}, {}
    for stream in cfg.streams:
        signal = strength[..., None, None, None] * protos[np.maximum(content, 0)]  # (V, N, Cf, S, S)
        if stream == "flow" or len(cfg.streams) == 1:
            signal = signal + cfg.cue_strength * key[..., None, None, None] * cue
        x = (signal + cfg.noise * rng.standard_normal(signal.shape)).astype(np.float16)
        conv[stream] = x
        if cfg.logits == "labels":
            # A backbone trained on the dataset's classes: it recognises what each segment shows.
            onehot = np.eye(C)[np.maximum(content, 0)] * (content >= 0)[..., None]
            logits[stream] = (3.0 * onehot + rng.standard_normal((V, N, C))).astype(np.float32)
        else:
            logits[stream] = (x.astype(np.float64).mean(axis=(-2, -1)) @ readout).astype(np.float32)
    splits = ["train"] * cfg.n_train + ["test"] * cfg.n_test
    ids = [f"{split}/{i:05d}" for i, split in enumerate(splits)]
    return KeyMomentVideos(ids, labels, splits, key, content, conv, logits)


def write_store(cfg: KeyMomentConfig, out: str | Path) -> KeyMomentVideos:
    """Generates the videos of `cfg` and writes them as a fixed-layout feature store at `out`.

    Returns:
        The generated videos (what the store holds, with the key segments and contents).
    """
    videos = generate(cfg)
    N = cfg.num_segments
    t = (np.arange(N) + 0.5) / N
    rows, feats = [], {}
    for i, vid in enumerate(videos.ids):
        rows.append(VideoRow(vid, int(videos.labels[i]), videos.splits[i], 10 * N, 25.0))
        feats[vid] = VideoFeatures(t=t, frame=np.arange(N) * 10, num_frames=10 * N, fps=25.0,
                                   streams={s: (videos.conv[s][i], videos.logits[s][i]) for s in cfg.streams})
    key_segments = {vid: np.flatnonzero(videos.key[i]).tolist() for i, vid in enumerate(videos.ids)}
    attrs = base_attrs(layout="fixed", class_names=[f"class{c}" for c in range(cfg.num_classes)],
                       new_length={s: 1 for s in cfg.streams}, settings={"keymoments": asdict(cfg)},
                       num_segments=N, backbone="keymoments", weights="random",
                       logits_match_labels=cfg.logits == "labels", key_segments=json.dumps(key_segments))
    write_features(Path(out), rows, feats, attrs)
    return videos
