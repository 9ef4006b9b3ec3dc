"""FAISS case index: exactness/recall per kind, persistence, mutation, filters, errors."""
from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import faiss
import numpy as np
import pytest

from mmvae.errors import IndexError_, InputError, MmvaeError
from mmvae.retrieval import index as index_mod
from mmvae.retrieval.feedback import rocchio
from mmvae.retrieval.index import KINDS, Result, build_index, load_index

N, L, C, Q = 2000, 32, 20, 60
IDENTITY = {"model": "mopoe-test", "checkpoint": "step-100", "latent_dim": L}
RECALL_BOUND = {"flat": 1.0, "ivf": 0.9, "hnsw": 0.9, "ivfpq": 0.85, "opq-ivfpq": 0.85, "binary": 0.5}


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    old = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)   # 2 shared cores: avoid OpenMP contention
    yield
    faiss.omp_set_num_threads(old)


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((C, L))
    lab = rng.integers(0, C, N)
    mu = (centres[lab] + 0.5 * rng.standard_normal((N, L))).astype(np.float32)
    logvar = rng.uniform(-2.0, 0.0, (N, L)).astype(np.float32)
    ids = [f"c{i:04d}" for i in range(N)]
    meta = [{"modalities": ["t1", "t2", "dwi"] if i % 3 == 0 else ["t1", "t2"],
             "labels": {"class": f"k{lab[i]}"}, "report": f"report of case {i}"}
            for i in range(N)]
    qlab = rng.integers(0, C, Q)
    q = (centres[qlab] + 0.5 * rng.standard_normal((Q, L))).astype(np.float32)
    qlv = rng.uniform(-2.0, 0.0, (Q, L)).astype(np.float32)
    return dict(mu=mu, logvar=logvar, ids=ids, meta=meta, lab=lab, q=q, qlv=qlv)


@pytest.fixture(scope="module")
def indexes(data):
    return {kind: build_index(data["mu"], data["logvar"], data["ids"], data["meta"], kind=kind,
                              metric="cosine", identity=IDENTITY, seed=0)
            for kind in KINDS}


def brute_force(q, mu, k, metric):
    if metric == "cosine":
        qn = q / np.linalg.norm(q, axis=1, keepdims=True)
        dn = mu / np.linalg.norm(mu, axis=1, keepdims=True)
        s = qn.astype(np.float64) @ dn.T.astype(np.float64)
    else:
        s = -((q[:, None, :].astype(np.float64) - mu[None].astype(np.float64)) ** 2).sum(-1)
    order = np.argsort(-s, axis=1, kind="stable")[:, :k]
    return order, np.take_along_axis(s, order, axis=1)


def ids_of(results):
    return [[r.case_id for r in row] for row in results]


def folder_digest(folder: Path) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(folder).iterdir())}


# ----------------------------------------------------------------------------- search quality
@pytest.mark.parametrize("metric", ["cosine", "l2"])
def test_flat_is_exact(data, indexes, metric):
    ix = indexes["flat"] if metric == "cosine" else build_index(
        data["mu"], data["logvar"], data["ids"], data["meta"], kind="flat", metric="l2")
    res = ix.search(data["q"], 10)
    order, scores = brute_force(data["q"], data["mu"], 10, metric)
    assert ids_of(res) == [[data["ids"][j] for j in row] for row in order]
    np.testing.assert_allclose([[r.score for r in row] for row in res], scores, rtol=1e-5, atol=1e-5)
    assert [r.rank for r in res[0]] == list(range(1, 11))
    r0 = res[0][0]
    assert isinstance(r0, Result) and r0.labels["class"].startswith("k") and "t1" in r0.modalities


