"""Atomic folder writes: build everything in a temporary sibling folder, then rename it into place."""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from pathlib import Path

from .errors import UserError


def check_output_free(out: str | Path, overwrite: bool = False) -> None:
    """Fail early (before hours of work) if `out` exists and may not be replaced."""
    if Path(out).exists() and not overwrite:
        raise UserError(f"output folder {out} already exists (choose another --out or pass --overwrite)")


@contextlib.contextmanager
def atomic_output_dir(out: str | Path, overwrite: bool = False):
    """Yield a temporary folder next to `out`; it becomes `out` only if the block finishes without error."""
    out = Path(out)
    check_output_free(out, overwrite)
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise UserError(f"cannot write {out}: parent folder {parent} does not exist")
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=parent))
    except OSError as e:
        raise UserError(f"cannot write {out}: {e.strerror}") from None
    try:
        yield tmp
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
