"""Stage three, `datp finetune`: TSN-style end-to-end training of a backbone and a pooling head.

Modules: `config` (FinetuneConfig, the lr schedule), `data` (splits, TSN clips, the epoch order),
`model` (backbone + head, BatchNorm freezing, parameter groups), `distributed` (torchrun process
groups), `checkpoint` (the run folder's files), `train` (`finetune`). See docs/finetune.md.
"""

from datp.finetune.checkpoint import load_head
from datp.finetune.config import FinetuneConfig
from datp.finetune.train import config_from_json, finetune

__all__ = ["FinetuneConfig", "config_from_json", "finetune", "load_head"]
