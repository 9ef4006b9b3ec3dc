"""The index folder on disk: atomic save, verified load, recovery of an interrupted save.

Folder layout (written by :func:`save`, atomically; no pickle anywhere):

``index.faiss``        the faiss index (``faiss.serialize_index`` / ``_binary``).
``embeddings.npy``     float32 ``(2, N, L)``: ``[0]`` posterior means, ``[1]`` log-variances,
                       rows in ``metadata.jsonl`` order.
``metadata.jsonl``     one JSON object per case: ``id`` (faiss int64 id), ``case_id``,
                       ``modalities``, ``labels`` (+ ``report`` only when the index was
                       built with ``include_text=True``, + ``source`` when given).
``binary_hash.npy``    (``binary`` only: the backend's ``state_file``) float32
                       ``(nbits + 1, L)``: projection rows, then the centre.
``lexical.jsonl``      (indexes with a lexical leg) one JSON list of report tokens per case,
                       row order (:mod:`.lexical`).
``fusion.json``        (after ``mmvae fit-fusion``) the fitted leg weights per label, with the
                       folds' scores (:mod:`mmvae.retrieval.hybrid`).
``index.json``         format, version, kind, metric, latent_dim, counts, next id,
                       parameters, identity and the sha256 of every other file.
"""
from __future__ import annotations

import glob
import json
import logging
import os
import shutil
import sys
import tempfile
import uuid
from pathlib import Path

import faiss
import numpy as np

from mmvae.data.cache import source_hash   # SHA-256 of a file's bytes
from mmvae.errors import IndexError_, InputError
from mmvae.retrieval.index.backends import BACKENDS
from mmvae.retrieval.index.lexical import LexicalLeg

log = logging.getLogger(__package__)

FORMAT = "mmvae-case-index"
FORMAT_VERSION = 1
METRICS = ("cosine", "l2")


def _writers():
    """``(atomic_write_bytes, atomic_save_npy, atomic_write_text)`` as the package
    (:mod:`mmvae.retrieval.index`) holds them at call time, so that patching them there
    reaches every write (tests/test_crash_safety.py kills a save part-way that way)."""
    pkg = sys.modules[__package__]
    return pkg.atomic_write_bytes, pkg.atomic_save_npy, pkg.atomic_write_text


# --------------------------------------------------------------------------- save
def save(ix, folder: str | os.PathLike) -> Path:
    """:meth:`~mmvae.retrieval.index.CaseIndex.save` of ``ix`` (the contract there)."""
    folder = Path(folder)
    recover_interrupted_save(folder)
    if folder.exists():
        if not folder.is_dir():
            raise InputError("index destination exists and is not a folder", path=str(folder))
        if any(folder.iterdir()) and not (folder / "index.json").is_file():
            raise InputError("refusing to replace a non-empty folder that is not an index",
                             path=str(folder))
    parent = folder.parent
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=parent))
    try:
        write_files(ix, tmp)
        install(tmp, folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return folder


def install(tmp: Path, folder: Path) -> None:
    """Rename the complete index folder ``tmp`` (a hidden ``.<name>.tmp-*`` sibling) onto ``folder``:
    the old index renamed aside (``.<name>.old-*``), the new one in, the old one deleted; on an
    exception the old one is put back (:func:`recover_interrupted_save` after a SIGKILL)."""
    folder = Path(folder)
    if folder.exists():
        if not folder.is_dir():
            raise InputError("index destination exists and is not a folder", path=str(folder))
        if any(folder.iterdir()) and not (folder / "index.json").is_file():
            raise InputError("refusing to replace a non-empty folder that is not an index", path=str(folder))
    old = None
    if folder.exists():
        old = folder.parent / f".{folder.name}.old-{uuid.uuid4().hex[:8]}"
        os.rename(folder, old)
    try:
        os.rename(tmp, folder)
    except BaseException:
        if old is not None:
            os.rename(old, folder)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _metadata_lines(ix) -> str:
    lines = []
    for i, c, m in zip(ix._ids, ix._case_ids, ix._meta):
        rec = {"id": int(i), "case_id": c, "modalities": m["modalities"], "labels": m["labels"]}
        if ix.include_text and "report" in m:
            rec["report"] = m["report"]
        if "source" in m:
            rec["source"] = m["source"]
        lines.append(json.dumps(rec, ensure_ascii=False))
    return "".join(x + "\n" for x in lines)


def write_files(ix, d: Path) -> None:
    """Every file of the index into the folder ``d``, ``index.json`` (with the sha256 of
    the others) last."""
    write_bytes, save_npy, write_text = _writers()
    b = ix.backend
    blob = faiss.serialize_index_binary(ix._index) if b.binary else faiss.serialize_index(ix._index)
    write_bytes(d / "index.faiss", np.asarray(blob).tobytes())
    save_npy(d / "embeddings.npy", np.stack([ix._mu, ix._logvar]).astype(np.float32))
    if b.state_file is not None:
        save_npy(d / b.state_file, b.save_state(ix._state))
    write_text(d / "metadata.jsonl", _metadata_lines(ix))
    if ix.lexical is not None:
        write_text(d / "lexical.jsonl", ix.lexical.dumps())
    if ix.fusion is not None:
        write_text(d / "fusion.json", json.dumps(ix.fusion, indent=2, sort_keys=True) + "\n")
    files = {name: source_hash(d / name)
             for name in sorted(p.name for p in d.iterdir() if not p.name.startswith("."))}
    info = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "kind": ix.kind,
        "metric": ix.metric,
        "latent_dim": ix.latent_dim,
        "count": ix.size,
        "faiss_ntotal": ix.ntotal,
        "tombstones": ix.ntotal - ix.size,
        "next_id": ix._next_id,
        "include_text": ix.include_text,
        "params": ix.params,
        "identity": ix.identity,
        "files": files,
    }
    write_text(d / "index.json", json.dumps(info, indent=2, sort_keys=True) + "\n")


