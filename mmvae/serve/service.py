"""What the review page does, without HTTP: queries, relevance-feedback rounds, case views.

:class:`ReviewService` wraps a :class:`~mmvae.retrieval.query.Retriever` (trained model +
case index) and the manifest of the indexed cases (for their files, report text and
thumbnails). A query opens a :class:`Session`; each round of feedback moves the query by
Rocchio (Rocchio 1971; as used for CBIR relevance feedback, e.g. Kurtz et al. 2015):

.. math::  q_{t+1} = \\alpha\\, q_t + \\beta\\,\\overline{R_t} - \\gamma\\,\\overline{N_t}

with :math:`R_t`, :math:`N_t` the stored posterior means of the cases marked relevant /
not relevant in round :math:`t` and the weights ``retrieval.rocchio`` of the run's config
(:meth:`Retriever.apply_feedback`), then searches again; the query case and nothing else is
excluded. The JSON API (:mod:`mmvae.serve.app`) and the page show exactly these rankings.

Uploaded files and their preprocessed arrays are written to a per-request folder inside the
service's temporary folder (``mmvae-serve-<pid>-*/requests``, :mod:`mmvae.serve.jobs`) and removed once
the query is encoded, or when its deadline passes; the Retriever's cache (a subfolder) holds
only arrays of indexed cases (queries with a subset of their modalities) and goes when the
service closes. Folders of dead servers are swept when a service starts.

Locks: ``_lock`` guards the sessions and the index (held only for short steps: a search, a
session); ``_model_lock`` guards the Retriever's encoder state (held for one encoding); a
semaphore of ``serve.workers`` slots bounds the uploads saved and loaded at once. Files are
saved, unzipped, loaded and preprocessed holding a slot only, so a slow file holds its own
request, not the others'. Order: archive lock → slot → model lock → ``_lock``.
"""
from __future__ import annotations

import csv
import io
import json
import logging
import os
import shutil
import tempfile
import threading
import time
import uuid
import zipfile
import zlib
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Mapping, Sequence

import numpy as np

from mmvae.data.cache import PreprocessCache
from mmvae.data.dataset import CLINICAL, load_case_images
from mmvae.data.manifest import CaseEntries, REPORT, group_cases, read_manifest
from mmvae.errors import InputError
from mmvae.retrieval.index import RERANKS, Result
from mmvae.retrieval.index.lexical import tokenize
from mmvae.retrieval.query import QUERY_CASE, Retriever, _strip_case
from mmvae.retrieval.uncertainty import posterior_spread
from mmvae.serve import jobs
from mmvae.serve.thumbnails import ThumbnailCache, thumbnail_png

__all__ = ["ReviewService", "Session", "Round", "UploadTooLarge", "UnknownCase", "uncertainty", "DEFAULTS"]

log = logging.getLogger(__name__)

# Server settings (``serve.*`` of a run's config overrides them; CLI flags override both).
DEFAULTS = {"k": 10, "max_upload_mb": 1024, "thumbnail_px": 192, "max_sessions": 64, "report_excerpt": 400,
            "request_timeout_s": 60.0, "workers": 2}
IMAGE_SUFFIXES = (".nii", ".nii.gz", ".png", ".zip")
MAX_ZIP_MEMBERS = 10000      # files in one zipped DICOM series


class UploadTooLarge(InputError):
    """An upload over the size limit (``serve.max_upload_mb``)."""


class UnknownCase(InputError):
    """A case id that is not in the index."""


def uncertainty(logvar: np.ndarray, reference_logvar: np.ndarray | None = None) -> dict:
    """Spread of a diagonal Gaussian posterior ``N(μ, diag σ²)``, ``logvar = log σ²`` ``(E,)``.

    Returns ``mean_variance`` = mean_j σ_j², ``log_det`` = log det Σ = Σ_j log σ_j² (both in
    the index's embedding units, i.e. standardised when the index is), and, given the
    indexed cases' ``reference_logvar`` ``(N, E)``, ``percentile``: the share (%) of indexed
    cases whose mean variance is lower (0 = the most certain, 100 = the least). The spread is
    :func:`mmvae.retrieval.uncertainty.posterior_spread`'s."""
    mv, ld = posterior_spread(logvar)
    mv = float(mv)
    out = {"mean_variance": mv, "log_det": float(ld)}
    if reference_logvar is not None and len(reference_logvar):
        ref = posterior_spread(reference_logvar)[0]
        out["percentile"] = float(100.0 * np.mean(ref < mv))
    return out