@pytest.mark.parametrize("kind", KINDS)
def test_recall_at_10_vs_flat(data, indexes, kind):
    ref = ids_of(indexes["flat"].search(data["q"], 10))
    got = ids_of(indexes[kind].search(data["q"], 10))
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ref, got)])
    print(f"recall@10 {kind}: {recall:.3f} params={indexes[kind].params}")
    assert recall >= RECALL_BOUND[kind]
    if kind == "binary":   # a larger first pass recovers almost everything
        got = ids_of(indexes[kind].search(data["q"], 10, rerank_factor=16))
        recall16 = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ref, got)])
        print(f"recall@10 binary rerank_factor=16: {recall16:.3f}")
        assert recall16 >= 0.9


def test_recall_on_unclustered_data():
    # worst case for ANN: isotropic Gaussian vectors (no cluster structure)
    rng = np.random.default_rng(1)
    mu = rng.standard_normal((N, L)).astype(np.float32)
    q = rng.standard_normal((40, L)).astype(np.float32)
    ids = [str(i) for i in range(N)]
    lv = np.zeros_like(mu)
    ref = ids_of(build_index(mu, lv, ids).search(q, 10))
    for kind, kw, bound in [("ivf", dict(nprobe=26), 0.9), ("hnsw", {}, 0.9)]:
        got = ids_of(build_index(mu, lv, ids, kind=kind, **kw).search(q, 10))
        recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ref, got)])
        print(f"unclustered recall@10 {kind} {kw}: {recall:.3f}")
        assert recall >= bound


def test_defaults(indexes):
    assert indexes["ivf"].params["nlist"] == 51           # min(4·sqrt(2000)≈179, 2000//39)
    assert indexes["ivf"].params["nprobe"] == 14          # round(2·sqrt(51))
    assert indexes["ivfpq"].params["m_pq"] == 16          # 32 / 2
    assert indexes["binary"].params["nbits"] == 32
    assert indexes["hnsw"].params["hnsw_m"] == 32
    assert index_mod.default_nlist(10) == 1 and index_mod.default_m_pq(48) == 24


# ----------------------------------------------------------------------------- persistence
@pytest.mark.parametrize("kind", KINDS)
def test_save_load_round_trip(data, indexes, kind, tmp_path):
    ix = indexes[kind]
    folder = ix.save(tmp_path / "idx")
    names = sorted(p.name for p in folder.iterdir())
    expected = ["embeddings.npy", "index.faiss", "index.json", "metadata.jsonl"]
    assert names == sorted(expected + (["binary_hash.npy"] if kind == "binary" else []))
    info = json.loads((folder / "index.json").read_text())
    assert info["kind"] == kind and info["latent_dim"] == L and info["count"] == N
    assert info["identity"]["model"] == "mopoe-test"
    assert "report" not in (folder / "metadata.jsonl").read_text()   # include_text=False
    back = load_index(folder, expect_identity=IDENTITY)
    a = ix.search(data["q"][:20], 10, filter={"has": "dwi"})
    b = back.search(data["q"][:20], 10, filter={"has": "dwi"})
    assert ids_of(a) == ids_of(b)
    assert [[r.score for r in row] for row in a] == [[r.score for r in row] for row in b]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["idx"]      # no temp folders


def test_include_text_keeps_reports(data, tmp_path):
    ix = build_index(data["mu"][:50], data["logvar"][:50], data["ids"][:50], data["meta"][:50],
                     include_text=True)
    ix.save(tmp_path / "i")
    first = json.loads((tmp_path / "i" / "metadata.jsonl").read_text().splitlines()[0])
    assert first == {"id": 0, "case_id": "c0000", "modalities": ["t1", "t2", "dwi"],
                     "labels": {"class": data["meta"][0]["labels"]["class"]},
                     "report": "report of case 0"}
    assert load_index(tmp_path / "i").metadata("c0000")["report"] == "report of case 0"


