"""Index an archive's studies, and query with a study that lives in the archive.

:func:`ingest` lists the archive's studies (QIDO-RS), maps each study's series to the model's
image modalities (:mod:`mmvae.pacs.rules`, every decision logged), retrieves the chosen
series (WADO-RS) into a temporary folder without identifying attributes, encodes the study
with the run's preprocessing and model (:class:`~mmvae.retrieval.query.Retriever`, exactly
as a query), and adds it to the index under its StudyInstanceUID.

* **Incremental and idempotent**: a study already indexed with the same number of instances
  is skipped; one whose instance count changed is encoded again; on a full listing (no
  ``studies``/``since``), indexed studies of this archive that the archive no longer lists
  are removed.
* **Crash-safe**: the index is saved atomically (:meth:`CaseIndex.save`) after every
  ``save_every`` studies and at the end, so a killed run leaves the last saved index and
  the next run goes on from there (no duplicates: a study is either in the saved index or
  not).
* **Parallel** (``workers`` > 1): up to ``workers`` studies are mapped and retrieved at once,
  each thread with its own archive client, while the main thread encodes the retrieved studies
  in listing order and adds them to the index; the index, its order and the crash safety are
  those of ``workers=1`` (tested). Encoding stays in one thread: the JAX encoder already uses
  every core (XLA's intra-op threads), and one model copy is kept in memory.
* **Privacy** (PS3.15 Annex E as reference): the index keeps, per study, only
  StudyInstanceUID, AccessionNumber, StudyDate, the used series' SeriesInstanceUIDs and the
  archive URL (``source``), plus the report text only with ``store_reports``; the
  temporary DICOM files are written de-identified (:func:`mmvae.pacs.archive.deidentify`).
"""
from __future__ import annotations

import csv
import io
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np

from mmvae.data import io as mio
from mmvae.data.cache import PreprocessCache
from mmvae.errors import InputError, MmvaeError
from mmvae.pacs.archive import Archive, ArchiveUnreachable, PacsError, StudyInfo
from mmvae.pacs.rules import Rule, load_rules, map_series
from mmvae.progress import progress_bar
from mmvae.retrieval.embed import Embeddings
from mmvae.retrieval.index import build_index
from mmvae.retrieval.query import Retriever, model_identity
from mmvae.runs.trained import load_trained

__all__ = ["ingest", "IngestReport", "load_reports", "encode_study", "retrieve_study", "encode_retrieved",
           "RetrievedStudy"]

log = logging.getLogger(__name__)


@dataclass
class IngestReport:
    """What an ingestion did (study UIDs)."""

    added: list[str] = field(default_factory=list)
    updated: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)     # (study, one-line error)
    decisions: list[str] = field(default_factory=list)               # series → modality, in words

    def summary(self) -> str:
        s = (f"{len(self.added)} added, {len(self.updated)} updated, {len(self.removed)} removed, "
             f"{len(self.unchanged)} unchanged, {len(self.failed)} failed")
        return s


def load_reports(path: str | os.PathLike | None) -> dict[str, str]:
    """Report texts keyed by AccessionNumber or StudyInstanceUID: a folder of ``<key>.txt``
    files, or a CSV with a ``report`` column and a ``key`` (or ``accession_number`` /
    ``study_instance_uid``) column."""
    if path is None:
        return {}
    p = Path(path)
    if p.is_dir():
        return {f.stem: mio.load_report(f) for f in sorted(p.glob("*.txt"))}
    if not p.is_file():
        raise InputError("reports folder or CSV not found", path=str(p))
    from mmvae.data.text import decode_text
    try:
        text = decode_text(p.read_bytes())
    except InputError as e:
        raise InputError(f"reports CSV {e.reason}", path=str(p)) from None
    reader = csv.DictReader(io.StringIO(text, newline=""))
    cols = reader.fieldnames or []
    key = next((c for c in ("key", "accession_number", "study_instance_uid", "AccessionNumber",
                            "StudyInstanceUID") if c in cols), None)
    if key is None or "report" not in cols:
        raise InputError(f"reports CSV needs a 'report' column and a key column (key, accession_number or "
                         f"study_instance_uid); it has {cols}", path=str(p))
    return {row[key].strip(): row["report"].strip() for row in reader if row.get(key) and row.get("report")}