@dataclass
class Round:
    """One ranking of a session: round 0 is the query, round t>0 follows the marks of t−1."""

    number: int
    query: np.ndarray                      # (E,) the query mean searched with
    results: list[Result]
    relevant: list[str] = field(default_factory=list)      # marks given on this round's results
    nonrelevant: list[str] = field(default_factory=list)


@dataclass
class Session:
    id: str
    source: dict                           # {"kind": "case", "case_id"} or {"kind": "upload", "files": {...}}
    modalities: list[str]                  # what the model saw of the query
    mu: np.ndarray                         # (D,) retrieval vector of the query (embed.case_vectors)
    logvar: np.ndarray                     # (E,)
    k: int
    rerank: str | None
    exclude: list[str]
    notes: list[str]
    uncertainty: dict
    thumbnails: dict[str, bytes] = field(default_factory=dict)   # uploaded query's images
    tokens: list[str] | None = None        # the query report's words (the index's lexical leg)
    method: str | None = None              # fused ranking ('weighted'/'rrf') or None (one vector)
    weights: dict | None = None            # the fused ranking's leg weights, learnt round by round
    rounds: list[Round] = field(default_factory=list)
    created: float = field(default_factory=time.time)


def _result_json(r: Result, labels: dict | None = None) -> dict:
    out = {"rank": r.rank, "case_id": r.case_id, "score": float(r.score), "modalities": list(r.modalities),
           "labels": r.labels}
    if hasattr(r, "contributions"):      # a fused ranking: each leg's part of the score
        out["contributions"] = {n: float(v) for n, v in r.contributions.items()}
        out["matched_on"] = r.matched_on(labels)
    return out


def _suffix(name: str) -> str:
    low = name.lower()
    for s in IMAGE_SUFFIXES:
        if low.endswith(s):
            return s
    return Path(low).suffix