# ----------------------------------------------------------------------------- mutation
@pytest.mark.parametrize("kind", KINDS)
def test_add_remove_without_rebuild(data, kind, tmp_path):
    n = 600
    ix = build_index(data["mu"][:n], data["logvar"][:n], data["ids"][:n], data["meta"][:n],
                     kind=kind, identity=IDENTITY)
    gone = ["c0000", "c0001", "c0100"]
    rows = [0, 1, 100]
    before_ntotal = ix.ntotal
    ix.remove(gone)
    assert len(ix) == n - 3 and "c0000" not in ix
    # a removed case is never returned, not even for its own vector
    res = ix.search(data["mu"][rows], 20)
    assert not {r.case_id for row in res for r in row} & set(gone)
    # add new cases far from everything: each is its own nearest neighbour
    rng = np.random.default_rng(9)
    new_mu = (8.0 * rng.standard_normal((3, L))).astype(np.float32)
    new_ids = ["new-a", "new-b", "new-c"]
    ix.add(new_mu, np.zeros((3, L), np.float32), new_ids,
           [{"modalities": ["dwi"], "labels": {"class": "new"}}] * 3)
    top = ix.search(new_mu, 1)
    assert [row[0].case_id for row in top] == new_ids
    assert top[0][0].labels == {"class": "new"}
    if kind == "hnsw":
        assert ix.ntotal == before_ntotal + 3            # tombstones stay in the graph
    else:
        assert ix.ntotal == n                            # 600 - 3 + 3
    # and it all survives a save/load
    back = load_index(ix.save(tmp_path / kind))
    res = back.search(np.vstack([data["mu"][rows], new_mu]), 20)
    assert not {r.case_id for row in res for r in row} & set(gone)
    assert [row[0].case_id for row in res[3:]] == new_ids
    # ids are never reused
    back.add(data["mu"][:1], data["logvar"][:1], ["c0000"], None)
    assert back.search(data["mu"][:1], 1)[0][0].case_id == "c0000"


def test_add_remove_errors_leave_index_unchanged(data, indexes, tmp_path):
    ix = build_index(data["mu"][:100], data["logvar"][:100], data["ids"][:100], data["meta"][:100])
    folder = ix.save(tmp_path / "idx")
    digest = folder_digest(folder)
    with pytest.raises(InputError, match="already in the index"):
        ix.add(data["mu"][100:102], data["logvar"][100:102], ["fresh", "c0005"], None)
    with pytest.raises(InputError, match="duplicate"):
        ix.add(data["mu"][100:102], data["logvar"][100:102], ["x", "x"], None)
    with pytest.raises(IndexError_, match="16.*32"):
        ix.add(np.zeros((1, 16)), np.zeros((1, 16)), ["y"], None)
    with pytest.raises(InputError, match="unknown case id"):
        ix.remove(["c0001", "nope"])
    assert len(ix) == 100 and "fresh" not in ix and "c0001" in ix
    assert ix.ntotal == 100
    assert folder_digest(folder) == digest


# ----------------------------------------------------------------------------- filters
@pytest.mark.parametrize("kind", ["flat", "ivf", "hnsw", "binary"])
def test_filter_and_exclude(data, indexes, kind):
    ix = indexes[kind]
    res = ix.search(data["q"][:10], 15, filter={"has": "dwi"})
    assert all(len(row) == 15 and all("dwi" in r.modalities for r in row) for row in res)
    # a selective filter (one class, ~100 cases) still returns k matching results
    want = data["meta"][7]["labels"]["class"]
    res = ix.search(data["q"][:5], 30, filter=lambda m: m["labels"]["class"] == want)
    assert all(len(row) == 30 and all(r.labels["class"] == want for r in row) for row in res)
    if kind == "flat":   # filtered flat search = brute force on the subset
        sub = np.array([i for i, m in enumerate(data["meta"]) if m["labels"]["class"] == want])
        order, _ = brute_force(data["q"][:5], data["mu"][sub], 30, "cosine")
        assert ids_of(res) == [[data["ids"][sub[j]] for j in row] for row in order]
    # exclude: the plain top-3 never comes back
    top = ids_of(ix.search(data["q"][:3], 3))
    res = ids_of(ix.search(data["q"][:3], 10, exclude=[c for row in top for c in row]))
    assert all(len(row) == 10 and not set(row) & set(sum(top, [])) for row in res)
    # per-query exclusion, e.g. leave-one-out with a case's own vector as query
    own = ids_of(ix.search(data["mu"][:4], 5, exclude=[[data["ids"][i]] for i in range(4)]))
    assert all(data["ids"][i] not in own[i] for i in range(4))
    # dict filters: lacks / labels
    res = ix.search(data["q"][:2], 5, filter={"lacks": "dwi", "labels": {"class": [want]}})
    assert all("dwi" not in r.modalities and r.labels["class"] == want for row in res for r in row)