@dataclass
class RetrievedStudy:
    """A study's chosen series, written de-identified under ``folder`` (one sub-folder per
    image modality): ``chosen`` modality → SeriesInfo, ``images`` modality → [series folder],
    ``notes`` the mapping decisions."""
    study: StudyInfo
    folder: Path
    chosen: dict
    images: dict[str, list[str]]
    notes: list[str]


def retrieve_study(archive: Archive, image_modalities: Sequence[str], study: StudyInfo, rules: Sequence[Rule],
                   tmp: Path, *, modalities: Sequence[str] | None = None,
                   on_series: Callable[[str, Path], None] | None = None) -> RetrievedStudy:
    """Map ``study``'s series to ``image_modalities`` (restricted to ``modalities``) with
    ``rules`` and write each chosen series de-identified into a new folder under ``tmp``
    (``on_series(modality, folder)`` sees each one as it arrives). Archive I/O only: touches
    no model. The caller removes ``.folder``; on an error it is removed here.

    Raises:
      PacsError: no series matches the rules, or the archive fails.
    """
    series = archive.series(study.study_uid)
    want = [m for m in image_modalities if modalities is None or m in modalities]
    chosen, notes = map_series(series, rules, want)
    if not chosen:
        names = ", ".join(repr(s.description) for s in series) or "none"
        raise PacsError(f"no series matches the modality rules for {want} (series: {names})", study=study.study_uid)
    folder = Path(tempfile.mkdtemp(prefix="study-", dir=tmp))
    try:
        images = {}
        for m, s in chosen.items():
            images[m] = [str(archive.write_series(study.study_uid, s.series_uid, folder / m, expect=s.instances))]
            if on_series is not None:
                on_series(m, folder / m)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    return RetrievedStudy(study, folder, chosen, images, notes)


def encode_retrieved(archive_url: str, retriever: Retriever, got: RetrievedStudy, *, report: str | None = None,
                     modalities: Sequence[str] | None = None):
    """Encode a :func:`retrieve_study` result with the study's own preprocessing cache (under
    its folder) and remove the folder. Returns ``(mu, logvar, used modalities, source,
    decisions)``; PacsError naming the series when one fails to load. Not thread-safe (the
    retriever's cache is swapped while it runs)."""
    study, folder, chosen = got.study, got.folder, got.chosen
    cache = retriever.cache
    try:
        use_report = report if (modalities is None or "report" in modalities) else None
        retriever.cache = PreprocessCache(folder / ".cache")    # nothing of the study outlives this call
        try:
            mu, lv, used = retriever.encode(got.images, use_report)
        except InputError as e:
            m = e.modality
            raise PacsError(f"{e.reason}", study=study.study_uid,
                            series=chosen[m].series_uid if m in chosen else None) from None
        notes = got.notes + [f"{study.study_uid}: {x.replace(str(folder) + '/', '')}" for x in retriever.last_notes]
    finally:
        retriever.cache = cache
        shutil.rmtree(folder, ignore_errors=True)
    source = {"archive": archive_url, "study_instance_uid": study.study_uid, "accession_number": study.accession,
              "study_date": study.study_date, "instances": study.instances,
              "series": {m: s.series_uid for m, s in chosen.items()}}
    return mu, lv, used, source, notes


def encode_study(archive: Archive, retriever: Retriever, study: StudyInfo, rules: Sequence[Rule], tmp: Path, *,
                 modalities: Sequence[str] | None = None, report: str | None = None,
                 on_series: Callable[[str, Path], None] | None = None):
    """Map, retrieve and encode one study (:func:`retrieve_study` then
    :func:`encode_retrieved`). Returns ``(mu, logvar, used modalities, source, decisions)``;
    PacsError when no series matches or a series fails to load.

    The series are written de-identified into a folder under ``tmp`` with the study's own
    preprocessing cache, and the folder is removed before returning (``on_series(modality,
    folder)`` sees each retrieved series first, e.g. for a thumbnail)."""
    got = retrieve_study(archive, retriever.image_modalities, study, rules, tmp, modalities=modalities,
                         on_series=on_series)
    return encode_retrieved(archive.url, retriever, got, report=report, modalities=modalities)


