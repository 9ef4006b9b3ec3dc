"""The ablation grid end to end on the tiny config: outputs' content, an independent
check of one metric, resume, failed cells, settings guard, leave-one-out with two labels."""
import csv
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mmvae.config import load_config
from mmvae.errors import ConfigError
from mmvae.experiments import grid as G
from mmvae.retrieval.embed import Embeddings

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny.py")
FULL = ("t1", "t2", "dwi", "report", "clinical")


def _script(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "experiments" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _csv(path):
    with open(path, newline="") as f:
        r = csv.DictReader(f)
        return r.fieldnames, list(r)


@pytest.fixture(scope="module")
def grid_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ablation")
    rc = _script("ablate_modalities").main(["--config", TINY, "--out", str(out), "--train-subsets", "full",
                                             "--fusions", "poe", "--seeds", "0", "--baselines", "raw_pca",
                                             "--hybrid"])
    return out, rc


def test_grid_outputs_hold_every_cell_query_and_metric(grid_run):
    out, rc = grid_run
    assert rc == 0
    header, rows = _csv(out / "results.csv")
    assert tuple(header) == G.CSV_COLUMNS
    assert {r["status"] for r in rows} == {"ok"}
    vae = [r for r in rows if r["method"] == "vae"]
    pca = [r for r in rows if r["method"] == "raw_pca"]
    assert {r["cell"] for r in vae} == {"vae-poe-default-t1+t2+dwi+report+clinical-s0"}
    assert {r["label"] for r in rows} == {"class"}
    every = {"+".join(s) for s in G.nonempty_subsets(FULL)}
    vae_queries = {r["query"] for r in vae}
    # Queries are subsets of the training modalities; the held-out cases have most of them.
    assert vae_queries <= every and len(vae_queries) >= 20 and "t1+t2+dwi+report+clinical" in vae_queries
    # The image-only baseline answers image-only queries.
    assert {r["query"] for r in pca} <= {"+".join(s) for s in G.nonempty_subsets(("t1", "t2", "dwi"))}
    assert len({r["query"] for r in pca}) == 7
    for q in vae_queries:
        assert sorted(r["metric"] for r in vae if r["query"] == q) == ["map@10", "ndcg@10", "precision@10", "recall@10"]
    for r in rows:
        v, lo, hi = float(r["value"]), float(r["lo"]), float(r["hi"])
        assert 0.0 <= lo <= v + 1e-9 and v <= hi + 1e-9 and hi <= 1.0 + 1e-9
        assert int(r["num_queries"]) > 0

    # Summary, Markdown table and heat map agree with the CSV (one seed: sd 0).
    summary = json.loads((out / "summary.json").read_text())
    full = next(s for s in summary if s["method"] == "vae" and s["query"] == "t1+t2+dwi+report+clinical")
    csv_full = next(r for r in vae if r["query"] == full["query"] and r["metric"] == "map@10")
    assert full["mean"] == pytest.approx(float(csv_full["value"])) and full["sd"] == 0.0 and full["n_seeds"] == 1
    md = (out / "results.md").read_text()
    line = next(ln for ln in md.splitlines() if ln.startswith("| vae poe default [t1+t2+dwi+report+clinical]"))
    cols = [c.strip() for c in md.splitlines()[0].strip("|").split("|")]
    assert line.strip("|").split("|")[cols.index("t1+t2+dwi+report+clinical")].strip() == f"{full['mean']:.3f}"
    assert "raw_pca [t1+t2+dwi]" in md and "Failed cells" not in md
    img = Image.open(out / "heatmap_poe_default.png")
    assert img.size[0] > 200 and img.size[1] > 100 and np.asarray(img.convert("L")).std() > 10


def test_precision_matches_an_independent_computation(grid_run):
    """precision@10 of the all-modality query, recomputed by hand from the saved embeddings."""
    out, _ = grid_run
    _, rows = _csv(out / "results.csv")
    cell = "vae-poe-default-t1+t2+dwi+report+clinical-s0"
    emb = Embeddings.load(out / "cells" / cell / "embeddings.npz")
    cfg = load_config(TINY)
    from mmvae.data.dataset import split_indices
    _, q = split_indices(len(emb.case_ids), float(cfg.data.val_fraction), int(cfg.data.split_seed))
    labels = np.asarray([lab.get("class", "") for lab in emb.labels])
    full = np.ones(len(emb.modalities), np.float32)
    qv = np.asarray(emb.subset_posterior(full)[0])
    db = np.asarray(emb.mu)
    qv = qv / np.linalg.norm(qv, axis=1, keepdims=True)
    db = db / np.linalg.norm(db, axis=1, keepdims=True)
    precisions = []
    for i in q:
        if not emb.present[i].all() or labels[i] == "":
            continue
        others = np.delete(np.arange(len(db)), i)
        if not np.any(labels[others] == labels[i]):
            continue
        top = others[np.argsort(-(db[others] @ qv[i]), kind="stable")[:10]]
        precisions.append(np.mean(labels[top] == labels[i]))
    r = next(r for r in rows if r["cell"] == cell and r["query"] == "+".join(FULL) and r["metric"] == "precision@10")
    assert int(r["num_queries"]) == len(precisions) > 0
    assert float(r["value"]) == pytest.approx(float(np.mean(precisions)), abs=1e-6)


def test_grid_hybrid_rankings_of_the_vae_cell(grid_run):
    """--hybrid: each expert leg and BM25 alone, fused, fitted on the training split, feedback and
    chance for the VAE cell, on the held-out queries; a finished cell gets its rows from its
    saved embeddings without retraining, the same rows."""
    from mmvae.data.dataset import split_indices
    from mmvae.retrieval.evaluate import chance_map
    out, _ = grid_run
    header, rows = _csv(out / "hybrid.csv")
    assert tuple(header) == G.HYBRID_COLUMNS
    cell = "vae-poe-default-t1+t2+dwi+report+clinical-s0"
    assert {r["cell"] for r in rows} == {cell}                    # baselines have no legs to fuse
    names = [r["ranking"] for r in rows]
    assert [n for n in names if n.startswith("leg ")] == [f"leg expert:{m}" for m in FULL] + ["leg bm25:report"]
    assert names[len(FULL) + 1:] == ["fused uniform", "fused rrf", "fused fitted"] + [
        f"feedback {w}, round {r}" for w in ("rocchio", "rocchio+weights") for r in (1, 2, 3)] + ["chance"]
    emb = Embeddings.load(out / "cells" / cell / "embeddings.npz")
    cfg = load_config(TINY)
    _, q = split_indices(len(emb.case_ids), float(cfg.data.val_fraction), int(cfg.data.split_seed))
    by = {r["ranking"]: r for r in rows}
    assert all(int(by[n]["num_queries"]) == len(q) for n in names if not n.startswith("leg "))
    labels = [lab.get("class", "") for lab in emb.labels]
    assert float(by["chance"]["value"]) == pytest.approx(chance_map(labels, list(q), 10))
    for r in rows:
        v, lo, hi = float(r["value"]), float(r["lo"]), float(r["hi"])
        assert 0.0 <= lo <= v + 1e-9 <= hi + 2e-9 <= 1.0 + 2e-9 and r["fitted_on"] == "fit_cases"
    weights = json.loads(rows[0]["weights"])
    assert list(weights) == sorted(n[4:] for n in names if n.startswith("leg ")) and sum(weights.values()) == pytest.approx(1.0)
    assert f"#### Hybrid rankings: vae poe default [{'+'.join(FULL)}], label `class`" in (out / "hybrid.md").read_text()
    # A cell finished without them: evaluated from its embeddings (no training), identical rows.
    path = out / "cells" / cell / "result.json"
    result = json.loads(path.read_text())
    saved = result.pop("hybrid")
    path.write_text(json.dumps(result))
    done = (out / "cells" / cell / "train_done.json").stat().st_mtime_ns
    assert _script("ablate_modalities").main(["--config", TINY, "--out", str(out), "--train-subsets", "full",
                                              "--fusions", "poe", "--seeds", "0", "--baselines", "raw_pca",
                                              "--hybrid"]) == 0
    assert json.loads(path.read_text())["hybrid"] == saved
    assert (out / "cells" / cell / "train_done.json").stat().st_mtime_ns == done


def test_a_hybrid_evaluation_that_fails_leaves_the_cell_and_says_why(grid_run, tmp_path):
    """The hybrid rows are an extra evaluation: when they cannot be made (here the reports'
    manifest is gone) the cell keeps its vector rows and hybrid.md names the cell and the reason."""
    out, _ = grid_run
    cell = G.Cell("vae", FULL)
    emb = Embeddings.load(out / "cells" / cell.id / "embeddings.npz")
    ctx = G.GridContext(TINY, [], out, "class", hybrid=True)
    r = G._hybrid_or_error(ctx, cell, emb, str(tmp_path / "gone.jsonl"), [], [])
    assert "hybrid" not in r and "manifest not found" in r["hybrid_error"]
    G.write_hybrid([], tmp_path, [(cell.id, r["hybrid_error"])])
    assert f"- `{cell.id}`: InputError" in (tmp_path / "hybrid.md").read_text()


def test_grid_resumes_records_a_failed_cell_and_goes_on(grid_run):
    out, _ = grid_run
    ctx = G.GridContext(TINY, [], out, "class")
    done = [G.Cell("vae", FULL), G.Cell("raw_pca", ("t1", "t2", "dwi"))]
    result_file = ctx.cell_dir(done[0]) / "result.json"
    before = result_file.stat().st_mtime_ns
    log = []
    bad = G.Cell("vae", FULL, objective="no_such_objective")
    results = G.run_grid(ctx, done + [bad], log=log.append)
    assert log[0] == "grid: 3 cells, 2 finished before, 1 to run"
    assert result_file.stat().st_mtime_ns == before
    assert [r["status"] for r in results] == ["ok", "ok", "failed"]
    assert "unknown objective variant 'no_such_objective'" in results[2]["error"]
    recorded = json.loads((ctx.cell_dir(bad) / "result.json").read_text())
    assert recorded["status"] == "failed" and "ConfigError" in recorded["error"]
    res = G.write_outputs(results, FULL, out / "with_failure")
    _, rows = _csv(res["csv"])
    failed = [r for r in rows if r["status"] == "failed"]
    assert len(failed) == 1 and failed[0]["cell"] == bad.id and "no_such_objective" in failed[0]["error"]
    assert "Failed cells" in res["markdown"].read_text()
    # A failed cell stays failed on resume unless asked to retry.
    log.clear()
    G.run_grid(ctx, [bad], log=log.append)
    assert log[0] == "grid: 1 cells, 1 finished before, 0 to run"
    # The same folder with other settings is refused: its cells would be silently reused.
    with pytest.raises(ConfigError, match="other settings"):
        G.run_grid(G.GridContext(TINY, [], out, "lesion_size"), done, log=log.append)


def test_cli_errors_exit_2_without_running(grid_run, tmp_path, capsys):
    mod = _script("ablate_modalities")
    assert mod.main(["--config", TINY, "--out", str(tmp_path / "x"), "--objectives", "bogus"]) == 2
    assert "unknown ['bogus']" in capsys.readouterr().err
    assert mod.main(["--config", TINY, "--out", str(tmp_path / "x"), "--train-subsets", "t1+flair"]) == 2
    assert not (tmp_path / "x" / "cells").exists()


def test_leave_one_out_with_two_labels(tmp_path):
    """queries='all': every case queries the others; each label gets its rows, table and heat maps."""
    out = tmp_path / "loo"
    ctx = G.GridContext(TINY, [], out, "class,lesion_size", k=5, queries="all")
    results = G.run_grid(ctx, [G.Cell("raw_pca", ("t1", "t2", "dwi"))], log=lambda *_: None)
    assert results[0]["status"] == "ok", results[0].get("error")
    res = G.write_outputs(results, FULL, out, "map@5", ctx.labels)
    _, rows = _csv(res["csv"])
    assert {r["label"] for r in rows} == {"class", "lesion_size"}
    t1 = [r for r in rows if r["query"] == "t1" and r["metric"] == "map@5"]
    # Every case with a t1 queries (40 tiny cases, a few lack t1): far more than a held-out split.
    assert all(int(r["num_queries"]) >= 30 for r in t1)
    md = res["markdown"].read_text()
    assert "### Label `class`" in md and "### Label `lesion_size`" in md


# ------------------------------------------------------------------------------ report
def test_tertiles_split_by_rank_in_equal_thirds():
    from mmvae.experiments.brats import tertiles
    vols = {"a": 5.0, "b": 1.0, "c": 90.0, "d": 30.0, "e": 2.0, "f": 31.0}
    assert tertiles(vols) == {"b": "small", "e": "small", "a": "medium", "d": "medium",
                                 "f": "large", "c": "large"}


def _entry(query, mean, lo=None, method="vae", fusion="poe", train="t1+t2+report", sd=0.01, objective="default"):
    return {"method": method, "fusion": fusion if method == "vae" else "", "objective": objective if method == "vae" else "",
            "train_subset": train, "query": query, "mean": mean, "sd": sd, "n_seeds": 3,
            "lo": mean - 0.05 if lo is None else lo, "hi": mean + 0.05}


def test_targets_report_what_is_met_and_by_how_much_it_is_missed():
    from mmvae.experiments import report as R
    mods = ["t1", "t2", "report"]
    summary = [_entry("t1", 0.40), _entry("t2", 0.55), _entry("report", 0.30), _entry("t1+t2", 0.60),
               _entry("t1+report", 0.45), _entry("t2+report", 0.42, lo=0.40),
               _entry("t1+t2+report", 0.50),
               _entry("t1+t2", 0.45, method="raw_pca", train="t1+t2"),
               _entry("report", 0.35, method="report_minilm", train="report"),
               _entry("report", 0.25, method="report_tfidf", train="report"),
               _entry("t1+t2+report", 0.88, objective="labels20"),
               _entry("t1+t2+report", 0.92, objective="labels100"),
               _entry("t1+t2+report", 0.95, method="logreg_tfidf", train="t1+t2+report")]
    t = {x.name: x for x in R.check_targets(summary, mods)}
    assert t["all-modality mAP@10"].met is False and t["all-modality mAP@10"].gap == "0.100 below"
    assert t["fusion gain"].met is False and "gain -0.050" in t["fusion gain"].measured
    assert t["fusion gain"].gap == "0.150 short"
    # t2 (0.55, lo 0.50) → t2+report (0.42): 0.08 below the CI of t2; t1+t2 (lo 0.55) → t1+t2+report 0.05 below.
    mono = t["adding a modality never hurts"]
    assert mono.met is False and "2 of 9 pairs" in mono.measured and "`t2` → `t2+report` 0.080" in mono.measured
    assert t["beats every unsupervised baseline"].met is True            # logreg_tfidf is supervised: not here
    assert t["text-only query ≥ report_minilm"].met is False and t["text-only query ≥ report_minilm"].gap == "0.050 below"
    assert t["text-only query ≥ report_tfidf"].met is True
    assert t["semi-supervised `labels20`"].met is True
    assert t["semi-supervised `labels100`"].met is True
    sup = t["`labels100` beats the supervised baselines"]
    assert sup.met is False and sup.gap == "0.030 below logreg_tfidf [t1+t2+report]"
    table = R.targets_table(t.values())
    assert table.count("**missed**") == 5 and "0.500 ± 0.010 (poe)" in table


def test_make_report_end_to_end_on_tiny(grid_run, tmp_path):
    """Reuses the tiny grid's finished cells (same settings), adds figures and the BraTS part."""
    import re
    out, _ = grid_run
    report_out = tmp_path / "report"
    report_out.mkdir()
    (report_out / "synthetic").symlink_to(out, target_is_directory=True)
    docs = tmp_path / "docs" / "results.md"
    brats = ROOT.parent / "shared" / "data" / "brats18-sample"
    argv = ["--out", str(report_out), "--docs", str(docs), "--config", TINY, "--seeds", "0", "--fusions", "poe",
            "--baselines", "raw_pca", "--figures", "pca",
            "--ablation", "dwi",      # one single-modality training: the ablation rows' code path (each
                                      # further subset is one more training and no other code path)
            "--brats", str(brats), "--brats-baselines", "raw_pca",
            "--brats-set", "data.shape=(16,16,16)", "--brats-set", "data.spacing=(12.0,12.0,12.0)",
            "--brats-set", "model.image.channels=(4,8)", "--brats-set", "model.latent_dim=4",
            "--brats-set", "train.steps=2", "--brats-set", "train.batch_size=2",
            "--semi", "labels20",
            "--medpix-seeds", "0", "--medpix-baselines", "report_tfidf",
            # the tiny from-scratch report BERT below, whether or not the `text` extra is installed
            # at most 2 key images per sequence (the recipe reads 8): fewer frozen-feature extractions
            "--medpix-config", str(ROOT / "configs" / "medpix.py") + ":text=scratch,series=2",
            "--medpix-set", "data.shape=(32,32)", "--medpix-set", "model.image.channels=(8,16)",
            "--medpix-set", "model.latent_dim=4", "--medpix-set", "train.steps=2", "--medpix-set", "train.batch_size=4",
            "--medpix-set", "model.text.hidden=16", "--medpix-set", "model.text.intermediate=32"]
    assert _script("make_report").main(argv) == 0
    md = docs.read_text()
    summary = json.loads((out / "summary.json").read_text())
    full = next(s for s in summary if s["method"] == "vae" and s["query"] == "+".join(FULL))
    line = next(ln for ln in md.splitlines() if ln.startswith("| all-modality mAP@10 |"))
    assert f"{full['mean']:.3f} (poe; {full['num_queries']} queries with every modality)" in line
    assert ("**missed**" in line) == (full["mean"] < 0.60)
    if full["mean"] < 0.60:
        assert f"{0.60 - full['mean']:.3f} below" in line
    assert "| beats every unsupervised baseline |" in md
    assert "| semi-supervised `labels20` |" in md
    hyb = md.split("### Hybrid rankings", 1)[1].split("### Heat maps", 1)[0]      # the synthetic part's
    assert f"#### Hybrid rankings: vae poe default [{'+'.join(FULL)}], label `class`" in hyb
    assert "| bm25:report alone |" in hyb and "| feedback: Rocchio + leg weights, after 3 rounds |" in hyb
    assert "labels20" not in hyb and "[dwi]" not in hyb          # the full-modality default cell only
    assert "#### Objective `default`" in md and "#### Objective `labels20`" in md and "In words: " in md
    assert "chance mAP@10 = " in md and "Lesion reconstruction" in md
    medpix = ROOT.parent / "shared" / "data" / "medpix-dev"
    if medpix.is_dir():
        part = md.split("## MedPix key images + reports", 1)[1].split("## Reproduce", 1)[0]
        assert "Chance (random ranking, same protocol): `category`" in part and "report_tfidf" in part
        assert (docs.parent / "results" / "medpix_results.csv").is_file()
        assert "(n=" in part                   # every column says how many queries it rests on
        # each case queried with the sequences it has: (nearly) every labelled case, not 3
        own = [ln for ln in part.splitlines() if ln.startswith("| `location` | images + report |")]
        assert len(own) == 1 and int(own[0].split("|")[3]) >= 100
        assert "MedPix target, `category`: image + text queries above TF-IDF" in part
        assert "MedPix target, `location`: image-only queries above chance" in part
        assert "label `location`" in part.split("### Hybrid rankings", 1)[1] and "| bm25:report alone |" in part
    # Every figure the page links exists, is a PNG and lies beside the page.
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert any("heatmap_poe_default" in x for x in links) and any("projection_pca" in x for x in links)
    for link in links:
        assert (docs.parent / link).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (docs.parent / "results" / "synthetic_results.csv").read_text() == (out / "results.csv").read_text()
    if not brats.is_dir():
        assert "Skipped: BraTS sample not found" in md
        pytest.skip(f"BraTS sample absent at {brats}: the real-data part was not exercised")
    section = md.split("## BraTS 2018 sample", 1)[1]
    rows = [ln for ln in section.splitlines() if ln.startswith("| Brats18_")]
    assert len(rows) == 6 and sum("| HGG |" in r for r in rows) == 4
    assert sorted(r.rsplit("|", 2)[1].strip() for r in rows) == ["large"] * 2 + ["medium"] * 2 + ["small"] * 2
    assert "### Label `grade`" in section and "### Label `tumour_volume`" in section
    _, brows = _csv(docs.parent / "results" / "brats_results.csv")
    ok = [r for r in brows if r["status"] == "ok" and r["query"] == "t1+t1ce+t2+flair" and r["metric"] == "map@5"]
    # Leave-one-out: all six cases query (a case whose label is unique would be skipped; none is here).
    assert {(r["method"], r["label"]) for r in ok} == {("vae", "grade"), ("vae", "tumour_volume"),
                                                      ("raw_pca", "grade"), ("raw_pca", "tumour_volume")}
    assert all(int(r["num_queries"]) == 6 for r in ok)


def test_markdown_table_can_show_the_number_of_queries_per_column():
    from mmvae.experiments import grid as G
    s = [dict(method="raw_pca", fusion="", objective="", train_subset="t1+t2", query=q, mean=m, sd=0.0, n_seeds=1,
              lo=m, hi=m, num_queries=n) for q, m, n in (("t1", 0.2, 57), ("t1+t2", 0.3, 3))]
    plain = G.markdown(s, ["t1", "t1+t2"])
    shown = G.markdown(s, ["t1", "t1+t2"], show_queries=True)
    assert "| t1 | t1+t2 |" in plain and "(n=" not in plain
    assert "| t1 (n=57) | t1+t2 (n=3) |" in shown and "| 0.200 | 0.300 |" in shown
