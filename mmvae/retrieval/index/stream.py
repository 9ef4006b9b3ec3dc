"""Build a case index from a shard set without holding every vector: train on a sample, add shard by shard.

The FAISS wiki's recipe for large collections ("Indexing 1M vectors", "Indexing 1G vectors"):
train the coarse quantiser (and PQ / OPQ) on a sample, encode the vectors part by part with the
trained index, and merge the parts' inverted lists. Here a part is a shard of
:mod:`mmvae.retrieval.shards`. Steps, each resumable:

1. standardisation statistics over every shard (:meth:`ShardSet.standardize_stats`: one pass,
   float64 moments);
2. the training sample: from each shard a seeded uniform share of ``train_size`` rows;
   ``trained.faiss`` is the trained, empty index;
3. per shard: its standardised means and log-variances (``part-J.npy``), its metadata lines with
   global ids (``part-J.jsonl``) and, for the IVF kinds, its codes ``index.sa_encode(x)``
   (``part-J.codes.npy``: list number + code, what ``add_sa_codes`` takes back), written
   atomically, codes last;
4. assembly into a hidden temporary folder: the trained index plus every part's codes in shard
   order (byte-identical to adding the vectors in memory: ``add_sa_codes`` of ``sa_encode``),
   ``embeddings.npy`` and ``metadata.jsonl`` streamed part by part, ``index.json`` last; then
   the folder is renamed into place as :meth:`CaseIndex.save` does.

The work folder ``.<name>.build-<key>`` beside the index keeps steps 1–3; ``key`` digests the
shard set and the build options, so a re-run of the same command after a kill at any point
reuses what is finished and gives the same index, byte for byte (tested), and another build never
reads it. It is removed after a successful build.

Memory: the training sample, one shard, and the final faiss index (for ``opq-ivfpq``
``m_pq + 8`` bytes per case plus the lists' overhead, for ``ivf`` ``4·L + 8``, for ``flat``
``4·L + 16``); :func:`build_from_shards` refuses, before any work, a build whose estimate exceeds
``max_build_gb`` and names the kind that fits. The kind, when not given, comes from
:func:`choose_kind` (the table in docs/scale.md).
"""
from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np

from mmvae.atomic import atomic_save_npy, atomic_write_bytes, atomic_write_text
from mmvae.errors import InputError
from mmvae.retrieval.index import storage
from mmvae.retrieval.index.backends import BuildOptions, backend_of, default_m_opq, default_nlist, default_nprobe
from mmvae.retrieval.index.inputs import jsonable, normalise

log = logging.getLogger(__name__)

STREAMING_KINDS = ("flat", "ivf", "ivfpq", "opq-ivfpq")
EXACT_MAX = 100_000            # flat (exact) up to this many cases
IVF_MAX = 1_000_000            # ivf (exact vectors in lists) up to this many, when the floats fit


def choose_kind(n: int, latent_dim: int, max_build_gb: float) -> str:
    """The index kind for ``n`` cases of width ``latent_dim`` under a memory budget (GB).

    ``flat`` (exact) under 10⁴ cases, and up to 10⁵ within the budget; ``ivf`` up to 10⁶ when its float lists (``4·L + 8`` B a case)
    take at most half the budget; otherwise ``opq-ivfpq`` (``m_pq + 8`` B a case, FAISS wiki's
    ``OPQ32_…,IVF…,PQ32``). Measured trade-offs: docs/scale.md."""
    budget = float(max_build_gb) * 1e9
    if n < 10_000 or (n <= EXACT_MAX and n * (4 * latent_dim + 16) <= budget / 2):
        return "flat"          # (PQ codebooks need thousands of training vectors; a small index is exact)
    if n <= IVF_MAX and n * (4 * latent_dim + 8) <= budget / 2:
        return "ivf"
    return "opq-ivfpq"


def default_rerank_factor(kind: str, n: int) -> int:
    """First-pass candidates per result (``rerank_factor·k`` re-scored exactly from the stored means):
    4 for exact kinds and small collections; for PQ codes over 10⁵ cases more, since their
    ranking cannot tell apart the many close neighbours of a large collection (measured at 10⁶:
    docs/scale.md)."""
    if "pq" not in kind or n <= EXACT_MAX:
        return 4
    return 32


