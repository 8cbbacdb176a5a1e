"""`datp train-head` (`datp.pool.train.train_head`) and `datp evaluate` (`datp.pool.evaluate.evaluate`)."""

from __future__ import annotations

from pathlib import Path

import click

from datp.cli.common import defaults, user_errors
from datp.pool.config import HeadConfig
from datp.pool.evaluate import EvaluateConfig

D = defaults(HeadConfig)
E = defaults(EvaluateConfig)


@click.command("train-head")
@click.argument("features", type=click.Path(path_type=Path))
@click.option("--head", default=D["head"], show_default=True,
              help="avg, max, datp, lstm-attn, self-attn or joint-attn; several, comma-separated, train as one "
              "study (one read of each batch for all) into OUT/<head>-<stream>/.")
@click.option("--stream", default=D["stream"], show_default=True,
              help="rgb, flow, or both (joint-attn only); rgb,flow trains each head on each stream (joint-attn "
              "once, on both); fuse the streams with datp evaluate.")
@click.option("--out", required=True, type=click.Path(path_type=Path),
              help="Run folder; with several heads or streams, the folder of their run folders.")
@click.option("--epochs", type=int, default=D["epochs"], show_default=True)
@click.option("--batch-size", type=int, default=D["batch_size"], show_default=True, help="Videos per step.")
@click.option("--lr", type=float, default=D["lr"], show_default=True, help="Adam learning rate.")
@click.option("--weight-decay", type=float, default=D["weight_decay"], show_default=True)
@click.option("--seed", type=int, default=D["seed"], show_default=True)
@click.option("--val-fraction", type=float, default=D["val_fraction"], show_default=True,
              help="Share of the train split held out (stratified) to pick the best epoch; the "
              "test split is never used for choices.")
@click.option("--score-source", type=click.Choice(["auto", "cached", "linear"]), default=D["score_source"],
              show_default=True, help="Segment class scores: the store's logits (cached, when the "
              "backbone was trained on these classes) or a trained linear classifier on pooled "
              "conv features; auto picks from the store.")
@click.option("--datp-input", type=click.Choice(["conv", "softmax"]), default=D["datp_input"],
              show_default=True, help="What DATP's auxiliary ConvNet reads.")
@click.option("--gaussians", type=int, default=D["gaussians"], show_default=True, help="DATP mixture size K.")
@click.option("--generator", type=click.Choice(["mog", "discrete"]), default=D["generator"],
              show_default=True, help="DATP weights: mixture of Gaussians or N discrete weights.")
@click.option("--pooled-scores", type=click.Choice(["logits", "probs"]), default=D["pooled_scores"],
              show_default=True, help="What DATP pools per segment.")
@click.option("--locate", type=click.Choice(["soft-argmax", "fc"]), default=D["locate"], show_default=True,
              help="DATP: place each Gaussian at the expected time under per-segment scores (soft-argmax) "
              "or regress its mean with the fc layers (fc, as first implemented; docs/fidelity.md).")
@click.option("--aux-center/--no-aux-center", default=D["aux_center"], show_default=True,
              help="DATP: the auxiliary net subtracts each video's mean segment features before its temporal "
              "convs, so it sees how each segment differs from the rest (--no-aux-center: as first implemented).")
@click.option("--min-sigma", type=float, default=D["min_sigma"],
              help="DATP: lower bound of each Gaussian's sigma (segment times span [0, 1]); default: half "
              "the segment spacing, 0.5/N (0.01 lets the Gaussians collapse onto one segment).")
@click.option("--aux-lr-scale", type=float, default=D["aux_lr_scale"], show_default=True,
              help="DATP: the auxiliary net's learning rate relative to --lr.")
@click.option("--aux-max-lr", type=float, default=D["aux_max_lr"], show_default=True,
              help="DATP: cap on the auxiliary net's learning rate (0: none).")
@click.option("--aux-warmup", type=float, default=D["aux_warmup"], show_default=True,
              help="DATP: share of the epochs over which the auxiliary net's rate rises linearly to its "
              "value (0: none).")
