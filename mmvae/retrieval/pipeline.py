"""One embed → index → evaluate pipeline over a trained run.

What ``mmvae embed``, ``mmvae index`` and ``mmvae evaluate`` do, as functions: the commands
(:mod:`mmvae.cli`), the quickstart (:mod:`mmvae.quickstart`) and the ablation grid
(:mod:`mmvae.experiments.grid`) call these, so an embeddings file, an index and a table mean
the same thing whoever wrote them.

- :func:`embed_run`: load a trained work dir's newest checkpoint and encode every case of a
  manifest, with the run's tokenizer and clinical standardisation; the embeddings' identity
  records ``model_fingerprint``, ``checkpoint_step``, ``workdir``, ``label`` and (from
  :func:`~mmvae.retrieval.embed.embed_cohort`) ``weights_digest``.
- :func:`index_embeddings`: a case index of those embeddings (each case's modalities and
  labels as metadata, the embeddings' identity carried over), saved.
- :func:`evaluation_label`, :func:`evaluate_embeddings`, :func:`write_tables`: the leave-one-out
  retrieval table (:func:`mmvae.retrieval.evaluate.evaluate`) and its CSV + Markdown files.

Training is not here (retrieval never imports :mod:`mmvae.train`): a run is trained by
``mmvae train`` / :func:`mmvae.train.loop.train_and_evaluate` first.
"""
from __future__ import annotations

import csv
import dataclasses
import io
import json
import logging
import os
from pathlib import Path
from typing import Any

from mmvae.atomic import atomic_write_text
from mmvae.errors import InputError

log = logging.getLogger(__name__)

__all__ = ["Embedded", "embed_run", "case_metadata", "index_embeddings", "manifest_reports", "run_manifest", "evaluation_label",
           "evaluate_embeddings", "rows_to_csv", "write_tables"]


@dataclasses.dataclass
class Embedded:
    """The result of :func:`embed_run`: the embeddings and what produced them."""
    embeddings: Any          # mmvae.retrieval.embed.Embeddings
    cohort: Any              # the mmvae.data.dataset.Cohort that was encoded (``skipped``: cases left out)
    config: Any              # the run's config (with ``on_error`` applied)
    spec: Any                # the run's ModelSpec
    step: int                # the checkpoint step whose weights encoded the cases


def embed_run(workdir: str | os.PathLike, manifest: str | os.PathLike | None = None, *,
              on_error: str | None = None, out: str | os.PathLike | None = None,
              show_progress: bool = True, batch_size: int = 32) -> Embedded:
    """Encode every case of ``manifest`` (default the run's ``data.manifest``) with the trained
    model of ``workdir`` (newest intact checkpoint, EMA weights when kept).

    The cases are prepared as in training: the run's tokenizer, its ``clinical_stats.json``,
    its preprocessing settings (``on_error``: ``'raise'`` or ``'skip'`` overrides the run's
    ``data.on_error``); ``batch_size`` cases per encoder call. The vectors are the config's
    ``retrieval.embedding`` kind, standardised unless ``retrieval.standardize`` is false. ``out``:
    also save them there (.npz). Several processes and resumable shards:
    :func:`mmvae.retrieval.shards.embed_shards`.
    """
    from mmvae.retrieval.embed import embed_cohort, embedding_kind
    from mmvae.runs.files import fingerprint
    from mmvae.runs.trained import load_cohort, load_trained
    workdir = Path(workdir)
    config, spec, model, tokenizer, step = load_trained(workdir, return_step=True)
    if on_error:
        with config.unlocked():
            config.data.on_error = on_error
    stats = json.loads((workdir / "clinical_stats.json").read_text())
    cohort, _, _ = load_cohort(config, workdir, None if manifest is None else str(manifest), tokenizer=tokenizer,
                               clinical_stats=stats, show_progress=show_progress)
    identity = {"model_fingerprint": fingerprint(spec), "checkpoint_step": int(step),
                "workdir": str(workdir.resolve()), "label": str(config.data.label or "")}
    emb = embed_cohort(model, cohort, batch_size=batch_size, identity=identity, show_progress=show_progress,
                       standardize=bool(config.retrieval.standardize),
                       embedding=embedding_kind(config))
    if out is not None:
        emb.save(out)
    return Embedded(emb, cohort, config, spec, int(step))


def case_metadata(emb) -> list[dict]:
    """Each case's index metadata: the modalities it has and its labels."""
    return [{"modalities": [m for m, p in zip(emb.modalities, row) if p > 0], "labels": lab}
            for row, lab in zip(emb.present, emb.labels)]


