"""`python -m datp.finetune CONFIG.json [--report DIR]`: run finetune from a config file.

A plain entry point for torchrun besides `python -m datp finetune ...`, e.g. to rerun a run folder's
`config.json`: `torchrun --nproc-per-node 2 -m datp.finetune runs/ucf/config.json`. With `--report`
every rank writes its result (JSON, including the digest of its final weights) to
`DIR/rank<RANK>.json`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import replace
from pathlib import Path

from datp.finetune.train import config_from_json, finetune


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m datp.finetune", description=__doc__.splitlines()[0])
    parser.add_argument("config", type=Path, help="a FinetuneConfig as JSON (a run folder's config.json)")
    parser.add_argument("--report", type=Path, default=None, help="folder for each rank's result JSON")
    parser.add_argument("--resume", action="store_true", help="continue the run in the config's out")
    parser.add_argument("--quiet", action="store_true", help="no progress output")
    args = parser.parse_args(argv)
    try:
        cfg = config_from_json(args.config)
        if args.resume:
            cfg = replace(cfg, resume=True)
        result = finetune(cfg, progress=not args.quiet)
    except (ValueError, FileNotFoundError) as err:
        print(f"datp finetune: error: {err}", file=sys.stderr)
        return 2
    if args.report is not None:
        args.report.mkdir(parents=True, exist_ok=True)
        (args.report / f"rank{os.environ.get('RANK', 0)}.json").write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
