"""Atomic model folders: write into a hidden sibling, rename into place only when complete.

A crash, a full disk or a refused check never leaves a half-written folder that loads, and an existing
folder is replaced only by a complete one (`--overwrite`).
"""

from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


class ExportError(RuntimeError):
    """An export that cannot proceed; the message says why and how to fix it."""


def check_destination(out: Path, overwrite: bool) -> None:
    if out.exists() and not overwrite:
        raise ExportError(f"{out} already exists; pass --overwrite to replace it")
    if out.exists() and not out.is_dir():
        raise ExportError(f"{out} exists and is not a folder")


@contextmanager
def atomic_folder(out: str | Path, *, overwrite: bool, tag: str = "tmp") -> Iterator[Path]:
    """Yield an empty hidden sibling of `out` to write into; on success it becomes `out` by rename."""
    out = Path(out)
    check_destination(out, overwrite)
    parent = out.parent if str(out.parent) else Path(".")
    parent.mkdir(parents=True, exist_ok=True)
    tmp = parent / f".{out.name}.{tag}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        if out.exists():
            old = parent / f".{out.name}.old-{os.getpid()}"
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