# --------------------------------------------------------------------------- recovery
def _leftovers(folder: Path, kind: str) -> list[Path]:
    """Hidden ``.<name>.<kind>-*`` siblings of an index folder (newest first)."""
    if not folder.parent.is_dir():
        return []
    found = [p for p in folder.parent.glob(f".{glob.escape(folder.name)}.{kind}-*") if p.is_dir()]
    return sorted(found, key=lambda p: p.stat().st_mtime, reverse=True)


def recover_interrupted_save(folder: str | os.PathLike) -> list[str]:
    """Undo what a killed :meth:`CaseIndex.save` left next to ``folder``: delete its
    ``.tmp-*`` folders, put the ``.old-*`` folder (the last complete index) back when
    ``folder`` is missing, delete stale ``.old-*`` folders otherwise. Returns what it did."""
    folder = Path(folder)
    done = []
    for t in _leftovers(folder, "tmp"):
        shutil.rmtree(t, ignore_errors=True)
        done.append(f"removed unfinished {t.name}")
    olds = [o for o in _leftovers(folder, "old") if (o / "index.json").is_file()]
    if olds and not folder.exists():
        os.rename(olds[0], folder)
        done.append(f"restored {folder.name} from {olds[0].name} (a save was interrupted)")
        olds = olds[1:]
    for o in olds:
        shutil.rmtree(o, ignore_errors=True)
        done.append(f"removed stale {o.name}")
    return done


