"""Shard sets: the embeddings of a large cohort, written in fixed-size shards by N processes.

``mmvae embed --out FOLDER`` (a folder, not ``.npz``) writes a shard set. The manifest's cases, in
manifest order, are cut into shards of ``shard_size`` cases (a multiple of the batch size, so
every batch a process encodes is a batch the single-process run encodes: the vectors are
bit-identical, not only close). Shard ``i`` belongs to process ``i mod P`` of the ``P``
processes of a ``jax.distributed`` job (:func:`mmvae.sharding.maybe_initialize_distributed`,
the launcher and environment of training: ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES``,
``JAX_PROCESS_ID``, SLURM, Open MPI). The shard plan does not depend on ``P``: a job resumed
with another number of processes continues the same set.

Folder layout (every file written atomically; no pickle)::

    plan.json                 what the set is: manifest digest, weights digest, shard size,
                              batch size, the number of cases and shards, the case-id digest
    shard-00000.npz ...       unstandardised Embeddings of one shard (mmvae.retrieval.embed),
                              identity["shard"] = {"index", "cases", "skipped"}
    shardset.json             written once every shard is there (by process 0 after a barrier,
                              or by the last process to finish): each shard's SHA-256 and count

A killed process leaves finished shards and at most one unfinished temporary file; the re-run
of the same command skips the shards whose file is there and whose weights digest and cases
match the plan, and encodes the rest. A folder holding another run's or manifest's shards is
refused (InputError), never mixed.

A shard set is read like one embeddings file: :meth:`ShardSet.embeddings` concatenates the
shards in plan order and applies the cohort's standardisation over all of them
(:meth:`mmvae.retrieval.embed.Embeddings.standardized`), so it equals the ``.npz`` the
single-process ``mmvae embed`` writes (tested). :func:`mmvae.retrieval.embed.load_embeddings`
opens either (and refuses a set larger than the memory). For sets too large to hold, the
streaming index build (:mod:`mmvae.retrieval.index.stream`) reads one shard at a time, with
statistics accumulated shard by shard (:meth:`ShardSet.standardize_stats`; float64 moments,
equal to the in-memory statistics within 1e-6 relative).

Bit-identical to one process when no case is skipped: with ``data.on_error=skip`` a skipped case
shifts the later cases of its shard into other batches than a single-process run's, and the
vectors then agree to float tolerance only.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import zipfile
from pathlib import Path
import numpy as np

from mmvae.atomic import atomic_write_text
from mmvae.data.cache import source_hash
from mmvae.errors import InputError

log = logging.getLogger(__name__)

FORMAT = "mmvae-shard-set"
FORMAT_VERSION = 1
PLAN, DONE = "plan.json", "shardset.json"
DEFAULT_SHARD_SIZE = 4096


def shard_name(i: int) -> str:
    return f"shard-{int(i):05d}.npz"


def is_shard_set(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a shard-set folder (it has ``plan.json``)."""
    return Path(path).is_dir() and (Path(path) / PLAN).is_file()


def _digest_text(items) -> str:
    h = hashlib.sha256()
    for x in items:
        h.update(str(x).encode("utf-8") + b"\0")
    return h.hexdigest()


def plan_shards(n_cases: int, shard_size: int) -> list[tuple[int, int]]:
    """``[(start, stop), ...]``: contiguous shards of ``shard_size`` cases in manifest order."""
    return [(s, min(s + shard_size, n_cases)) for s in range(0, n_cases, shard_size)]


def shares(n_shards: int, process_index: int, process_count: int) -> list[int]:
    """The shards process ``process_index`` of ``process_count`` encodes: ``i ≡ index (mod count)``."""
    if not 0 <= process_index < process_count:
        raise InputError(f"process index {process_index} is not in [0, {process_count})")
    return list(range(process_index, n_shards, process_count))


@dataclasses.dataclass
class EmbedShardsResult:
    out: Path
    encoded: list[int]          # shards this process encoded
    reused: list[int]           # shards of this process already there
    complete: bool              # shardset.json written (every shard present)
    n_cases: int
    seconds: float


