"""``mmvae query``: the indexed cases most similar to a new case's files (``--pacs``: to a study
of an archive, :func:`mmvae.cli.pacs.pacs_query_main`).

The options depend on the model (one ``--<modality>`` per image modality of ``--workdir``'s
config), so the arguments are parsed in two passes by :func:`query_main`. The search is
:class:`mmvae.retrieval.query.Retriever`'s.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Sequence

from mmvae.errors import ConfigError, InputError

__all__ = ["query_main"]


class _QueryArgs(argparse.ArgumentParser):
    """``mmvae query`` options depend on the model (one ``--<modality>`` per image
    modality of ``--workdir``'s config): hand every argument to :func:`run`,
    which parses them in two passes."""

    def parse_known_args(self, args=None, namespace=None):
        ns = argparse.Namespace() if namespace is None else namespace
        for key, value in self._defaults.items():
            setattr(ns, key, value)
        ns.query_args = list(args or [])
        return ns, []


def add(sub) -> None:
    s = sub.add_parser("query", add_help=False,
                       help="find the indexed cases most similar to a new case's files (--workdir RUN --help)")
    s.__class__ = _QueryArgs
    s.set_defaults(fn=run)


def run(a, extra):
    if any(x == "--pacs" or x.startswith("--pacs=") for x in a.query_args):
        from mmvae.cli.pacs import pacs_query_main
        return pacs_query_main(a.query_args)
    query_main(a.query_args)


# ---------------------------------------------------------------------- parsing
def _parse_clinical(specs: Sequence[str] | None) -> dict | None:
    from mmvae.data.dataset import CLINICAL
    if not specs:
        return None
    out = {}
    for spec in specs:
        key, sep, value = spec.partition("=")
        if not sep or not key.strip():
            raise InputError(f"--clinical {spec!r} must look like NAME=VALUE", modality=CLINICAL)
        out[key.strip()] = value.strip()
    return out


class _ArgParser(argparse.ArgumentParser):
    """argparse that raises InputError (→ one line, exit 2) instead of exiting."""

    def error(self, message):
        raise InputError(message)


_STATIC = ("index", "workdir", "report", "report-file", "clinical", "k", "filter", "exclude",
           "feedback", "rerank", "fusion", "weights", "json", "cache-dir", "help")


def _parse_other(items) -> dict[str, Any]:
    """``["labs=[1,2]", ...]`` → ``{"labs": [1, 2]}`` (values are JSON)."""
    out = {}
    for item in items or []:
        name, sep, value = item.partition("=")
        if not sep or not name.strip():
            raise InputError(f"--other expects NAME=JSON, got {item!r}")
        try:
            out[name.strip()] = json.loads(value)
        except json.JSONDecodeError as e:
            raise InputError(f"--other {name.strip()}: value is not JSON ({e.msg}): {value!r}",
                             modality=name.strip()) from None
    return out


def _query_parser(modalities: Sequence[str] | None, max_series: int | None = None) -> argparse.ArgumentParser:
    from mmvae.retrieval.index import RERANKS
    p = _ArgParser(prog="mmvae query", allow_abbrev=False,
                   description="Find the indexed cases most similar to a new case (query by example).",
                   epilog="Image options (one per image modality of the model) are read from --workdir's "
                          "config; each takes a NIfTI file, a DICOM series folder or a PNG and may be "
                          "repeated for several series. Exit status 2 on bad input.")
    p.add_argument("--index", required=True, help="index folder (mmvae index / quickstart)")
    p.add_argument("--workdir", required=True, help="trained work dir whose embeddings built the index")
    if modalities is None:
        p.add_argument_group("image options", "--<modality> PATH for each image modality of the model "
                                              "(give --workdir to list them)")
    else:
        g = p.add_argument_group("image options (from the model)")
        for m in modalities:
            if m in _STATIC:
                raise ConfigError(f"image modality {m!r} clashes with a 'mmvae query' option")
            g.add_argument(f"--{m}", dest=f"image:{m}", action="append", metavar="PATH",
                           help=f"{m} series: NIfTI file, DICOM folder or PNG; repeat for several series "
                                f"(up to data.max_series={max_series})")
    r = p.add_mutually_exclusive_group()
    r.add_argument("--report", help="report text")
    r.add_argument("--report-file", help="report text file (UTF-8)")
    p.add_argument("--clinical", action="append", metavar="NAME=VALUE",
                   help="clinical field of the model's config (repeatable), e.g. age=63")
    p.add_argument("--other", action="append", metavar="NAME=JSON",
                   help="value of a modality of another kind (data.other_modalities), as JSON, e.g. "
                        "labs=[4.1,0.9,140] (repeatable)")
    p.add_argument("--k", type=int, default=None, help="number of results (default retrieval.k)")
    p.add_argument("--filter", action="append", metavar="KEY=VALUE",
                   help="has=dwi, has_any=t1,t2, lacks=t1, label.class=glioma (repeatable, all must hold)")
    p.add_argument("--exclude", action="append", metavar="CASE", help="case id(s) never returned (repeatable, "
                                                                       "comma-separated)")
    p.add_argument("--feedback", action="append", metavar="+CASE,-CASE",
                   help="relevance feedback: +CASE relevant, -CASE non-relevant (use --feedback=-CASE "
                        "when the first item is non-relevant); the query moves by Rocchio")
    p.add_argument("--rerank", choices=[x for x in RERANKS if x], help="re-rank with the query posterior")
    p.add_argument("--fusion", choices=["auto", "vector", "weighted", "rrf"],
                   help="rank by one vector, or fuse the index's legs (default retrieval.fusion: auto = fuse when "
                        "the index has a lexical leg or fitted weights)")
    p.add_argument("--weights", metavar="SET", help="fused ranking's leg weights: 'uniform' or a label fitted by "
                                                    "mmvae fit-fusion (default: the index's default set)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--cache-dir", help="preprocessing cache for query files (default: temporary)")
    return p


def _known_flags(config) -> str:
    mods = list(config.data.image_modalities)
    return ("this model's image modality options are " + ", ".join("--" + m for m in mods)
            + " (see mmvae query --workdir RUN --help)")


def _parse_args(argv: list[str]):
    """Two passes: ``--workdir`` first, then the options of its model → ``(args, run config)``."""
    from mmvae.runs.files import read_run_files
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument("--workdir")
    pre.add_argument("-h", "--help", action="store_true")
    first, _ = pre.parse_known_args(argv)
    if first.workdir is None:
        if first.help:
            _query_parser(None).parse_args(["--help"])      # prints help, SystemExit(0)
        raise InputError("the following arguments are required: --workdir (a trained work dir)")
    config, _, _ = read_run_files(Path(first.workdir))
    parser = _query_parser(list(config.data.image_modalities), int(config.data.max_series))
    a, rest = parser.parse_known_args(argv)
    if rest:
        opts = [x for x in rest if x.startswith("-")]
        if opts:
            raise InputError(f"unknown option {opts[0].split('=')[0]!r}; {_known_flags(config)}")
        raise InputError(f"unexpected argument(s) {rest}")
    return a, config


def _report(a) -> str | None:
    """The report text of ``--report`` (checked) or ``--report-file``, before the model is loaded."""
    from mmvae.data import io as mio
    from mmvae.data.manifest import REPORT
    from mmvae.data.text import check_report_text
    if a.report is not None:
        try:
            check_report_text(a.report)
        except InputError as e:
            raise e.with_context(modality=REPORT) from None
        return a.report
    if a.report_file is not None:
        try:
            return mio.load_report(a.report_file)
        except InputError as e:
            raise e.with_context(modality=REPORT) from None
    return None


@dataclasses.dataclass
class _Query:
    """What ``mmvae query``'s options ask for."""
    images: dict
    report: str | None
    clinical: dict | None
    other: dict
    filter: dict | None
    exclude: list | None
    feedback: dict | None


def _query(a, mods: Sequence[str]) -> _Query:
    from mmvae.retrieval.query import parse_feedback, parse_filter
    images = {m: getattr(a, f"image:{m}") for m in mods if getattr(a, f"image:{m}")}
    report = _report(a)
    q = _Query(images=images, report=report, clinical=_parse_clinical(a.clinical), other=_parse_other(a.other),
               filter=parse_filter(a.filter),
               exclude=[c.strip() for x in (a.exclude or []) for c in x.split(",") if c.strip()] or None,
               feedback=parse_feedback(a.feedback))
    if not images and report is None and not q.clinical and not q.other:
        raise InputError("no query modality given: give at least one image option "
                         f"({', '.join('--' + m for m in mods)}) or --report/--report-file")
    if a.k is not None and a.k < 1:
        raise InputError(f"k must be an integer ≥ 1 (got {a.k})")
    return q


def query_main(argv: Sequence[str], out=None) -> None:
    """``mmvae query``: parse ``argv`` in two passes (``--workdir`` first, then one
    ``--<modality>`` option per image modality of its config), search, print."""
    from mmvae.retrieval.query import Retriever
    out = sys.stdout if out is None else out
    a, config = _parse_args(list(argv))
    q = _query(a, list(config.data.image_modalities))
    t0 = time.perf_counter()
    r = Retriever.load(a.workdir, a.index, cache_dir=a.cache_dir)
    t_load = time.perf_counter() - t0
    # The config's default k never exceeds a small index (6 cases: 6 results); an explicit --k does.
    k = min(int(config.retrieval.k), r.index.size) if a.k is None else a.k
    try:
        r._check_k(k)
        t1 = time.perf_counter()
        method = r.fusion_method(a.rerank, a.fusion)
        if method is None and a.weights:
            raise InputError("--weights sets the weights of a fused ranking; this query is one vector search "
                             "(the index has no lexical leg or fitted weights, or --fusion vector / --rerank)")
        hq = _query_tokens(r, q) if method is not None else None
        mu, lv, used = r.encode(q.images, q.report, clinical=q.clinical, other=q.other)
        t2 = time.perf_counter()
        fusion_info = None
        if method is not None:
            results, fusion_info = r.search_hybrid(r.hybrid_query(mu, used, tokens=hq), k, weights=a.weights,
                                                   method=method, filter=q.filter, exclude=q.exclude,
                                                   feedback=q.feedback)
        else:
            results = r.search_embedding(mu, lv, k=k, filter=q.filter, exclude=q.exclude, feedback=q.feedback,
                                         rerank=a.rerank, modalities=used)
        t3 = time.perf_counter()
    finally:
        r.close()
    timing = {"load_s": t_load, "encode_s": t2 - t1, "search_s": t3 - t2, "query_s": t3 - t1}
    if a.json:
        doc = _json_doc(a, q, r, results, used, k, timing)
        doc["fusion"] = fusion_info
        print(json.dumps(doc, indent=2), file=out)
        return
    _print_results(r, results, used, timing, out, fusion_info)


def _query_tokens(r, q: _Query) -> list[str] | None:
    """The report's tokens for the lexical leg (None without a report); InputError for a report
    with no searchable word when the index has a lexical leg."""
    from mmvae.retrieval.index.lexical import query_tokens
    if q.report is None or r.index.lexical is None:
        return None
    return query_tokens(q.report)


# ---------------------------------------------------------------------- printing
def _json_doc(a, q: _Query, r, results, used, k: int, timing: dict) -> dict:
    return {"results": [dataclasses.asdict(x) for x in results],
            "query": {"images": q.images, "report": q.report is not None, "clinical": q.clinical,
                      "other": q.other or None, "modalities": used, "k": k, "filter": q.filter,
                      "exclude": q.exclude, "feedback": q.feedback, "rerank": a.rerank,
                      "notes": list(r.last_notes), "uncertainty": dict(r.last_uncertainty)},
            "index": {"path": str(a.index), "kind": r.index.kind, "metric": r.index.metric,
                      "size": r.index.size},
            "timing": timing}


def _format_labels(labels) -> str:
    if isinstance(labels, Mapping):
        return ", ".join(f"{k}={v}" for k, v in labels.items())
    return "" if labels is None else json.dumps(labels)


def _table(results) -> str:
    hybrid = any(hasattr(r, "contributions") for r in results)
    head = ("rank", "case_id", "score", "modalities", "labels") + (("matched on",) if hybrid else ())
    rows = [(str(r.rank), r.case_id, f"{r.score:.4f}", ",".join(r.modalities), _format_labels(r.labels))
            + ((r.matched_on(),) if hybrid else ()) for r in results]
    widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h) for i, h in enumerate(head)]
    right = {0, 2}

    def line(cells):
        return "  ".join(c.rjust(w) if i in right else c.ljust(w)
                         for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    return "\n".join([line(head), line(["-" * w for w in widths])] + [line(r) for r in rows])


def _print_results(r, results, used, timing: dict, out, fusion=None) -> None:
    print(_table(results), file=out)
    if fusion is not None:
        w = ", ".join(f"{n} {v:.2f}" for n, v in fusion["weights"].items())
        print(f"fused ranking ({fusion['method']}, {fusion['weight_set']} weights): {w}", file=out)
    print(f"{len(results)} of {r.index.size} cases ({r.index.kind} index, {r.index.metric}); query by "
          f"{'+'.join(used)}; query time {1e3 * timing['query_s']:.1f} ms (encode "
          f"{1e3 * timing['encode_s']:.1f} ms incl. first-call compile, search {1e3 * timing['search_s']:.1f} ms); "
          f"model+index load {timing['load_s']:.1f} s", file=out)
    u = r.last_uncertainty
    print(f"query uncertainty: posterior mean variance {u['mean_variance']:.3f}, log det {u['log_det']:.1f}; "
          + ("expert disagreement " + (f"{u['disagreement']:.4g} nats (mean pairwise symmetrised KL "
                                        "between the unimodal posteriors, summed over latent dimensions; it grows "
                                        "with the experts' confidence, so compare it between queries of one model: "
                                        "higher = the modalities agree less)" if u["disagreement"] is not None
                                       else "n/a (one modality)")), file=out)
    for n in r.last_notes:
        print(f"query used: {n}", file=out)

