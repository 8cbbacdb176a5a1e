"""`datp finetune`: stage three, end-to-end training (`datp.finetune.finetune`)."""

from __future__ import annotations

from pathlib import Path

import click

from datp.cli.common import SOURCE_HELP, defaults, size, user_errors
from datp.finetune.config import FinetuneConfig
from datp.io.rawframes import LIST_FORMATS

D = defaults(FinetuneConfig)


@click.command("finetune", epilog=SOURCE_HELP + " Several processes or machines: torchrun "
              "--nproc-per-node K -m datp finetune ... (docs/finetune.md).")
@click.argument("sources", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--out", required=True, type=click.Path(path_type=Path),
              help="Run folder: config.json, last.pt, best.pt, resume.pt, metrics.json.")
@click.option("--stream", type=click.Choice(["rgb", "flow"]), default=D["stream"], show_default=True)
@click.option("--head", default=D["head"], show_default=True,
              help="Pooling head: avg (TSN), max, datp, lstm-attn, self-attn, joint-attn.")
@click.option("--head-option", "head_options", multiple=True, metavar="KEY=VALUE",
              help="Head constructor option, repeatable (JSON values), e.g. input=softmax.")
@click.option("--backbone", default=D["backbone"], show_default=True,
              help="Any torchvision ResNet/ResNeXt/wide ResNet name.")
@click.option("--weights", default=D["weights"], show_default=True,
              help="A torchvision ImageNet state_dict file, a datp checkpoint, or 'random' (seeded).")
@click.option("--segments", type=int, default=D["num_segments"], show_default=True, help="Segments per video (TSN).")
@click.option("--new-length", type=int, default=D["new_length"], show_default=True,
              help="Flow pairs stacked per segment.")
@click.option("--flows", type=click.Path(exists=True, path_type=Path), default=D["flows"],
              help="Flow store or jpg folder from extract-flow; without it --stream flow computes the flow "
              "of the sampled pairs while training (TSN's random sampling every epoch, never written).")
@click.option("--flow-algorithm", type=click.Choice(["tvl1", "dis", "farneback"]), default=D["flow_algorithm"],
              show_default=True, help="On-the-fly flow algorithm.")
@click.option("--flow-backend", type=click.Choice(["opencv", "torch"]), default=D["flow_backend"],
              show_default=True, help="On-the-fly TV-L1: opencv (CPU, in the decoding workers) or torch (on "
              "--device in the training process, the pairs of a batch as one batch: the GPU path).")
@click.option("--flow-preset", default=D["flow_preset"], help="On-the-fly flow preset (see extract-flow; "
              "tvl1 default: tuned).")
@click.option("--flow-short-side", type=int, default=D["flow_short_side"], show_default=True,
              help="On-the-fly flow: decode at this short side (0: the source size).")
@click.option("--flow-size", default=None, help="On-the-fly flow: decode at WxH instead (TSN: 340x256).")
@click.option("--bound", type=float, default=D["flow_bound"], show_default=True,
              help="On-the-fly flow quantization bound in pixels, as extract-flow's.")
@click.option("--root", type=click.Path(path_type=Path), default=None)
@click.option("--split", type=int, default=1, show_default=True)
@click.option("--list-format", type=click.Choice(LIST_FORMATS), default=D["list_format"], show_default=True,
              help="How list files are read (rawframe lists told from video lists by their fields; "
              "name rawframes-offset for mmaction2's with_offset lists).")
@click.option("--train-split", default=D["train_split"], show_default=True, help="Records to train on.")
@click.option("--test-split", default=D["test_split"], show_default=True,
              help="Records evaluated with the best checkpoint at the end (never used for choices).")
@click.option("--val-fraction", type=float, default=D["val_fraction"], show_default=True,
              help="Share of the training videos held out (stratified by class, as train-head) to pick the "
              "best epoch (unless the dataset has 'val' records).")
@click.option("--short-side", type=int, default=D["short_side"], show_default=True, help="RGB decode size.")
@click.option("--resize", type=int, default=D["resize"], show_default=True, help="Short side before cropping.")
@click.option("--input-size", type=int, default=D["input_size"], show_default=True, help="Crop size.")
@click.option("--multi-scale/--no-multi-scale", default=D["multi_scale"], show_default=True,
              help="TSN's multi-scale crop (else a plain random crop).")
