"""``mmvae scan`` (a dataset folder → a manifest) and ``mmvae check`` (load every file of a
manifest without training): the commands that look at input before a run."""
from __future__ import annotations

import json
from pathlib import Path

from mmvae.cli import _config


def add(sub) -> None:
    s = sub.add_parser("scan", help="scan a dataset folder into a manifest, saying what went where and what was skipped")
    s.add_argument("root", help="dataset folder")
    s.add_argument("--layout", default="auto", choices=["auto", "brats", "bids", "dicom", "keyimages"])
    s.add_argument("--out", required=True, help="manifest to write (.jsonl or .csv)")
    s.add_argument("--labels", help="CSV with a case_id column and one column per label")
    s.add_argument("--modalities", action="append", help="keep only these modalities (comma list)")
    s.set_defaults(fn=run_scan)

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
    s.set_defaults(fn=run_check)


def _add_labels(entries, labels_csv) -> None:
    """Each case's labels from ``labels_csv`` onto its first row (a case's rows stay together);
    say which cases have no row and which rows name no case."""
    from mmvae.data.scan import read_label_csv
    labels = read_label_csv(Path(labels_csv))
    cases = {e.case_id for e in entries}
    seen: set[str] = set()
    for e in entries:
        if e.case_id in labels and e.case_id not in seen:
            e.labels = {**e.labels, **labels[e.case_id]}
            seen.add(e.case_id)
    missing = sorted(cases - set(labels))
    if missing:
        print(f"labels: {len(missing)} case(s) have no row in {labels_csv} (e.g. {missing[0]!r})")
    extra_rows = sorted(set(labels) - cases)
    if extra_rows:
        print(f"labels: {len(extra_rows)} row(s) name no scanned case (e.g. {extra_rows[0]!r}); ignored")


def run_scan(a, extra):
    from mmvae.data.manifest import write_manifest
    from mmvae.data.scan import scan_folder_detailed
    mods = [m for x in (a.modalities or []) for m in x.split(",") if m] or None
    res = scan_folder_detailed(a.root, a.layout, mods)
    entries = list(res.entries)
    if a.labels:
        _add_labels(entries, a.labels)
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


def run_check(a, extra):
    from mmvae.data.dataset import input_summary
    from mmvae.runs.trained import load_cohort
    config = _config.load(a.config, extra)
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