@click.option("--hidden", type=int, default=D["hidden"], show_default=True, help="lstm-attn cells.")
@click.option("--attn-hidden", type=int, default=D["attn_hidden"], show_default=True,
              help="Attention MLP width (self-attn, joint-attn).")
@click.option("--attention", type=click.Choice(["softmax", "sigmoid"]), default=D["attention"],
              show_default=True, help="self-attn attention (sigmoid localizes better).")
@click.option("--alpha", type=float, default=D["alpha"], show_default=True,
              help="self-attn smoothness weight.")
@click.option("--beta", type=float, default=D["beta"], show_default=True,
              help="self-attn sparsity weight (acts with sigmoid attention).")
@click.option("--dropout", type=float, default=D["dropout"], show_default=True)
@click.option("--loss", type=click.Choice(["ce", "bce"]), default=D["loss"], show_default=True,
              help="ce: softmax cross-entropy on the video label; bce: a sigmoid per class against the "
              "store's multi-hot labels (multi-label videos; avg, max, datp, lstm-attn, self-attn).")
@click.option("--standardize/--no-standardize", default=D["standardize"], show_default=True,
              help="Standardise each conv channel with the train videos' mean and std (saved in the "
              "checkpoint); frozen backbones' channels differ in scale by orders of magnitude.")
@click.option("--device", default=D["device"], show_default=True)
@click.option("--max-ram-gb", type=float, default=D["max_ram_gb"], show_default=True,
              help="Load the features into RAM under this size, else stream them from the store.")
@click.option("--transfer-from", type=click.Path(path_type=Path), default=D["transfer_from"],
              help="Feature store of trimmed videos (split 'train', same backbone): TSRNet's knowledge "
              "transfer adds --mmd-weight x [MMD^2(T, U) + MMD^2(fc1(T), fc1(U))] between the pooled "
              "segment features of a trimmed (T) and the untrimmed (U) batch, Gaussian kernels with "
              "bandwidths 0.5, 1, 2 x the median distance (docs/detection.md, Knowledge transfer).")
@click.option("--mmd-weight", type=float, default=D["mmd_weight"], show_default=True,
              help="Weight L of the transfer term (> 0 with --transfer-from).")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@user_errors
def train_head_cmd(features, head, stream, out, epochs, batch_size, lr, weight_decay, seed,
                   val_fraction, score_source, datp_input, gaussians, generator, pooled_scores,
                   locate, aux_center, min_sigma, aux_lr_scale, aux_max_lr, aux_warmup, hidden, attn_hidden, attention,
                   alpha, beta, dropout, loss,
                   standardize, device, max_ram_gb,
                   transfer_from, mmd_weight, quiet):
    """Train a pooling head on a feature store; pick the epoch on validation, evaluate on test.

    Writes config.json, checkpoint.pt, metrics.json, predictions.h5 and weights.csv to --out. Several
    heads or streams (--head avg,datp --stream rgb,flow) train in one pass over the data, each into
    OUT/<head>-<stream>/, exactly as their own runs would.
    """
    from datp.pool.config import study_configs
    from datp.pool.train import train_heads

    options = dict(epochs=epochs, batch_size=batch_size, lr=lr, weight_decay=weight_decay,
                   seed=seed, val_fraction=val_fraction, score_source=score_source,
                   datp_input=datp_input, gaussians=gaussians, generator=generator,
                   pooled_scores=pooled_scores, locate=locate, aux_center=aux_center, min_sigma=min_sigma,
                   aux_lr_scale=aux_lr_scale, aux_max_lr=aux_max_lr, aux_warmup=aux_warmup, hidden=hidden, attn_hidden=attn_hidden,
                   attention=attention, alpha=alpha, beta=beta, dropout=dropout, loss=loss,
                   standardize=standardize, device=device, max_ram_gb=max_ram_gb,
                   transfer_from=str(transfer_from) if transfer_from else None, mmd_weight=mmd_weight)
    cfgs = study_configs(str(features), str(out), heads=head.split(","), streams=stream.split(","), **options)
    train_heads(cfgs, progress=not quiet)


