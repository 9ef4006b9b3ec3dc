"""Hybrid retrieval (mmvae/retrieval/hybrid): the BM25 leg, fusion, fitted weights, feedback-learnt
weights, the commands, and the review page's per-leg contributions in a real Chromium."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from mmvae.cli import main
from mmvae.errors import IndexError_, InputError
from mmvae.retrieval.hybrid import HybridQuery, hybrid_search, index_legs, zscore
from mmvae.retrieval.hybrid.fit import fit_fusion
from mmvae.retrieval.hybrid.fusion import feedback_weights, fuse
from mmvae.retrieval.index import build_index, load_index
from mmvae.retrieval.index.lexical import LexicalLeg, query_tokens, tokenize

from _tiny_run import faiss_one_thread
from test_serve import browser, wait_for  # noqa: F401  (the Chromium fixture, shared)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with faiss_one_thread():
        yield


# ----------------------------------------------------------------------------- BM25 leg
def test_tokenizer_keeps_abbreviations_numbers_and_negations():
    toks = tokenize("T2-weighted MRI: a 5.2 cm mass at C5-6, NO enhancement; DWI b=1000. The ADC is low.")
    for t in ("t2-weighted", "t2", "weighted", "mri", "5.2", "cm", "c5-6", "no", "dwi", "b=1000", "adc", "low"):
        assert t in toks, t
    assert not {"a", "at", "the", "is"} & set(toks)
    assert tokenize(None) == [] and tokenize("") == []
    with pytest.raises(InputError, match="no searchable word"):
        query_tokens("the of and, is it?")


def test_bm25_against_a_hand_computed_example():
    # Lucene BM25 (k1 = 1.2, b = 0.75): idf = ln(1 + (N − n + 0.5)/(n + 0.5)), tf part f/(f + k1(1 − b + b·|d|/avgdl))
    leg = LexicalLeg([["glioma", "glioma", "frontal"], ["glioma", "edema"], [], ["infarct"]])
    s = leg.scores(["glioma"])
    n_docs, df, avgdl = 4, 2, (3 + 2 + 0 + 1) / 4
    idf = math.log(1 + (n_docs - df + 0.5) / (df + 0.5))

    def part(f, dl):
        return f / (f + 1.2 * (1 - 0.75 + 0.75 * dl / avgdl))
    np.testing.assert_allclose(s, [idf * part(2, 3), idf * part(1, 2), 0.0, 0.0], rtol=1e-5)
    two = leg.scores(["glioma", "infarct"])
    idf_i = math.log(1 + (4 - 1 + 0.5) / (1 + 0.5))
    assert two[3] == pytest.approx(idf_i * part(1, 1), rel=1e-5) and two[0] == pytest.approx(s[0], rel=1e-5)
    assert not leg.scores(["unknownword"]).any() and not leg.scores([]).any()


# ----------------------------------------------------------------------------- fusion
def test_fusion_is_invariant_to_a_legs_score_scale():
    rng = np.random.default_rng(0)
    raw = rng.normal(size=(3, 200))
    raw[1, rng.random(200) < 0.2] = np.nan                 # cases without that leg
    w = np.array([0.5, 0.3, 0.2])

    def ranking(r):
        z = np.stack([zscore(x, x[:64]) for x in r])
        return np.argsort(-fuse(z, r, w, "weighted")[0], kind="stable")
    base = ranking(raw)
    scaled = raw.copy()
    scaled[2] = 37.0 * scaled[2] + 5.0                      # e.g. BM25 on another corpus' scale
    scaled[1] = 0.01 * scaled[1] - 3.0
    assert np.array_equal(ranking(scaled), base)
    # RRF only sees ranks: invariant as well, and a case lacking a leg gets nothing from it
    rr = fuse(np.zeros_like(raw), raw, w, "rrf")
    rs = fuse(np.zeros_like(raw), scaled, w, "rrf")
    np.testing.assert_allclose(rr[0], rs[0])
    assert (rr[1][1][np.isnan(raw[1])] == 0).all()


def _toy_index(n=200, seed=0, **kw):
    """Three expert legs: ``a`` carries the label (5 classes), ``b`` and ``c`` are noise; a report
    leg whose words name the class for every case."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 5, n)
    centers = rng.normal(size=(5, 8))
    good = centers[y] + 0.8 * rng.normal(size=(n, 8))
    mu = np.concatenate([good, rng.normal(size=(n, 8)), rng.normal(size=(n, 8))], 1).astype(np.float32)
    words = ["glioma", "abscess", "infarct", "metastasis", "lymphoma"]
    reports = [f"findings compatible with {words[v]} case{i}" for i, v in enumerate(y)]
    meta = [{"modalities": ["a", "b", "c", "report"], "labels": {"y": str(v)}} for v in y]
    ix = build_index(mu, np.zeros_like(mu), [f"c{i:03d}" for i in range(n)], meta,
                     identity={"embedding": "experts", "modalities": ["a", "b", "c"], "weights_digest": "d0"},
                     reports=reports, **kw)
    return ix, y