# --------------------------------------------------------------------------- load
def _read_info(folder: Path) -> dict:
    """``index.json`` of ``folder``, its format and version checked."""
    jpath = folder / "index.json"
    if not folder.is_dir():
        raise IndexError_(f"no index folder at {str(folder)!r}")
    if not jpath.is_file():
        raise IndexError_(f"{str(folder)!r} has no index.json (not an index, or an incomplete save)")
    try:
        info = json.loads(jpath.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise IndexError_(f"index file index.json is corrupt (not valid JSON: {e})") from None
    if not isinstance(info, dict) or info.get("format") != FORMAT:
        raise IndexError_(f"{str(jpath)!r} is not an mmvae case index")
    if info.get("version") != FORMAT_VERSION:
        raise IndexError_(f"index format version {info.get('version')!r} is not supported "
                          f"(this mmvae reads version {FORMAT_VERSION})")
    return info


def _verify_files(folder: Path, files: dict, backend) -> None:
    """Every file the kind needs has a checksum, and every listed file matches its own."""
    required = ["index.faiss", "embeddings.npy", "metadata.jsonl"]
    if backend.state_file is not None:
        required.append(backend.state_file)
    for name in required:
        if name not in files:
            raise IndexError_(f"index.json lists no checksum for {name}")
    for name, sha in files.items():
        p = folder / name
        if os.sep in name or name.startswith(".") or not p.is_file():
            raise IndexError_(f"index file {name} is missing")
        if source_hash(p) != sha:
            raise IndexError_(f"index file {name} is corrupt (checksum mismatch)")


def _read_faiss(folder: Path, backend):
    data = np.frombuffer((folder / "index.faiss").read_bytes(), dtype=np.uint8)
    try:
        return faiss.deserialize_index_binary(data) if backend.binary else faiss.deserialize_index(data)
    except Exception as e:  # faiss raises RuntimeError with a C++ trace
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise IndexError_(f"index file index.faiss cannot be read by faiss: {msg[:300]}") from None


def _load_npy(folder: Path, name: str, mmap: bool = False) -> np.ndarray:
    try:
        return np.load(folder / name, allow_pickle=False, mmap_mode="r" if mmap else None)
    except (ValueError, OSError, EOFError) as e:
        raise IndexError_(f"index file {name} cannot be read: {e}") from None


def _read_metadata(folder: Path, count: int, next_id: int) -> tuple[list[int], list[str], list[dict]]:
    """``(faiss ids, case ids, metadata)`` of ``metadata.jsonl``, checked against index.json."""
    ids, cids, metas = [], [], []
    try:
        for line in (folder / "metadata.jsonl").read_text(encoding="utf-8").splitlines():
            if not line.strip():
                continue
            rec = json.loads(line)
            ids.append(int(rec["id"]))
            cids.append(str(rec["case_id"]))
            m = {"modalities": [str(x) for x in rec.get("modalities", [])],
                 "labels": rec.get("labels", {})}
            if "report" in rec:
                m["report"] = rec["report"]
            if isinstance(rec.get("source"), dict):
                m["source"] = rec["source"]
            metas.append(m)
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise IndexError_(f"index file metadata.jsonl is malformed ({e})") from None
    if len(cids) != count or len(set(cids)) != count or len(set(ids)) != count:
        raise IndexError_(f"metadata.jsonl has {len(cids)} entries ({len(set(cids))} unique), "
                          f"index.json says {count}")
    if ids and (min(ids) < 0 or max(ids) >= next_id):
        raise IndexError_("metadata.jsonl holds ids outside the index's id range")
    return ids, cids, metas


def _resolve(folder: Path) -> Path:
    """``folder``, or (when missing because a save was killed between its two renames)
    its newest complete ``.old-*`` sibling, with a warning."""
    if not folder.exists():
        olds = [o for o in _leftovers(folder, "old") if (o / "index.json").is_file()]
        if olds:
            log.warning("index %s: the last save was interrupted; reading the previous complete index %s",
                        folder, olds[0].name)
            return olds[0]
    return folder


def read_folder(folder: str | os.PathLike) -> dict:
    """The verified parts of an index folder, as keyword arguments of
    :class:`~mmvae.retrieval.index.CaseIndex` (the faiss index configured to search
    with the stored nprobe / efSearch). Every problem is an IndexError_; nothing is
    written."""
    folder = _resolve(Path(folder))
    info = _read_info(folder)
    try:
        kind, metric = info["kind"], info["metric"]
        L, count, next_id = int(info["latent_dim"]), int(info["count"]), int(info["next_id"])
        files = dict(info["files"])
        params, identity = dict(info["params"]), dict(info["identity"])
        include_text = bool(info.get("include_text", False))
    except (KeyError, TypeError, ValueError) as e:
        raise IndexError_(f"index.json is malformed ({type(e).__name__}: {e})") from None
    if kind not in BACKENDS or metric not in METRICS:
        raise IndexError_(f"index.json names an unknown kind/metric ({kind!r}, {metric!r})")
    backend = BACKENDS[kind]
    _verify_files(folder, files, backend)
    index = _read_faiss(folder, backend)
    # memory-mapped, read-only: a search reads the rows it re-scores, not the whole (2, N, L) array
    # (10⁶ cases × 200 dims is 1.6 GB); add/remove build new in-memory arrays
    emb = _load_npy(folder, "embeddings.npy", mmap=True)
    if emb.dtype != np.float32 or emb.shape != (2, count, L):
        raise IndexError_(f"embeddings.npy has shape {emb.shape} {emb.dtype}, "
                          f"expected (2, {count}, {L}) float32")
    ids, cids, metas = _read_metadata(folder, count, next_id)
    dim = backend.dim(params, L)
    if index.d != dim or index.ntotal < count:
        raise IndexError_(f"index.faiss (d={index.d}, {index.ntotal} vectors) does not match "
                          f"index.json (d={dim}, {count} cases)")
    state = {}
    if backend.state_file is not None:
        state = backend.load_state(_load_npy(folder, backend.state_file), params, L)
    backend.configure(index, params)
    lexical = fusion = None
    if "lexical.jsonl" in files:
        lexical = LexicalLeg.loads((folder / "lexical.jsonl").read_text(encoding="utf-8"), count)
    if "fusion.json" in files:
        try:
            fusion = json.loads((folder / "fusion.json").read_text(encoding="utf-8"))
        except ValueError as e:
            raise IndexError_(f"index file fusion.json is corrupt (not valid JSON: {e})") from None
    return dict(kind=kind, metric=metric, latent_dim=L, identity=identity, params=params,
                faiss_index=index, mu=np.ascontiguousarray(emb[0]), logvar=np.ascontiguousarray(emb[1]),
                ids=np.array(ids, dtype=np.int64), case_ids=cids, meta=metas, next_id=next_id,
                include_text=include_text, state=state, lexical=lexical, fusion=fusion)