def estimate_bytes(kind: str, n: int, latent_dim: int, nlist: int, m_pq: int, train_n: int, shard_n: int) -> int:
    """Peak bytes of the build (beyond the interpreter): final faiss index + training sample + one shard."""
    per_case = {"flat": 4 * latent_dim + 16, "ivf": 4 * latent_dim + 8, "ivfpq": m_pq + 8,
                "opq-ivfpq": m_pq + 8}[kind]
    quantiser = 4 * nlist * latent_dim
    sample = 4 * train_n * latent_dim * (2 if kind == "opq-ivfpq" else 1)
    shard = 4 * shard_n * latent_dim * 6            # experts, means, log-variances, normalised copy
    return n * per_case + quantiser + sample + shard


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def build_from_shards(shardset, out: str | os.PathLike, *, kind: str | None = None, metric: str = "cosine",
                      max_build_gb: float = 2.0, nlist: int | None = None, m_pq: int | None = None,
                      nprobe: int | None = None, train_size: int | None = None, seed: int = 0,
                      rerank_factor: int | None = None, show_progress: bool = True,
                      stop_after: str | None = None) -> Path:
    """Build the index folder ``out`` from a :class:`~mmvae.retrieval.shards.ShardSet` (module doc).

    ``kind``: one of :data:`STREAMING_KINDS` or None (:func:`choose_kind`); ``max_build_gb``: the
    memory budget the estimate must fit (InputError naming a kind that fits otherwise);
    ``train_size``: training sample (default 64·nlist, at least 10,000 for 8-bit PQ codebooks, at
    most N); ``rerank_factor``: the searches' default first pass (``rerank_factor·k`` candidates
    re-scored exactly; default :func:`default_rerank_factor`); ``stop_after``: ``'stats' | 'train' | 'part:J'`` stops there (tests simulate a kill).
    Returns ``out``."""
    t0 = time.perf_counter()
    out = Path(out)
    n = len(shardset)
    if n < 1:
        raise InputError("the shard set holds no case", path=str(shardset.folder))
    if not max_build_gb > 0:
        raise InputError(f"--max-build-gb must be > 0 (got {max_build_gb})")
    if metric not in storage.METRICS:
        raise InputError(f"metric must be one of {list(storage.METRICS)} (got {metric!r})")
    for name, v in (("nlist", nlist), ("m_pq", m_pq), ("nprobe", nprobe), ("train_size", train_size),
                    ("rerank_factor", rerank_factor)):
        if v is not None and int(v) < 1:
            raise InputError(f"--{name.replace('_', '-')} must be ≥ 1 (got {v})")
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / "index.json").is_file())):
        raise InputError("refusing to replace something that is not an index", path=str(out))
    first = shardset.shard(0)
    L = int(first.vectors_with(None)[0].shape[1])
    kind = kind or choose_kind(n, L, max_build_gb)
    if kind not in STREAMING_KINDS:
        raise InputError(f"a streaming build makes {list(STREAMING_KINDS)} (got {kind!r}); hnsw and binary are "
                         "built in memory from an embeddings file")
    backend = backend_of(kind)
    ivf_kind = kind != "flat"
    nl = (default_nlist(n) if nlist is None else int(nlist)) if ivf_kind else 0
    m = (m_pq or (default_m_opq(L) if kind == "opq-ivfpq" else None)) if "pq" in kind else None
    if kind == "ivfpq" and m is None:
        from mmvae.retrieval.index.backends import default_m_pq
        m = default_m_pq(L)
    need = max(64 * nl, 10_000 if "pq" in kind else 39 * nl) if ivf_kind else 0
    train_n = min(n, int(train_size) if train_size else need)
    if ivf_kind and train_n < 39 * nl:
        raise InputError(f"{train_n} training vectors for {nl} lists: faiss needs ≥ 39 a list (lower --nlist)")
    shard_n = max(int(s["count"]) for s in shardset.shards)
    est = estimate_bytes(kind, n, L, nl, m or 0, train_n, shard_n)
    if est > max_build_gb * 1e9:
        fits = choose_kind(n, L, max_build_gb)
        hint = f"use --kind {fits} or raise --max-build-gb" if fits != kind else "raise --max-build-gb"
        raise InputError(f"the {kind} index of {n} cases × {L} dims needs ≈ {est / 1e6:,.1f} MB to build, over "
                         f"--max-build-gb={max_build_gb:g}: {hint}")
    rf = default_rerank_factor(kind, n) if rerank_factor is None else int(rerank_factor)
    if rf < 1:
        raise InputError(f"rerank_factor must be ≥ 1 (got {rerank_factor})")
    options = {"kind": kind, "metric": metric, "nlist": nl, "m_pq": m, "nprobe": nprobe, "train_size": train_n,
               "rerank_factor": rf,
               "seed": int(seed), "shardset": storage.source_hash(shardset.folder / "shardset.json")}
    key = _digest(options)[:16]
    out.parent.mkdir(parents=True, exist_ok=True)
    storage.recover_interrupted_save(out)
    work = out.parent / f".{out.name}.build-{key}"
    work.mkdir(exist_ok=True)
    for stale in out.parent.glob(f".{glob.escape(out.name)}.build-*"):
        if stale != work:
            shutil.rmtree(stale, ignore_errors=True)
    (work / "build.json").write_text(json.dumps(options, indent=2, sort_keys=True) + "\n")

    # 1. standardisation statistics
    stats_path = work / "stats.json"
    if stats_path.is_file():
        stats = json.loads(stats_path.read_text())["stats"]
    else:
        stats = shardset.standardize_stats()
        atomic_write_text(stats_path, json.dumps({"stats": stats}))
    if stop_after == "stats":
        return out

    try:
        return _build(shardset, out, work, stats, kind, metric, backend, ivf_kind, nl, m, nprobe, train_n, n, L, rf,
                      seed, first, show_progress, stop_after, t0)
    except InputError:              # bad input (e.g. too few cases for the codebooks): nothing to resume
        if not list(work.glob("part-*")):
            shutil.rmtree(work, ignore_errors=True)
        raise


