"""`HeadConfig`: the settings of one `datp train-head` run, checked when built, and what follows
from them (`head_options`: the head's constructor arguments; `needs_conv`: whether it reads conv maps).

The CLI's options map one to one onto `HeadConfig`'s fields and take their defaults from it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path

from datp.pool.heads import HEADS
from datp.pool.heads.attention import ATTENTIONS
from datp.pool.heads.datp import (
    DATP_INPUTS,
    GENERATORS,
    LOCATES,
    POOLED_SCORES,
    default_min_sigma,
)

STREAM_CHOICES = ("rgb", "flow", "both")


SCORE_SOURCE_CHOICES = ("auto", "cached", "linear")
# "ce": softmax cross-entropy on the video label; "bce": a sigmoid per class against the video's
# multi-hot labels (multi-label videos, as STPN and W-TALC's successors train on THUMOS14).
LOSSES = ("ce", "bce")


# Options that only some heads read: a non-default value for another head is a user error.
OPTION_HEADS = {
    "score_source": ("avg", "max", "datp"),
    "datp_input": ("datp",), "gaussians": ("datp",), "generator": ("datp",), "pooled_scores": ("datp",),
    "min_sigma": ("datp",), "aux_lr_scale": ("datp",), "aux_max_lr": ("datp",), "locate": ("datp",),
    "aux_center": ("datp",), "aux_warmup": ("datp",),
    "hidden": ("lstm-attn",),
    "attn_hidden": ("self-attn", "joint-attn"),
    "attention": ("self-attn",), "alpha": ("self-attn",), "beta": ("self-attn",),
    # joint-attn is left out: its two-stream attention has only been trained with one label per video here.
    "loss": ("avg", "max", "datp", "lstm-attn", "self-attn"),
}


@dataclass(frozen=True)
class HeadConfig:
    """Settings of one `datp train-head` run; one field per CLI option, saved in config.json.

    Attributes:
        features: the feature store (HDF5) from `datp extract-features`.
        out: the run folder RUN_DIR.
        head: a name of `datp.pool.heads.HEADS`.
        stream: "rgb", "flow", or "both" (joint-attn only; other heads train one run per stream,
            fused with `datp evaluate`).
        epochs, batch_size: training epochs; videos per step.
        lr, weight_decay: Adam's (DATP's auxiliary net steps at lr x `aux_lr_scale`).
        seed: seed of the initialisation, the validation split, the epoch order and dropout.
        val_fraction: share of the train videos held out to pick the epoch (0: keep the last).
        score_source: per-segment class scores of avg/max/datp: "cached" (the store's logits, frozen),
            "linear" (a trainable classifier on pooled conv features) or "auto" ("cached" only when
            the store says its logits are over the dataset's classes, `logits_match_labels`).
        datp_input: what DATP's auxiliary net reads: "conv" maps or "softmax" of the segment scores.
        gaussians: K Gaussians of DATP's "mog" generator.
        generator: DATP's weights generator, "mog" or "discrete".
        pooled_scores: what DATP pools: segment "logits" (default) or "probs".
        min_sigma, aux_lr_scale, aux_max_lr: DATP's lower bound of sigma (None: half the segment
            spacing, 0.5 / N), its auxiliary net's learning rate relative to `lr`, and a cap on that
            rate (0: none). With `locate` and `aux_center`, the defaults (0.5 / N, 0.3, none) are the
            setting that learnt on both the key-moment stores and the demo's store (docs/fidelity.md);
            the paper as first implemented here was locate "fc", min_sigma 0.01, aux_lr_scale 0.1,
            aux_center off.
        locate: how DATP's auxiliary net places the Gaussians: "soft-argmax" (default: mu_k is the
            expected segment time under per-segment scores of a 1x1 conv shared by all segments) or
            "fc" (mu regressed by the fc layers from the flattened sequence, with rho and sigma).
        aux_center: DATP's auxiliary net subtracts each video's mean segment features before its
            temporal convs, so it sees how a segment differs from the rest (default; off: as first
            implemented).
        aux_warmup: share of the epochs over which DATP's auxiliary net's rate rises linearly to
            lr x aux_lr_scale (0.3 by default; 0: the full rate from the first step, as first implemented).
        hidden: LSTM cells per layer (lstm-attn).
        attn_hidden: width of the attention MLP (self-attn, joint-attn).
        attention: self-attn's "softmax" or "sigmoid" attention.
        alpha, beta: self-attn's smoothness and sparsity weights (TSRNet's regulariser).
        dropout: dropout before the classifier(s).
        loss: "ce" (softmax cross-entropy on `videos/label`) or "bce" (per-class sigmoid binary
            cross-entropy on the store's multi-hot labels, `FeatureStore.multi_hot`; avg, max, datp on
            pooled logits, lstm-attn, self-attn). With "bce" localize reads sigmoid class scores.
        standardize: standardise each conv channel with its mean and std over the training videos'
            real segments before the head (`ChannelNorm`; saved in the checkpoint and applied to every
            later input). Off: the features as stored.
        device: "auto" (cuda when available), "cpu", "cuda" or "cuda:K".
        max_ram_gb: load the needed arrays into RAM when they need at most this many GiB, else
            stream batches from the store (0: always stream).
        transfer_from: a feature store of trimmed videos (its split "train") for TSRNet's knowledge
            transfer; None: no transfer.
        mmd_weight: weight of the transfer term `MMD^2(T, U) + MMD^2(fc1(T), fc1(U))` in the loss
            (> 0 exactly when `transfer_from` is given; see docs/detection.md).
    """

    features: str
    out: str
    head: str = "datp"
    stream: str = "rgb"
    epochs: int = 30
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.0
    seed: int = 0
    val_fraction: float = 0.2
    score_source: str = "auto"
    datp_input: str = "conv"
    gaussians: int = 2
    generator: str = "mog"
    pooled_scores: str = "logits"
    min_sigma: float | None = None
    aux_lr_scale: float = 0.3
    aux_max_lr: float = 0.0
    locate: str = "soft-argmax"
    aux_center: bool = True
    aux_warmup: float = 0.3
    hidden: int = 512
    attn_hidden: int = 128
    attention: str = "softmax"
    alpha: float = 0.0
    beta: float = 0.0
    dropout: float = 0.0
    loss: str = "ce"
    standardize: bool = True
    device: str = "auto"
    max_ram_gb: float = 8.0
    transfer_from: str | None = None
    mmd_weight: float = 0.0

    def __post_init__(self):
        if self.head not in HEADS:
            raise ValueError(f"unknown head {self.head!r}; choose from {sorted(HEADS)}")
        for name, value, choices in (("stream", self.stream, STREAM_CHOICES),
                                     ("score_source", self.score_source, SCORE_SOURCE_CHOICES),
                                     ("datp_input", self.datp_input, DATP_INPUTS),
                                     ("generator", self.generator, GENERATORS),
                                     ("pooled_scores", self.pooled_scores, POOLED_SCORES),
                                     ("locate", self.locate, LOCATES),
                                     ("attention", self.attention, ATTENTIONS),
                                     ("loss", self.loss, LOSSES)):
            if value not in choices:
                raise ValueError(f"--{_flag(name)} {value!r} is not one of {list(choices)}")
        if self.stream == "both" and self.head != "joint-attn":
            raise ValueError(f"--stream both is for the joint-attn head only; train one {self.head} run with "
                             "--stream rgb and one with --stream flow, then fuse them with datp evaluate")
        if self.head == "joint-attn" and self.stream != "both":
            raise ValueError(f"joint-attn pools rgb and flow together; use --stream both, not {self.stream!r}")
        for name in ("epochs", "batch_size", "gaussians", "hidden", "attn_hidden"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{_flag(name)} {getattr(self, name)} must be >= 1")
        for name in ("lr",):
            if not getattr(self, name) > 0:
                raise ValueError(f"--{_flag(name)} {getattr(self, name)} must be > 0")
        if (self.min_sigma is not None and not self.min_sigma > 0) or not self.aux_lr_scale > 0:
            raise ValueError(f"--min-sigma {self.min_sigma} and --aux-lr-scale {self.aux_lr_scale} must be > 0")
        if not 0 <= self.aux_warmup <= 1:
            raise ValueError(f"--aux-warmup {self.aux_warmup} is a share of the epochs: give a value in [0, 1]")
        for name in ("weight_decay", "alpha", "beta", "max_ram_gb", "mmd_weight", "aux_max_lr"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{_flag(name)} {getattr(self, name)} must be >= 0")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"--val-fraction {self.val_fraction} must be in [0, 1)")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"--dropout {self.dropout} must be in [0, 1)")
        if self.transfer_from is not None and not self.mmd_weight > 0:
            raise ValueError(f"--transfer-from {self.transfer_from} needs --mmd-weight > 0 (got {self.mmd_weight:g}); "
                             "pass the weight of the transfer loss, e.g. --mmd-weight 1")
        if self.mmd_weight > 0 and self.transfer_from is None:
            raise ValueError(f"--mmd-weight {self.mmd_weight:g} needs --transfer-from TRIMMED.h5 (the trimmed videos' "
                             "feature store); pass it, or drop --mmd-weight")
        if self.loss == "bce" and self.head == "datp" and self.pooled_scores != "logits":
            raise ValueError("--loss bce puts a sigmoid on the pooled logits; DATP with --pooled-scores probs pools "
                             "probabilities: use --pooled-scores logits")
        defaults = {f.name: f.default for f in fields(self)}
        for name, heads in OPTION_HEADS.items():
            if getattr(self, name) != defaults[name] and self.head not in heads:
                raise ValueError(f"--{_flag(name)} applies to {', '.join(heads)} only, not to {self.head}; "
                                 "drop it")


def _flag(name: str) -> str:
    return name.replace("_", "-")


def needs_conv(head: str, score_source: str, datp_input: str) -> bool:
    """Whether the head reads conv maps (everything but avg/max/softmax-datp on cached scores)."""
    if not HEADS[head].uses_scores:
        return True
    return score_source == "linear" or (head == "datp" and datp_input == "conv")


def head_options(cfg: HeadConfig, *, score_source: str, num_classes: int, num_segments: int,
                 in_channels, map_size: int | None = None) -> dict:
    """Every constructor keyword argument of the head `cfg.head` (what the checkpoint stores)."""
    opts = {"num_classes": num_classes, "num_segments": num_segments, "in_channels": in_channels,
            "dropout": cfg.dropout}
    if HEADS[cfg.head].uses_scores:
        opts["score_source"] = score_source
    if cfg.head == "datp":
        opts |= {"input": cfg.datp_input, "generator": cfg.generator, "num_gaussians": cfg.gaussians,
                 "pooled_scores": cfg.pooled_scores,
                 "min_sigma": default_min_sigma(num_segments) if cfg.min_sigma is None else cfg.min_sigma,
                 "aux_lr_scale": cfg.aux_lr_scale,
                 "aux_max_lr": cfg.aux_max_lr or None, "locate": cfg.locate,
                 "aux_center": cfg.aux_center, "aux_warmup": cfg.aux_warmup}  # recorded, so a checkpoint rebuilds exactly
        if map_size is not None:
            opts["map_size"] = map_size
    elif cfg.head == "lstm-attn":
        opts["hidden"] = cfg.hidden
    elif cfg.head == "self-attn":
        opts |= {"attn_hidden": cfg.attn_hidden, "attention": cfg.attention}
    elif cfg.head == "joint-attn":
        opts |= {"attn_hidden": cfg.attn_hidden, "streams": ["rgb", "flow"]}
    return opts


def study_configs(features: str, out: str, *, heads: Sequence[str], streams: Sequence[str], **options) -> list[HeadConfig]:
    """The `HeadConfig`s of `datp train-head --head a,b --stream rgb,flow`: one per head and stream.

    One head and one stream: one config writing `out` itself. Otherwise each writes `out/<head>-<stream>`;
    joint-attn trains once, on "both"; an option a head does not read (`OPTION_HEADS`) keeps its default
    for that head, so `--gaussians 1` reaches datp alone.

    Raises:
        ValueError: an unknown head or stream, or a head without a stream to train on.
    """
    heads = [h.strip() for h in heads if h.strip()]
    streams = [s.strip() for s in streams if s.strip()]
    for name in heads:
        if name not in HEADS:
            raise ValueError(f"unknown head {name!r}; choose from {sorted(HEADS)}")
    for stream in streams:
        if stream not in STREAM_CHOICES:
            raise ValueError(f"--stream {stream!r} is not one of {list(STREAM_CHOICES)}")
    if len(heads) == 1 and len(streams) == 1:
        return [HeadConfig(features=features, out=out, head=heads[0], stream=streams[0], **options)]
    defaults = {f.name: f.default for f in fields(HeadConfig)}
    for key, readers in OPTION_HEADS.items():
        if key in options and options[key] != defaults[key] and not set(readers) & set(heads):
            raise ValueError(f"--{_flag(key)} applies to {', '.join(readers)} only, none of which is in --head "
                             f"{','.join(heads)}; drop it")
    cfgs = []
    for name in dict.fromkeys(heads):
        own = {k: (v if k not in OPTION_HEADS or name in OPTION_HEADS[k] else defaults[k]) for k, v in options.items()}
        for stream in ["both"] if name == "joint-attn" else [s for s in dict.fromkeys(streams) if s != "both"]:
            cfgs.append(HeadConfig(features=features, out=str(Path(out) / f"{name}-{stream}"), head=name,
                                   stream=stream, **own))
        if name != "joint-attn" and not any(s != "both" for s in streams):
            raise ValueError(f"--stream both is for joint-attn only; give {name} rgb or flow")
    return cfgs