def _count_faiss_calls(monkeypatch, ix) -> list[int]:
    calls = []
    search = ix._faiss_search

    def spy(x, k, params):
        calls.append(len(x))
        return search(x, k, params)
    monkeypatch.setattr(ix, "_faiss_search", spy)
    return calls


@pytest.mark.parametrize("kind", ["flat", "ivf"])
def test_selective_filter_is_exact_in_one_faiss_call(data, indexes, kind, monkeypatch):
    # ~3% of the cases pass; flat, and IVF probing every list, must equal brute force
    # on the allowed cases, and faiss returns only allowed ids (one call, no over-fetch)
    ix = indexes["flat"] if kind == "flat" else build_index(
        data["mu"], data["logvar"], data["ids"], data["meta"], kind="ivf", nlist=20, nprobe=20)
    want = data["meta"][7]["labels"]["class"]
    flt = {"lacks": "dwi", "labels": {"class": want}}
    sub = np.array([i for i, m in enumerate(data["meta"])
                    if m["labels"]["class"] == want and "dwi" not in m["modalities"]])
    assert 25 < len(sub) < 0.05 * N
    calls = _count_faiss_calls(monkeypatch, ix)
    res = ix.search(data["q"][:8], 25, filter=flt)
    assert calls == [8]
    order, scores = brute_force(data["q"][:8], data["mu"][sub], 25, "cosine")
    assert ids_of(res) == [[data["ids"][sub[j]] for j in row] for row in order]
    np.testing.assert_allclose([[r.score for r in row] for row in res], scores, rtol=1e-5, atol=1e-5)
    # k = every allowed case
    assert sorted(ids_of(ix.search(data["q"][:1], len(sub), filter=flt))[0]) == \
        sorted(data["ids"][j] for j in sub)


@pytest.mark.parametrize("kind", ["flat", "ivf", "hnsw", "binary"])
def test_per_query_exclusion_groups_queries(data, indexes, kind, monkeypatch):
    ix = indexes[kind]
    ids = data["ids"]
    q = data["mu"][:5]
    top = ids_of(ix.search(q, 3))
    excl = [[ids[0]], [ids[1], *top[1][1:]], None, [ids[0]], [ids[0], ids[0], "unknown"]]
    calls = _count_faiss_calls(monkeypatch, ix)
    res = ids_of(ix.search(q, 10, exclude=excl, filter={"has": "dwi"} if kind == "flat" else None))
    assert all(len(row) == 10 for row in res)
    assert not set(res[0]) & {ids[0]} and not set(res[1]) & {ids[1], *top[1][1:]}
    assert ids[0] not in res[3] + res[4]
    if kind == "flat":
        # queries 0, 3 and 4 share one allowed set: 3 faiss calls for 5 queries
        assert sorted(calls) == [1, 1, 3]
        for qi, ex in enumerate(excl):
            keep = np.array([i for i, m in enumerate(data["meta"])
                             if "dwi" in m["modalities"] and ids[i] not in (ex or [])])
            order, _ = brute_force(q[qi:qi + 1], data["mu"][keep], 10, "cosine")
            assert res[qi] == [ids[keep[j]] for j in order[0]]
    else:
        assert [res[i][0] for i in (2, 3, 4)] == ids[2:5]   # not excluded: finds itself


