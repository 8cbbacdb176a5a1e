"""`datp synth` (`datp.synth.generate`) and `datp demo` (`datp.demo.run_demo`)."""

from __future__ import annotations

from pathlib import Path

import click

from datp.cli.common import defaults, user_errors
from datp.demo import DemoConfig
from datp.synth import SynthConfig

D = defaults(SynthConfig)
M = defaults(DemoConfig)


@click.command("synth")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Output folder.")
@click.option("--classes", type=int, default=D["num_classes"], show_default=True)
@click.option("--train-per-class", type=int, default=D["videos_per_class_train"], show_default=True)
@click.option("--test-per-class", type=int, default=D["videos_per_class_test"], show_default=True)
@click.option("--size", type=int, default=D["size"], show_default=True, help="Frame side in pixels.")
@click.option("--fps", type=int, default=D["fps"], show_default=True)
@click.option("--duration", type=float, default=D["duration_s"], show_default=True, help="Seconds per video.")
@click.option("--event-fraction", type=float, default=D["event_fraction"], show_default=True,
              help="Share of the video the class's key motion lasts.")
@click.option("--distractor-strength", type=float, default=D["distractor_strength"], show_default=True)
@click.option("--confuser-probability", type=float, default=D["confuser_probability"], show_default=True,
              help="Share of the other stretches showing a confusing motion of another class.")
@click.option("--confuser-strength", type=float, default=D["confuser_strength"], show_default=True)
@click.option("--untrimmed", is_flag=True,
              help="Long videos with 1 to --max-events events each and ActivityNet-style ground truth.")
@click.option("--untrimmed-duration", default=",".join(f"{v:g}" for v in D["untrimmed_duration_s"]), show_default=True,
              help="MIN,MAX seconds of an untrimmed video (drawn per video).")
@click.option("--max-events", type=int, default=D["max_events"], show_default=True, help="Most events in an untrimmed video.")
@click.option("--seed", type=int, default=D["seed"], show_default=True)
@user_errors
def synth_cmd(out, classes, train_per_class, test_per_class, size, fps, duration, event_fraction,
              distractor_strength, confuser_probability, confuser_strength, untrimmed, untrimmed_duration,
              max_events, seed):
    """Generate the synthetic key-moment benchmark: videos, manifest.csv, lists, events.json."""
    from datp.synth import generate

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


@click.command("demo")
@click.option("--out", type=click.Path(path_type=Path), default=M["out"], show_default=True)
@click.option("--reduced", is_flag=True,
              help="A smaller run (CI): 20 train / 8 test videos per class, avg and datp-mog1 only.")
@click.option("--epochs", type=int, default=M["epochs"], show_default=True, help="Head training epochs.")
@click.option("--workers", type=int, default=M["workers"], show_default=True)
@click.option("--quiet", is_flag=True, help="No progress bars.")
@user_errors
def demo_cmd(out, reduced, epochs, workers, quiet):
    """Run the whole pipeline on synthetic key-moment videos and compare the heads.

    synth -> extract-flow -> extract-features -> train-head (avg, max, datp x3, lstm-attn,
    self-attn; rgb and flow) -> fusion. Prints a table, writes OUT/results.json and OUT/plots/.
    Rerunning reuses finished stages.
    """
    from dataclasses import replace

    from datp.demo import reduced as reduce_cfg, run_demo

    cfg = DemoConfig(out=str(out), workers=workers)
    if reduced:
        cfg = reduce_cfg(cfg)
    if epochs is not None:
        cfg = replace(cfg, epochs=epochs)
    run_demo(cfg, progress=not quiet, log=lambda m: click.echo(m, err=m.startswith("==")))
