"""The files of a finetune run folder, and loading its checkpoints back.

`<out>/` holds:
- `config.json`: `asdict(FinetuneConfig)`;
- `last.pt`, `best.pt`: datp checkpoints (`datp.extract.backbones.save_checkpoint`) of the last
  epoch and of the epoch with the best validation accuracy. They load in `datp extract-features
  --weights`; their `head` is the head's state_dict and their `config` is the FinetuneConfig plus
  `head_kwargs` (every constructor argument of the head), `epoch` and `val`, so
  `rebuild_head(config["head"], config["head_kwargs"]).load_state_dict(ckpt["head"])` rebuilds it
  (`load_head` does this; `datp.pool.runs.rebuild_head` gives options that a checkpoint written
  before they existed lacks the value they had then, e.g. DATP's `aux_center=False`);
- `resume.pt`: what `--resume` needs: the whole model, the optimizer (momentum buffers), the
  scheduler, the finished epoch count, the history and the best epoch so far;
- `metrics.json`: per-epoch history, best epoch, test result.
Every file is written under a temporary name and renamed (`datp.io.atomic`), by rank 0 only.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from torch import nn

from datp.extract.backbones import save_checkpoint
from datp.io.atomic import atomic_path

RESUME, LAST, BEST, METRICS, CONFIG = "resume.pt", "last.pt", "best.pt", "metrics.json", "config.json"


def write_json(path: Path, obj) -> None:
    with atomic_path(Path(path)) as tmp:
        tmp.write_text(json.dumps(obj, indent=1) + "\n")


def save_model_checkpoint(path: Path, model, *, class_names: list[str], config: dict) -> None:
    """A datp checkpoint of `model` (a VideoModel): backbone weights, head state and config."""
    head = {k: v.detach().cpu() for k, v in model.head.state_dict().items()}
    save_checkpoint(path, model.backbone, class_names=class_names, head=head, config=config)


def save_resume(path: Path, state: dict) -> None:
    """Write the resume state (tensors and plain values only) atomically."""
    with atomic_path(Path(path)) as tmp:
        torch.save(state, tmp)


def load_resume(path: Path) -> dict:
    if not Path(path).is_file():
        raise ValueError(f"{path} does not exist: there is no run to resume in {Path(path).parent}; "
                         "run without --resume to start one")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a truncated or damaged file: torch raises several types; say which file
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ValueError(f"{path} cannot be read ({reason}); it was cut short or damaged: resume from a copy, "
                         "or start the run again without --resume") from None


def load_head(checkpoint: str | Path | dict) -> nn.Module:
    """Rebuild the pooling head stored in a finetune checkpoint, with its trained weights.

    Args:
        checkpoint: a `best.pt` / `last.pt` path or its loaded dict.

    Returns:
        The head in eval mode.
    """
    from datp.pool.runs import rebuild_head

    ckpt = checkpoint if isinstance(checkpoint, dict) else torch.load(
        checkpoint, map_location="cpu", weights_only=True)
    config = ckpt.get("config") or {}
    if ckpt.get("head") is None or "head_kwargs" not in config:
        raise ValueError(f"{checkpoint if not isinstance(checkpoint, dict) else 'the checkpoint'} holds no "
                         "finetuned head (it was not written by datp finetune)")
    head = rebuild_head(config["head"], config["head_kwargs"])
    head.load_state_dict(ckpt["head"])
    return head.eval()


def state_digest(module: nn.Module) -> str:
    """sha256 of every tensor of `module.state_dict()` (names, dtypes, shapes and bytes)."""
    digest = hashlib.sha256()
    for name, value in sorted(module.state_dict().items()):
        value = value.detach().cpu()
        digest.update(f"{name}:{value.dtype}:{tuple(value.shape)}".encode())
        digest.update(value.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
