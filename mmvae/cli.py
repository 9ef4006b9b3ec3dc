"""The ``mmvae`` command line.

Every sub-command has ``--help``. Errors caused by input (``MmvaeError``) print one
line naming the case, modality and file, and exit with status 2.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from mmvae.errors import MmvaeError



def _config(spec: str | None, overrides: list[str], default: str):
    from mmvae.config import load_config
    if spec is None:
        spec = default
    return load_config(spec, overrides)


def cmd_synth(a, extra):
    from mmvae.data.synth import make_cohort
    path = make_cohort(a.out, a.cases, seed=a.seed, shape=tuple(a.shape), spacing=tuple(a.spacing),
                       spatial_dims=len(a.shape))
    print(f"wrote {a.cases} cases; manifest {path}")


def _on_error(config, a):
    if getattr(a, "on_error", None):
        with config.unlocked():
            config.data.on_error = a.on_error
    return config


def cmd_train(a, extra):
    from mmvae.train.loop import train_and_evaluate
    config = _on_error(_config(a.config, extra, "quickstart.py"), a)
    if a.manifest:
        with config.unlocked():
            config.data.manifest = a.manifest
    if not config.data.manifest:
        from mmvae.errors import ConfigError
        if int(config.synth.cases) <= 0:
            raise ConfigError("data.manifest is empty: pass --manifest (this config has no synthetic cohort)")
        from mmvae.quickstart import synthesize
        with config.unlocked():
            config.data.manifest = str(synthesize(config, Path(a.workdir) / "data"))
    s = train_and_evaluate(config, a.workdir, show_progress=not a.quiet)
    print(json.dumps({k: v for k, v in s.items() if k != "metrics"}))


def cmd_embed(a, extra):
    from mmvae.retrieval.embed import embed_cohort, embedding_kind
    from mmvae.runs.trained import load_cohort, load_trained
    from mmvae.runs.files import fingerprint
    config, spec, model, tok, step = load_trained(a.workdir, return_step=True)
    config = _on_error(config, a)
    stats = json.loads((Path(a.workdir) / "clinical_stats.json").read_text())
    cohort, _, _ = load_cohort(config, Path(a.workdir), a.manifest, tokenizer=tok, clinical_stats=stats)
    emb = embed_cohort(model, cohort, identity={"model_fingerprint": fingerprint(spec),
                                                "checkpoint_step": int(step),
                                                "workdir": str(Path(a.workdir).resolve()),
                                                "label": str(config.data.get("label", "") or "")},
                       standardize=bool(config.retrieval.get("standardize", True)),
                       embedding=embedding_kind(config))
    emb.save(a.out)
    print(f"embedded {len(emb.case_ids)} cases -> {a.out}" + (f" ({len(cohort.skipped)} skipped)" if cohort.skipped else ""))


def cmd_index(a, extra):
    from mmvae.retrieval.embed import Embeddings
    from mmvae.retrieval.index import build_index
    emb = Embeddings.load(a.embeddings)
    meta = [{"modalities": [m for m, p in zip(emb.modalities, row) if p > 0], "labels": lab}
            for row, lab in zip(emb.present, emb.labels)]
    idx = build_index(emb.mu, emb.logvar, emb.case_ids, meta, kind=a.kind, metric=a.metric,
                      identity=dict(emb.identity))
    idx.save(a.out)
    print(f"{a.kind} index of {len(emb.case_ids)} cases -> {a.out}")


def _evaluation_label(emb, asked: str | None) -> str:
    """The label that defines relevance: ``--label``, else the run's ``data.label`` recorded in
    the embeddings, else the one label the cases carry. A label no case has is an error."""
    from mmvae.errors import InputError
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


def cmd_evaluate(a, extra):
    from mmvae.quickstart import rows_to_csv
    from mmvae.atomic import atomic_write_text
    from mmvae.retrieval.embed import Embeddings
    from mmvae.retrieval.evaluate import chance_map, evaluate, markdown_table, parse_subset
    emb = Embeddings.load(a.embeddings)
    label = _evaluation_label(emb, a.label)
    subsets = [parse_subset(s, emb.modalities) for s in a.subsets] if a.subsets else None
    rows = evaluate(emb, label, a.k, subsets=subsets, metric=a.metric, multilabel=a.multilabel,
                    n_boot=a.bootstrap, own=a.own, chance=True)
    table = markdown_table(rows, a.k)
    if a.out:
        atomic_write_text(Path(a.out).with_suffix(".csv"), rows_to_csv(rows))
        atomic_write_text(Path(a.out).with_suffix(".md"), table)
    print(f"label {label!r}; {'each case queries with the modalities of the subset it has' if a.own else 'queries: the cases that have every modality of the subset'}; "
          f"leave-one-out over {len(emb.case_ids)} cases")
    print(table)


def cmd_scan(a, extra):
    from mmvae.data.manifest import ManifestEntry, write_manifest
    from mmvae.data.scan import read_label_csv, scan_folder_detailed
    mods = [m for x in (a.modalities or []) for m in x.split(",") if m] or None
    res = scan_folder_detailed(a.root, a.layout, mods)
    entries = list(res.entries)
    if a.labels:
        labels = read_label_csv(Path(a.labels))
        cases = {e.case_id for e in entries}
        seen: set[str] = set()
        for e in entries:                        # on each case's first row (a case's rows stay together)
            if e.case_id in labels and e.case_id not in seen:
                e.labels = {**e.labels, **labels[e.case_id]}
                seen.add(e.case_id)
        missing = sorted(cases - set(labels))
        if missing:
            print(f"labels: {len(missing)} case(s) have no row in {a.labels} (e.g. {missing[0]!r})")
        extra_rows = sorted(set(labels) - cases)
        if extra_rows:
            print(f"labels: {len(extra_rows)} row(s) name no scanned case (e.g. {extra_rows[0]!r}); ignored")
    out = write_manifest(entries, a.out)
    by_mod: dict[str, int] = {}
    for e in res.entries:
        by_mod[e.modality] = by_mod.get(e.modality, 0) + 1
    print(f"layout {res.layout}: {len({e.case_id for e in res.entries})} cases, "
          + ", ".join(f"{m} {n}" for m, n in sorted(by_mod.items())))
    for e in res.entries:
        print(f"  {e.case_id}  {e.modality:<10} {e.path or '(text)'}")
    for path, reason in res.skipped:
        print(f"  skipped {path}: {reason}")
    print(f"wrote {out} ({len(entries)} rows; {len(res.skipped)} skipped)")


def cmd_check(a, extra):
    from mmvae.data.dataset import input_summary
    from mmvae.runs.trained import load_cohort
    config = _config(a.config, extra, "quickstart.py")
    with config.unlocked():
        config.data.manifest = a.manifest
        config.data.on_error = "skip"          # collect every problem; the exit status says if there were any
        if a.cache_dir:
            config.data.cache_dir = a.cache_dir
    workdir = Path(a.workdir) if a.workdir else Path(a.manifest).resolve().parent / ".mmvae-check"
    cohort, _, _ = load_cohort(config, workdir, show_progress=not a.quiet)
    summary = input_summary(cohort)
    dropped = [n for n in cohort.notes if n["kind"] == "dropped"]
    problems = len(cohort.skipped) + len(dropped)
    if a.json:
        print(json.dumps(summary, indent=1))
    else:
        for cid, reason in cohort.skipped:
            print(f"skip   {reason}" if repr(cid) in reason else f"skip   case {cid}: {reason}")
        for n in cohort.notes:
            label = {"dropped": "drop", "choice": "chose", "truncated": "trunc"}.get(n["kind"], n["kind"])
            print(f"{label:<6} case {n['case_id']}, {n['modality']}: {n['message']}")
        counts = ", ".join(f"{k} {v}" for k, v in summary["counts"].items()) or "no notes"
        print(f"{len(cohort)} cases usable; {len(cohort.skipped)} skipped; {counts}. "
              + ("With --on-error skip, training would drop the above." if problems else "No problem found."))
    return 2 if problems else 0


def cmd_query(a, extra):
    if any(x == "--pacs" or x.startswith("--pacs=") for x in a.query_args):
        from mmvae.pacs.query import pacs_query_main
        return pacs_query_main(a.query_args)
    from mmvae.retrieval.query import query_main
    query_main(a.query_args)


def cmd_suggest(a, extra):
    from mmvae.atomic import atomic_write_text
    from mmvae.errors import InputError
    from mmvae.retrieval.embed import Embeddings
    from mmvae.retrieval.query import model_identity
    from mmvae.retrieval.suggest import read_labelled, suggest, suggestions_csv
    from mmvae.runs.files import read_run_files
    config, spec, _ = read_run_files(Path(a.workdir))
    emb = Embeddings.load(a.embeddings)
    want = model_identity(spec)["model_fingerprint"]
    if emb.identity.get("model_fingerprint") != want:
        raise InputError(f"embeddings of another model (fingerprint {emb.identity.get('model_fingerprint')!r}, "
                         f"the workdir's is {want!r}): embed with this run first", path=a.embeddings)
    label = config.data.label
    classes = list(spec.label_classes) or sorted({lab.get(label) for lab in emb.labels if lab.get(label)}) or None
    labelled = read_labelled(a.labelled, emb, classes, label) if a.labelled else {}
    rows = suggest(emb, a.budget, a.strategy, list(labelled), seed=a.seed)
    text = suggestions_csv(rows)
    if a.out:
        atomic_write_text(Path(a.out), text)
        print(f"{len(rows)} case(s) to annotate next ({a.strategy}; pool {len(emb.case_ids) - len(labelled)}) "
              f"-> {a.out}")
    else:
        print(text, end="")


def cmd_pacs_ingest(a, extra):
    from mmvae.pacs.archive import Archive
    from mmvae.pacs.ingest import ingest, load_reports
    archive = Archive(a.url, username=a.username, password=os.environ.get("MMVAE_PACS_PASSWORD"))
    rep = ingest(archive, a.workdir, a.index, studies=a.study or None, since=a.since, rules_path=a.modality_rules,
                 standardize_from=a.standardize_from, reports=load_reports(a.reports), store_reports=a.store_reports,
                 on_error=a.on_error, save_every=a.save_every, show_progress=not a.quiet)
    for d in rep.decisions:
        print(f"  {d}")
    for study, err in rep.failed:
        print(f"  failed {err}")
    print(f"{a.index}: {rep.summary()}")


class _QueryArgs(argparse.ArgumentParser):
    """``mmvae query`` options depend on the model (one ``--<modality>`` per image
    modality of ``--workdir``'s config): hand every argument to :func:`cmd_query`,
    which parses them in two passes."""

    def parse_known_args(self, args=None, namespace=None):
        ns = argparse.Namespace() if namespace is None else namespace
        for key, value in self._defaults.items():
            setattr(ns, key, value)
        ns.query_args = list(args or [])
        return ns, []


def cmd_quickstart(a, extra):
    from mmvae.quickstart import run_quickstart
    config = _on_error(_config(a.config, extra, "quickstart.py"), a)
    with config.unlocked():
        if a.cases:
            config.synth.cases = a.cases
        if a.steps:
            config.train.steps = a.steps
    run_quickstart(config, a.workdir, show_progress=not a.quiet)


def cmd_serve(a, extra):
    from mmvae.serve import serve
    settings = {"k": a.k, "max_upload_mb": a.max_upload_mb}
    serve(a.workdir, a.index, manifest=a.manifest, host=a.host, port=a.port, allow_remote=a.allow_remote,
          settings=settings, pacs=a.pacs, pacs_username=a.pacs_username,
          pacs_password=os.environ.get("MMVAE_PACS_PASSWORD"))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mmvae", description=__doc__.splitlines()[0])
    p.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("synth", help="write a synthetic cohort (NIfTI + reports + manifest)")
    s.add_argument("--out", required=True)
    s.add_argument("--cases", type=int, default=300)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--shape", type=int, nargs="+", default=[32, 32, 32])
    s.add_argument("--spacing", type=float, nargs="+", default=[2.0, 2.0, 2.0])
    s.set_defaults(fn=cmd_synth)

    s = sub.add_parser("train", help="train a model; --config.a.b=value overrides any config field")
    s.add_argument("--config", help="config file[:args] or a shipped config by name (quickstart, brats, medpix, ...), default quickstart")
    s.add_argument("--workdir", required=True)
    s.add_argument("--manifest", help="cohort manifest (overrides data.manifest)")
    s.add_argument("--quiet", action="store_true")
    s.add_argument("--on-error", choices=["raise", "skip"], help="bad cases: stop (default) or skip with a warning")
    s.set_defaults(fn=cmd_train)

    s = sub.add_parser("embed", help="encode every case of a manifest with a trained model")
    s.add_argument("--workdir", required=True, help="trained work dir")
    s.add_argument("--manifest", required=True)
    s.add_argument("--out", required=True, help="embeddings file (.npz)")
    s.add_argument("--on-error", choices=["raise", "skip"], help="bad cases: stop (default) or skip with a warning")
    s.set_defaults(fn=cmd_embed)

    s = sub.add_parser("index", help="build a FAISS index from embeddings")
    s.add_argument("--embeddings", required=True)
    s.add_argument("--out", required=True)
    s.add_argument("--kind", default="flat", choices=["flat", "ivf", "ivfpq", "hnsw", "binary"])
    s.add_argument("--metric", default="cosine", choices=["cosine", "l2"])
    s.set_defaults(fn=cmd_index)

    s = sub.add_parser("evaluate", help="leave-one-case-out retrieval metrics for query subsets")
    s.add_argument("--embeddings", required=True)
    s.add_argument("--label", help="relevance = same value of this label (default: the run's data.label)")
    s.add_argument("--k", type=int, default=10)
    s.add_argument("--own", action="store_true",
                   help="each case queries with the modalities of the subset it has (at least one), as "
                        "docs/results.md's real-cohort tables; default: only cases that have all of them")
    s.add_argument("--metric", default="cosine", choices=["cosine", "l2"])
    s.add_argument("--subsets", nargs="*", help="e.g. t2 t1+t2 (default: every non-empty subset)")
    s.add_argument("--multilabel", action="store_true", help="labels hold several values joined by '|'")
    s.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the 95%% CIs")
    s.add_argument("--out", help="write OUT.csv and OUT.md")
    s.set_defaults(fn=cmd_evaluate)

    s = sub.add_parser("scan", help="scan a dataset folder into a manifest, saying what went where and what was skipped")
    s.add_argument("root", help="dataset folder")
    s.add_argument("--layout", default="auto", choices=["auto", "brats", "bids", "dicom", "keyimages"])
    s.add_argument("--out", required=True, help="manifest to write (.jsonl or .csv)")
    s.add_argument("--labels", help="CSV with a case_id column and one column per label")
    s.add_argument("--modalities", action="append", help="keep only these modalities (comma list)")
    s.set_defaults(fn=cmd_scan)

    s = sub.add_parser("check", help="load and preprocess every file of a manifest (cached) without training; "
                                     "list every problem and every choice; exit 2 if any case or modality "
                                     "would be dropped",
                       description="Load and preprocess every file of a manifest with a config's data.* settings "
                                   "(--config.data.image_modalities=[...] and any other --config.a.b=value "
                                   "override apply), list every problem and choice; exit 0, or 2 when a case "
                                   "or modality would be dropped.")
    s.add_argument("--manifest", required=True)
    s.add_argument("--config", help="config file[:args] or shipped name whose data.* settings apply (default quickstart)")
    s.add_argument("--workdir", help="where the tokenizer is built (default: <manifest folder>/.mmvae-check)")
    s.add_argument("--cache-dir", help="preprocessing cache (default: the config's, else <workdir>/cache)")
    s.add_argument("--json", action="store_true", help="print the summary as JSON")
    s.add_argument("--quiet", action="store_true")
    s.set_defaults(fn=cmd_check)

    s = sub.add_parser("query", add_help=False,
                       help="find the indexed cases most similar to a new case's files (--workdir RUN --help)")
    s.__class__ = _QueryArgs
    s.set_defaults(fn=cmd_query)

    s = sub.add_parser("suggest", help="which unlabelled cases to annotate next (active learning), as CSV",
                       description="Rank the unlabelled cases of EMB.npz for annotation: random, uncertainty "
                                   "(predicted-label entropy or posterior spread), disagreement (between the "
                                   "case's unimodal experts), coreset (k-center greedy) or hybrid "
                                   "(uncertainty-weighted k-means++). Writes rank,case_id,strategy,score,reason.")
    s.add_argument("--workdir", required=True, help="trained work dir the embeddings come from")
    s.add_argument("--embeddings", required=True, help="embeddings of the candidate cases (mmvae embed)")
    s.add_argument("--budget", type=int, required=True, help="cases to suggest")
    from mmvae.retrieval.suggest import STRATEGIES      # numpy only: `mmvae --help` stays free of JAX
    s.add_argument("--strategy", default="hybrid", choices=list(STRATEGIES))
    s.add_argument("--labelled", help="CSV with case_id (and the label column) of the cases already labelled")
    s.add_argument("--seed", type=int, default=0, help="seed of random and hybrid")
    s.add_argument("--out", help="CSV to write (default: print)")
    s.set_defaults(fn=cmd_suggest)

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
    s.add_argument("--username", help="HTTP basic authentication (password from $MMVAE_PACS_PASSWORD)")
    s.add_argument("--quiet", action="store_true")
    s.set_defaults(fn=cmd_pacs_ingest)

    s = sub.add_parser("serve", help="review web page: query by example with relevance feedback",
                       description="Serve the review page for a trained run and its index on the loopback "
                                   "interface (http://127.0.0.1:8765/ by default; API docs at /docs).")
    s.add_argument("--workdir", required=True, help="trained work dir")
    s.add_argument("--index", required=True, help="index folder built from this run's embeddings")
    s.add_argument("--manifest", help="manifest of the indexed cases, for thumbnails and reports "
                                      "(default: the run's data.manifest)")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8765)
    s.add_argument("--allow-remote", action="store_true",
                   help="allow a --host beyond the loopback interface (the page shows patient images)")
    s.add_argument("--k", type=int, help="results per query (default serve.k of the config, 10)")
    s.add_argument("--max-upload-mb", type=float, help="largest upload (default serve.max_upload_mb, 1024)")
    s.add_argument("--pacs", help="DICOMweb root of an archive: query with a StudyInstanceUID in it")
    s.add_argument("--pacs-username", help="HTTP basic authentication (password from $MMVAE_PACS_PASSWORD)")
    s.set_defaults(fn=cmd_serve)

    s = sub.add_parser("quickstart", help="synth → train → embed → index → evaluate, offline, on CPU")
    s.add_argument("--workdir", default="runs/quickstart")
    s.add_argument("--config", help="config file[:args] or a shipped config by name (quickstart, brats, medpix, ...), default quickstart")
    s.add_argument("--cases", type=int)
    s.add_argument("--steps", type=int)
    s.add_argument("--quiet", action="store_true")
    s.add_argument("--on-error", choices=["raise", "skip"], help="bad cases: stop (default) or skip with a warning")
    s.set_defaults(fn=cmd_quickstart)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # --config.a.b=value overrides are collected apart from argparse's own options.
    extra = [x for x in argv if x.startswith("--config.")]
    argv = [x for x in argv if not x.startswith("--config.")]
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")   # no "PyTorch was not found" banner
    try:
        rc = args.fn(args, extra)
    except MmvaeError as e:
        print(f"mmvae {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