@click.command("evaluate")
@click.argument("runs", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False,
                                                                  path_type=Path))
@click.option("--weights", default="", help="Fusion weight per run, comma-separated "
              "(default by stream: rgb 1, flow 1.5).")
@click.option("--on", type=click.Choice(["softmax", "logits"]), default=E["on"], show_default=True,
              help="Fuse softmax probabilities (heads' logits have different scales) or raw logits.")
@click.option("--schemes", is_flag=True, default=E["schemes"], help="DATP's testing schemes on the first run: as trained, "
              "P1 (random Gaussians), P2 (its segment classifier, average pooling); P3 with --avg-run.")
@click.option("--avg-run", type=click.Path(exists=True, file_okay=False, path_type=Path), default=E["avg_run"],
              help="A run of the avg head on the same store and stream (scheme P3).")
@click.option("--features", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=E["features"],
              help="Store for the schemes (default: the one the run was trained on).")
@click.option("--seed", type=int, default=E["seed"], show_default=True, help="Seed of P1's random Gaussians.")
@click.option("--out", type=click.Path(path_type=Path), default=E["out"],
              help="Folder for evaluation.json and the PNGs.")
@click.option("--plot-videos", type=int, default=E["plot_videos"], show_default=True,
              help="Figure 3 (segment scores and weights) for this many test videos of the first run.")
@click.option("--videos", default="", help="Figure 3 for these comma-separated video ids instead.")
@click.option("--events", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=E["events"],
              help="Ground-truth events to shade in Figure 3 (datp synth's events.json).")
@click.option("--compare", type=click.Path(exists=True, file_okay=False, path_type=Path), default=E["compare"],
              help="Figure 4: per-class accuracy changes from this run to the first run.")
@click.option("--device", default=E["device"], show_default=True, help="For the schemes.")
@user_errors
def evaluate_cmd(runs, weights, on, schemes, avg_run, features, seed, out, plot_videos, videos, events,
                 compare, device):
    """Score train-head runs on their test split: fuse several (e.g. rgb + flow), run DATP's
    testing schemes, draw Figures 3 and 4.
    """
    from datp.io.options import parse_numbers
    from datp.pool.evaluate import evaluate, format_report

    cfg = EvaluateConfig(
        runs=tuple(str(r) for r in runs), weights=parse_numbers(weights, kind=float, what="--weights"), on=on, schemes=schemes,
        avg_run=str(avg_run) if avg_run else None, features=str(features) if features else None,
        seed=seed, out=str(out) if out else None, plot_videos=plot_videos,
        videos=tuple(v.strip() for v in videos.split(",") if v.strip()),
        events=str(events) if events else None, compare=str(compare) if compare else None,
        device=device)
    click.echo(format_report(evaluate(cfg)))


@click.command("predict")
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("features", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--split", default="test", show_default=True, help="The store's split to score.")
@click.option("--out", required=True, type=click.Path(path_type=Path),
              help="Folder for predictions.h5, weights.csv, metrics.json (what train-head writes for its test split).")
@click.option("--batch-size", type=int, default=64, show_default=True)
@click.option("--device", default="cpu", show_default=True)
@user_errors
def predict_cmd(run_dir, features, split, out, batch_size, device):
    """Score any store or split with a trained train-head run (e.g. another dataset's test split).

    The output reads like a run's: datp evaluate fuses it with other runs or predictions.
    """
    from datp.pool.predict import predict_to_folder

    result = predict_to_folder(run_dir, out, features=features, split=split, batch_size=batch_size, device=device)
    top1 = "no labelled videos" if result["top1"] is None else f"top-1 {result['top1']:.4f}"
    click.echo(f"predicted {result['videos']} labelled videos of split {split!r}: {top1}; wrote {out}")
