"""Atomic file writes: write to a temporary file in the same folder, then rename.

A reader never sees a half-written file, and a crash leaves at most a stray hidden
``.<name>.tmp-*`` file that readers ignore and :func:`remove_stale_temps` deletes.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
import time
from pathlib import Path
from typing import Iterator

import numpy as np


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is renamed onto ``path``.

    ``suffix`` is appended to the temporary name (e.g. ``.npy`` for ``np.save``).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", suffix=suffix, dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def atomic_save_npy(path: str | os.PathLike, array: np.ndarray) -> Path:
    """Save one array as ``.npy`` (no pickle) atomically."""
    with atomic_path(path, suffix=".npy") as tmp:
        np.save(tmp, np.ascontiguousarray(array), allow_pickle=False)
    return Path(path)


#: A temporary file older than this (seconds) belongs to a writer that died (a live write
#: of one file takes far less); younger ones may belong to another process writing now.
STALE_TEMP_S = 600.0


def remove_stale_temps(folder: str | os.PathLike, *, recursive: bool = False,
                       older_than_s: float = STALE_TEMP_S) -> int:
    """Delete hidden ``.*.tmp-*`` files left in ``folder`` by killed writers; returns how many."""
    folder = Path(folder)
    if not folder.is_dir():
        return 0
    now, n = time.time(), 0
    for p in (folder.rglob(".*.tmp-*") if recursive else folder.glob(".*.tmp-*")):
        try:
            if p.is_file() and now - p.stat().st_mtime > older_than_s:
                p.unlink()
                n += 1
        except OSError:
            continue
    return n
