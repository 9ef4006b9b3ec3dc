"""Query by example with a study that lives in the archive (``mmvae query --pacs URL --study UID``)."""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Sequence

from mmvae.errors import InputError
from mmvae.pacs.archive import Archive, StudyInfo
from mmvae.pacs.ingest import encode_study
from mmvae.pacs.rules import load_rules
from mmvae.retrieval.query import Retriever

__all__ = ["query_study", "pacs_query_main"]


def query_study(retriever: Retriever, archive: Archive, study_uid: str, *, modalities: Sequence[str] | None = None,
                rules_path=None, k: int = 10, exclude_self: bool = False) -> dict:
    """Retrieve ``study_uid`` from the archive, map its series by the rules, encode the chosen
    ``modalities`` (default: every image modality of the model it has) and search the index.

    Returns ``{"study", "modalities", "decisions", "results": [{rank, study_instance_uid,
    accession_number, score, modalities, labels}]}``. Raises PacsError / InputError with one line.
    """
    if modalities is not None:
        bad = [m for m in modalities if m not in retriever.image_modalities]
        if bad:
            raise InputError(f"unknown image modality; this model's are {list(retriever.image_modalities)}",
                             modality=bad[0])
    study = archive.studies([study_uid])[0]
    with tempfile.TemporaryDirectory(prefix="mmvae-pacs-query-") as tmp:
        mu, lv, used, source, notes = encode_study(archive, retriever, study, load_rules(rules_path), Path(tmp),
                                                   modalities=modalities)
    res = retriever.search_embedding(mu, lv, k=k, exclude=[study_uid] if exclude_self else None, modalities=used)
    rows = []
    for r in res:
        src = retriever.index.metadata(r.case_id).get("source", {})
        rows.append({"rank": r.rank, "study_instance_uid": src.get("study_instance_uid", r.case_id),
                     "accession_number": src.get("accession_number", ""), "score": float(r.score),
                     "modalities": list(r.modalities), "labels": r.labels})
    return {"study": {"study_instance_uid": study.study_uid, "accession_number": study.accession},
            "modalities": list(used), "decisions": notes, "results": rows}


def pacs_query_main(argv: Sequence[str], out=None) -> None:
    """``mmvae query --pacs URL --study UID --workdir RUN --index IDX [--modalities t2,dwi] [--k N] [--json]``."""
    out = out or sys.stdout
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
    a = p.parse_args(list(argv))
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
