"""The `datp` command line: parses options, builds a config, calls the library. No logic here."""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import click

import datp

SOURCE_HELP = ("SOURCE: a video, a folder tree root/<class>/<video>, a list file of "
               "'<path> <label>' lines, a UCF101 split folder (classInd.txt + trainlist0K.txt), "
               "an HMDB51 split folder (<class>_test_splitK.txt) or a datp manifest.csv; several "
               "may be given.")


def user_errors(fn):
    """Turn user errors into one clear line on stderr and exit code 2 (no traceback)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from datp.flows.store import StoreError
        from datp.io.datasets import DatasetError
        from datp.io.decode import DecodeError

        try:
            return fn(*args, **kwargs)
        except (ValueError, DatasetError, StoreError, DecodeError, FileNotFoundError,
                KeyError) as err:
            message = err.args[0] if isinstance(err, KeyError) and err.args else err
            click.echo(f"datp: error: {message}", err=True)
            sys.exit(2)

    return wrapper


def _size(text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise click.BadParameter(f"{text!r} must be WxH, e.g. 340x256") from None
    return w, h


def _dataset(sources, root, split, skip_missing):
    """Load the dataset; missing videos are an error unless skip_missing records them."""
    from datp.io.datasets import DatasetError, load_dataset

    dataset = load_dataset(list(sources), root=root, split=split)
    missing = dataset.missing()
    if missing and not skip_missing:
        first = missing[0]
        raise DatasetError(f"{first.origin}: video {first.path} not found ({len(missing)} of "
                           f"{len(dataset.records)} missing); check --root, or pass "
                           "--skip-missing to record them as failures")
    return dataset, missing


def _finish(summary, failures_path: Path, what: str) -> None:
    click.echo(f"{what}: {summary.done} done, {summary.skipped} already done, "
               f"{len(summary.failed)} failed in {summary.seconds:.1f}s", err=True)
    if summary.failed:
        click.echo(f"failures (id, path, reason) are listed in {failures_path}", err=True)
    if summary.interrupted:
        click.echo("interrupted: finished videos are kept; run the same command to resume",
                   err=True)
    sys.exit(summary.exit_code)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(datp.__version__, prog_name="datp")
def main():
    """datp: two-stream action recognition with learned temporal pooling.

    Stage one: extract-flow, extract-features. Stage two: train-head, evaluate.
    Stage three: finetune. Every output records the settings that made it.
    """


@main.command("extract-flow", epilog=SOURCE_HELP + " Exit codes: 0 all videos done; "
              "3 some videos failed (listed in OUT.failures.csv); 2 bad input; 130 interrupted.")
@click.argument("sources", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--out", required=True, type=click.Path(path_type=Path),
              help="HDF5 flow store (--format h5) or output folder (--format jpg).")
@click.option("--format", "fmt", type=click.Choice(["h5", "jpg"]), default="h5", show_default=True,
              help="h5: one compressed store; jpg: TSN/denseflow flow_x_00001.jpg folders + lists.")
@click.option("--algorithm", type=click.Choice(["tvl1", "dis", "farneback"]), default="tvl1",
              show_default=True)
@click.option("--preset", default=None, help="Parameter preset of the algorithm (tvl1: tuned "
              "[default: 4x lower end-point error than opencv on Middlebury, 2.4x faster], fast, "
              "opencv [OpenCV's defaults, as TSN/mmaction2 features]; dis: ultrafast, fast, "
              "medium [default]); see docs/flow-presets.md.")
@click.option("--short-side", type=int, default=256, show_default=True,
              help="Resize so the short side has S pixels before flow (0: keep the source size).")
@click.option("--size", default=None, help="Resize to WxH instead (TSN: 340x256).")
@click.option("--bound", type=float, default=20.0, show_default=True,
              help="Clip flow to +-B pixels before quantizing to uint8 (128 = zero).")
@click.option("--rgb", is_flag=True, help="With --format jpg, also write img_00001.jpg frames.")
@click.option("--workers", type=int, default=1, show_default=True,
              help="Worker processes (one OpenCV thread each); use the number of cores.")
@click.option("--shard", default=None, help="Do shard i/n of the dataset (default: torchrun's "
              "RANK/WORLD_SIZE when set); join shard stores with datp merge.")
@click.option("--root", type=click.Path(path_type=Path), default=None,
              help="Folder the videos of list files and split folders are relative to.")
@click.option("--split", type=int, default=1, show_default=True,
              help="Official split number for UCF101/HMDB51 split folders.")
@click.option("--skip-missing", is_flag=True, help="Record missing videos as failures and go on.")
@click.option("--allow-decode-errors", is_flag=True,
              help="Keep videos whose stream has corrupt packets (default: record as failed).")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@user_errors
def extract_flow_cmd(sources, out, fmt, algorithm, preset, short_side, size, bound, rgb, workers,
                     shard, root, split, skip_missing, allow_decode_errors, quiet):
    """Compute optical flow (TV-L1 by default) for every video of SOURCES.

    Resumable: rerunning skips finished videos; a kill at any moment leaves a store that opens.
    One failing video is recorded and the run goes on.
    """
    from datp.flows.extract import FlowConfig, extract_flow, shard_out
    from datp.io.datasets import parse_shard

    cfg = FlowConfig(out=str(out), format=fmt, algorithm=algorithm, preset=preset,
                     short_side=short_side, size=_size(size), bound=bound, rgb=rgb,
                     workers=workers, shard=parse_shard(shard),
                     allow_decode_errors=allow_decode_errors)
    dataset, missing = _dataset(sources, root, split, skip_missing)
    summary = extract_flow(dataset, cfg, progress=not quiet, missing=missing)
    failures = Path(f"{shard_out(cfg.out, cfg.shard, cfg.format)}.failures.csv")
    _finish(summary, failures, "extract-flow")


@main.command("extract-features", epilog=SOURCE_HELP + " Exit codes as extract-flow.")
@click.argument("sources", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Feature store (HDF5).")
@click.option("--backbone", default="resnet34", show_default=True,
              help="Any torchvision ResNet/ResNeXt/wide ResNet name.")
@click.option("--weights", default="random", show_default=True,
              help="A torchvision ImageNet state_dict file, a datp finetune checkpoint, or "
              "'random' (seeded; for tests and demos). Nothing is downloaded.")
@click.option("--flow-weights", default=None, help="Weights for the flow stream (default: --weights).")
@click.option("--streams", default="rgb,flow", show_default=True, help="rgb, flow or rgb,flow.")
@click.option("--segments", type=int, default=10, show_default=True,
              help="Segments per video (TSN test sampling: centres of N equal parts).")
@click.option("--stride", type=int, default=None,
              help="One segment every S frames instead (untrimmed videos; variable N).")
@click.option("--new-length", type=int, default=5, show_default=True,
              help="Flow pairs stacked per segment (2L input channels).")
@click.option("--flows", type=click.Path(exists=True, path_type=Path), default=None,
              help="Flow store or jpg folder from extract-flow; default: compute on the fly only "
              "the pairs the segments read.")
@click.option("--flow-algorithm", type=click.Choice(["tvl1", "dis", "farneback"]), default="tvl1",
              show_default=True, help="On-the-fly flow algorithm.")
@click.option("--flow-preset", default=None, help="On-the-fly flow preset (see extract-flow).")
@click.option("--flow-short-side", type=int, default=256, show_default=True,
              help="On-the-fly flow: resize the short side first (0: source size).")
@click.option("--bound", type=float, default=20.0, show_default=True,
              help="On-the-fly flow quantization bound.")
@click.option("--resize", type=int, default=256, show_default=True,
              help="Short side before cropping.")
@click.option("--input-size", type=int, default=224, show_default=True, help="Crop size.")
@click.option("--ten-crop", is_flag=True, help="Ten-crop test-time augmentation, averaged per "
              "segment.")
@click.option("--batch-size", type=int, default=64, show_default=True,
              help="Images per backbone forward (across videos).")
@click.option("--workers", type=int, default=2, show_default=True,
              help="Decoding/flow worker processes.")
@click.option("--shard", default=None, help="Do shard i/n (default: torchrun's RANK/WORLD_SIZE).")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:K.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of random weights.")
@click.option("--root", type=click.Path(path_type=Path), default=None)
@click.option("--split", type=int, default=1, show_default=True)
@click.option("--skip-missing", is_flag=True, help="Record missing videos as failures and go on.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@user_errors
def extract_features_cmd(sources, out, backbone, weights, flow_weights, streams, segments, stride,
                         new_length, flows, flow_algorithm, flow_preset, flow_short_side, bound,
                         resize, input_size, ten_crop, batch_size, workers, shard, device, seed,
                         root, split, skip_missing, quiet):
    """Dump each segment's last conv map and class scores (RGB and flow) to a feature store.

    Resumable and crash-safe like extract-flow; every setting is recorded in the store.
    """
    from datp.extract.features import FeatureConfig, extract_features, shard_out
    from datp.io.datasets import parse_shard

    cfg = FeatureConfig(
        out=str(out), backbone=backbone, weights=weights, flow_weights=flow_weights,
        streams=tuple(s.strip() for s in streams.split(",") if s.strip()), num_segments=segments,
        stride=stride, new_length=new_length, flows=str(flows) if flows else None,
        flow_algorithm=flow_algorithm, flow_preset=flow_preset, flow_bound=bound,
        flow_short_side=flow_short_side, resize=resize, input_size=input_size,
        num_crops=10 if ten_crop else 1, batch_size=batch_size, workers=workers,
        shard=parse_shard(shard), device=device, seed=seed)
    dataset, missing = _dataset(sources, root, split, skip_missing)
    summary = extract_features(dataset, cfg, progress=not quiet, missing=missing)
    _finish(summary, Path(f"{shard_out(cfg.out, cfg.shard)}.failures.csv"), "extract-features")


@main.command("train-head")
@click.argument("features", type=click.Path(path_type=Path))
@click.option("--head", default="datp", show_default=True,
              help="avg, max, datp, lstm-attn, self-attn or joint-attn.")
@click.option("--stream", type=click.Choice(["rgb", "flow", "both"]), default="rgb",
              show_default=True, help="both: joint-attn only (other heads: one run per stream, "
              "fused by datp evaluate).")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Run folder.")
@click.option("--epochs", type=int, default=30, show_default=True)
@click.option("--batch-size", type=int, default=32, show_default=True, help="Videos per step.")
@click.option("--lr", type=float, default=1e-3, show_default=True, help="Adam learning rate.")
@click.option("--weight-decay", type=float, default=0.0, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--val-fraction", type=float, default=0.2, show_default=True,
              help="Share of the train split held out (stratified) to pick the best epoch; the "
              "test split is never used for choices.")
@click.option("--score-source", type=click.Choice(["auto", "cached", "linear"]), default="auto",
              show_default=True, help="Segment class scores: the store's logits (cached, when the "
              "backbone was trained on these classes) or a trained linear classifier on pooled "
              "conv features; auto picks from the store.")
@click.option("--datp-input", type=click.Choice(["conv", "softmax"]), default="conv",
              show_default=True, help="What DATP's auxiliary ConvNet reads.")
@click.option("--gaussians", type=int, default=2, show_default=True, help="DATP mixture size K.")
@click.option("--generator", type=click.Choice(["mog", "discrete"]), default="mog",
              show_default=True, help="DATP weights: mixture of Gaussians or N discrete weights.")
@click.option("--pooled-scores", type=click.Choice(["logits", "probs"]), default="logits",
              show_default=True, help="What DATP pools per segment.")
@click.option("--hidden", type=int, default=512, show_default=True, help="lstm-attn cells.")
@click.option("--attn-hidden", type=int, default=128, show_default=True,
              help="Attention MLP width (self-attn, joint-attn).")
@click.option("--attention", type=click.Choice(["softmax", "sigmoid"]), default="softmax",
              show_default=True, help="self-attn attention (sigmoid localizes better).")
@click.option("--alpha", type=float, default=0.0, show_default=True,
              help="self-attn smoothness weight.")
@click.option("--beta", type=float, default=0.0, show_default=True,
              help="self-attn sparsity weight (acts with sigmoid attention).")
@click.option("--dropout", type=float, default=0.0, show_default=True)
@click.option("--standardize/--no-standardize", default=True, show_default=True,
              help="Standardise each conv channel with the train videos' mean and std (saved in the "
              "checkpoint); frozen backbones' channels differ in scale by orders of magnitude.")
@click.option("--device", default="auto", show_default=True)
@click.option("--max-ram-gb", type=float, default=8.0, show_default=True,
              help="Load the features into RAM under this size, else stream them from the store.")
@click.option("--transfer-from", type=click.Path(path_type=Path), default=None,
              help="Feature store of trimmed videos (split 'train', same backbone): TSRNet's knowledge "
              "transfer adds --mmd-weight x [MMD^2(T, U) + MMD^2(fc1(T), fc1(U))] between the pooled "
              "segment features of a trimmed (T) and the untrimmed (U) batch, Gaussian kernels with "
              "bandwidths 0.5, 1, 2 x the median distance (docs/detection.md, Knowledge transfer).")
@click.option("--mmd-weight", type=float, default=0.0, show_default=True,
              help="Weight L of the transfer term (> 0 with --transfer-from).")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@user_errors
def train_head_cmd(features, head, stream, out, epochs, batch_size, lr, weight_decay, seed,
                   val_fraction, score_source, datp_input, gaussians, generator, pooled_scores,
                   hidden, attn_hidden, attention, alpha, beta, dropout, standardize, device, max_ram_gb,
                   transfer_from, mmd_weight, quiet):
    """Train a pooling head on a feature store; pick the epoch on validation, evaluate on test.

    Writes config.json, checkpoint.pt, metrics.json, predictions.h5 and weights.csv to --out.
    """
    from datp.pool.config import HeadConfig
    from datp.pool.train import train_head

    cfg = HeadConfig(features=str(features), out=str(out), head=head, stream=stream,
                     epochs=epochs, batch_size=batch_size, lr=lr, weight_decay=weight_decay,
                     seed=seed, val_fraction=val_fraction, score_source=score_source,
                     datp_input=datp_input, gaussians=gaussians, generator=generator,
                     pooled_scores=pooled_scores, hidden=hidden, attn_hidden=attn_hidden,
                     attention=attention, alpha=alpha, beta=beta, dropout=dropout,
                     standardize=standardize, device=device, max_ram_gb=max_ram_gb,
                     transfer_from=str(transfer_from) if transfer_from else None,
                     mmd_weight=mmd_weight)
    train_head(cfg, progress=not quiet)


@main.command("evaluate")
@click.argument("runs", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False,
                                                                  path_type=Path))
@click.option("--weights", default="", help="Fusion weight per run, comma-separated "
              "(default by stream: rgb 1, flow 1.5).")
@click.option("--on", type=click.Choice(["softmax", "logits"]), default="softmax", show_default=True,
              help="Fuse softmax probabilities (heads' logits have different scales) or raw logits.")
@click.option("--schemes", is_flag=True, help="DATP's testing schemes on the first run: as trained, "
              "P1 (random Gaussians), P2 (its segment classifier, average pooling); P3 with --avg-run.")
@click.option("--avg-run", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="A run of the avg head on the same store and stream (scheme P3).")
@click.option("--features", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Store for the schemes (default: the one the run was trained on).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of P1's random Gaussians.")
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="Folder for evaluation.json and the PNGs.")
@click.option("--plot-videos", type=int, default=0, show_default=True,
              help="Figure 3 (segment scores and weights) for this many test videos of the first run.")
@click.option("--videos", default="", help="Figure 3 for these comma-separated video ids instead.")
@click.option("--events", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Ground-truth events to shade in Figure 3 (datp synth's events.json).")
@click.option("--compare", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="Figure 4: per-class accuracy changes from this run to the first run.")
@click.option("--device", default="cpu", show_default=True, help="For the schemes.")
@user_errors
def evaluate_cmd(runs, weights, on, schemes, avg_run, features, seed, out, plot_videos, videos, events,
                 compare, device):
    """Score train-head runs on their test split: fuse several (e.g. rgb + flow), run DATP's
    testing schemes, draw Figures 3 and 4.
    """
    from datp.pool.evaluate import EvaluateConfig, evaluate, format_report, parse_floats

    cfg = EvaluateConfig(
        runs=tuple(str(r) for r in runs), weights=parse_floats(weights), on=on, schemes=schemes,
        avg_run=str(avg_run) if avg_run else None, features=str(features) if features else None,
        seed=seed, out=str(out) if out else None, plot_videos=plot_videos,
        videos=tuple(v.strip() for v in videos.split(",") if v.strip()),
        events=str(events) if events else None, compare=str(compare) if compare else None,
        device=device)
    click.echo(format_report(evaluate(cfg)))


@main.command("finetune", epilog=SOURCE_HELP + " Several processes or machines: torchrun "
              "--nproc-per-node K -m datp finetune ... (docs/finetune.md).")
@click.argument("sources", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--out", required=True, type=click.Path(path_type=Path),
              help="Run folder: config.json, last.pt, best.pt, resume.pt, metrics.json.")
@click.option("--stream", type=click.Choice(["rgb", "flow"]), default="rgb", show_default=True)
@click.option("--head", default="avg", show_default=True,
              help="Pooling head: avg (TSN), max, datp, lstm-attn, self-attn, joint-attn.")
@click.option("--head-option", "head_options", multiple=True, metavar="KEY=VALUE",
              help="Head constructor option, repeatable (JSON values), e.g. input=softmax.")
@click.option("--backbone", default="resnet34", show_default=True,
              help="Any torchvision ResNet/ResNeXt/wide ResNet name.")
@click.option("--weights", default="random", show_default=True,
              help="A torchvision ImageNet state_dict file, a datp checkpoint, or 'random' (seeded).")
@click.option("--segments", type=int, default=3, show_default=True, help="Segments per video (TSN).")
@click.option("--new-length", type=int, default=5, show_default=True,
              help="Flow pairs stacked per segment.")
@click.option("--flows", type=click.Path(exists=True, path_type=Path), default=None,
              help="Flow store or jpg folder from extract-flow (needed for --stream flow).")
@click.option("--root", type=click.Path(path_type=Path), default=None)
@click.option("--split", type=int, default=1, show_default=True)
@click.option("--train-split", default="train", show_default=True, help="Records to train on.")
@click.option("--test-split", default="test", show_default=True,
              help="Records evaluated with the best checkpoint at the end (never used for choices).")
@click.option("--val-fraction", type=float, default=0.1, show_default=True,
              help="Share of each class's training videos held out to pick the best epoch "
              "(unless the dataset has 'val' records).")
@click.option("--short-side", type=int, default=256, show_default=True, help="RGB decode size.")
@click.option("--resize", type=int, default=256, show_default=True, help="Short side before cropping.")
@click.option("--input-size", type=int, default=224, show_default=True, help="Crop size.")
@click.option("--multi-scale/--no-multi-scale", default=True, show_default=True,
              help="TSN's multi-scale crop (else a plain random crop).")
@click.option("--epochs", type=int, default=80, show_default=True)
@click.option("--batch-size", type=int, default=8, show_default=True, help="Videos per process per step.")
@click.option("--lr", type=float, default=0.001, show_default=True)
@click.option("--lr-schedule", type=click.Choice(["step", "cosine"]), default="step", show_default=True)
@click.option("--lr-steps", default="30,60", show_default=True, help="Epochs where step decay applies.")
@click.option("--lr-gamma", type=float, default=0.1, show_default=True)
@click.option("--momentum", type=float, default=0.9, show_default=True)
@click.option("--weight-decay", type=float, default=5e-4, show_default=True)
@click.option("--dropout", type=float, default=0.8, show_default=True, help="Before the classifier.")
@click.option("--bn-freeze", type=click.Choice(["partial", "all", "none"]), default="partial",
              show_default=True, help="partial: TSN's partial BN (all but the first frozen).")
@click.option("--conv1-lr-mult", type=float, default=1.0, show_default=True,
              help="Learning-rate multiplier of conv1 (TSN's flow nets use a larger one).")
@click.option("--head-lr-mult", type=float, default=1.0, show_default=True)
@click.option("--clip-grad", type=float, default=20.0, show_default=True,
              help="Max gradient norm (0: no clipping).")
@click.option("--amp/--no-amp", default=True, show_default=True, help="bf16 autocast on GPU.")
@click.option("--channels-last/--no-channels-last", default=True, show_default=True,
              help="channels_last memory format on GPU.")
@click.option("--workers", type=int, default=4, show_default=True, help="Decoding workers per process.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--resume", is_flag=True, help="Continue the run in --out from its last epoch.")
@click.option("--quiet", is_flag=True, help="No progress output.")
@user_errors
def finetune_cmd(sources, out, stream, head, head_options, backbone, weights, segments, new_length,
                 flows, root, split, train_split, test_split, val_fraction, short_side, resize,
                 input_size, multi_scale, epochs, batch_size, lr, lr_schedule, lr_steps, lr_gamma,
                 momentum, weight_decay, dropout, bn_freeze, conv1_lr_mult, head_lr_mult, clip_grad,
                 amp, channels_last, workers, device, seed, resume, quiet):
    """Train backbone + pooling head end to end (TSN style).

    The checkpoint (best.pt) goes back to extract-features --weights; its head to train-head.
    """
    from datp.finetune import FinetuneConfig, finetune
    from datp.finetune.config import parse_ints

    cfg = FinetuneConfig(
        sources=tuple(str(s) for s in sources), out=str(out), stream=stream, head=head,
        head_options=tuple(head_options), backbone=backbone, weights=weights, num_segments=segments,
        new_length=new_length, flows=str(flows) if flows else None, root=str(root) if root else None,
        split=split, train_split=train_split, test_split=test_split, val_fraction=val_fraction,
        short_side=short_side, resize=resize, input_size=input_size, multi_scale=multi_scale,
        epochs=epochs, batch_size=batch_size, lr=lr, lr_schedule=lr_schedule,
        lr_steps=parse_ints(lr_steps), lr_gamma=lr_gamma, momentum=momentum,
        weight_decay=weight_decay, dropout=dropout, bn_freeze=bn_freeze,
        conv1_lr_mult=conv1_lr_mult, head_lr_mult=head_lr_mult, clip_grad=clip_grad, amp=amp,
        channels_last=channels_last, workers=workers, device=device, seed=seed, resume=resume)
    finetune(cfg, progress=not quiet)


@main.command("synth")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Output folder.")
@click.option("--classes", type=int, default=6, show_default=True)
@click.option("--train-per-class", type=int, default=16, show_default=True)
@click.option("--test-per-class", type=int, default=8, show_default=True)
@click.option("--size", type=int, default=96, show_default=True, help="Frame side in pixels.")
@click.option("--fps", type=int, default=10, show_default=True)
@click.option("--duration", type=float, default=4.0, show_default=True, help="Seconds per video.")
@click.option("--event-fraction", type=float, default=0.15, show_default=True,
              help="Share of the video the class's key motion lasts.")
@click.option("--distractor-strength", type=float, default=0.5, show_default=True)
@click.option("--confuser-probability", type=float, default=0.8, show_default=True,
              help="Share of the other stretches showing a confusing motion of another class.")
@click.option("--confuser-strength", type=float, default=0.6, show_default=True)
@click.option("--untrimmed", is_flag=True,
              help="Long videos with 1 to --max-events events each and ActivityNet-style ground truth.")
@click.option("--untrimmed-duration", default="20,30", show_default=True,
              help="MIN,MAX seconds of an untrimmed video (drawn per video).")
@click.option("--max-events", type=int, default=3, show_default=True, help="Most events in an untrimmed video.")
@click.option("--seed", type=int, default=0, show_default=True)
@user_errors
def synth_cmd(out, classes, train_per_class, test_per_class, size, fps, duration, event_fraction,
              distractor_strength, confuser_probability, confuser_strength, untrimmed, untrimmed_duration,
              max_events, seed):
    """Generate the synthetic key-moment benchmark: videos, manifest.csv, lists, events.json."""
    from datp.synth import SynthConfig, generate

    cfg = SynthConfig(seed=seed, num_classes=classes, videos_per_class_train=train_per_class,
                      videos_per_class_test=test_per_class, size=size, fps=fps,
                      duration_s=duration, event_fraction=event_fraction,
                      distractor_strength=distractor_strength,
                      confuser_probability=confuser_probability,
                      confuser_strength=confuser_strength, untrimmed=untrimmed,
                      untrimmed_duration_s=_duration_range(untrimmed_duration), max_events=max_events)
    path = generate(cfg, out)
    click.echo(f"wrote {path / 'manifest.csv'}")


def _duration_range(text: str) -> tuple[float, float]:
    try:
        low, high = (float(v) for v in text.split(","))
    except ValueError:
        raise click.BadParameter(f"{text!r}: give MIN,MAX seconds, e.g. 20,30",
                                 param_hint="--untrimmed-duration") from None
    return low, high


@main.command("demo")
@click.option("--out", type=click.Path(path_type=Path), default="datp-demo", show_default=True)
@click.option("--reduced", is_flag=True,
              help="A smaller run (CI): 20 train / 8 test videos per class, avg and datp-mog1 only.")
@click.option("--epochs", type=int, default=None, help="Head training epochs (default 100).")
@click.option("--workers", type=int, default=2, show_default=True)
@click.option("--quiet", is_flag=True, help="No progress bars.")
@user_errors
def demo_cmd(out, reduced, epochs, workers, quiet):
    """Run the whole pipeline on synthetic key-moment videos and compare the heads.

    synth -> extract-flow -> extract-features -> train-head (avg, max, datp x3, lstm-attn,
    self-attn; rgb and flow) -> fusion. Prints a table, writes OUT/results.json and OUT/plots/.
    Rerunning reuses finished stages.
    """
    from dataclasses import replace

    from datp.demo import DemoConfig, reduced as reduce_cfg, run_demo

    cfg = DemoConfig(out=str(out), workers=workers)
    if reduced:
        cfg = reduce_cfg(cfg)
    if epochs is not None:
        cfg = replace(cfg, epochs=epochs)
    run_demo(cfg, progress=not quiet, log=lambda m: click.echo(m, err=m.startswith("==")))


def _floats(text):
    return None if text is None else [float(v) for v in text.split(",") if v.strip()]


@main.command("localize")
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.argument("features", type=click.Path(path_type=Path))
@click.option("--out", required=True, type=click.Path(path_type=Path), help="ActivityNet results JSON to write.")
@click.option("--split", default=None, help="Only this split of the store (default: every done video).")
@click.option("--flow-run", type=click.Path(path_type=Path), default=None,
              help="A flow-stream run on the same store, fused as theta * rgb + (1 - theta) * flow.")
@click.option("--theta", type=float, default=0.5, show_default=True, help="Weight of RUN_DIR in the fusion.")
@click.option("--class-threshold", type=float, default=0.1, show_default=True,
              help="Localize classes whose video probability reaches this (else the top class).")
@click.option("--segment-threshold", default="0.5", show_default=True,
              help="Fraction(s) of each class curve's peak at which it is cut, e.g. 0.5 or 0.3,0.5,0.7.")
@click.option("--nms-iou", type=float, default=0.5, show_default=True, help="Per-class NMS tIoU.")
@click.option("--export", type=click.Path(path_type=Path), default=None,
              help="Also write the attention weights per video (.csv or .json).")
@click.option("--plot", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Folder for one PNG per video: attention over time, ground truth shaded, detections.")
@click.option("--ground-truth", type=click.Path(exists=True, path_type=Path), default=None,
              help="ActivityNet JSON or THUMOS14 annotation folder to shade on the --plot PNGs.")
@click.option("--plot-count", type=int, default=8, show_default=True,
              help="Plot at most this many videos, those with ground truth first.")
@click.option("--device", default="cpu", show_default=True)
@user_errors
def localize_cmd(run_dir, features, out, split, flow_run, theta, class_threshold, segment_threshold, nms_iou,
                 export, plot, ground_truth, plot_count, device):
    """Temporal action detection from a trained attention head: w_i^c = a_i * s_c -> segments."""
    from datp.pool.detect.pipeline import localize_run

    thresholds = _floats(segment_threshold)
    result = localize_run(run_dir, features, out=out, split=split, flow_run=flow_run, theta=theta,
                          class_threshold=class_threshold,
                          segment_threshold=thresholds[0] if len(thresholds) == 1 else thresholds,
                          nms_iou=nms_iou, export=export, plot=plot, ground_truth=ground_truth,
                          plot_count=plot_count, device=device)
    count = sum(len(v) for v in result["results"].values())
    click.echo(f"wrote {out}: {count} detections in {len(result['results'])} videos"
               + (f"; weights in {export}" if export else "")
               + (f"; {min(plot_count, len(result['results']))} plots in {plot}" if plot else ""))


@main.command("eval-detection")
@click.argument("detections", type=click.Path(path_type=Path))
@click.argument("ground_truth", type=click.Path(path_type=Path))
@click.option("--evaluator", required=True, type=click.Choice(["anet", "thumos14"]),
              help="anet: ActivityNet's tool; thumos14: the THUMOS14 kit (docs/detection.md).")
@click.option("--subset", default=None,
              help="Ground truth subset: 'validation' (ActivityNet JSON) or 'test'/'val' (THUMOS14 folder).")
@click.option("--tiou", default=None, help="tIoU thresholds, e.g. 0.5,0.75 (default: the evaluator's).")
@click.option("--per-class", is_flag=True, help="Also print each class's AP.")
@user_errors
def eval_detection_cmd(detections, ground_truth, evaluator, subset, tiou, per_class):
    """Mean AP of ActivityNet results JSON against ActivityNet JSON or THUMOS14 annotations."""
    from datp.pool.detect.pipeline import eval_detection
    from datp.pool.detect.evaluators import format_result

    result = eval_detection(detections, ground_truth, evaluator=evaluator, subset=subset, tiou=_floats(tiou))
    click.echo(format_result(result, per_class=per_class))


@main.command("merge")
@click.argument("inputs", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
@click.option("--out", required=True, type=click.Path(path_type=Path))
@click.option("--copy", is_flag=True, help="Copy the data into one self-contained file "
              "(default: link to the inputs, which must then stay in place).")
@user_errors
def merge_cmd(inputs, out, copy):
    """Join the shard stores of one run (flow or feature stores) into one store."""
    import h5py

    with h5py.File(inputs[0], "r") as f:
        kind = f.attrs.get("datp_kind")
    if kind == "features":
        from datp.extract.store import merge_feature_stores as merge
    elif kind == "flow":
        from datp.flows.store import merge_stores as merge
    else:
        raise ValueError(f"{inputs[0]} is neither a flow nor a feature store")
    count = merge(list(inputs), out, copy=copy)
    click.echo(f"merged {count} videos from {len(inputs)} stores into {out}")


if __name__ == "__main__":
    main()
