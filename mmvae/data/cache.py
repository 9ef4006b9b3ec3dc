"""On-disk cache of preprocessed arrays.

An entry is keyed by the SHA-256 of the source bytes (a file, or every file of a DICOM
folder), of the preprocessing configuration, and of the reference series' source when
one is used. It holds one ``.npy`` array ``(V, *shape)`` float32 — every volume the
source yields (a multi-b-value DICOM series gives several) — and a JSON sidecar with the
shape and a CRC-32 of the array bytes. Both are written atomically (temp file, then
rename; the ``.npy`` last-but-one, the sidecar last, so a sidecar always describes a
complete array). A read verifies shape and checksum once per process, then serves a
read-only memory map; a missing, truncated or corrupted entry is rebuilt.
"""
from __future__ import annotations

import hashlib
import json
import os
import threading
import zlib
from pathlib import Path
from typing import Callable

import numpy as np

from mmvae.atomic import atomic_save_npy, atomic_write_text, remove_stale_temps

CACHE_VERSION = "2"      # 2: the loader chooses one series / b-value per source and records it
_NP_LOAD = threading.Lock()   # np.load parses headers with ast.literal_eval: not thread-safe on CPython 3.11.7
_CHUNK = 1 << 20


def source_hash(path: str | os.PathLike) -> str:
    """SHA-256 of a file's bytes, or of the names and bytes of a folder's files (sorted)."""
    p = Path(path)
    h = hashlib.sha256()
    files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
    for f in files:
        if p.is_dir():
            h.update(str(f.relative_to(p)).encode() + b"\0")
        with open(f, "rb") as fh:
            while chunk := fh.read(_CHUNK):
                h.update(chunk)
    return h.hexdigest()


def _load(path: Path) -> np.ndarray:
    """Read-only memory map of a ``.npy`` (no pickle), header parsing serialised across threads."""
    with _NP_LOAD:
        return np.load(path, mmap_mode="r", allow_pickle=False)


class PreprocessCache:
    """Cache of preprocessed arrays under ``root``; safe to share between threads."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.removed_temps = remove_stale_temps(self.root, recursive=True)   # left by killed writers
        self._verified: dict[str, list[str]] = {}   # key -> its notes, once shape and checksum were checked
        self._lock = threading.Lock()
        self.builds = 0      # number of entries (re)built in this process
        self.rebuilt_corrupt = 0

    def key(self, *parts: str) -> str:
        h = hashlib.sha256(CACHE_VERSION.encode())
        for part in parts:
            h.update(b"\0" + part.encode())
        return h.hexdigest()

    def _paths(self, key: str) -> tuple[Path, Path]:
        d = self.root / key[:2]
        return d / f"{key}.npy", d / f"{key}.json"

    def _valid(self, key: str) -> bool:
        arr_path, meta_path = self._paths(key)
        if key in self._verified:
            return arr_path.exists()
        if not (arr_path.exists() and meta_path.exists()):
            return False
        try:
            meta = json.loads(meta_path.read_text())
            arr = _load(arr_path)
            ok = (list(arr.shape) == meta["shape"] and str(arr.dtype) == meta["dtype"]
                  and zlib.crc32(np.ascontiguousarray(arr).view(np.uint8)) == meta["crc32"])
        except (OSError, ValueError, KeyError, json.JSONDecodeError):
            ok = False
        if ok:
            with self._lock:
                self._verified[key] = list(meta.get("notes", []))
        else:
            with self._lock:
                self.rebuilt_corrupt += int(arr_path.exists() or meta_path.exists())
        return ok

    def get_or_build(self, key: str, build: Callable[[], np.ndarray]) -> np.ndarray:
        """Memory-mapped array of entry ``key``, calling ``build()`` first if needed."""
        return self.get_or_build_noted(key, lambda: (build(), []))[0]

    def get_or_build_noted(self, key: str, build: Callable[[], tuple[np.ndarray, list[str]]]
                           ) -> tuple[np.ndarray, list[str]]:
        """Like :meth:`get_or_build` for a ``build() -> (array, notes)``: the notes (what the
        loader chose, in words) are stored in the sidecar and returned on every read."""
        got = self.get(key)
        if got is None:
            arr, notes = build()
            self.put(key, arr, notes)
            got = self.get(key)
        return got

    def get(self, key: str) -> tuple[np.ndarray, list[str]] | None:
        """``(read-only memory map, notes)`` of a valid entry, else None (missing or corrupt)."""
        if not self._valid(key):
            return None
        return _load(self._paths(key)[0]), list(self._verified[key])

    def put(self, key: str, arr: np.ndarray, notes: list[str] = ()) -> None:
        """Write entry ``key`` atomically (the array as float32, then its sidecar)."""
        arr_path, meta_path = self._paths(key)
        arr = np.ascontiguousarray(arr, dtype=np.float32)
        atomic_save_npy(arr_path, arr)
        atomic_write_text(meta_path, json.dumps({
            "shape": list(arr.shape), "dtype": str(arr.dtype),
            "crc32": zlib.crc32(arr.view(np.uint8)), "notes": list(notes)}))
        with self._lock:
            self.builds += 1
            self._verified[key] = list(notes)