def test_fitted_weights_beat_uniform_when_a_leg_is_noise():
    ix, _ = _toy_index()
    ix.lexical = None                       # dense legs only: the noise legs matter
    ix.version += 1
    entry = fit_fusion(ix, "y", k=10, folds=5, seed=0, n_boot=200)
    cv = entry["cv"]
    # the cross-validated fitted weights (never fitted on the query) recover the informative leg
    assert cv["fitted"]["map"] > cv["uniform"]["map"] + 0.2
    assert cv["fitted"]["map"] >= cv["legs"]["expert:a"]["map"] - 0.02
    assert entry["weights"]["expert:a"] > 0.8 and entry["weights"]["expert:c"] < 0.15
    assert len(entry["folds"]) == 5 and sum(f["n"] for f in entry["folds"]) == 200
    assert ix.fusion["default"] == "y" and ix.fusion["identity"]["legs"] == ["expert:a", "expert:b", "expert:c"]


def test_hybrid_evaluation_never_fits_on_its_queries_and_agrees_with_fit_fusion():
    """evaluate_hybrid (the grid's and the experiments' one protocol): leave-one-out it gives
    fit-fusion's cross-validated numbers; with a training split the weights are fitted on those
    cases only (the same weights as fitting on them by hand), and a split that overlaps the
    queries is refused."""
    from mmvae.retrieval.evaluate import chance_map
    from mmvae.retrieval.hybrid.evaluate import evaluate_hybrid, markdown_table
    from mmvae.retrieval.hybrid.fit import cross_validate, fit_weights, leg_matrices
    ix, y = _toy_index(n=120)
    ix.lexical = None
    ix.version += 1
    rows, fit = evaluate_hybrid(ix, "y", k=10, folds=5, seed=0, rounds=2, n_boot=100)
    by = {r["ranking"]: r for r in rows}
    assert list(by) == ["leg expert:a", "leg expert:b", "leg expert:c", "fused uniform", "fused rrf", "fused fitted",
                        "feedback rocchio, round 1", "feedback rocchio, round 2",
                        "feedback rocchio+weights, round 1", "feedback rocchio+weights, round 2", "chance"]
    cv = cross_validate(leg_matrices(ix, "y"), 10, 5, seed=0)
    assert by["fused fitted"]["value"] == pytest.approx(cv["fitted"].mean())
    assert by["fused uniform"]["value"] == pytest.approx(cv["uniform"].mean())
    assert by["leg expert:a"]["value"] == pytest.approx(np.nanmean(cv["legs"]["expert:a"]))
    assert fit["fitted_on"] == "5-fold CV" and all(r["num_queries"] == 120 for r in rows)
    assert by["chance"]["value"] == pytest.approx(chance_map([str(v) for v in y], list(range(120)), 10))
    assert by["fused fitted"]["value"] > by["fused uniform"]["value"] + 0.2 > by["chance"]["value"] + 0.2
    # a training split: 80 cases fit, 40 query (the database is every case)
    ids = [f"c{i:03d}" for i in range(120)]
    rows, fit = evaluate_hybrid(ix, "y", k=10, queries=ids[80:], fit_cases=ids[:80], rounds=1, n_boot=0)
    by = {r["ranking"]: r for r in rows}
    m = leg_matrices(ix, "y")
    w, _ = fit_weights(m.sub(np.arange(80)), 10)
    assert fit["fitted_on"] == "fit_cases" and fit["weights"] == pytest.approx(dict(zip(["expert:a", "expert:b", "expert:c"], w)))
    assert fit["weights"]["expert:a"] > 0.8 and by["fused fitted"]["num_queries"] == 40
    assert by["chance"]["value"] == pytest.approx(chance_map([str(v) for v in y], list(range(80, 120)), 10))
    with pytest.raises(InputError, match="overlap"):
        evaluate_hybrid(ix, "y", k=10, queries=ids[70:], fit_cases=ids[:80], rounds=1, n_boot=0)
    table = markdown_table(rows, fit["fitted_on"])
    assert "| fused, fitted weights (fitted on the training split) |" in table
    assert "| feedback: Rocchio + leg weights, after 1 round |" in table and "| expert:b alone |" in table


