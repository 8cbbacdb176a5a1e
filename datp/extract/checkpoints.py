"""Weight files of other tools, read safely and mapped onto torchvision's ResNet keys.

Every file is read with `torch.load(weights_only=True)`: nothing in it is executed. Some checkpoints
also hold non-tensor metadata (mmengine's `meta` and `message_hub`); the numpy scalar and dtype
types that torch documents as needed for such metadata are allowed, and a file that needs anything
else gets one line saying how to keep only its tensors.

Key maps (`to_torchvision(state)`; docs/weights.md has the table):

| layout (detected by) | its keys | torchvision's |
|---|---|---|
| torchvision (`conv1.weight`) | as is; a `module.` prefix (DataParallel) is dropped | |
| mmaction2 recognizer (`backbone.`) | `backbone.conv1.conv.*`, `backbone.conv1.bn.*` | `conv1.*`, `bn1.*` |
| | `backbone.layerI.J.convK.conv.*`, `...convK.bn.*` | `layerI.J.convK.*`, `layerI.J.bnK.*` |
| | `backbone.layerI.J.downsample.conv.*`, `...downsample.bn.*` | `layerI.J.downsample.0.*`, `.1.*` |
| | `cls_head.fc_cls.*` (TSNHead) | `fc.*` |
| tsn-pytorch (`module.base_model.`) | `module.base_model.<torchvision key>` | `<torchvision key>` |
| | `module.new_fc.*` | `fc.*` |

The mmaction2 map is the inverse of mmaction2's own `ResNet._load_torchvision_checkpoint` (its
ConvModule `name.conv` is torchvision's `name`, `name.bn` is `name` with conv -> bn, and a
downsample's `.conv` / `.bn` are `.0` / `.1`).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import torch

# Globals torch's documentation names for numpy metadata in checkpoints (scalars and their dtypes).
SAFE_NUMPY = [np.dtype, *{type(np.dtype(c)) for c in "?bhilqBHILQefdgFDG"}]
try:  # numpy >= 1.25 moved the scalar reconstructor; accept either name
    from numpy._core.multiarray import scalar as _scalar
except ImportError:  # pragma: no cover - older numpy
    from numpy.core.multiarray import scalar as _scalar
SAFE_NUMPY.append(_scalar)

_MM_CONV = re.compile(r"^(?P<name>.*?)\.(?P<kind>conv|bn)\.(?P<param>[^.]+)$")


def read_weights(path: str | os.PathLike) -> dict:
    """Load a weight file with `weights_only=True` (numpy scalar metadata allowed), on the CPU.

    Raises:
        FileNotFoundError: no such file.
        ValueError: one line naming the file: not loadable safely (with what to do), or not a dict.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} does not exist; pass a state_dict file or 'random'")
    try:
        with torch.serialization.safe_globals(SAFE_NUMPY):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises UnpicklingError, RuntimeError, EOFError, ... for bad files
        text = str(e).strip()
        unsupported = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
        if unsupported:
            raise ValueError(
                f"{path} holds non-tensor metadata ({unsupported[1]}) that weights_only=True does not unpickle; "
                f"if you trust the file, keep only its tensors: python -c \"import torch; c = torch.load('{path}', "
                f"weights_only=False); torch.save(c.get('state_dict', c), '{path}.tensors.pth')\" and pass that file"
            ) from None
        first = text.splitlines()[0] if text else type(e).__name__
        raise ValueError(f"{path} is not a loadable weights file (weights_only=True): {first}") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path} holds a {type(obj).__name__}, not a state_dict or datp checkpoint")
    return obj


def to_torchvision(state: dict) -> tuple[dict, str]:
    """A state_dict of another tool's ResNet (see the module docstring) with torchvision's keys.

    Returns:
        (state with torchvision keys, layout: "torchvision", "mmaction2" or "tsn-pytorch").
    """
    keys = list(state)
    if any(k.startswith("backbone.") for k in keys):
        out = {}
        for key, value in state.items():
            if key.startswith("backbone."):
                out[_mmaction_key(key[len("backbone."):])] = value
            elif key.startswith("cls_head.fc_cls."):
                out["fc." + key[len("cls_head.fc_cls."):]] = value
            else:  # another part of the recognizer (a neck, a second head): not a ResNet parameter
                out[key] = value
        return out, "mmaction2"
    if any(k.startswith("module.base_model.") for k in keys):
        out = {}
        for key, value in state.items():
            if key.startswith("module.base_model."):
                out[key[len("module.base_model."):]] = value
            elif key.startswith("module.new_fc."):
                out["fc." + key[len("module.new_fc."):]] = value
            else:
                out[key] = value
        return out, "tsn-pytorch"
    if keys and all(k.startswith("module.") for k in keys):  # saved from nn.DataParallel
        return {k[len("module."):]: v for k, v in state.items()}, "torchvision"
    return dict(state), "torchvision"


def _mmaction_key(key: str) -> str:
    m = _MM_CONV.match(key)
    if m is None:  # not inside a ConvModule (e.g. already torchvision-named)
        return key
    name, kind, param = m["name"], m["kind"], m["param"]
    if name.endswith("downsample"):
        return f"{name}.{0 if kind == 'conv' else 1}.{param}"
    return f"{name if kind == 'conv' else name.replace('conv', 'bn')}.{param}"