def embed_shards(workdir: str | os.PathLike, manifest: str | os.PathLike | None, out: str | os.PathLike, *,
                 shard_size: int = DEFAULT_SHARD_SIZE, batch_size: int = 32, on_error: str | None = None,
                 process_index: int | None = None, process_count: int | None = None,
                 show_progress: bool = True, on_shard=None) -> EmbedShardsResult:
    """Encode this process's shards of ``manifest`` (default the run's ``data.manifest``) with the
    trained model of ``workdir`` into the shard-set folder ``out`` (module doc).

    ``process_index`` / ``process_count``: default ``jax.process_index()`` / ``jax.process_count()``
    (call :func:`mmvae.sharding.maybe_initialize_distributed` first to join a job).
    ``shard_size`` must be a multiple of ``batch_size``. Raises InputError for a folder that holds
    another plan (other weights, manifest, shard or batch size) and for bad sizes. ``on_shard(index,
    cases, seconds)`` is called after each shard this process encodes (benchmarks)."""
    import time

    import jax

    from mmvae.data.manifest import group_cases, read_manifest, write_manifest
    from mmvae.retrieval.embed import embed_cohort, embedding_fns, embedding_kind
    from mmvae.runs.files import fingerprint
    from mmvae.runs.trained import load_cohort, load_trained
    from mmvae.sharding import barrier

    t0 = time.perf_counter()
    if batch_size < 1 or shard_size < 1 or shard_size % batch_size:
        raise InputError(f"--shard-size ({shard_size}) must be a positive multiple of --batch-size ({batch_size}): "
                         "shards then hold whole batches and their vectors equal a single-process run's")
    pi = jax.process_index() if process_index is None else int(process_index)
    pc = jax.process_count() if process_count is None else int(process_count)
    out, workdir = Path(out), Path(workdir)
    if out.suffix == ".npz" or (out.exists() and not out.is_dir()):
        raise InputError("a shard set is a folder (give --out a folder name, not a file)", path=str(out))
    config, spec, model, tokenizer, step = load_trained(workdir, return_step=True)
    if on_error:
        with config.unlocked():
            config.data.on_error = on_error
    manifest = str(manifest or config.data.manifest)
    entries = read_manifest(manifest)
    cases = group_cases(entries)
    ids = [c.case_id for c in cases]
    spans = plan_shards(len(ids), shard_size)
    fns = embedding_fns(model)        # compiled once for every shard of this process
    digest = fns[2]
    plan = {"format": FORMAT, "version": FORMAT_VERSION, "manifest": str(Path(manifest).resolve()),
            "manifest_sha256": source_hash(manifest), "case_ids_sha256": _digest_text(ids), "n_cases": len(ids),
            "shard_size": int(shard_size), "batch_size": int(batch_size), "n_shards": len(spans),
            "weights_digest": digest, "workdir": str(workdir.resolve()), "checkpoint_step": int(step),
            "standardize": bool(config.retrieval.standardize), "embedding": embedding_kind(config),
            "on_error": str(config.data.on_error)}
    out.mkdir(parents=True, exist_ok=True)
    _check_or_write_plan(out, plan)
    identity = {"model_fingerprint": fingerprint(spec), "checkpoint_step": int(step),
                "workdir": str(workdir.resolve()), "label": str(config.data.label or "")}
    stats = json.loads((workdir / "clinical_stats.json").read_text())
    work = out / ".work"
    encoded, reused = [], []
    mine = shares(len(spans), pi, pc)
    from mmvae.progress import progress_bar
    for i in progress_bar(mine, total=len(mine), desc=f"embed (process {pi}/{pc})" if pc > 1 else "embed",
                          enable=show_progress, unit="shard"):
        start, stop = spans[i]
        t_shard = time.perf_counter()
        if _shard_ok(out / shard_name(i), digest, ids[start:stop]):
            reused.append(i)
            continue
        work.mkdir(exist_ok=True)
        sub = work / f"shard-{i:05d}.p{pi}.jsonl"         # this shard's rows, as a manifest
        keep = set(ids[start:stop])
        write_manifest([e for e in entries if e.case_id in keep], sub)
        try:
            cohort, _, _ = load_cohort(config, workdir, str(sub), tokenizer=tokenizer, clinical_stats=stats,
                                       show_progress=False)
            emb = embed_cohort(model, cohort, batch_size=batch_size, identity=identity, show_progress=False,
                               standardize=False, embedding=embedding_kind(config), fns=fns)
        finally:
            sub.unlink(missing_ok=True)
        emb.identity["shard"] = {"index": i, "cases": ids[start:stop],
                                 "skipped": [list(s) for s in cohort.skipped]}
        emb.save(out / shard_name(i))
        encoded.append(i)
        if on_shard is not None:
            on_shard(i, stop - start, time.perf_counter() - t_shard)
    if pc > 1:
        barrier("mmvae-embed-shards")
    complete = False
    # under a barrier process 0 alone writes the index of the set; processes launched without one
    # (each its own job) try it when they end: the last one to finish completes it
    if pi == 0 or (pc > 1 and not _joined_job() and all((out / shard_name(i)).is_file() for i in range(len(spans)))):
        complete = _finish(out, plan)
    elif pc > 1 and _joined_job():
        complete = (out / DONE).is_file()          # process 0 is writing it (it reads every shard)
    if complete:          # every shard is written: nobody writes any more; what killed runs left goes
        shutil.rmtree(work, ignore_errors=True)
        for leftover in out.glob(".shard-*.npz.tmp-*"):
            leftover.unlink(missing_ok=True)
    return EmbedShardsResult(out, encoded, reused, complete, len(ids), time.perf_counter() - t0)