def test_manifest_reports_drop_a_blank_report_and_say_so(tmp_path, caplog):
    """A cohort's blank report file: that case is indexed without report words and one warning
    names it (data.empty_report=drop, as training does); 'error' keeps the strict refusal."""
    from mmvae.data.synth import make_cohort
    from mmvae.errors import InputError
    from mmvae.retrieval.pipeline import manifest_reports
    man = make_cohort(tmp_path / "c", 3, seed=0, shape=(8, 8, 8), spacing=(8.0, 8.0, 8.0))
    report = tmp_path / "c" / "cases" / "synth-00001" / "report.txt"
    report.write_text("  \n")
    lines = [json.loads(x) for x in Path(man).read_text().splitlines()]
    for e in lines:
        if e["case_id"] == "synth-00001" and e["modality"] == "report":
            e.pop("text")
            e["path"] = "cases/synth-00001/report.txt"
    Path(man).write_text("".join(json.dumps(e) + "\n" for e in lines))
    ids = ["synth-00000", "synth-00001", "synth-00002"]
    with caplog.at_level("WARNING"):
        texts = manifest_reports(man, ids)
    assert texts[1] is None and texts[0]          # (synth-00002 has no report in this cohort)
    assert "1 blank report(s)" in caplog.text and "synth-00001" in caplog.text and str(report) in caplog.text
    with pytest.raises(InputError, match="synth-00001.*empty report"):
        manifest_reports(man, ids, empty_report="error")


def test_hybrid_search_legs_filters_and_index_kinds(tmp_path):
    ix, y = _toy_index()
    names = [leg.name for leg in index_legs(ix)]
    assert names == ["expert:a", "expert:b", "expert:c", "bm25:report"]
    q = HybridQuery(ix._mu[0], ["a", "b", "c", "report"], tokenize("case17"))
    res, info = hybrid_search(ix, q, 5, exclude=["c000"])
    assert res[0].case_id == "c017"                         # the unique word wins through the lexical leg
    assert set(info["legs"]) == set(names) and sum(info["weights"].values()) == pytest.approx(1.0)
    r0 = res[0]
    assert sum(r0.contributions.values()) == pytest.approx(r0.score, abs=1e-5)
    assert max(r0.contributions, key=r0.contributions.get) == "bm25:report"
    # only the legs the query has: an image-only query (a) has one leg
    res_a, info_a = hybrid_search(ix, HybridQuery(ix._mu[0], ["a"], None), 5, exclude=["c000"])
    assert info_a["legs"] == ["expert:a"] and all(set(r.contributions) == {"expert:a"} for r in res_a)
    # filters hold
    res_f, _ = hybrid_search(ix, q, 5, filter={"labels": {"y": str(y[3])}})
    assert all(r.labels["y"] == str(y[3]) for r in res_f)
    # an approximate kind returns the same top results (candidates: its first pass ∪ BM25's best)
    ivf, _ = _toy_index(kind="ivf", nlist=4, nprobe=4)
    res_ivf, _ = hybrid_search(ivf, q, 5, exclude=["c000"])
    assert [r.case_id for r in res_ivf] == [r.case_id for r in res]
    with pytest.raises(InputError, match="lacks"):
        hybrid_search(ix, q, 5, weights={"expert:z": 1.0})
    with pytest.raises(InputError, match="no fusion weights fitted for label 'nope'"):
        hybrid_search(ix, q, 5, weights="nope")


def test_feedback_weights_move_towards_the_leg_that_ranked_the_marks():
    w = {"expert:a": 0.5, "bm25:report": 0.5}
    new = feedback_weights(w, {"expert:a": np.array([2.0, 1.5]), "bm25:report": np.array([-0.2, 0.1])},
                           {"expert:a": np.array([-1.0]), "bm25:report": np.array([1.0])})
    assert new["expert:a"] > 0.9 and sum(new.values()) == pytest.approx(1.0)
    assert feedback_weights(w, {}, {}) == pytest.approx(w)


