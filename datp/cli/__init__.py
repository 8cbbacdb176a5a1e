"""The `datp` command line, one module per stage; each command parses its options into the stage's
config dataclass (defaults taken from it, so the CLI and the Python API cannot drift) and calls one
documented library function. User errors become one line on stderr and exit code 2 (`common.py`).

Commands are imported when they run (`LazyGroup`): `datp extract-flow` never imports torch.
"""

from __future__ import annotations

import importlib

import click

import datp

# name -> "module:function" of the command; the group imports the module only when it is needed.
COMMANDS = {
    "extract-flow": "datp.cli.flows:extract_flow_cmd",
    "extract-features": "datp.cli.extract:extract_features_cmd",
    "merge": "datp.cli.extract:merge_cmd",
    "export-features": "datp.cli.extract:export_features_cmd",
    "import-features": "datp.cli.extract:import_features_cmd",
    "train-head": "datp.cli.pool:train_head_cmd",
    "evaluate": "datp.cli.pool:evaluate_cmd",
    "predict": "datp.cli.pool:predict_cmd",
    "localize": "datp.cli.detect:localize_cmd",
    "eval-detection": "datp.cli.detect:eval_detection_cmd",
    "finetune": "datp.cli.finetune:finetune_cmd",
    "synth": "datp.cli.demo:synth_cmd",
    "demo": "datp.cli.demo:demo_cmd",
}


class LazyGroup(click.Group):
    """A group whose commands live in other modules, imported on first use (click's documented
    pattern for large CLIs; `datp --help` imports them all to list their one-line help)."""

    def list_commands(self, ctx):
        return list(COMMANDS)

    def get_command(self, ctx, name):
        if name not in COMMANDS:
            return None
        module, attr = COMMANDS[name].split(":")
        return getattr(importlib.import_module(module), attr)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(datp.__version__, prog_name="datp")
def main():
    """datp: two-stream action recognition with learned temporal pooling.

    Stage one: extract-flow, extract-features (merge joins shards). Stage two: train-head, evaluate,
    localize, eval-detection. Stage three: finetune. synth and demo: the synthetic benchmark.
    Every output records the settings that made it.
    """
