"""Query-by-example retrieval (mmvae.retrieval.query and ``mmvae query``) on a tiny trained run.

One tiny model is trained for the whole module (16³ volumes, 40 synthetic cases); the
index is the exact (flat) index of the cohort's embeddings, as the quickstart builds it.
"""
from __future__ import annotations

import dataclasses
import json
import sys
import shutil
import time
from pathlib import Path

import ml_collections
import nibabel as nib
import numpy as np
import pytest

from mmvae.cli import main
from mmvae.errors import IndexError_, InputError, MmvaeError
from mmvae.retrieval.index import build_index, load_index
from mmvae.retrieval.query import Retriever, model_identity, parse_feedback, parse_filter

from _dicom import nifti_to_series as write_dicom_series
from _tiny_run import faiss_one_thread, files_digest

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny.py")

digest = files_digest


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with faiss_one_thread():
        yield


@dataclasses.dataclass
class Run:
    workdir: Path
    index_dir: Path
    manifest: Path
    retriever: Retriever
    emb: object
    cases: dict          # case id -> {"images": {m: [path]}, "report": str|None, "meta": {}, "labels": {}}
    digest: dict
    tmp: Path

    def full_case(self, with_report=True):
        """A case with every image modality and a report."""
        for cid, c in self.cases.items():
            if len(c["images"]) == 3 and c["report"] and (not with_report or c["report"]):
                return cid, c
        raise AssertionError("no complete case")


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_indexed) -> Run:
    from mmvae.data.manifest import group_cases, read_manifest

    tmp = tmp_path_factory.mktemp("query")
    _, c, wd, emb, index_dir = tiny_indexed
    cases = {}
    for ce in group_cases(read_manifest(c.data.manifest)):
        used = list(c.data.clinical.numeric) + list(c.data.clinical.categorical)   # the model's fields only
        cases[ce.case_id] = {"images": dict(ce.images), "report": ce.report_text,
                             "meta": {k: v for k, v in ce.metadata.items() if k in used}, "labels": dict(ce.labels)}
    r = Retriever.load(wd, index_dir)
    return Run(wd, index_dir, Path(c.data.manifest), r, emb, cases, digest(index_dir), tmp)


def cli(capsys, *args):
    rc = main(["query", *map(str, args)])
    out = capsys.readouterr()
    return rc, out.out, out.err


def base_args(run, index_dir=None):
    return ["--index", index_dir or run.index_dir, "--workdir", run.workdir]


def rank_of(results, case_id):
    ids = [x.case_id for x in results]
    return ids.index(case_id) + 1 if case_id in ids else None


def cos(a, b):
    return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))