@click.option("--epochs", type=int, default=D["epochs"], show_default=True)
@click.option("--batch-size", type=int, default=D["batch_size"], show_default=True, help="Videos per process per step.")
@click.option("--lr", type=float, default=D["lr"], show_default=True)
@click.option("--lr-schedule", type=click.Choice(["step", "cosine"]), default=D["lr_schedule"], show_default=True)
@click.option("--lr-steps", default=",".join(map(str, D["lr_steps"])), show_default=True, help="Epochs where step decay applies.")
@click.option("--lr-gamma", type=float, default=D["lr_gamma"], show_default=True)
@click.option("--momentum", type=float, default=D["momentum"], show_default=True)
@click.option("--weight-decay", type=float, default=D["weight_decay"], show_default=True)
@click.option("--dropout", type=float, default=D["dropout"], show_default=True, help="Before the classifier.")
@click.option("--bn-freeze", type=click.Choice(["partial", "all", "none"]), default=D["bn_freeze"],
              show_default=True, help="partial: TSN's partial BN (all but the first frozen).")
@click.option("--conv1-lr-mult", type=float, default=D["conv1_lr_mult"], show_default=True,
              help="Learning-rate multiplier of conv1 (TSN's flow nets use a larger one).")
@click.option("--head-lr-mult", type=float, default=D["head_lr_mult"], show_default=True)
@click.option("--clip-grad", type=float, default=D["clip_grad"], show_default=True,
              help="Max gradient norm (0: no clipping).")
@click.option("--amp/--no-amp", default=D["amp"], show_default=True, help="bf16 autocast on GPU.")
@click.option("--channels-last/--no-channels-last", default=D["channels_last"], show_default=True,
              help="channels_last memory format on GPU.")
@click.option("--workers", type=int, default=D["workers"], show_default=True, help="Decoding workers per process.")
@click.option("--device", default=D["device"], show_default=True, help="auto, cpu or cuda.")
@click.option("--seed", type=int, default=D["seed"], show_default=True)
@click.option("--resume", is_flag=True, help="Continue the run in --out from its last epoch.")
@click.option("--quiet", is_flag=True, help="No progress output.")
@user_errors
def finetune_cmd(sources, out, stream, head, head_options, backbone, weights, segments, new_length,
                 flows, flow_algorithm, flow_backend, flow_preset, flow_short_side, flow_size, bound, root, split, list_format, train_split, test_split, val_fraction, short_side, resize,
                 input_size, multi_scale, epochs, batch_size, lr, lr_schedule, lr_steps, lr_gamma,
                 momentum, weight_decay, dropout, bn_freeze, conv1_lr_mult, head_lr_mult, clip_grad,
                 amp, channels_last, workers, device, seed, resume, quiet):
    """Train backbone + pooling head end to end (TSN style).

    The checkpoint (best.pt) goes back to extract-features --weights; its head to train-head.
    """
    from datp.finetune import finetune
    from datp.io.options import parse_numbers

    cfg = FinetuneConfig(
        sources=tuple(str(s) for s in sources), out=str(out), stream=stream, head=head,
        head_options=tuple(head_options), backbone=backbone, weights=weights, num_segments=segments,
        new_length=new_length, flows=str(flows) if flows else None, flow_algorithm=flow_algorithm,
        flow_backend=flow_backend, flow_preset=flow_preset, flow_short_side=flow_short_side,
        flow_size=size(flow_size), flow_bound=bound, root=str(root) if root else None,
        split=split, list_format=list_format, train_split=train_split, test_split=test_split, val_fraction=val_fraction,
        short_side=short_side, resize=resize, input_size=input_size, multi_scale=multi_scale,
        epochs=epochs, batch_size=batch_size, lr=lr, lr_schedule=lr_schedule,
        lr_steps=parse_numbers(lr_steps, kind=int, what="--lr-steps"), lr_gamma=lr_gamma, momentum=momentum,
        weight_decay=weight_decay, dropout=dropout, bn_freeze=bn_freeze,
        conv1_lr_mult=conv1_lr_mult, head_lr_mult=head_lr_mult, clip_grad=clip_grad, amp=amp,
        channels_last=channels_last, workers=workers, device=device, seed=seed, resume=resume)
    finetune(cfg, progress=not quiet)