def test_lexical_leg_and_weights_saved_loaded_added_removed(tmp_path):
    ix, _ = _toy_index(n=60)
    fit_fusion(ix, "y", k=5, folds=3, n_boot=0)
    ix.save(tmp_path / "ix")
    back = load_index(tmp_path / "ix")
    assert back.lexical.tokens == ix.lexical.tokens and back.fusion == ix.fusion
    q = HybridQuery(ix._mu[1], ["a", "b", "c", "report"], tokenize("case7"))
    assert [r.case_id for r in hybrid_search(back, q, 5)[0]] == [r.case_id for r in hybrid_search(ix, q, 5)[0]]
    # add / remove keep the BM25 leg aligned with the cases
    back.add(ix._mu[:1] + 1.0, np.zeros((1, 24), np.float32), ["new"], [{"modalities": ["a"], "labels": {}}],
             reports=["a unique zebraword report"])
    assert hybrid_search(back, HybridQuery(ix._mu[0], ["report"], ["zebraword"]), 1)[0][0].case_id == "new"
    back.remove(["c007", "new"])
    assert len(back.lexical) == back.size == 59
    assert "c007" not in [r.case_id for r in hybrid_search(back, q, 5)[0]]
    # weights fitted for other vectors are refused, naming what differs
    back.fusion["identity"]["weights_digest"] = "other"
    with pytest.raises(IndexError_, match="fitted for another index.*weights_digest"):
        hybrid_search(back, q, 5)
    # a tampered lexical file is caught by the checksum
    (tmp_path / "ix" / "lexical.jsonl").write_text("[]\n" * 60)
    with pytest.raises(IndexError_, match="lexical.jsonl is corrupt"):
        load_index(tmp_path / "ix")


def test_a_killed_weights_save_leaves_the_previous_index(tmp_path, monkeypatch):
    import mmvae.retrieval.index as pkg
    ix, _ = _toy_index(n=60)
    ix.save(tmp_path / "ix")
    before = (tmp_path / "ix" / "index.json").read_text()
    real = pkg.atomic_write_text

    def dying(path, text, *a, **kw):
        if Path(path).name == "fusion.json":
            raise KeyboardInterrupt("killed while writing the weights")
        return real(path, text, *a, **kw)
    monkeypatch.setattr(pkg, "atomic_write_text", dying)
    loaded = load_index(tmp_path / "ix")
    fit_fusion(loaded, "y", k=5, folds=3, n_boot=0)
    with pytest.raises(KeyboardInterrupt):
        loaded.save(tmp_path / "ix")
    monkeypatch.undo()
    again = load_index(tmp_path / "ix")
    assert again.fusion is None and (tmp_path / "ix" / "index.json").read_text() == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


# ----------------------------------------------------------------------------- commands on a trained run
@pytest.fixture(scope="module")
def hybrid_run(tmp_path_factory, tiny_indexed):
    tmp = tmp_path_factory.mktemp("hybrid")
    _, c, wd, emb, _ = tiny_indexed
    emb_path = emb.save(tmp / "emb.npz")
    return {"workdir": wd, "emb": emb, "emb_path": emb_path, "tmp": tmp, "manifest": c.data.manifest}


def cli(capsys, *args):
    rc = main([*map(str, args)])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_index_fit_fusion_and_query_commands(hybrid_run, capsys):
    tmp, emb = hybrid_run["tmp"], hybrid_run["emb"]
    out_dir = tmp / "lex"
    args = ["index", "--embeddings", hybrid_run["emb_path"], "--out", out_dir, "--lexical"]
    rc, out, err = cli(capsys, *args)        # these embeddings do not name their run: one line, exit 2
    assert rc == 2 and "--manifest" in err and not out_dir.exists()
    rc, out, err = cli(capsys, *args, "--manifest", hybrid_run["manifest"])
    assert rc == 0, err
    assert "lexical leg over" in out and "40 cases" in out
    ix = load_index(out_dir)
    assert ix.lexical is not None and len(ix.lexical) == 40 and ix.lexical.has_text().sum() >= 30
    label = str(emb.identity.get("label") or "class")
    rc, out, err = cli(capsys, "fit-fusion", "--index", out_dir, "--label", label, "--folds", "3")
    assert rc == 0, err
    assert "cross-validated mAP@10" in out and "bm25:report alone" in out
    fusion = json.loads((out_dir / "fusion.json").read_text())
    assert fusion["default"] == label and len(fusion["sets"][label]["folds"]) == 3
    assert fusion["identity"]["legs"][-1] == "bm25:report"
    # an unknown label: one line, exit 2, the index unchanged
    before = (out_dir / "index.json").read_text()
    rc, out, err = cli(capsys, "fit-fusion", "--index", out_dir, "--label", "nosuchlabel")
    assert rc == 2 and "nosuchlabel" in err and len(err.strip().splitlines()) == 1
    assert (out_dir / "index.json").read_text() == before
    # a text query through the fused ranking shows each result's legs
    man = Path(hybrid_run["manifest"])
    from mmvae.data.manifest import group_cases, read_manifest
    ce = next(c for c in group_cases(read_manifest(man)) if c.report_text)
    base = ["query", "--index", out_dir, "--workdir", hybrid_run["workdir"]]
    rc, out, err = cli(capsys, *base, "--report", ce.report_text, "--k", "3", "--json")
    assert rc == 0, err
    doc = json.loads(out)
    assert doc["fusion"]["weight_set"] == label and doc["results"][0]["contributions"]
    assert doc["results"][0]["case_id"] == ce.case_id           # its own report ranks it first
    rc, out, err = cli(capsys, *base, "--report", ce.report_text, "--k", "3", "--weights", "uniform")
    assert rc == 0 and "matched on" in out and "uniform weights" in out
    # bad input: a stop-word-only text query, weights for an unfitted label
    rc, out, err = cli(capsys, *base, "--report", "the and of it", "--k", "3")
    assert rc == 2 and "no searchable word" in err and len(err.strip().splitlines()) == 1
    rc, out, err = cli(capsys, *base, "--report", ce.report_text, "--weights", "nosuch")
    assert rc == 2 and "no fusion weights fitted for label 'nosuch'" in err


