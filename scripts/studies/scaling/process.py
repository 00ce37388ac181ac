"""How the scaling study starts its child processes: `python -m studies.scaling.worker COMMAND ...` from the
repository root, with scripts/ (the import root of `studies`, not installed) first on PYTHONPATH."""

from __future__ import annotations

import os
import sys
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parents[2]
REPO = SCRIPTS.parent


def child_command(*args: str) -> list[str]:
    """The command line of a study child process (studies/scaling/worker.py)."""
    return [sys.executable, "-m", "studies.scaling.worker", *args]


def child_env() -> dict[str, str]:
    """The environment of a study child process: scripts/ first on PYTHONPATH."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(SCRIPTS), env.get("PYTHONPATH")) if p)
    return env