def _build(shardset, out, work, stats, kind, metric, backend, ivf_kind, nl, m, nprobe, train_n, n, L, rf, seed,
           first, show_progress, stop_after, t0):
    from mmvae.progress import progress_bar
    from mmvae.retrieval.pipeline import case_metadata

    def vectors(j):
        e = shardset.shard(j)
        mu, lv = e.vectors_with(stats)
        x = normalise(mu) if metric == "cosine" else np.ascontiguousarray(mu, np.float32)
        return e, mu.astype(np.float32), lv.astype(np.float32), x

    # 2. training sample and the trained, empty index
    fm = faiss.METRIC_INNER_PRODUCT if metric == "cosine" else faiss.METRIC_L2
    trained_path = work / "trained.faiss"
    if trained_path.is_file():
        trained_blob = np.fromfile(trained_path, dtype=np.uint8)
        params = json.loads((work / "trained.json").read_text())
    else:
        sample = []
        for j, sh in enumerate(progress_bar(shardset.shards, desc="sample", enable=show_progress, unit="shard")):
            take = int(round(train_n * int(sh["count"]) / n)) if ivf_kind else 0
            if take <= 0:
                continue
            rows = np.sort(np.random.default_rng([int(seed), j]).choice(int(sh["count"]), take, replace=False))
            sample.append(vectors(j)[3][rows])
        xs = np.concatenate(sample) if sample else np.zeros((1, L), np.float32)
        opts = BuildOptions(nlist=nl or None, m_pq=m, nprobe=nprobe, seed=int(seed))
        index, params, _ = backend.build(xs, fm, opts)
        del xs, sample
        if kind == "flat":
            params = {}
        params = {"seed": int(seed), **params, **({"rerank_factor": rf} if rf != 4 else {})}
        trained_blob = faiss.serialize_index(index)
        atomic_write_text(work / "trained.json", json.dumps(params))
        atomic_write_bytes(trained_path, np.asarray(trained_blob).tobytes())
    if stop_after == "train":
        return out

    # 3. parts
    trained = faiss.deserialize_index(trained_blob)
    offsets = np.concatenate([[0], np.cumsum([int(s["count"]) for s in shardset.shards])])
    for j in progress_bar(range(len(shardset.shards)), desc="encode", enable=show_progress, unit="shard"):
        done = work / f"part-{j:05d}.codes.npy"
        if done.is_file():
            continue
        e, mu, lv, x = vectors(j)
        atomic_save_npy(work / f"part-{j:05d}.npy", np.stack([mu, lv]))
        lines = []
        for k, (cid, meta) in enumerate(zip(e.case_ids, case_metadata(e))):
            lines.append(json.dumps({"id": int(offsets[j] + k), "case_id": cid, "modalities": meta["modalities"],
                                     "labels": meta["labels"]}, ensure_ascii=False))
        atomic_write_text(work / f"part-{j:05d}.jsonl", "".join(x_ + "\n" for x_ in lines))
        codes = trained.sa_encode(x) if ivf_kind else np.zeros((len(x), 0), np.uint8)
        atomic_save_npy(done, codes)
        if stop_after == f"part:{j}":
            return out

    # 4. assembly
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        _assemble(tmp, work, shardset, trained, kind, metric, L, n, params, first, offsets, show_progress)
        storage.install(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(work, ignore_errors=True)
    log.info("built %s index of %d cases in %.1f s -> %s", kind, n, time.perf_counter() - t0, out)
    return out


def _assemble(tmp: Path, work: Path, shardset, trained, kind, metric, L, n, params, first, offsets,
              show_progress) -> None:
    from mmvae.progress import progress_bar
    nparts = len(shardset.shards)
    index = trained
    if kind == "flat":
        for j in range(nparts):
            part = np.load(work / f"part-{j:05d}.npy", mmap_mode="r")
            x = normalise(np.asarray(part[0])) if metric == "cosine" else np.ascontiguousarray(part[0])
            index.add_with_ids(x, np.arange(offsets[j], offsets[j + 1], dtype=np.int64))
    else:
        ivf = faiss.extract_index_ivf(index)
        for j in progress_bar(range(nparts), desc="merge", enable=show_progress, unit="shard"):
            codes = np.load(work / f"part-{j:05d}.codes.npy")
            ivf.add_sa_codes(codes, np.arange(offsets[j], offsets[j + 1], dtype=np.int64))
        index.ntotal = ivf.ntotal
    faiss.write_index(index, str(tmp / "index.faiss"))
    del index
    with open(tmp / "embeddings.npy", "wb") as fh:           # (2, N, L): every part's means, then log-variances
        np.lib.format.write_array_header_2_0(fh, {"descr": "<f4", "fortran_order": False, "shape": (2, n, L)})
        for which in (0, 1):
            for j in range(nparts):
                part = np.load(work / f"part-{j:05d}.npy", mmap_mode="r")
                fh.write(np.ascontiguousarray(part[which], dtype="<f4").tobytes())
    with open(tmp / "metadata.jsonl", "wb") as fh:
        for j in range(nparts):
            fh.write((work / f"part-{j:05d}.jsonl").read_bytes())
    ident = {k: v for k, v in first.identity.items() if k not in ("shard",)}
    ident.setdefault("embedding", first.embedding)
    ident.setdefault("modalities", list(first.modalities))
    ident["standardize"] = json.loads((work / "stats.json").read_text())["stats"]
    ident["latent_dim"] = L
    ident["shard_set"] = {"folder": str(shardset.folder.resolve()), "n_shards": nparts}
    files = {p.name: storage.source_hash(p) for p in sorted(tmp.iterdir())}
    info = {"format": storage.FORMAT, "version": storage.FORMAT_VERSION, "kind": kind, "metric": metric,
            "latent_dim": L, "count": n, "faiss_ntotal": n, "tombstones": 0, "next_id": n, "include_text": False,
            "params": params, "identity": jsonable(ident, "identity"), "files": files}
    (tmp / "index.json").write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
    for p in tmp.iterdir():
        with open(p, "rb+") as f:
            os.fsync(f.fileno())


__all__ = ["build_from_shards", "choose_kind", "estimate_bytes", "STREAMING_KINDS"]