def test_exact_fallback_without_selector_support(data, indexes, monkeypatch):
    # a faiss whose IndexBinaryFlat ignores selectors: the filtered binary search ranks
    # the allowed cases exactly instead
    monkeypatch.setattr(index_mod.backends, "_binary_selectors", lambda: False)
    ix = indexes["binary"]
    calls = _count_faiss_calls(monkeypatch, ix)
    want = data["meta"][3]["labels"]["class"]
    res = ix.search(data["q"][:4], 10, filter={"labels": {"class": want}})
    assert calls == []
    sub = np.array([i for i, m in enumerate(data["meta"]) if m["labels"]["class"] == want])
    order, _ = brute_force(data["q"][:4], data["mu"][sub], 10, "cosine")
    assert ids_of(res) == [[data["ids"][sub[j]] for j in row] for row in order]
    assert len(ix.search(data["q"][:2], 10)[0]) == 10 and len(calls) == 1   # unfiltered: faiss


# ----------------------------------------------------------------------------- reranking
def test_posterior_rerank_equations():
    rng = np.random.default_rng(3)
    mq, lq = rng.standard_normal(4), rng.uniform(-1, 1, 4)
    md, ld = rng.standard_normal((2, 4)), rng.uniform(-1, 1, (2, 4))
    for j in range(2):
        S1, S2 = np.diag(np.exp(lq)), np.diag(np.exp(ld[j]))
        S = (S1 + S2) / 2
        dm = mq - md[j]
        db = dm @ np.linalg.inv(S) @ dm / 8 + 0.5 * math.log(
            np.linalg.det(S) / math.sqrt(np.linalg.det(S1) * np.linalg.det(S2)))
        V = S1 + S2
        el = -0.5 * (dm @ np.linalg.inv(V) @ dm + math.log(np.linalg.det(2 * math.pi * V)))
        got_b = index_mod.rerank.posterior_scores(mq, lq, md[j:j + 1], ld[j:j + 1], "bhattacharyya")
        got_e = index_mod.rerank.posterior_scores(mq, lq, md[j:j + 1], ld[j:j + 1], "expected_likelihood")
        assert got_b[0] == pytest.approx(-db, rel=1e-10)
        assert got_e[0] == pytest.approx(el, rel=1e-10)


def test_rerank_uses_variances():
    # two cases with the same distance to the query mean; the one whose posterior
    # matches the query's uncertainty wins under Bhattacharyya
    mu = np.array([[1.0, 0.0], [-1.0, 0.0], [10.0, 10.0]], np.float32)
    lv = np.array([[0.0, 0.0], [4.0, 4.0], [0.0, 0.0]], np.float32)
    ix = build_index(mu, lv, ["same-var", "wide", "far"], None, kind="flat", metric="l2")
    q, qlv = np.zeros((1, 2), np.float32), np.zeros((1, 2), np.float32)
    res = ix.search(q, 2, query_logvar=qlv, rerank="bhattacharyya")
    assert [r.case_id for r in res[0]] == ["same-var", "wide"]
    assert res[0][0].score == pytest.approx(-1 / 8)          # (1² / 1) / 8, no variance term
    res = ix.search(q, 2, query_logvar=np.full((1, 2), 4.0, np.float32), rerank="bhattacharyya")
    assert [r.case_id for r in res[0]] == ["wide", "same-var"]
    res = ix.search(q, 2, query_logvar=qlv, rerank="expected_likelihood")
    assert res[0][0].score == pytest.approx(-0.5 * (2 * math.log(4 * math.pi) + 0.5))
    with pytest.raises(InputError, match="query_logvar"):
        ix.search(q, 1, rerank="bhattacharyya")


def test_rerank_on_large_index(data, indexes):
    res = indexes["hnsw"].search(data["q"][:5], 10, query_logvar=data["qlv"][:5],
                                 rerank="expected_likelihood")
    assert all(len(row) == 10 for row in res)
    assert all(row[i].score >= row[i + 1].score for row in res for i in range(9))