def _retrieved(archive: Archive, image_modalities, todo: Sequence[StudyInfo], rules, tmp: Path, workers: int):
    """``(study, fetch)`` in the order of ``todo``; ``fetch()`` returns its :class:`RetrievedStudy` or
    raises its PacsError. With ``workers`` > 1 up to ``workers`` retrievals run ahead in threads,
    each with its own :meth:`Archive.copy`; an error or interruption of the caller cancels the
    pending ones (their folders are under ``tmp``, which the caller removes)."""
    if workers <= 1 or len(todo) <= 1:
        for st in todo:
            yield st, (lambda st=st: retrieve_study(archive, image_modalities, st, rules, tmp))
        return
    import collections
    import threading
    from concurrent.futures import ThreadPoolExecutor
    local, copies, lock = threading.local(), [], threading.Lock()

    def fetch(st):
        if not hasattr(local, "archive"):
            local.archive = archive.copy()
            with lock:
                copies.append(local.archive)
        return retrieve_study(local.archive, image_modalities, st, rules, tmp)

    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="mmvae-fetch")
    try:
        ahead = collections.deque()
        it = iter(todo)
        for st in it:
            ahead.append((st, pool.submit(fetch, st)))
            if len(ahead) >= workers:
                break
        while ahead:
            st, fut = ahead.popleft()
            nxt = next(it, None)
            if nxt is not None:
                ahead.append((nxt, pool.submit(fetch, nxt)))
            yield st, fut.result
    finally:
        # waits for the retrievals in flight (each bounded by the archive's timeout and attempts), so
        # nothing writes into tmp after the caller removes it
        pool.shutdown(wait=True, cancel_futures=True)
        for c in copies:
            c.close()


