"""Query by example with a study that lives in the archive (the command: ``mmvae query --pacs URL
--study UID``, :func:`mmvae.cli.pacs.pacs_query_main`)."""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Sequence

from mmvae.errors import InputError
from mmvae.pacs.archive import Archive, StudyInfo
from mmvae.pacs.ingest import encode_study
from mmvae.pacs.rules import load_rules
from mmvae.retrieval.query import Retriever

__all__ = ["query_study"]


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