# ----------------------------------------------------------------------------- feedback
def test_rocchio_numbers():
    q = np.array([1.0, 0.0])
    out = rocchio(q, [[0.0, 1.0], [0.0, 3.0]], [[2.0, 2.0]], 1.0, 0.5, 0.25)
    np.testing.assert_allclose(out, [0.5, 0.5])
    np.testing.assert_allclose(rocchio(q, np.zeros((0, 2)), None, 2.0, 0.5, 0.25), [2.0, 0.0])
    with pytest.raises(InputError):
        rocchio(q, [[1.0, 2.0, 3.0]], [], 1, 1, 1)


def test_rocchio_improves_rank_of_relevant_case(data, indexes):
    ix = indexes["flat"]
    q = data["q"][0]
    res = ix.search(q, 200)[0]
    cls = res[0].labels["class"]
    # a relevant (same class) case ranked low, and the non-relevant cases above it
    target = [r for r in res if r.labels["class"] == cls][-1]
    nonrel = [r.case_id for r in res[:target.rank] if r.labels["class"] != cls][:5]
    rel_mu, _ = ix.embeddings([target.case_id])
    non_mu, _ = ix.embeddings(nonrel) if nonrel else (np.zeros((0, L)), None)
    q2 = rocchio(q, rel_mu, non_mu, 1.0, 0.75, 0.25)
    res2 = ix.search(q2, N)[0]
    new_rank = next(r.rank for r in res2 if r.case_id == target.case_id)
    assert new_rank < target.rank


# ----------------------------------------------------------------------------- bad inputs
def test_bad_k_and_dimension(data, indexes):
    ix = indexes["flat"]
    for bad in (0, -3):
        with pytest.raises(MmvaeError, match="k must be ≥ 1"):
            ix.search(data["q"][:1], bad)
    with pytest.raises(InputError, match="larger than the index"):
        ix.search(data["q"][:1], N + 1)
    n_dwi = sum("dwi" in m["modalities"] for m in data["meta"])
    with pytest.raises(InputError, match="after filter"):
        indexes["ivf"].search(data["q"][:1], n_dwi + 1, filter={"has": "dwi"})
    assert len(indexes["ivf"].search(data["q"][:1], n_dwi, filter={"has": "dwi"})[0]) == n_dwi
    with pytest.raises(IndexError_, match="16.*32"):
        ix.search(np.zeros((1, 16), np.float32), 5)
    with pytest.raises(InputError, match="NaN"):
        ix.search(np.full((1, L), np.nan), 5)
    with pytest.raises(InputError, match="unknown filter key"):
        ix.search(data["q"][:1], 5, filter={"hass": "dwi"})
    with pytest.raises(InputError, match="kind"):
        build_index(data["mu"][:10], data["logvar"][:10], data["ids"][:10], None, kind="lsh")
    with pytest.raises(InputError, match="m_pq"):
        build_index(data["mu"], data["logvar"], data["ids"], None, kind="ivfpq", m_pq=5)


@pytest.fixture()
def saved(data, tmp_path):
    ix = build_index(data["mu"][:300], data["logvar"][:300], data["ids"][:300],
                     data["meta"][:300], kind="ivf", identity=IDENTITY)
    return ix, ix.save(tmp_path / "idx")


def test_corrupt_index_file(saved):
    _, folder = saved
    p = folder / "index.faiss"
    raw = bytearray(p.read_bytes())
    raw[10:18] = bytes(b ^ 0xFF for b in raw[10:18])
    p.write_bytes(bytes(raw))
    with pytest.raises(IndexError_, match=r"index file index.faiss is corrupt \(checksum mismatch\)"):
        load_index(folder)
    # even with a matching checksum, unreadable faiss data is an IndexError_
    p.write_bytes(b"not a faiss index at all" * 4)
    info = json.loads((folder / "index.json").read_text())
    info["files"]["index.faiss"] = hashlib.sha256(p.read_bytes()).hexdigest()
    (folder / "index.json").write_text(json.dumps(info))
    with pytest.raises(IndexError_, match="cannot be read by faiss"):
        load_index(folder)


