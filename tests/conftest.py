"""Fixtures shared by every test folder (helpers live in datp_testing.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

# bench/fault_cases.py (the fault-injection cases) is shared by bench/faults.py and the fault tests
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

from datp_testing import moving_texture, write_video


@pytest.fixture
def video_dir(tmp_path: Path) -> Path:
    """A tree root/<class>/<video>.mkv of five short lossless clips in two classes."""
    root = tmp_path / "videos"
    for i in range(5):
        cls = "left" if i % 2 else "right"
        write_video(root / cls / f"clip{i}.mkv", moving_texture(6 + i, seed=i))
    return root