def _joined_job() -> bool:
    """Whether this process is part of an initialised ``jax.distributed`` job (its barrier works)."""
    import jax
    return jax.process_count() > 1


def _check_or_write_plan(out: Path, plan: dict) -> None:
    p = out / PLAN
    if p.is_file():
        try:
            have = json.loads(p.read_text())
        except ValueError:
            raise InputError("plan.json of the shard set is corrupt: delete the folder to start again",
                             path=str(p)) from None
        keys = ("manifest_sha256", "case_ids_sha256", "shard_size", "batch_size", "weights_digest", "embedding",
                "standardize", "on_error")
        diff = [k for k in keys if have.get(k) != plan[k]]
        if diff:
            raise InputError(f"{out} holds a shard set of another plan (differs in {', '.join(diff)}): "
                             "give another --out, or delete it to re-embed", path=str(p))
        return
    if any(x for x in out.iterdir() if not x.name.startswith(".") and x.name != PLAN):
        raise InputError("refusing to write a shard set into a non-empty folder that is not one", path=str(out))
    atomic_write_text(p, json.dumps(plan, indent=2, sort_keys=True) + "\n")   # processes starting together
    _check_or_write_plan(out, plan)                                           # write the same plan: checked


def _shard_ok(path: Path, digest: str, cases: list[str]) -> bool:
    """A finished shard of this plan: readable, same weights, same cases."""
    if not path.is_file():
        return False
    from mmvae.retrieval.embed import Embeddings
    try:
        e = Embeddings.load(path, part_of_set=True)
    except InputError as err:
        log.warning("shard %s is unreadable (%s): encoding it again", path.name, err)
        return False
    meta = e.identity.get("shard", {})
    return e.identity.get("weights_digest") == digest and meta.get("cases") == cases


def _finish(out: Path, plan: dict) -> bool:
    """Write ``shardset.json`` when every shard is there; False when one is missing. Reads each
    shard's identity and case ids only (the arrays are hashed, not parsed)."""
    shards = []
    for i in range(plan["n_shards"]):
        p = out / shard_name(i)
        if not p.is_file():
            return False
        try:
            with np.load(p, allow_pickle=False) as z:
                count, identity = len(z["case_ids"]), json.loads(str(z["identity"]))
        except (OSError, ValueError, KeyError, zipfile.BadZipFile) as e:
            raise InputError(f"shard cannot be read ({e}): delete it and run the same `mmvae embed` again",
                             path=str(p)) from None
        shards.append({"file": p.name, "sha256": source_hash(p), "count": count,
                       "skipped": identity.get("shard", {}).get("skipped", [])})
    info = dict(plan, shards=shards, count=sum(s["count"] for s in shards))
    atomic_write_text(out / DONE, json.dumps(info, indent=2, sort_keys=True) + "\n")
    return True