def test_corrupt_metadata_and_json(saved):
    _, folder = saved
    (folder / "metadata.jsonl").write_text("garbage\n")
    with pytest.raises(IndexError_, match="metadata.jsonl is corrupt"):
        load_index(folder)
    (folder / "index.json").write_text("{ not json")
    with pytest.raises(IndexError_, match="index.json is corrupt"):
        load_index(folder)
    (folder / "index.json").unlink()
    with pytest.raises(IndexError_, match="no index.json"):
        load_index(folder)


def test_version_and_identity_mismatch(saved):
    ix, folder = saved
    with pytest.raises(IndexError_, match="latent 32, this model has .*latent 64"):
        load_index(folder, expect_identity={"model": "mopoe-test", "latent_dim": 64})
    with pytest.raises(IndexError_, match="checkpoint"):
        load_index(folder, expect_identity={"checkpoint": "step-200"})
    load_index(folder, expect_identity={"model": "mopoe-test", "latent_dim": 32})
    info = json.loads((folder / "index.json").read_text())
    info["version"] = 99
    (folder / "index.json").write_text(json.dumps(info))
    with pytest.raises(IndexError_, match="version 99"):
        load_index(folder)


def test_failed_save_leaves_disk_identical(saved, data, monkeypatch):
    ix, folder = saved
    digest = folder_digest(folder)
    ix.add(data["mu"][300:310], data["logvar"][300:310], data["ids"][300:310], None)

    def boom(*a, **k):
        raise OSError("disk full")
    monkeypatch.setattr(index_mod, "atomic_write_text", boom)
    with pytest.raises(OSError, match="disk full"):
        ix.save(folder)
    assert folder_digest(folder) == digest
    assert sorted(p.name for p in folder.parent.iterdir()) == ["idx"]   # temp folder cleaned
    assert len(load_index(folder)) == 300
    monkeypatch.undo()
    ix.save(folder)                                                     # a later save works
    assert len(load_index(folder)) == 310


def test_save_refuses_foreign_folder(data, tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "precious.txt").write_text("keep me")
    ix = build_index(data["mu"][:10], data["logvar"][:10], data["ids"][:10], None)
    with pytest.raises(InputError, match="not an index"):
        ix.save(tmp_path / "x")
    assert (tmp_path / "x" / "precious.txt").read_text() == "keep me"


def test_approximate_kinds_keep_recall_when_a_query_informs_one_block():
    """dims masks (per-expert retrieval vectors: a one-modality query informs a fifth of the vector):
    hnsw/ivf first passes see whole vectors, so they re-score proportionally more candidates."""
    from mmvae.retrieval.index import build_index
    rng = np.random.default_rng(0)
    n, m, e = 3000, 5, 16
    cent = rng.normal(size=(30, m * e))
    pres = rng.random((n, m)) > 0.3
    pres[np.arange(n), rng.integers(0, m, n)] = True
    mu = ((cent[rng.integers(0, 30, n)] + rng.normal(size=(n, m * e))) * np.repeat(pres, e, 1)).astype(np.float32)
    ids = [f"c{i}" for i in range(n)]
    dims = np.r_[np.ones(e), np.zeros((m - 1) * e)].astype(np.float32)
    q = ((cent[rng.integers(0, 30, 50)] + rng.normal(size=(50, m * e))) * dims).astype(np.float32)
    want = [{r.case_id for r in x} for x in build_index(mu, np.zeros_like(mu), ids).search(q, 10, dims=dims)]
    for kind, floor in (("hnsw", 0.95), ("ivf", 0.9)):
        got = [{r.case_id for r in x} for x in build_index(mu, np.zeros_like(mu), ids, kind=kind, seed=0)
               .search(q, 10, dims=dims)]
        recall = np.mean([len(a & b) / 10 for a, b in zip(want, got)])
        assert recall >= floor, (kind, recall)
