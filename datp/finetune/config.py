"""`FinetuneConfig`: every setting of one `datp finetune` run, one field per CLI option.

Defaults follow TSN's published recipe (Wang et al. 2016, tsn-pytorch's README): 3 segments, SGD
with momentum 0.9, lr 0.001 divided by 10 at epochs 30 and 60 of 80, weight decay 5e-4, dropout 0.8
before the classifier, gradient norm clipped at 20, all BatchNorm layers but the first frozen.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass

from datp.io.options import parse_numbers

STREAMS = ("rgb", "flow")
SCHEDULES = ("step", "cosine")
BN_FREEZE = ("none", "partial", "all")
# Fields that may change when a run is resumed: they do not change what is computed (`epochs`
# only extends or shortens the run; with the cosine schedule it also stretches the remaining decay).
RESUMABLE_CHANGES = ("epochs", "resume", "workers", "device")


@dataclass(frozen=True)
class FinetuneConfig:
    """Settings of one finetune run; saved as `config.json` in the run folder and in checkpoints.

    Attributes:
        sources: the dataset (as in extract-flow: list files, split folders, a manifest...).
        out: the run folder (config.json, resume.pt, last.pt, best.pt, metrics.json).
        stream: "rgb" (one frame per segment) or "flow" (`new_length` stacked flow pairs).
        head: a name of `datp.pool.heads.HEADS`; "avg" is TSN.
        head_options: "KEY=VALUE" strings passed to the head's constructor (values parsed as JSON,
            else kept as strings), e.g. ("input=softmax", "num_gaussians=3").
        backbone: torchvision ResNet name.
        weights: "random" (seeded), a torchvision state_dict (ImageNet) or a datp checkpoint.
        num_segments: N segments per video (TSN trains with 3).
        new_length: flow pairs per segment (L); flow stream only.
        flows: flow store (.h5) or jpg folder from `datp extract-flow`; None with the flow
            stream computes the flow of the sampled pairs while training (never written).
        flow_algorithm, flow_backend, flow_preset, flow_bound, flow_short_side, flow_size: that
            on-the-fly flow, as extract-features': "opencv" computes it in the decoding workers,
            "torch" (TV-L1, `datp.flows.tvl1_torch`) in the training process on its device, the
            pairs of a batch as one batch (the GPU path); decoded at `flow_short_side` (0: the
            source size) or `flow_size` (W, H), quantized at `flow_bound` like stored flow.
        root, split: as in extract-flow (video folder of list files; official split number).
        train_split, test_split: the record splits to train on and to report at the end.
        val_fraction: share of the training videos held out (seeded, stratified by class:
            `datp.io.splits.carve_validation`, the rule train-head uses) to pick the best epoch,
            unless the dataset has records of split "val" (those are used instead).
        short_side: RGB decode size (short side), resize: short side before cropping,
            input_size: crop size S.
        multi_scale: TSN's multi-scale crop (else a plain random crop).
        epochs, batch_size: epochs; videos per process per step (global batch = batch_size *
            world size).
        lr, lr_schedule, lr_steps, lr_gamma: SGD learning rate, "step" (times lr_gamma at each
            epoch of lr_steps) or "cosine" (to 0 at `epochs`).
        momentum, weight_decay: SGD's (no weight decay on biases and BatchNorm).
        dropout: before the backbone's classifier.
        bn_freeze: "partial" (TSN: every BatchNorm but the first in eval mode, affine frozen),
            "all" or "none".
        conv1_lr_mult: learning-rate multiplier of conv1 (TSN's flow nets use a larger one).
        head_lr_mult: learning-rate multiplier of the head's parameters.
        clip_grad: max gradient L2 norm; 0 or None: no clipping.
        amp: bf16 autocast on GPU (ignored on CPU).
        channels_last: channels_last memory format on GPU (ignored on CPU).
        workers: DataLoader worker processes (spawned) per process for decoding.
        device: "auto" (cuda when available; each torchrun process takes cuda:LOCAL_RANK), "cpu",
            "cuda".
        seed: seed of the initialisation, the validation split, sampling, augmentation, dropout.
        resume: continue the run in `out` from its last finished epoch.
        list_format: how list files are read, as in extract-features ("auto", "video", "rawframes",
            "rawframes-offset": mmaction2's lists with an offset column; `datp.io.rawframes`).
    """

    sources: tuple[str, ...]
    out: str
    stream: str = "rgb"
    head: str = "avg"
    head_options: tuple[str, ...] = ()
    backbone: str = "resnet34"
    weights: str = "random"
    num_segments: int = 3
    new_length: int = 5
    flows: str | None = None
    flow_algorithm: str = "tvl1"
    flow_backend: str = "opencv"
    flow_preset: str | None = None
    flow_bound: float = 20.0
    flow_short_side: int = 256
    flow_size: tuple[int, int] | None = None
    root: str | None = None
    split: int = 1
    list_format: str = "auto"
    train_split: str = "train"
    test_split: str = "test"
    val_fraction: float = 0.2
    short_side: int = 256
    resize: int = 256
    input_size: int = 224
    multi_scale: bool = True
    epochs: int = 80
    batch_size: int = 8
    lr: float = 0.001
    lr_schedule: str = "step"
    lr_steps: tuple[int, ...] = (30, 60)
    lr_gamma: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    dropout: float = 0.8
    bn_freeze: str = "partial"
    conv1_lr_mult: float = 1.0
    head_lr_mult: float = 1.0
    clip_grad: float | None = 20.0
    amp: bool = True
    channels_last: bool = True
    workers: int = 4
    device: str = "auto"
    seed: int = 0
    resume: bool = False

    def __post_init__(self):
        for name, value, choices in (("stream", self.stream, STREAMS), ("lr_schedule", self.lr_schedule, SCHEDULES),
                                     ("bn_freeze", self.bn_freeze, BN_FREEZE)):
            if value not in choices:
                raise ValueError(f"{name} {value!r} is not one of {list(choices)}")
        if not self.sources:
            raise ValueError("no SOURCE given; pass the dataset (a list file, split folder or manifest)")
        if self.stream == "flow" and not self.flows:
            from datp.flows.compute import FlowComputer

            FlowComputer(algorithm=self.flow_algorithm, preset=self.flow_preset,
                         backend=self.flow_backend)  # names checked now, not after the data is loaded
            if self.flow_bound <= 0 or self.flow_short_side < 0:
                raise ValueError(f"flow_bound {self.flow_bound} must be > 0 and flow_short_side "
                                 f"{self.flow_short_side} >= 0 (0 keeps the source size)")
            if self.flow_size is not None and (len(self.flow_size) != 2 or min(self.flow_size) < 1):
                raise ValueError(f"flow_size {self.flow_size} must be W x H, both >= 1")
        for name in ("num_segments", "new_length", "epochs", "batch_size", "input_size", "resize"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} {getattr(self, name)} must be >= 1")
        if self.resize < self.input_size:
            raise ValueError(f"resize {self.resize} must be >= input_size {self.input_size} (the crop)")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"val_fraction {self.val_fraction} must be in [0, 1)")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout {self.dropout} must be in [0, 1)")
        if self.lr <= 0:
            raise ValueError(f"lr {self.lr} must be > 0")
        if self.clip_grad is not None and self.clip_grad < 0:
            raise ValueError(f"clip_grad {self.clip_grad} must be > 0 (0 or None: no clipping)")
        if self.workers < 0:
            raise ValueError(f"workers {self.workers} must be >= 0")
        if list(self.lr_steps) != sorted(self.lr_steps):
            raise ValueError(f"lr_steps {list(self.lr_steps)} must be increasing epochs")
        self.head_kwargs()  # malformed options fail now, not after the data is loaded

    def head_kwargs(self) -> dict:
        """`head_options` as constructor keyword arguments (JSON values, else strings)."""
        kwargs = {}
        for option in self.head_options:
            key, sep, text = option.partition("=")
            if not sep or not key.strip():
                raise ValueError(f"head option {option!r} must be KEY=VALUE, e.g. num_gaussians=3")
            try:
                kwargs[key.strip()] = json.loads(text)
            except json.JSONDecodeError:
                kwargs[key.strip()] = text
        return kwargs

    def plain(self) -> dict:
        """`asdict(self)` with tuples as lists: JSON- and `weights_only`-safe."""
        return json.loads(json.dumps(asdict(self)))


def parse_ints(text: str) -> tuple[int, ...]:
    """"30,60" -> (30, 60) (for --lr-steps); "" -> (). See `datp.io.options.parse_numbers`."""
    return parse_numbers(text, kind=int, what="--lr-steps")


def lr_factor(epoch: int, cfg: FinetuneConfig) -> float:
    """Multiplier of the base learning rate during `epoch` (0-based), a pure function of the epoch.

    step: `lr_gamma ** (number of lr_steps <= epoch)`; cosine: `(1 + cos(pi * epoch / epochs)) / 2`
    (1 in the first epoch, 0 only after the last).
    """
    if cfg.lr_schedule == "step":
        return cfg.lr_gamma ** sum(epoch >= step for step in cfg.lr_steps)
    return 0.5 * (1.0 + math.cos(math.pi * epoch / cfg.epochs))