def manifest_reports(manifest: str | os.PathLike, case_ids, *, empty_report: str = "drop") -> list[str | None]:
    """The report text of each of ``case_ids`` in ``manifest`` (None: the case has no report).

    A blank report file is a cohort's everyday accident: with ``empty_report='drop'`` (the
    default, as ``data.empty_report`` in training) that case gets None and one warning names the
    cases; ``'error'`` raises. InputError naming case and file for a report that is not text."""
    from mmvae.data.manifest import group_cases, read_manifest
    cases = {c.case_id: c for c in group_cases(read_manifest(manifest))}
    out, blank = [], []
    for cid in case_ids:
        c = cases.get(cid)
        try:
            text = c.read_report() if c is not None and (c.report_text is not None or c.report_path) else None
        except InputError as e:
            if e.reason != "empty report" or empty_report != "drop":
                raise
            text = None
            blank.append(f"{cid} ({e.path})" if e.path else cid)
        out.append(text if text and text.strip() else None)
    if blank:
        log.warning("%d blank report(s) indexed without report words (data.empty_report=drop): %s%s", len(blank),
                    ", ".join(blank[:5]), " ..." if len(blank) > 5 else "")
    return out


def run_manifest(emb) -> str:
    """The manifest of the run that made ``emb`` (its ``data.manifest``); InputError without."""
    run_config = Path(str(emb.identity.get("workdir", ""))) / "config.json"
    if emb.identity.get("workdir") and run_config.is_file():
        m = json.loads(run_config.read_text()).get("data", {}).get("manifest")
        if m:
            return str(m)
    raise InputError("the embeddings do not name their run's manifest: give the reports' manifest with --manifest")


def index_embeddings(emb, out: str | os.PathLike | None = None, *, kind: str = "flat", metric: str = "cosine",
                     reports=None, options: dict | None = None):
    """A :class:`~mmvae.retrieval.index.CaseIndex` of ``emb`` (``kind``: flat, ivf, ivfpq, hnsw,
    binary), carrying the embeddings' identity (model fingerprint, weights digest, the
    modalities of its blocks, ...); ``reports``: each case's report text (None entries), which
    gives the index its lexical (BM25) leg; ``options``: :func:`~mmvae.retrieval.index.build_index`'s
    kind options (``nlist``, ``nprobe``, ``m_pq``, ``seed``; None entries take the defaults); saved to
    the folder ``out`` when given."""
    from mmvae.retrieval.index import build_index
    ident = dict(emb.identity)
    ident.setdefault("embedding", getattr(emb, "embedding", "fused"))
    ident.setdefault("modalities", list(emb.modalities))
    idx = build_index(emb.mu, emb.logvar, emb.case_ids, case_metadata(emb), kind=kind, metric=metric,
                      identity=ident, reports=reports,
                      **{k: v for k, v in (options or {}).items() if v is not None})
    if out is not None:
        idx.save(out)
    return idx


def evaluation_label(emb, asked: str | None = None) -> str:
    """The label that defines relevance: ``asked``, else the run's ``data.label`` recorded in
    the embeddings, else the one label the cases carry. A label no case has is an error."""
    have = sorted({k for lab in emb.labels for k, v in lab.items() if str(v) != ""})
    label = asked or str(emb.identity.get("label", "") or "")
    run_config = Path(str(emb.identity.get("workdir", ""))) / "config.json"
    if not label and emb.identity.get("workdir") and run_config.is_file():    # files embedded before the label was recorded
        label = str(json.loads(run_config.read_text()).get("data", {}).get("label", "") or "")
    if not label:
        if len(have) != 1:
            raise InputError(f"{len(have)} labels in the embeddings ({', '.join(have) or 'none'}): "
                             "choose one with --label")
        label = have[0]
    if label not in have:
        raise InputError(f"label {label!r}: no case of the embeddings has it (labels present: "
                         f"{', '.join(have) or 'none'})")
    return label


def evaluate_embeddings(emb, label: str, k: int = 10, *, out: str | os.PathLike | None = None,
                        **options) -> tuple[list[dict], str]:
    """Leave-one-case-out retrieval of ``label`` for every query subset → ``(rows, markdown
    table)``; ``options`` go to :func:`mmvae.retrieval.evaluate.evaluate` (``subsets``,
    ``metric``, ``multilabel``, ``n_boot``, ``own``, ``chance``, ...). ``out``: also write
    ``OUT.csv`` and ``OUT.md`` (:func:`write_tables`)."""
    from mmvae.retrieval.evaluate import evaluate, markdown_table
    rows = evaluate(emb, label, k, **options)
    table = markdown_table(rows, k)
    if out is not None:
        write_tables(out, rows, table)
    return rows, table


def rows_to_csv(rows: list[dict]) -> str:
    """Table rows as CSV text; the columns: every key, in order of first appearance."""
    keys = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=keys)
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue()


def write_tables(out: str | os.PathLike, rows: list[dict], markdown: str) -> tuple[Path, Path]:
    """Write ``rows`` to ``OUT.csv`` and ``markdown`` to ``OUT.md`` (atomically; ``OUT``'s own
    suffix, if any, is replaced)."""
    csv_path, md_path = Path(out).with_suffix(".csv"), Path(out).with_suffix(".md")
    atomic_write_text(csv_path, rows_to_csv(rows))
    atomic_write_text(md_path, markdown)
    return csv_path, md_path
