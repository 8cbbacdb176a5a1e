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

from datp.synth.config import ACTIVITYNET_SUBSETS, CLASSES, SPLITS, SynthConfig
from datp.synth.render import render_video
from datp.synth.write import generate, write_video

__all__ = ["ACTIVITYNET_SUBSETS", "CLASSES", "SPLITS", "SynthConfig", "generate", "render_video",
           "write_video"]