def _available_bytes() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


class ShardSet:
    """A finished shard set (``shardset.json`` present, every shard's checksum verified on read)."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        p = self.folder / DONE
        if not p.is_file():
            missing = ""
            if (self.folder / PLAN).is_file():
                try:
                    plan = json.loads((self.folder / PLAN).read_text())
                except ValueError:
                    raise InputError("plan.json of the shard set is corrupt", path=str(self.folder / PLAN)) from None
                gone = [i for i in range(int(plan["n_shards"])) if not (self.folder / shard_name(i)).is_file()]
                missing = f" ({len(gone)} of {plan['n_shards']} shards missing, e.g. {shard_name(gone[0])})" if gone else ""
            raise InputError(f"the shard set is not finished{missing}: run the same `mmvae embed` again to "
                             "encode the missing shards", path=str(self.folder))
        try:
            self.info = json.loads(p.read_text())
        except ValueError as e:
            raise InputError(f"shardset.json is corrupt ({e})", path=str(p)) from None
        if self.info.get("format") != FORMAT or self.info.get("version") != FORMAT_VERSION:
            raise InputError("not an mmvae shard set of a version this mmvae reads", path=str(p))
        self.shards = list(self.info["shards"])
        self._verified: dict[int, tuple] = {}      # shard → (size, mtime) when its checksum matched

    def __len__(self) -> int:
        return int(self.info["count"])

    @property
    def skipped(self) -> list:
        return [s for sh in self.shards for s in sh.get("skipped", [])]

    def shard(self, j: int):
        """The ``j``-th shard's unstandardised Embeddings. Its checksum is verified on the first read;
        a later read (the streaming build reads every shard three times) hashes it again only when
        its size or modification time changed since."""
        from mmvae.retrieval.embed import Embeddings
        sh = self.shards[j]
        p = self.folder / sh["file"]
        st = p.stat() if p.is_file() else None
        stamp = None if st is None else (st.st_size, st.st_mtime_ns)
        if stamp is None or (self._verified.get(j) != stamp and source_hash(p) != sh["sha256"]):
            raise InputError("shard is missing or changed since the set was finished (checksum)", path=str(p))
        self._verified[j] = stamp
        return Embeddings.load(p, part_of_set=True)

    def embeddings(self, standardize: bool | None = None):
        """Every shard concatenated in plan order, standardised over the whole cohort (as the run's
        ``retrieval.standardize``, or ``standardize``): equal to the single-process ``.npz``.

        InputError, before reading, when the set would take more than 80 % of the memory available
        (Linux ``MemAvailable``): index it streaming instead (``mmvae index``)."""
        from mmvae.retrieval.embed import Embeddings
        gone = [sh["file"] for sh in self.shards if not (self.folder / sh["file"]).is_file()]
        if gone:
            raise InputError(f"{len(gone)} shard(s) of the finished set are missing (e.g. {gone[0]}): run the "
                             "same `mmvae embed` again to encode them", path=str(self.folder))
        need = sum((self.folder / sh["file"]).stat().st_size for sh in self.shards) * 2
        avail = _available_bytes()
        if avail is not None and need > 0.8 * avail:
            raise InputError(f"the shard set ({len(self)} cases) needs ≈ {need / 1e9:.1f} GB in memory and "
                             f"{avail / 1e9:.1f} GB are available: index it streaming (mmvae index --embeddings "
                             f"{self.folder}), which never loads it whole", path=str(self.folder))
        parts = [self.shard(j) for j in range(len(self.shards))]
        first = parts[0]

        def cat(name):
            vals = [getattr(p, name) for p in parts]
            return None if vals[0] is None else np.concatenate(vals)

        ident = {k: v for k, v in first.identity.items() if k != "shard"}
        emb = Embeddings(case_ids=[c for p in parts for c in p.case_ids], modalities=first.modalities,
                         experts_mu=cat("experts_mu"), experts_logvar=cat("experts_logvar"), present=cat("present"),
                         mu=cat("mu"), logvar=cat("logvar"), labels=[x for p in parts for x in p.labels],
                         identity=ident, fusion=first.fusion, label_probs=cat("label_probs"),
                         label_classes=first.label_classes, embedding=first.embedding, frozen=cat("frozen"),
                         frozen_widths=first.frozen_widths)
        std = self.info.get("standardize", True) if standardize is None else standardize
        return emb.standardized() if std else emb

    def standardize_stats(self) -> dict | None:
        """The cohort's standardisation statistics accumulated shard by shard (float64 count, sum and
        sum of squares per dimension over the cases that inform it; the same definition as
        :meth:`~mmvae.retrieval.embed.Embeddings.standardized`); None when the run does not standardise."""
        if not self.info.get("standardize", True):
            return None
        def moments(every: bool):
            acc = None
            for j in range(len(self.shards)):
                e = self.shard(j)
                x, keep, width = e.raw_vectors()
                if every:
                    keep = np.ones_like(keep)
                x64 = np.where(keep, x, 0.0).astype(np.float64)
                part = np.stack([keep.sum(0).astype(np.float64), x64.sum(0), (x64 * x64).sum(0)])
                acc = part if acc is None else acc + part
            return acc, width, e.embedding

        acc, width, kind = moments(False)
        if kind == "fused" and not acc[0].any():          # no case has a modality: every case (as in memory)
            acc, width, kind = moments(True)
        n, s, ss = acc
        with np.errstate(invalid="ignore", divide="ignore"):
            center = np.where(n > 0, s / np.maximum(n, 1), 0.0)
            var = np.where(n > 0, ss / np.maximum(n, 1) - center ** 2, 1.0)
        scale = np.sqrt(np.maximum(var, 0.0))
        from mmvae.retrieval.embed import _stats
        return _stats(center, np.maximum(scale, 1e-6) * np.sqrt(width))


def write_shard_set(parts, out: str | os.PathLike, *, standardize: bool = True, source: str = "") -> "ShardSet":
    """A shard set from unstandardised :class:`~mmvae.retrieval.embed.Embeddings` parts already in
    memory (one shard each, in order): embeddings computed elsewhere, synthetic benchmarks
    (experiments/benchmarks/bench_scale.py), tests. ``source`` is recorded in the plan."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if any(x for x in out.iterdir() if not x.name.startswith(".")):
        raise InputError("refusing to write a shard set into a non-empty folder", path=str(out))
    n_shards, count, ids_digest, first = 0, 0, hashlib.sha256(), None
    for i, e in enumerate(parts):
        e.identity = dict(e.identity, shard={"index": i, "cases": list(e.case_ids), "skipped": []})
        e.identity.pop("standardize", None)
        e.save(out / shard_name(i))
        first = first or e
        for c in e.case_ids:
            ids_digest.update(c.encode() + b"\0")
        n_shards, count = n_shards + 1, count + len(e.case_ids)
    if first is None:
        raise InputError("no shard to write", path=str(out))
    plan = {"format": FORMAT, "version": FORMAT_VERSION, "manifest": source, "manifest_sha256": "",
            "case_ids_sha256": ids_digest.hexdigest(), "n_cases": count, "shard_size": 0, "batch_size": 0,
            "n_shards": n_shards, "weights_digest": first.identity.get("weights_digest", ""),
            "standardize": bool(standardize), "embedding": first.embedding}
    atomic_write_text(out / PLAN, json.dumps(plan, indent=2, sort_keys=True) + "\n")
    if not _finish(out, plan):
        raise InputError("a shard went missing while the set was written", path=str(out))
    return ShardSet(out)
