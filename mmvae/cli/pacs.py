"""A DICOMweb archive (PACS) from the command line: ``mmvae pacs ingest`` and
``mmvae query --pacs`` (:func:`pacs_query_main`). The work is :mod:`mmvae.pacs`'s."""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Sequence

__all__ = ["pacs_query_main"]


def add(sub) -> None:
    s = sub.add_parser("pacs", help="a DICOMweb archive (PACS) as source of the index (docs/pacs.md)")
    pacs = s.add_subparsers(dest="pacs_command", required=True)
    s = pacs.add_parser("ingest", help="encode the archive's studies and add them to an index (incremental)",
                        description="Search the archive's studies (QIDO-RS), map series to the model's modalities "
                                    "by rules, retrieve (WADO-RS), encode and add them to the index under their "
                                    "StudyInstanceUID. A second run adds only new or changed studies and, on a "
                                    "full listing, removes studies deleted from the archive; a killed run resumes.")
    s.add_argument("--url", required=True, help="DICOMweb root, e.g. http://127.0.0.1:8042/dicom-web")
    s.add_argument("--workdir", required=True, help="trained work dir")
    s.add_argument("--index", required=True, help="index folder (created when missing)")
    s.add_argument("--study", action="append", help="only this StudyInstanceUID (repeatable)")
    s.add_argument("--since", help="only studies with StudyDate >= YYYYMMDD")
    s.add_argument("--modality-rules", help="JSON rules file (default: brain + prostate MRI rules)")
    s.add_argument("--reports", help="folder of <AccessionNumber or StudyInstanceUID>.txt, or a CSV with key,report")
    s.add_argument("--store-reports", action="store_true", help="keep report text in the index (default: not)")
    s.add_argument("--standardize-from", help="embeddings (.npz, mmvae embed of the training cohort) whose "
                                              "standardisation a new index takes")
    s.add_argument("--on-error", choices=["raise", "skip"], default="raise",
                   help="a failing study: stop (default) or count, list and go on")
    s.add_argument("--save-every", type=int, default=1, help="save the index after this many studies (default 1)")
    s.add_argument("--workers", type=int, default=1,
                   help="studies retrieved at once, each thread with its own connection, while the main thread "
                        "encodes in listing order (default 1; the index is the same for any number)")
    s.add_argument("--username", help="HTTP basic authentication (password from $MMVAE_PACS_PASSWORD)")
    s.add_argument("--attempts", type=int, default=5,
                   help="tries per HTTP request before the archive counts as unreachable (exponential back-off "
                        "from 2 s: 30 s in all for the default 5)")
    s.add_argument("--quiet", action="store_true")
    s.set_defaults(fn=run_ingest)


def run_ingest(a, extra):
    from mmvae.pacs.archive import Archive
    from mmvae.pacs.ingest import ingest, load_reports
    archive = Archive(a.url, username=a.username, password=os.environ.get("MMVAE_PACS_PASSWORD"), attempts=a.attempts)
    rep = ingest(archive, a.workdir, a.index, studies=a.study or None, since=a.since, rules_path=a.modality_rules,
                 standardize_from=a.standardize_from, reports=load_reports(a.reports), store_reports=a.store_reports,
                 on_error=a.on_error, save_every=a.save_every, show_progress=not a.quiet, workers=a.workers)
    for d in rep.decisions:
        print(f"  {d}")
    for study, err in rep.failed:
        print(f"  failed {err}")
    print(f"{a.index}: {rep.summary()}")


def _pacs_query_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mmvae query --pacs", description=pacs_query_main.__doc__)
    p.add_argument("--pacs", required=True, help="DICOMweb root, e.g. http://127.0.0.1:8042/dicom-web")
    p.add_argument("--study", required=True, help="StudyInstanceUID of the query study")
    p.add_argument("--workdir", required=True)
    p.add_argument("--index", required=True)
    p.add_argument("--modalities", help="comma list of image modalities to use (default: all the study has)")
    p.add_argument("--modality-rules", help="JSON rules file (default: brain + prostate MRI rules)")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--exclude-self", action="store_true", help="leave the query study out of the results")
    p.add_argument("--username", help="HTTP basic authentication (password from $MMVAE_PACS_PASSWORD)")
    p.add_argument("--json", action="store_true")
    return p


def pacs_query_main(argv: Sequence[str], out=None) -> None:
    """``mmvae query --pacs URL --study UID --workdir RUN --index IDX [--modalities t2,dwi] [--k N] [--json]``."""
    out = out or sys.stdout
    a = _pacs_query_parser().parse_args(list(argv))
    from mmvae.pacs.archive import Archive
    from mmvae.pacs.query import query_study
    from mmvae.retrieval.query import Retriever
    archive = Archive(a.pacs, username=a.username, password=os.environ.get("MMVAE_PACS_PASSWORD"))
    mods = [m for m in (a.modalities or "").split(",") if m] or None
    with Retriever.load(a.workdir, a.index) as r:
        doc = query_study(r, archive, a.study, modalities=mods, rules_path=a.modality_rules, k=a.k,
                          exclude_self=a.exclude_self)
    if a.json:
        print(json.dumps(doc, indent=1), file=out)
        return
    for d in doc["decisions"]:
        print(f"# {d}", file=out)
    print(f"query study {a.study} with {'+'.join(doc['modalities'])}", file=out)
    print(f"{'rank':>4}  {'score':>7}  {'accession':<12}  study", file=out)
    for r in doc["results"]:
        print(f"{r['rank']:>4}  {r['score']:7.4f}  {r['accession_number'] or '-':<12}  {r['study_instance_uid']}",
              file=out)
