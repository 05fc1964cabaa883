"""Writes that never leave a half-written result: everything is written beside its destination
under a hidden temporary name and renamed into place only when complete (a rename within one
directory is atomic on POSIX), and a failure removes the temporary. Standard library only, so
the installer (``saap.runtime.llama_build``) can use it before anything else is installed."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from saap.runtime.errors import SaapError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()


def swap_in(tmp: Path, final: Path) -> None:
    """Rename ``tmp`` to ``final``; an existing ``final`` (file or directory) is moved aside first
    and deleted only after the swap, so a crash between the renames loses nothing valid."""
    if not final.exists():
        os.replace(tmp, final)
        return
    old = final.with_name(f".{final.name}.tmp-old-{os.getpid()}")  # a leftover matches ".*.tmp-*" too
    _remove(old)
    os.replace(final, old)
    os.replace(tmp, final)
    _remove(old)


@contextmanager
def atomic_file(path: str | Path, suffix: str = "") -> Iterator[Path]:
    """Yield an empty temporary file beside ``path``; it becomes ``path`` (readable like any file) if the
    block completes, and is removed if it fails."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.tmp-", suffix=suffix, dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        if tmp.exists():
            os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it private; results read like any file
        swap_in(tmp, path)
    finally:
        if tmp.exists():
            _remove(tmp)


@contextmanager
def atomic_dir(out_dir: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory that replaces ``out_dir`` only if the block completes."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise SaapError(f"output '{out_dir}' already exists (pass --overwrite to replace it)")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    tmp.chmod(0o777 & ~_umask())  # mkdtemp makes it private; the result should look like any other dir
    try:
        yield tmp
        swap_in(tmp, out_dir)
    finally:
        if tmp.exists():
            _remove(tmp)


def write_text_atomic(path: str | Path, text: str) -> None:
    with atomic_file(path) as tmp:
        tmp.write_text(text)


def write_json_atomic(path: str | Path, data: Any) -> None:
    write_text_atomic(path, json.dumps(data, indent=2) + "\n")