def test_a_feedback_round_learns_leg_weights_through_the_retriever(hybrid_run):
    from mmvae.retrieval.query import Retriever
    out_dir = hybrid_run["tmp"] / "lex2"
    assert main(["index", "--embeddings", str(hybrid_run["emb_path"]), "--out", str(out_dir), "--lexical",
                 "--manifest", str(hybrid_run["manifest"])]) == 0
    with Retriever.load(hybrid_run["workdir"], out_dir) as r:
        assert r.fusion_method() == "weighted"
        cid = r.index.case_ids[0]
        q = r.case_query(cid)
        res, info = r.search_hybrid(q, 5, exclude=[cid])
        assert info["weight_set"] == "uniform" and len(info["legs"]) >= 2
        # mark as relevant the case the lexical leg likes most, as not relevant the one it likes least
        by_lex = sorted(res, key=lambda x: -x.contributions.get("bm25:report", 0.0))
        marks = {"relevant": [by_lex[0].case_id], "nonrelevant": [by_lex[-1].case_id]}
        res2, info2 = r.search_hybrid(q, 5, exclude=[cid], feedback=marks, weights=info["weights"])
        assert info2["weights"]["bm25:report"] > info["weights"]["bm25:report"]
        assert sum(info2["weights"].values()) == pytest.approx(1.0)


# ----------------------------------------------------------------------------- the page
def test_page_shows_leg_contributions_and_a_feedback_round_changes_them(hybrid_run, browser):
    from selenium.webdriver.common.by import By

    from mmvae.serve import BackgroundServer
    from mmvae.serve.app import create_app
    from mmvae.serve.service import ReviewService
    out_dir = hybrid_run["tmp"] / "lex3"
    assert main(["index", "--embeddings", str(hybrid_run["emb_path"]), "--out", str(out_dir), "--lexical",
                 "--manifest", str(hybrid_run["manifest"])]) == 0
    service = ReviewService.load(hybrid_run["workdir"], out_dir, settings={"k": 5})
    live = BackgroundServer(create_app(service))
    driver = browser
    try:
        cid = next(c for c in service.retriever.index.case_ids if service._case_tokens(c))
        driver.get(live.url + "/")
        wait_for(driver, "return document.body.dataset.ready")
        driver.find_element(By.ID, "case-search").send_keys(cid)
        driver.find_element(By.ID, "query-case").click()
        wait_for(driver, "return document.body.dataset.round === '0' && !document.body.dataset.busy")
        shown0 = driver.execute_script("return [...document.querySelectorAll('#results .matched-on')].map(x => x.textContent)")
        weights0 = driver.find_element(By.ID, "fusion").text
        assert len(shown0) == 5 and all(s.startswith("matched on:") for s in shown0)
        assert "leg weights" in weights0 and "bm25:report" in weights0
        order0 = driver.execute_script("return [...document.querySelectorAll('#results .result')].map(x => x.dataset.caseId)")
        driver.find_element(By.CSS_SELECTOR, f".result[data-case-id='{order0[4]}'] .mark-relevant").click()
        driver.find_element(By.CSS_SELECTOR, f".result[data-case-id='{order0[0]}'] .mark-nonrelevant").click()
        driver.find_element(By.ID, "search-again").click()
        wait_for(driver, "return document.body.dataset.round === '1' && !document.body.dataset.busy")
        shown1 = driver.execute_script("return [...document.querySelectorAll('#results .matched-on')].map(x => x.textContent)")
        weights1 = driver.find_element(By.ID, "fusion").text
        assert weights1 != weights0 and shown1 != shown0
        s = next(iter(service.sessions.values()))
        assert s.weights and sum(s.weights.values()) == pytest.approx(1.0)
    finally:
        live.stop()
        service.close()
