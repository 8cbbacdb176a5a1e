"""The one form of datp's warnings on stderr: `datp: warning: <message>` (errors are the CLI's, in
`datp.cli.common`)."""

from __future__ import annotations

import sys


def warn(message: str) -> None:
    """Print `datp: warning: message` on stderr."""
    print(f"datp: warning: {message}", file=sys.stderr)