# ----------------------------------------------------------------------------- query forms
def test_own_files_return_the_case_at_rank_1(run):
    r = run.retriever
    cid, c = run.full_case()
    row = run.emb.case_ids.index(cid)
    mu, lv = r.encode_query(c["images"], c["report"], clinical=c["meta"])
    # retrieval.embedding=experts (the default): the five experts' 8-dim means side by side
    assert run.emb.embedding == "experts" and mu.shape == lv.shape == (40,) and mu.dtype == np.float32
    # exactly the embedding the cohort pipeline computed for this case
    np.testing.assert_allclose(mu, run.emb.mu[row], atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(lv, run.emb.logvar[row], atol=1e-4, rtol=1e-4)
    res = r.search(c["images"], c["report"], k=5, clinical=c["meta"])
    assert [x.rank for x in res] == [1, 2, 3, 4, 5]
    assert res[0].case_id == cid and res[0].score == pytest.approx(1.0, abs=1e-5)
    assert res[0].labels == c["labels"] and "t2" in res[0].modalities
    assert all(a.score >= b.score for a, b in zip(res, res[1:]))


@pytest.mark.parametrize("form", ["t2", "t2+dwi", "t1+t2+dwi", "report", "t2+report"])
def test_every_query_form(run, form):
    r = run.retriever
    cid, c = run.full_case()
    parts = form.split("+")
    images = {m: c["images"][m] for m in parts if m != "report"}
    report = c["report"] if "report" in parts else None
    mu, lv, used = r.encode(images, report)
    assert used == [m for m in ("t1", "t2", "dwi", "report") if m in parts]
    assert np.all(np.isfinite(mu)) and np.all(np.isfinite(lv))
    # the same fusion over the same subset, and the same standardisation, as the cohort embeddings
    assert run.emb.identity.get("standardize")
    sub = np.array([1.0 if m in parts else 0.0 for m in run.emb.modalities], np.float32)
    row = run.emb.case_ids.index(cid)
    want_mu, _ = run.emb.subset_posterior(sub)
    np.testing.assert_allclose(mu, want_mu[row], atol=1e-4, rtol=1e-4)
    res = r.search(images, report, k=10)
    assert len(res) == 10 and len({x.case_id for x in res}) == 10


def test_a_modality_given_twice_fills_the_series_dimension(run, caplog):
    r = run.retriever
    ids = [cid for cid, c in run.cases.items() if "t2" in c["images"]][:2]
    a, b = (run.cases[i]["images"]["t2"][0] for i in ids)
    # tiny config: data.max_series = 1 → the second series is dropped (as in training), with a warning
    batch = r.query_batch({"t2": [a, b]})
    assert batch["image/t2"].shape == (1, 1, 16, 16, 16) and batch["series_mask/t2"].tolist() == [[1.0]]
    assert "max_series" in caplog.text
    np.testing.assert_allclose(r.encode_query({"t2": [a, b]})[0], r.encode_query({"t2": [a]})[0], atol=1e-6)
    # the same model with data.max_series = 2: both series fill the padded set dimension
    cfg = ml_collections.ConfigDict(r.config.to_dict())
    cfg.data.max_series = 2
    r2 = Retriever(config=cfg, spec=r.spec, model=r.model, tokenizer=r.tokenizer, clinical_stats=r.clinical_stats,
                   index=r.index)
    batch = r2.query_batch({"t2": [a, b]})
    assert batch["image/t2"].shape == (1, 2, 16, 16, 16) and batch["series_mask/t2"].tolist() == [[1.0, 1.0]]
    one = r2.query_batch({"t2": [a]})
    np.testing.assert_array_equal(batch["image/t2"][0, 0], one["image/t2"][0, 0])
    assert one["series_mask/t2"].tolist() == [[1.0, 0.0]]
    mu2, lv2 = r2.encode_query({"t2": [a, b]})
    mu1, lv1 = r2.encode_query({"t2": [a]})
    assert not np.allclose(mu2, mu1) and len(r2.search({"t2": [a, b]}, k=3)) == 3
    r2.close()


def test_dicom_folder_query_matches_the_nifti_file(run, tmp_path, capsys):
    r = run.retriever
    cid, c = run.full_case()
    folder = write_dicom_series(Path(c["images"]["t2"][0]), tmp_path / "t2 dicom")
    mu_d, _ = r.encode_query({"t2": [folder]})
    mu_n, _ = r.encode_query({"t2": c["images"]["t2"]})
    assert cos(mu_d, mu_n) > 0.999
    images = dict(c["images"], t2=[str(folder)])
    assert r.search(images, c["report"], k=3, clinical=c["meta"])[0].case_id == cid
    rc, out, err = cli(capsys, *base_args(run), "--t2", folder, "--dwi", c["images"]["dwi"][0], "--k", 3, "--json")
    assert rc == 0, err
    doc = json.loads(out)
    assert doc["query"]["images"]["t2"] == [str(folder)] and doc["query"]["modalities"] == ["t2", "dwi"]


# ----------------------------------------------------------------------------- search options
def test_relevance_feedback_moves_marked_cases(run):
    r = run.retriever
    cid, c = run.full_case()
    q = {"t2": c["images"]["t2"]}
    n = r.index.size
    before = r.search(q, k=n)
    relevant = before[n // 2].case_id          # a mid-ranked case
    nonrelevant = before[1].case_id            # the second best
    after = r.search(q, k=n, feedback={"relevant": [relevant], "nonrelevant": [nonrelevant]})
    assert rank_of(after, relevant) < rank_of(before, relevant)
    assert rank_of(after, nonrelevant) > rank_of(before, nonrelevant)
    # exactly Rocchio with the run's weights over the index's stored means
    from mmvae.retrieval.feedback import rocchio
    mu, lv = r.encode_query(q)
    w = r.config.retrieval.rocchio
    moved = rocchio(mu, r.index.embeddings([relevant])[0], r.index.embeddings([nonrelevant])[0],
                    w.alpha, w.beta, w.gamma)
    want = r.search_embedding(moved, k=n, modalities=["t2"])     # compared on the query's blocks
    assert [x.case_id for x in after] == [x.case_id for x in want]
    # no feedback / empty feedback = plain search
    assert [x.case_id for x in r.search(q, k=5, feedback={"relevant": []})] == [x.case_id for x in before[:5]]
    with pytest.raises(InputError, match="unknown case id"):
        r.search(q, k=5, feedback={"relevant": ["no-such-case"]})
    with pytest.raises(InputError, match="both relevant and non-relevant"):
        r.search(q, k=5, feedback={"relevant": [relevant], "nonrelevant": [relevant]})


def test_filter_exclude_and_rerank(run):
    r = run.retriever
    cid, c = run.full_case()
    q = {"t1": c["images"]["t1"]}
    with_dwi = [x for x in r.index.case_ids if "dwi" in r.index.metadata(x)["modalities"]]
    assert 0 < len(with_dwi) < r.index.size
    res = r.search(q, k=len(with_dwi), filter={"has": "dwi"})
    assert sorted(x.case_id for x in res) == sorted(with_dwi)
    assert all("dwi" in x.modalities for x in res)
    with pytest.raises(InputError, match="after filter"):
        r.search(q, k=len(with_dwi) + 1, filter={"has": "dwi"})
    top = r.search(q, k=3)
    res = r.search(q, k=3, exclude=[top[0].case_id])
    assert top[0].case_id not in [x.case_id for x in res] and res[0].case_id == top[1].case_id
    rr = r.search(q, k=5, rerank="bhattacharyya")
    assert len(rr) == 5 and all(a.score >= b.score for a, b in zip(rr, rr[1:]))
    assert parse_filter(["has=dwi", "has=t2,dwi", "label.class=glioma,abscess"]) == {
        "has": ["dwi", "t2"], "labels": {"class": ["glioma", "abscess"]}}
    assert parse_feedback(["+a,-b", "+c"]) == {"relevant": ["a", "c"], "nonrelevant": ["b"]}


def test_add_remove_save_and_reload(run, tmp_path):
    r = run.retriever
    cid, c = run.full_case()
    r2 = Retriever(config=r.config, spec=r.spec, model=r.model, tokenizer=r.tokenizer,
                   clinical_stats=r.clinical_stats, index=load_index(run.index_dir), index_dir=run.index_dir)
    mods = r2.add_case("new-case", c["images"], c["report"], clinical=c["meta"], labels={"class": "x"})
    assert mods == ["t1", "t2", "dwi", "report", "clinical"] and r2.index.size == r.index.size + 1
    res = r2.search(c["images"], c["report"], k=2, clinical=c["meta"])
    assert {x.case_id for x in res} == {cid, "new-case"}
    r2.remove([cid])
    res = r2.search(c["images"], c["report"], k=2, clinical=c["meta"])
    assert res[0].case_id == "new-case" and cid not in [x.case_id for x in res]
    assert res[0].labels == {"class": "x"}
    out = r2.save(tmp_path / "idx2")
    assert digest(run.index_dir) == run.digest          # the original index is untouched
    r3 = Retriever.load(run.workdir, out)
    again = r3.search(c["images"], c["report"], k=2, clinical=c["meta"])
    assert [(x.case_id, round(x.score, 5)) for x in again] == [(x.case_id, round(x.score, 5)) for x in res]
    np.testing.assert_array_equal(r3.encode_query(c["images"])[0], r.encode_query(c["images"])[0])
    r2.close(), r3.close()


def test_query_latency_three_volumes(run):
    """Reported, not asserted: one case with t1+t2+dwi (16³) after load and compile, new files each time."""
    r = run.retriever
    fresh = Retriever(config=r.config, spec=r.spec, model=r.model, tokenizer=r.tokenizer,
                      clinical_stats=r.clinical_stats, index=r.index)          # its own, empty preprocessing cache
    complete = [c for c in run.cases.values() if len(c["images"]) == 3]
    fresh.search(complete[0]["images"], k=10)            # warm-up: jit compile
    times = []
    for c in complete[1:6]:
        t0 = time.perf_counter()
        fresh.search(c["images"], k=10)
        times.append(time.perf_counter() - t0)
    fresh.close()
    print(f"\nquery latency (t1+t2+dwi at 16^3, load+preprocess+encode+search, after load): "
          f"median {1e3 * np.median(times):.1f} ms over {len(times)} cases")


# ----------------------------------------------------------------------------- CLI
def test_cli_table_and_json(run, capsys, tmp_path):
    cid, c = run.full_case()
    rf = tmp_path / "report.txt"
    rf.write_text(c["report"])
    rc, out, err = cli(capsys, *base_args(run), "--t1", c["images"]["t1"][0], "--t2", c["images"]["t2"][0],
                       "--dwi", c["images"]["dwi"][0], "--report-file", rf, "--clinical", f"age={c['meta']['age']}",
                       "--clinical", f"sex={c['meta']['sex']}", "--k", 4, "--filter", "has=t2",
                       "--exclude", "c9999", "--feedback", f"+{cid}")
    assert rc == 0, err
    lines = out.splitlines()
    assert lines[0].split() == ["rank", "case_id", "score", "modalities", "labels"]
    summary = [x for x in lines if "query time" in x]
    assert lines[2].split()[:2] == ["1", cid] and len(summary) == 1 and " ms" in summary[0]
    # what the loader did is said after the summary (here: the tiny config's 32-token reports)
    assert lines[-1].startswith("query used: report:") and "truncated to data.text.max_len=32" in lines[-1]
    assert lines[-2].startswith("query uncertainty: posterior mean variance ") and "expert disagreement" in lines[-2]
    assert len(lines) == 2 + 4 + 1 + 1 + 1              # header, 4 results, summary, uncertainty, the note
    rc, out, err = cli(capsys, *base_args(run), "--t2", c["images"]["t2"][0], "--report", c["report"],
                       "--json", "--k", 3, "--rerank", "bhattacharyya", "--exclude", cid)
    assert rc == 0, err
    doc = json.loads(out)
    assert len(doc["results"]) == 3 and cid not in [x["case_id"] for x in doc["results"]]
    u = doc["query"]["uncertainty"]
    assert u["mean_variance"] > 0 and u["disagreement"] is not None and u["disagreement"] >= 0   # t2 + report
    assert doc["results"][0]["rank"] == 1 and set(doc["results"][0]) == {"rank", "case_id", "score", "modalities",
                                                                          "labels"}
    assert doc["query"]["modalities"] == ["t2", "report"] and doc["timing"]["query_s"] > 0
    assert doc["index"]["size"] == run.retriever.index.size
    with pytest.raises(SystemExit) as e:
        main(["query", "--workdir", str(run.workdir), "--help"])
    assert e.value.code == 0
    help_text = capsys.readouterr().out
    assert "usage: mmvae query" in help_text and all(f"--{m} PATH" in help_text for m in ("t1", "t2", "dwi"))


# ----------------------------------------------------------------------------- bad input
@pytest.fixture()
def bad_files(tmp_path):
    garbage = tmp_path / "broken_t2.nii.gz"
    garbage.write_bytes(b"this is not a nifti file" * 10)
    return {"garbage": garbage, "missing": tmp_path / "nowhere_dwi.nii.gz"}


def other_indexes(run, tmp: Path) -> dict:
    """Indexes that must be refused: another model, another latent size, a corrupt file."""
    emb = run.emb
    meta = [{"modalities": ["t2"], "labels": {}}] * len(emb.case_ids)
    out = {}
    ident = dict(model_identity(run.retriever.spec, run.emb.embedding), embedding=run.emb.embedding)
    out["another model"] = build_index(emb.mu, emb.logvar, emb.case_ids, meta,
                                       identity=dict(ident, model_fingerprint="0123456789abcdef")).save(tmp / "m")
    rng = np.random.default_rng(0)
    out["another latent"] = build_index(rng.normal(size=(40, 4)), rng.normal(size=(40, 4)), emb.case_ids, meta,
                                        identity={"model_fingerprint": ident["model_fingerprint"]}).save(tmp / "l")
    corrupt = tmp / "corrupt"
    shutil.copytree(run.index_dir, corrupt)
    raw = bytearray((corrupt / "embeddings.npy").read_bytes())
    raw[-3] ^= 0xFF
    (corrupt / "embeddings.npy").write_bytes(bytes(raw))
    out["corrupt"] = corrupt
    return out


def test_bad_input_api(run, bad_files, tmp_path):
    r = run.retriever
    cid, c = run.full_case()
    t2 = c["images"]["t2"]
    with pytest.raises(InputError, match="no query modality") as e:
        r.search({}, None)
    assert "t1" in str(e.value) and "dwi" in str(e.value)
    with pytest.raises(InputError, match="no query modality"):
        r.search({"t2": []})
    with pytest.raises(InputError) as e:
        r.search({"flair": t2})
    msg = str(e.value)
    assert "'flair'" in msg and "unknown" in msg and all(f"'{m}'" in msg for m in ("t1", "t2", "dwi"))
    with pytest.raises(InputError, match="report="):
        r.search({"report": t2})
    with pytest.raises(InputError) as e:
        r.search({"t2": [bad_files["garbage"]]})
    assert e.value.modality == "t2" and "broken_t2.nii.gz" in str(e.value) and "modality 't2'" in str(e.value)
    with pytest.raises(InputError) as e:
        r.search({"t2": t2, "dwi": [bad_files["missing"]]})
    assert e.value.modality == "dwi" and "nowhere_dwi.nii.gz" in str(e.value) and "not found" in str(e.value)
    with pytest.raises(InputError, match="empty report"):
        r.search(report="   ")
    for k in (0, -1):
        with pytest.raises(InputError, match="k must be"):
            r.search({"t2": t2}, k=k)
    with pytest.raises(InputError, match="larger than the index"):
        r.search({"t2": t2}, k=r.index.size + 1)
    with pytest.raises(InputError, match="unknown clinical field"):
        r.search({"t2": t2}, clinical={"weight": 80})
    with pytest.raises(InputError, match="rerank"):
        r.search({"t2": t2}, rerank="cosine")
    for what, folder in other_indexes(run, tmp_path).items():
        before = digest(folder)
        with pytest.raises(IndexError_) as e:
            Retriever.load(run.workdir, folder)
        assert ("corrupt" if what == "corrupt" else "index was built with model") in str(e.value)
        assert digest(folder) == before
    with pytest.raises(MmvaeError, match="not a trained work dir"):
        Retriever.load(tmp_path, run.index_dir)
    assert digest(run.index_dir) == run.digest


def test_bad_input_cli(run, bad_files, tmp_path, capsys):
    cid, c = run.full_case()
    t2 = c["images"]["t2"][0]
    cases = [
        ([], "no query modality"),
        (["--flair", t2], "unknown option '--flair'"),
        (["--t2", bad_files["garbage"]], "broken_t2.nii.gz"),
        (["--t2", t2, "--dwi", bad_files["missing"]], "nowhere_dwi.nii.gz"),
        (["--t2", t2, "--k", 0], "k must be"),
        (["--t2", t2, "--k", -3], "k must be"),
        (["--t2", t2, "--k", 41], "larger than the index"),
        (["--t2", t2, "--k", "ten"], "invalid int value"),
        (["--t2", t2, "--filter", "colour=red"], "unknown key 'colour'"),
        (["--t2", t2, "--feedback", "+nope"], "unknown case id"),
        (["--t2", t2, "--report-file", tmp_path / "none.txt"], "none.txt"),
        (["--t2", t2, "--report", "x", "--report-file", tmp_path / "none.txt"], "not allowed with"),
    ]
    for extra, fragment in cases:
        rc, out, err = cli(capsys, *base_args(run), *extra)
        assert rc == 2, (extra, err)
        assert fragment in err, (extra, err)
        assert err.count("\n") == 1 and err.startswith("mmvae query: error:"), err
        assert out == ""
    rc, _, err = cli(capsys, *base_args(run), "--flair", t2)
    assert all(f"--{m}" in err for m in ("t1", "t2", "dwi"))
    rc, _, err = cli(capsys, *base_args(run), "--t2", bad_files["garbage"])
    assert "modality 't2'" in err
    for what, folder in other_indexes(run, tmp_path).items():
        before = digest(folder)
        rc, out, err = cli(capsys, *base_args(run, folder), "--t2", t2)
        assert rc == 2 and ("corrupt" if what == "corrupt" else "index was built with model") in err, err
        assert digest(folder) == before
    rc, _, err = cli(capsys, "--index", run.index_dir, "--t2", t2)
    assert rc == 2 and "--workdir" in err
    rc, _, err = cli(capsys, "--index", run.index_dir, "--workdir", tmp_path, "--t2", t2)
    assert rc == 2 and "not a trained work dir" in err
    assert digest(run.index_dir) == run.digest


def test_query_text_that_is_not_text_is_refused(run, tmp_path, capsys):
    """Issue 30: a report of NUL bytes (or mostly control characters) is no query, however it
    arrives: the API (the review page's text query goes through it), --report, --report-file."""
    r = run.retriever
    cid, c = run.full_case()
    for text in ("\x00" * 100, "Lesion" + "\x01\x02" * 10):
        with pytest.raises(InputError, match=r"modality 'report'.*(no readable text|not text)"):
            r.search(report=text, k=3)
    f = tmp_path / "nul_report.txt"
    f.write_bytes(b"\x00" * 100)
    t2 = c["images"]["t2"][0]
    for extra in (["--report", "\x01" * 50], ["--report-file", f]):
        rc, out, err = cli(capsys, *base_args(run), "--t2", t2, *extra)
        assert rc == 2 and "modality 'report'" in err and "no readable text" in err, err
        assert err.count("\n") == 1 and out == ""
    assert "nul_report.txt" in cli(capsys, *base_args(run), "--report-file", f)[2]
    # a readable report with a stray control character still queries
    res = r.search(report=c["report"] + "\x0c\x1b", k=3)
    assert len(res) == 3


def test_query_says_what_the_loader_chose(run, tmp_path, capsys):
    """A multi-b-value DWI folder: the query uses the highest b-value and says so (table and JSON)."""
    sys.path.insert(0, str(Path(__file__).parent))
    from _dicom import write_series
    dwi = write_series(tmp_path / "dwi", 8, b_values=(0, 500, 1000), spacing=(4.0, 4.0), slice_gap=4.0,
                       rows=16, cols=16)
    rc, out, err = cli(capsys, *base_args(run), "--dwi", dwi, "--k", 3)
    assert rc == 0, err
    assert "query used: dwi: dwi: b-values 0/500/1000 s/mm²: using b=1000 (data.dwi_b_value='highest')" in out
    rc, out, err = cli(capsys, *base_args(run), "--dwi", dwi, "--k", 3, "--json")
    notes = json.loads(out)["query"]["notes"]
    assert rc == 0 and len(notes) == 1 and "using b=1000" in notes[0]