def ingest(archive: Archive, workdir, index_dir, *, studies: Sequence[str] | None = None, since: str | None = None,
           rules_path=None, standardize_from=None, reports: Mapping[str, str] | None = None, store_reports: bool = False,
           on_error: str = "raise", save_every: int = 1, show_progress: bool = True,
           on_saved: Callable[[int], None] | None = None, workers: int = 1) -> IngestReport:
    """Add the archive's studies to the index in ``index_dir`` (created when missing); see the
    module doc. ``on_error='skip'``: a failing study is counted and listed, the rest goes on.
    ``workers``: studies retrieved at once (module doc: Parallel).

    Raises:
      PacsError: the archive is unreachable or answers with an error (always), or a study
        fails with ``on_error='raise'``.
    """
    if on_error not in ("raise", "skip"):
        raise InputError(f"on_error must be 'raise' or 'skip' (got {on_error!r})")
    if int(workers) < 1:
        raise InputError(f"workers must be ≥ 1 (got {workers})")
    rules = load_rules(rules_path)
    reports = dict(reports or {})
    index_dir = Path(index_dir)
    rep = IngestReport()
    listing = archive.studies(studies, since)
    exists = index_dir.exists() or any(index_dir.parent.glob(f".{index_dir.name}.old-*"))
    r = Retriever.load(workdir, index_dir) if exists else None
    if r is None:           # no index yet: the model alone; the index is built from the first study
        config, spec, model, tok = load_trained(workdir)
        stats = json.loads((Path(workdir) / "clinical_stats.json").read_text())
        r = Retriever(config=config, spec=spec, model=model, tokenizer=tok, clinical_stats=stats, index=None,
                      workdir=workdir, index_dir=index_dir)
        if config.retrieval.standardize:
            if standardize_from is None:
                r.close()
                raise InputError("a new index needs the cohort's standardisation (retrieval.standardize): pass "
                                 "--standardize-from EMB.npz (mmvae embed of the training cohort), or ingest into "
                                 "an index built with mmvae index", path=str(index_dir))
            emb = Embeddings.load(standardize_from)
            if emb.identity.get("model_fingerprint") != model_identity(spec)["model_fingerprint"]:
                r.close()
                raise InputError("embeddings of another model than the workdir's", path=str(standardize_from))
            have = emb.identity.get("weights_digest")
            if have is not None and have != r.weights_digest:     # statistics of other weights: stale
                r.close()
                raise InputError(f"embeddings made with other weights ({have[:12]}…) than the workdir's "
                                 f"({r.weights_digest[:12]}…): re-run `mmvae embed --workdir {workdir} ...` "
                                 "and pass its output", path=str(standardize_from))
            if emb.embedding != r.embedding:     # the experts give either kind's statistics
                emb = emb.as_embedding(r.embedding)
            std = emb.standardized()
            r.standardize = std.identity["standardize"]
            r.blocks = std.identity.get("blocks")          # the features kinds' vector layout
    index = r.index
    if index is not None and store_reports and not index.include_text:
        log.warning("--store-reports: the index %s was built without report text; texts are not stored "
                    "(build a new index to keep them)", index_dir)
    pending = 0
    fetching = None

    def save():
        nonlocal pending
        if index is not None and pending:
            index.save(index_dir)
            pending = 0
            if on_saved is not None:
                on_saved(index.size)

    # Scratch beside the index (not in /tmp): a run killed by a signal leaves it, the next run wipes it.
    tmp = index_dir.parent / f".{index_dir.name}.ingest-tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        if index is not None and not studies and not since:
            listed = {s.study_uid for s in listing}
            ours = [c for c in index.case_ids if index.metadata(c).get("source", {}).get("archive") == archive.url]
            gone = [c for c in ours if c not in listed]
            if gone and not listed:
                raise PacsError(f"the archive lists no study: refusing to remove the {len(gone)} indexed studies "
                                "of this archive (check the archive, or ingest with --study)")
            gone = [c for c in gone if not archive.has_study(c)]     # asked one by one: a capped listing
            if gone:
                index.remove(gone)
                rep.removed += gone
                pending += len(gone)
                log.info("removed %d studies no longer in the archive", len(gone))
        todo = []
        for st in listing:
            if index is not None and st.study_uid in index:
                src = index.metadata(st.study_uid).get("source", {})
                if st.instances is None or src.get("instances") == st.instances:
                    rep.unchanged.append(st.study_uid)
                    continue
            todo.append(st)
        fetching = _retrieved(archive, r.image_modalities, todo, rules, tmp, int(workers))
        for st, fetched in progress_bar(fetching, total=len(todo), desc="studies", enable=show_progress,
                                        unit="study"):
            known = index is not None and st.study_uid in index
            text = reports.get(st.accession) if st.accession else None
            text = text if text is not None else reports.get(st.study_uid)
            try:
                got = fetched()
                mu, lv, used, source, notes = encode_retrieved(archive.url, r, got, report=text)
            except PacsError as e:
                if on_error == "raise" or isinstance(e, ArchiveUnreachable):
                    raise
                log.warning("skipped: %s", e)
                rep.failed.append((st.study_uid, str(e)))
                continue
            rep.decisions += notes
            for n in notes:
                log.info("%s", n)
            meta = {"modalities": used, "labels": {}, "source": source}
            if store_reports and text is not None:
                meta["report"] = text
            if index is None:
                blocks = getattr(r, "blocks", None) or r.last_blocks
                ident = {**model_identity(r.spec, r.embedding, blocks), "embedding": r.embedding,
                         "weights_digest": r.weights_digest,       # ties the index to these weights
                         **({"standardize": r.standardize} if r.standardize else {}),
                         **({"blocks": blocks} if blocks else {})}
                index = build_index(mu[None], lv[None], [st.study_uid], [meta], kind="flat", metric="cosine",
                                    identity=ident, include_text=store_reports)
                r.index = index
                rep.added.append(st.study_uid)
            else:
                if known:
                    index.remove([st.study_uid])
                    rep.updated.append(st.study_uid)
                else:
                    rep.added.append(st.study_uid)
                index.add(mu[None], lv[None], [st.study_uid], [meta])
            pending += 1
            if pending >= max(1, int(save_every)):
                save()
        save()
    except BaseException:
        try:
            save()        # keep what was encoded before the failure (a re-run would redo it otherwise)
        except Exception as e:  # noqa: BLE001 - the original error is the one to report
            log.warning("could not save the index after the failure: %s", e)
        raise
    finally:
        if fetching is not None:
            fetching.close()           # cancels and waits for retrievals still running, before tmp goes
        r.close()
        shutil.rmtree(tmp, ignore_errors=True)
    return rep
