"""`datp localize` and `datp eval-detection` (`datp.pool.detect.pipeline`)."""

from __future__ import annotations

import inspect
from pathlib import Path

import click

from datp.cli.common import user_errors
from datp.io.options import parse_numbers
from datp.pool.detect import pipeline

# localize's option defaults are localize_run's keyword defaults.
L = {k: p.default for k, p in inspect.signature(pipeline.localize_run).parameters.items()}


@click.command("localize")
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.argument("features", type=click.Path(path_type=Path))
@click.option("--out", required=True, type=click.Path(path_type=Path), help="ActivityNet results JSON to write.")
@click.option("--split", default=None, help="Only this split of the store (default: every done video).")
@click.option("--flow-run", type=click.Path(path_type=Path), default=None,
              help="A flow-stream run on the same store, fused as theta * rgb + (1 - theta) * flow.")
@click.option("--theta", type=float, default=L["theta"], show_default=True, help="Weight of RUN_DIR in the fusion.")
@click.option("--class-threshold", type=float, default=L["class_threshold"], show_default=True,
              help="Localize classes whose video probability reaches this (else the top class).")
@click.option("--segment-threshold", default=f"{L['segment_threshold']:g}", show_default=True,
              help="Fraction(s) of each class curve's peak at which it is cut, e.g. 0.5 or 0.3,0.5,0.7.")
@click.option("--nms-iou", type=float, default=L["nms_iou"], show_default=True, help="Per-class NMS tIoU.")
@click.option("--export", type=click.Path(path_type=Path), default=None,
              help="Also write the attention weights per video (.csv or .json).")
@click.option("--plot", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Folder for one PNG per video: attention over time, ground truth shaded, detections.")
@click.option("--ground-truth", type=click.Path(exists=True, path_type=Path), default=None,
              help="ActivityNet JSON or THUMOS14 annotation folder to shade on the --plot PNGs.")
@click.option("--plot-count", type=int, default=L["plot_count"], show_default=True,
              help="Plot at most this many videos, those with ground truth first.")
@click.option("--device", default=L["device"], show_default=True)
@user_errors
def localize_cmd(run_dir, features, out, split, flow_run, theta, class_threshold, segment_threshold, nms_iou,
                 export, plot, ground_truth, plot_count, device):
    """Temporal action detection from a trained attention head: w_i^c = a_i * s_c -> segments."""
    thresholds = parse_numbers(segment_threshold, kind=float, what="--segment-threshold")
    result = pipeline.localize_run(run_dir, features, out=out, split=split, flow_run=flow_run, theta=theta,
                          class_threshold=class_threshold,
                          segment_threshold=thresholds[0] if len(thresholds) == 1 else thresholds,
                          nms_iou=nms_iou, export=export, plot=plot, ground_truth=ground_truth,
                          plot_count=plot_count, device=device)
    count = sum(len(v) for v in result["results"].values())
    click.echo(f"wrote {out}: {count} detections in {len(result['results'])} videos"
               + (f"; weights in {export}" if export else "")
               + (f"; {min(plot_count, len(result['results']))} plots in {plot}" if plot else ""))


@click.command("eval-detection")
@click.argument("detections", type=click.Path(path_type=Path))
@click.argument("ground_truth", type=click.Path(path_type=Path))
@click.option("--evaluator", required=True, type=click.Choice(["anet", "thumos14"]),
              help="anet: ActivityNet's tool; thumos14: the THUMOS14 kit (docs/detection.md).")
@click.option("--subset", default=None,
              help="Ground truth subset: 'validation' (ActivityNet JSON) or 'test'/'val' (THUMOS14 folder).")
@click.option("--tiou", default=None, help="tIoU thresholds, e.g. 0.5,0.75 (default: the evaluator's).")
@click.option("--per-class", is_flag=True, help="Also print each class's AP.")
@click.option("--annotated-only", is_flag=True,
              help="Leave out detections on videos the ground truth does not list (and say how many); by "
              "default they are false positives, as in the official ActivityNet and THUMOS14 tools.")
@user_errors
def eval_detection_cmd(detections, ground_truth, evaluator, subset, tiou, per_class, annotated_only):
    """Mean AP of ActivityNet results JSON against ActivityNet JSON or THUMOS14 annotations."""
    from datp.pool.detect.evaluators import format_result

    thresholds = None if tiou is None else parse_numbers(tiou, kind=float, what="--tiou")
    result = pipeline.eval_detection(detections, ground_truth, evaluator=evaluator, subset=subset, tiou=thresholds,
                                     annotated_only=annotated_only)
    click.echo(format_result(result, per_class=per_class))