class ReviewService:
    """Queries, feedback rounds and case views over one trained run and its index.

    Thread-safe (module docstring: locks). Methods called in a worker of :mod:`mmvae.serve.jobs`
    stop at their next step once the worker's job is cancelled.

    ``tmp_root``: where the service's folder is made (default the system's temporary folder);
    leftovers of dead servers there are removed first (:func:`mmvae.serve.jobs.sweep`).
    ``folder``: an already made server folder (:meth:`load` makes it before the Retriever).
    """

    def __init__(self, retriever: Retriever, cases: Mapping[str, CaseEntries] | None = None, *,
                 settings: Mapping[str, Any] | None = None, tmp_root: str | os.PathLike | None = None,
                 archive=None, folder: tuple[Path, int] | None = None):
        self.retriever = retriever
        self.archive = archive           # a mmvae.pacs.archive.Archive: query with a study in the archive
        self.cases = dict(cases or {})
        self.settings = {**DEFAULTS, **dict(settings or {})}
        if folder is None:
            jobs.sweep(tmp_root)
            folder = jobs.make_server_folder(tmp_root)
        self.folder, self._owner_fd = folder      # the server's folder: its lock, cache/, requests/
        self.tmp = self.folder / "requests"       # one folder per request in flight, nothing else
        self.tmp.mkdir(exist_ok=True)
        self._lock = threading.RLock()
        self._model_lock = threading.RLock()    # the Retriever's encoder state (cache, last notes)
        self._slots = threading.BoundedSemaphore(max(1, int(self.settings["workers"])))
        self._archive_lock = threading.Lock()   # query_pacs: one study search + download at a time
        self.workers = jobs.Jobs()
        self._closed = False
        self._case_cache = retriever.cache      # indexed cases' arrays (retriever.cache is swapped per upload)
        self.sessions: OrderedDict[str, Session] = OrderedDict()
        self.thumbs = ThumbnailCache()
        ids = retriever.index.case_ids
        self._ref_logvar = retriever.index.embeddings(ids)[1] if ids else None

    # ------------------------------------------------------------------ construction
    @classmethod
    def load(cls, workdir, index_dir, manifest=None, *, settings=None, archive=None) -> "ReviewService":
        """Load ``workdir``'s model, ``index_dir``'s index and the cases of ``manifest``
        (default: the run's ``data.manifest``; cases missing from it have no thumbnails or
        report, and can be queried with their stored embedding only)."""
        jobs.sweep()
        folder = jobs.make_server_folder()
        try:
            r = Retriever.load(workdir, index_dir, cache_dir=folder[0] / "cache")
        except BaseException:
            _remove_folder(folder)
            raise
        try:
            config = r.config
            s = {**DEFAULTS, **{k: v for k, v in dict(config.get("serve", {}) or {}).items()}}
            s.update({k: v for k, v in dict(settings or {}).items() if v is not None})
            mpath = manifest or config.data.get("manifest") or None
            cases = {}
            if mpath:
                if not Path(mpath).is_file():
                    raise InputError("manifest not found (give --manifest)", path=str(mpath))
                cases = {c.case_id: c for c in group_cases(read_manifest(mpath), allow_duplicate_ids=True)}
            missing = [c for c in r.index.case_ids if c not in cases]
            if missing:
                log.warning("%d indexed case(s) are not in the manifest %s (e.g. %r): shown without images",
                            len(missing), mpath, missing[0])
            return cls(r, cases, settings=s, archive=archive, folder=folder)
        except BaseException:
            r.close()
            _remove_folder(folder)
            raise

    def close(self, close_retriever: bool = True, wait: float = 5.0) -> None:
        """Cancel running jobs, wait up to ``wait`` seconds for them (a PACS download, an
        encoding) and remove the service's folder — also when a job is still stuck in a
        loader call (its files go from under it)."""
        if self._closed:
            return
        self._closed = True
        self.workers.cancel_all(wait)
        got = [lk.acquire(timeout=wait) for lk in (self._model_lock, self._lock)]
        try:
            if close_retriever:
                self.retriever.close()
            _remove_folder((self.folder, self._owner_fd))
        finally:
            for lk, ok in zip((self._model_lock, self._lock), got):
                if ok:
                    lk.release()

    # ------------------------------------------------------------------ cases
    @property
    def modalities(self) -> list[str]:
        return list(self.retriever.modalities)

    def _check_case(self, case_id: str) -> None:
        if case_id not in set(self.retriever.index.case_ids):
            raise UnknownCase("unknown case id (not in the index)", case_id=str(case_id))

    def find_cases(self, text: str = "", limit: int = 50) -> list[str]:
        """Indexed case ids containing ``text`` (case-insensitive), in index order."""
        t = (text or "").lower()
        return [c for c in self.retriever.index.case_ids if t in c.lower()][: max(0, int(limit))]

    def _report(self, ce: CaseEntries | None) -> str | None:
        if ce is None:
            return None
        try:
            return ce.read_report()
        except InputError as e:
            log.warning("%s", e)
            return None

    def case_info(self, case_id: str) -> dict:
        """Index metadata of a case + what the manifest knows (image modalities with files,
        a report excerpt). Raises InputError for a case id that is not indexed."""
        with self._lock:
            self._check_case(case_id)
            meta = self.retriever.index.metadata(case_id)
            ce = self.cases.get(case_id)
            report = self._report(ce)
            n = int(self.settings["report_excerpt"])
            mu, lv = self.retriever.index.embeddings([case_id])
            return {"case_id": case_id, "modalities": list(meta.get("modalities", [])),
                    "labels": meta.get("labels", {}),
                    "images": [m for m in self.retriever.image_modalities if ce is not None and ce.images.get(m)],
                    "report_excerpt": None if report is None else (report[:n] + ("…" if len(report) > n else "")),
                    "uncertainty": uncertainty(lv[0], self._ref_logvar)}

    def case_thumbnail(self, case_id: str, modality: str) -> bytes:
        """PNG of the first series of ``modality`` of an indexed case (cached)."""
        with self._lock:
            self._check_case(case_id)
            ce = self.cases.get(case_id)
        paths = (ce.images.get(modality) if ce is not None else None) or []
        if not paths:
            raise InputError("no image file of this modality for the case", case_id=case_id, modality=modality)
        try:                  # built outside the lock: a large volume takes a while to read
            return self.thumbs.get(("case", case_id, modality), lambda: self._thumbnail(paths[0]))
        except InputError as e:
            raise e.with_context(case_id=case_id, modality=modality) from None

    # ------------------------------------------------------------------ queries
    def _check_modalities(self, modalities) -> list[str] | None:
        if modalities is None:
            return None
        mods = [m for m in modalities if m]
        bad = [m for m in mods if m not in self.modalities]
        if bad:
            raise InputError(f"unknown modality; this model has {self.modalities}", modality=bad[0])
        if not mods:
            raise InputError("no modality chosen for the query")
        return mods

    def _uncertainty(self, lv) -> dict:
        """Spread of a just-encoded query + its experts' disagreement (Retriever.last_uncertainty)."""
        out = uncertainty(lv, self._ref_logvar)
        d = self.retriever.last_uncertainty.get("disagreement")
        if d is not None:
            out["disagreement"] = d
        return out

    def _check_query(self, modalities, k, rerank) -> tuple[list[str] | None, int]:
        """The checked modalities and k of a query (InputError for an unknown modality or
        re-ranker, or a k the index cannot give)."""
        mods = self._check_modalities(modalities)
        if rerank not in RERANKS:
            raise InputError(f"rerank must be one of {list(RERANKS)} (got {rerank!r})")
        return mods, self.retriever._check_k(int(self.settings["k"] if k is None else k))

    def _thumbnail(self, source) -> bytes:
        """PNG of an image source with the run's loader settings (uncached)."""
        data = self.retriever.config.data
        return thumbnail_png(source, size=int(self.settings["thumbnail_px"]), spatial_dims=int(data.spatial_dims),
                             b_value=data.dwi_b_value, max_voxels=int(data.max_voxels))

    def _new_session(self, *, report: str | None = None, **kw) -> Session:
        """A query session and its first round; ``report``: the query's report text (its words are
        the lexical leg's query, unless ``tokens`` are given)."""
        s = Session(id=uuid.uuid4().hex, **kw)
        s.method = self.retriever.fusion_method(s.rerank)
        if s.tokens is None and report:
            s.tokens = tokenize(report) or None
        s.rounds.append(Round(0, s.mu, self._search(s, s.mu)))
        self.sessions[s.id] = s
        while len(self.sessions) > int(self.settings["max_sessions"]):
            self.sessions.popitem(last=False)
        return s

    def _search(self, s: Session, q: np.ndarray) -> list[Result]:
        if s.method is not None:
            results, info = self.retriever.search_hybrid(self._hybrid(s, q), s.k, weights=s.weights,
                                                         method=s.method, exclude=s.exclude)
            s.weights = dict(info["weights"])        # normalised over the legs this query has
            return results
        return self.retriever.search_embedding(q, s.logvar, k=s.k, exclude=s.exclude, rerank=s.rerank,
                                               modalities=s.modalities)

    def _hybrid(self, s: Session, q: np.ndarray):
        return self.retriever.hybrid_query(q, s.modalities, tokens=s.tokens or [])

    def _case_tokens(self, case_id: str) -> list[str] | None:
        lex = self.retriever.index.lexical
        return None if lex is None else (lex.tokens[self.retriever.index._row_of_case[case_id]] or None)

    def query_case(self, case_id: str, modalities: Sequence[str] | None = None, k: int | None = None,
                   rerank: str | None = None) -> Session:
        """Query with an indexed case (itself excluded from the results).

        With every modality the case has (``modalities`` None or a superset), the query is its
        stored posterior; with fewer, the chosen modalities' files are encoded again from the
        manifest (a case missing from the manifest raises InputError)."""
        with self._lock:
            self._check_case(case_id)
            mods, k = self._check_query(modalities, k, rerank)
            have = list(self.retriever.index.metadata(case_id).get("modalities", []))
            use = [m for m in have if mods is None or m in mods]
            if not use:
                raise InputError(f"the case has none of the chosen modalities {mods} (it has {have})", case_id=case_id)
            if set(use) == set(have):
                mu, lv = (x[0] for x in self.retriever.index.embeddings([case_id]))
                return self._new_session(source={"kind": "case", "case_id": case_id}, modalities=list(use),
                                         mu=np.asarray(mu, np.float32), logvar=np.asarray(lv, np.float32), k=k,
                                         rerank=rerank, exclude=[case_id], notes=[],
                                         uncertainty=uncertainty(lv, self._ref_logvar),
                                         tokens=self._case_tokens(case_id))
        ce = self.cases.get(case_id)
        if ce is None:
            raise InputError("the case's files are not in the manifest: query it with all its modalities "
                             "or give the manifest (--manifest)", case_id=case_id)
        images = {m: ce.images[m] for m in use if m in ce.images}
        report = self._report(ce) if REPORT in use else None
        clinical = None
        if CLINICAL in use:
            fields = list(self.retriever.config.data.clinical.numeric) + \
                list(self.retriever.config.data.clinical.categorical)
            clinical = {f: ce.metadata[f] for f in fields if f in ce.metadata} or None
        try:
            if images:
                with jobs.holding(self._slots, "an upload slot (serve.workers)"):
                    self._preload(images, self._case_cache)
            with jobs.holding(self._model_lock, "the model"):
                jobs.checkpoint()
                mu, lv, use = self.retriever.encode(images or None, report, clinical=clinical)
                notes = list(self.retriever.last_notes)
                unc = self._uncertainty(lv)
        except InputError as e:
            raise e.with_context(case_id=case_id) from None
        with self._lock:
            return self._new_session(source={"kind": "case", "case_id": case_id}, modalities=list(use),
                                     mu=np.asarray(mu, np.float32), logvar=np.asarray(lv, np.float32), k=k,
                                     rerank=rerank, exclude=[case_id], notes=notes, uncertainty=unc,
                                     report=report if REPORT in use else None)

    def _preload(self, images: Mapping[str, Sequence[str]], cache: PreprocessCache) -> None:
        """Load and preprocess a query's image files into ``cache`` before the model lock is
        taken (the slow part for a large or bad file), exactly as
        :meth:`Retriever.query_batch` reads them back from it.

        Raises:
          InputError: a file that fails to load (the loader's message, no case id)."""
        r = self.retriever
        data = r.config.data
        imgs = {m: [os.path.abspath(os.fspath(p)) for p in ps] for m, ps in images.items()
                if m in r.image_modalities and ps}
        ref_mod = data.reference_modality or None
        ref = imgs.get(ref_mod, [None])[0] if ref_mod else None
        case = CaseEntries(QUERY_CASE, imgs, None, None, {}, {})
        for m in r.image_modalities:
            if m in imgs:
                jobs.checkpoint()
                try:
                    load_case_images(case, m, imgs[m], cache, r.preprocess, int(data.spatial_dims), ref,
                                     b_value=data.dwi_b_value, max_voxels=int(data.max_voxels))
                except InputError as e:
                    raise _strip_case(e) from None

    def _request_folder(self, prefix: str) -> Path:
        """A new folder for one request's files, owned by the running job (removed when it is
        cancelled)."""
        if self._closed:
            raise jobs.Cancelled("the server is stopping")
        folder = Path(tempfile.mkdtemp(prefix=prefix, dir=self.tmp))
        job = jobs.current()
        return job.own(folder) if job is not None else folder

    def _save_upload(self, folder: Path, modality: str, name: str, stream: BinaryIO, count: list[int]) -> Path:
        """Copy one uploaded file into ``folder`` (counting bytes against the limit in
        ``count[0]``); a zip is extracted to a folder (a DICOM series). Returns what the
        loaders read."""
        limit = int(float(self.settings["max_upload_mb"]) * 2 ** 20)
        base = Path(name or "upload").name or "upload"
        suffix = _suffix(base)
        if suffix not in IMAGE_SUFFIXES:
            raise InputError("unsupported file type (expected .nii, .nii.gz, .png or a .zip of one DICOM series)",
                             modality=modality, path=base)
        dst = folder / f"{modality}-{uuid.uuid4().hex[:8]}{suffix}"
        with open(dst, "wb") as f:
            while True:
                jobs.checkpoint()
                chunk = stream.read(1 << 20)
                if not chunk:
                    break
                count[0] += len(chunk)
                if count[0] > limit:
                    raise UploadTooLarge(f"upload larger than the limit of {self.settings['max_upload_mb']} MB "
                                         "(serve.max_upload_mb)", modality=modality, path=base)
                f.write(chunk)
        if suffix != ".zip":
            return dst
        out = folder / f"{dst.stem}-dicom"
        out.mkdir()
        try:
            with zipfile.ZipFile(dst) as z:
                members = [i for i in z.infolist() if not i.is_dir()]
                if len(members) > MAX_ZIP_MEMBERS:
                    raise InputError(f"zip holds {len(members)} files, more than {MAX_ZIP_MEMBERS}",
                                     modality=modality, path=base)
                for n, info in enumerate(members):
                    jobs.checkpoint()
                    parts = Path(info.filename).parts
                    if info.filename.startswith(("/", "\\")) or ".." in parts:
                        raise InputError(f"zip member {info.filename!r} points outside the archive",
                                         modality=modality, path=base)
                    count[0] += info.file_size        # unzipped bytes count against the limit too
                    if count[0] > limit:
                        raise UploadTooLarge(f"unzipped upload larger than the limit of "
                                             f"{self.settings['max_upload_mb']} MB (serve.max_upload_mb)",
                                             modality=modality, path=base)
                    with z.open(info) as src, open(out / f"{n:06d}-{Path(info.filename).name}", "wb") as f:
                        while True:
                            chunk = src.read(1 << 20)
                            if not chunk:
                                break
                            f.write(chunk)
                            jobs.checkpoint()
        except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError, RuntimeError) as e:
            # a corrupt, truncated, encrypted (RuntimeError) or unsupported-compression member
            raise InputError(f"not a readable zip file ({type(e).__name__}: {e})", modality=modality,
                             path=base) from None
        dst.unlink()
        return out

    def query_files(self, uploads: Mapping[str, Sequence[tuple[str, BinaryIO]]] | None = None,
                    report: str | None = None, *, clinical: Mapping[str, Any] | None = None,
                    modalities: Sequence[str] | None = None, k: int | None = None,
                    rerank: str | None = None) -> Session:
        """Query with uploaded files: ``uploads`` = image modality → ``[(file name, binary
        stream)]`` (NIfTI, PNG, or a .zip of one DICOM series), plus optional report text and
        clinical fields; ``modalities`` restricts what is used. The files live in a
        temporary folder only while the query is encoded (or until its job is cancelled).

        Raises:
          InputError: wrong file type, a file that fails to load (naming modality and file),
            nothing to query with; :class:`UploadTooLarge` over ``serve.max_upload_mb``;
            :class:`~mmvae.serve.jobs.Cancelled` when its job is cancelled.
        """
        with self._lock:
            mods, k = self._check_query(modalities, k, rerank)
        for m in uploads or {}:
            if m not in self.retriever.image_modalities:
                raise InputError(f"unknown image modality; this model's are "
                                 f"{list(self.retriever.image_modalities)}", modality=m)
        folder = self._request_folder("query-")
        try:
            cache = PreprocessCache(folder / ".cache")        # the query's arrays go with its folder
            images: dict[str, list[str]] = {}
            names: dict[str, str] = {}
            with jobs.holding(self._slots, "an upload slot (serve.workers)"):                   # saving, unzipping, loading: its own files only
                count = [0]
                for m, files in (uploads or {}).items():
                    for name, stream in files:
                        p = self._save_upload(folder, m, name, stream, count)
                        names[str(p)] = Path(name).name
                        if mods is None or m in mods:
                            images.setdefault(m, []).append(str(p))
                try:
                    self._preload(images, cache)
                except InputError as e:
                    raise _uploaded_name(e, names) from None
            if report is not None and not report.strip():
                report = None
            if mods is not None and REPORT not in mods:
                report = None
            if mods is not None and CLINICAL not in mods:
                clinical = None
            with jobs.holding(self._model_lock, "the model"):
                jobs.checkpoint()
                old = self.retriever.cache
                self.retriever.cache = cache
                try:
                    mu, lv, used = self.retriever.encode(images or None, report, clinical=clinical)
                except InputError as e:
                    raise _uploaded_name(e, names) from None
                finally:
                    self.retriever.cache = old
                notes = [_replace_names(n, names) for n in self.retriever.last_notes]
                unc = self._uncertainty(lv)
            thumbs = {}
            for m, paths in images.items():
                jobs.checkpoint()
                try:
                    thumbs[m] = self._thumbnail(paths[0])
                except InputError as e:    # it encoded, so this is unexpected; the query stands
                    log.warning("thumbnail: %s", _uploaded_name(e, names))
            files = {m: [names[p] for p in ps] for m, ps in images.items()}
            jobs.checkpoint()
            with self._lock:
                return self._new_session(source={"kind": "upload", "files": files, "report": report is not None},
                                         modalities=list(used), mu=mu, logvar=lv, k=k, rerank=rerank, exclude=[],
                                         notes=notes, uncertainty=unc, thumbnails=thumbs,
                                         report=report if REPORT in used else None)
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    def query_pacs(self, study_uid: str, modalities: Sequence[str] | None = None, k: int | None = None,
                   rerank: str | None = None) -> Session:
        """Query with a study in the archive (``--pacs``): its series are mapped by the default
        modality rules (:mod:`mmvae.pacs.rules`), retrieved de-identified into a temporary
        folder, encoded and searched; the decisions are the session's notes."""
        from mmvae.pacs.ingest import encode_retrieved, retrieve_study
        from mmvae.pacs.rules import load_rules
        with self._lock:
            if self.archive is None:
                raise InputError("no archive: start the server with --pacs URL")
            mods, k = self._check_query(modalities, k, rerank)
        thumbs: dict[str, bytes] = {}

        def thumbnail(m: str, series_folder: Path) -> None:
            jobs.checkpoint()
            try:
                thumbs[m] = self._thumbnail(series_folder)
            except InputError as e:     # the query stands without this picture
                log.warning("thumbnail of study %s, %s: %s", study_uid, m, e.reason)

        # The archive's answers and the study's download (seconds to minutes) run under the
        # archive lock only, so other users' queries go on meanwhile; the encoding takes the
        # model lock, the search the service lock.
        with jobs.holding(self._archive_lock, "the archive"):
            folder = self._request_folder("pacs-")
            try:
                study = self.archive.studies([str(study_uid).strip()])[0]
                img_mods = None if mods is None else [m for m in mods if m in self.retriever.image_modalities]
                got = retrieve_study(self.archive, self.retriever.image_modalities, study, load_rules(), folder,
                                     modalities=img_mods, on_series=thumbnail)
                with jobs.holding(self._model_lock, "the model"):
                    jobs.checkpoint()
                    mu, lv, used, _, notes = encode_retrieved(self.archive.url, self.retriever, got,
                                                              modalities=img_mods)
                    unc = self._uncertainty(lv)
                src = {"kind": "pacs", "study_instance_uid": study.study_uid, "accession_number": study.accession}
                with self._lock:
                    return self._new_session(source=src, modalities=list(used), mu=mu, logvar=lv, k=k, rerank=rerank,
                                             exclude=[], notes=notes, uncertainty=unc, thumbnails=thumbs)
            finally:
                shutil.rmtree(folder, ignore_errors=True)

    # ------------------------------------------------------------------ feedback
    def session(self, session_id: str) -> Session:
        with self._lock:
            s = self.sessions.get(str(session_id))
            if s is None:
                raise InputError(f"unknown or expired query session {session_id!r}: run the query again")
            return s

    def feedback(self, session_id: str, relevant: Sequence[str] = (), nonrelevant: Sequence[str] = ()) -> Session:
        """Record marks on the session's latest round and search again with the Rocchio-moved
        query (module docstring). Marks may name any indexed case, not only shown ones."""
        with self._lock:
            s = self.session(session_id)
            rel, non = [str(x) for x in relevant or []], [str(x) for x in nonrelevant or []]
            if not rel and not non:
                raise InputError("no case marked: mark at least one result relevant or not relevant")
            for c in rel + non:
                self._check_case(c)
            last = s.rounds[-1]
            if s.method is not None:      # Rocchio on the vector + the legs' weights learn from the marks
                hq, s.weights = self.retriever.feedback_round(self._hybrid(s, last.query),
                                                              {"relevant": rel, "nonrelevant": non},
                                                              weights=s.weights, method=s.method)
                q = hq.vector
            else:
                q = self.retriever.apply_feedback(last.query, {"relevant": rel, "nonrelevant": non})
            last.relevant, last.nonrelevant = rel, non
            s.rounds.append(Round(len(s.rounds), q, self._search(s, q)))
            return s

    # ------------------------------------------------------------------ views
    def _leg_labels(self) -> dict:
        from mmvae.retrieval.hybrid import index_legs
        try:
            return {leg.name: leg.label for leg in index_legs(self.retriever.index, self.retriever.spec.query_modalities)}
        except InputError:
            return {}

    def session_json(self, s: Session) -> dict:
        last = s.rounds[-1]
        return {"session": s.id, "source": s.source, "modalities": s.modalities, "k": s.k, "rerank": s.rerank,
                "notes": s.notes, "uncertainty": s.uncertainty, "query_thumbnails": sorted(s.thumbnails),
                "round": last.number, "results": [_result_json(r, self._leg_labels()) for r in last.results],
                "fusion": None if s.method is None else {"method": s.method, "weights": s.weights},
                "history": [{"round": r.number, "relevant": r.relevant, "nonrelevant": r.nonrelevant,
                             "top": [x.case_id for x in r.results]} for r in s.rounds]}

    def export(self, session_id: str, fmt: str = "csv") -> str:
        """Every round's ranking with the marks given on it, as CSV or JSON text."""
        with self._lock:
            s = self.session(session_id)
            rows = []
            for r in s.rounds:
                for x in r.results:
                    mark = "relevant" if x.case_id in r.relevant else "nonrelevant" if x.case_id in r.nonrelevant else ""
                    rows.append({"round": r.number, "rank": x.rank, "case_id": x.case_id, "score": round(float(x.score), 6),
                                 "modalities": "+".join(x.modalities), "labels": json.dumps(x.labels, sort_keys=True),
                                 "mark": mark})
            if fmt == "json":
                return json.dumps({"session": s.id, "source": s.source, "modalities": s.modalities,
                                   "uncertainty": s.uncertainty, "rows": rows}, indent=1)
            if fmt != "csv":
                raise InputError(f"export format must be csv or json (got {fmt!r})")
            buf = io.StringIO()
            w = csv.DictWriter(buf, fieldnames=["round", "rank", "case_id", "score", "modalities", "labels", "mark"])
            w.writeheader()
            w.writerows(rows)
            return buf.getvalue()


def _remove_folder(folder: tuple[Path, int]) -> None:
    """Remove a server folder, then let go of its lock."""
    path, fd = folder
    shutil.rmtree(path, ignore_errors=True)
    try:
        os.close(fd)
    except OSError:
        pass


def _replace_names(text: str, names: Mapping[str, str]) -> str:
    for tmp, name in names.items():
        text = text.replace(tmp, name).replace(Path(tmp).name, name)
    return text


def _uploaded_name(e: InputError, names: Mapping[str, str]) -> InputError:
    """The loader's error with the uploaded file's name instead of its temporary path."""
    path = e.path
    if path is not None:
        for tmp, name in names.items():
            if path == tmp or path.startswith(tmp + os.sep):
                path = name + path[len(tmp):]
                break
    return InputError(_replace_names(e.reason, names), case_id=e.case_id, modality=e.modality, path=path)
