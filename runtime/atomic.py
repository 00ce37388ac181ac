"""Atomic writes: a file or a folder is built under a temporary sibling name, then renamed into place, so that a
failure never leaves a half-written artifact."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

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


def write_file_atomic(path: str | Path, write: Callable[[BinaryIO], None]) -> Path:
    """Call `write` on a temporary file beside `path`, flush it to disk, then rename it to `path`; returns `path`.

    On any error the temporary file is removed and an existing `path` stays as it was; an OSError (a missing folder,
    no permission, a full disk) becomes a one-line UserError naming the file."""
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise UserError(f"cannot write {path}: folder {parent} does not exist")
    tmp = parent / f".{path.name}.{os.getpid()}.tmp"
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise UserError(f"cannot write {path}: {e.strerror or e}") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path
