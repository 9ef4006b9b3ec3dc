"""Retrieval metrics: hand-computed values, bootstrap, label relevance, end-to-end."""
from __future__ import annotations

import csv
import inspect
import math
import warnings

import numpy as np
import pytest
from scipy import stats

from mmvae.errors import InputError, MmvaeError
from mmvae.retrieval.metrics import (
    average_precision_at_k, bootstrap_ci, exact_search, format_markdown_table,
    ndcg_at_k, precision_at_k, recall_at_k, relevance_from_labels, retrieval_metrics,
    write_csv,
)


# ----------------------------------------------------------------------------- per-query
def test_precision_recall_hand_computed():
    rel = np.array([[1, 0, 1, 0, 0], [0, 0, 0, 0, 1], [1, 1, 1, 1, 1]], bool)
    np.testing.assert_allclose(precision_at_k(rel, 5), [0.4, 0.2, 1.0])
    np.testing.assert_allclose(precision_at_k(rel, 3), [2 / 3, 0.0, 1.0])
    np.testing.assert_allclose(recall_at_k(rel, [4, 1, 0], 5), [0.5, 1.0, 0.0])  # R=0 -> 0
    # fewer results than k: the missing ones count as not relevant
    np.testing.assert_allclose(precision_at_k(np.array([[1, 1]], bool), 4), [0.5])


def test_average_precision_hand_computed():
    rel = np.array([[1, 0, 1, 0, 0]] * 3, bool)
    ap = average_precision_at_k(rel, [2, 3, 0], 5)
    np.testing.assert_allclose(ap, [(1 + 2 / 3) / 2, (1 + 2 / 3) / 3, 0.0])
    # denominator is min(k, R): R = 10 > k = 3 -> divide by 3
    ap = average_precision_at_k(np.array([[0, 1, 1, 1, 1]], bool), [10], 3)
    np.testing.assert_allclose(ap, [(1 / 2 + 2 / 3) / 3])
    # perfect ranking -> 1
    np.testing.assert_allclose(average_precision_at_k(np.ones((1, 4), bool), [4], 4), [1.0])


def test_ndcg_hand_computed():
    # the classic example: gains 3,2,3,0,1,2 -> DCG 6.861; the pool's best six gains
    # (3,3,3,2,2,2) -> IDCG 8.740; with only these six items as the pool: IDCG 7.141
    g = np.array([[3, 2, 3, 0, 1, 2]], float)
    np.testing.assert_allclose(ndcg_at_k(g, [[3, 3, 3, 2, 2, 2]]), [6.861 / 8.740], atol=1e-3)
    np.testing.assert_allclose(ndcg_at_k(g, [[3, 3, 2, 2, 1, 0]]), [6.861 / 7.141], atol=1e-3)
    # binary: [1,0,1] vs ideal [1,1,0]
    expect = (1 + 1 / 2) / (1 + 1 / math.log2(3))
    np.testing.assert_allclose(ndcg_at_k([[1, 0, 1]], [[0, 1, 1]]), [expect])  # ideal is sorted
    np.testing.assert_allclose(ndcg_at_k([[0, 0]], [[0, 0]]), [0.0])  # no relevant -> 0
    np.testing.assert_allclose(ndcg_at_k([[1.0, 0.0]], [[1.0, 1.0]], k=1), [1.0])


def test_k_must_be_positive():
    with pytest.raises(MmvaeError, match="k must be"):
        precision_at_k(np.ones((1, 3), bool), 0)
    with pytest.raises(InputError):
        retrieval_metrics(np.zeros((2, 2)), np.zeros((2, 2)), ["a", "b"], ["a", "b"], -1)


# ----------------------------------------------------------------------------- labels
def test_relevance_single_label():
    rel, gains = relevance_from_labels(
        ["a", "b", None], [["a", "b", "a"], ["b", None, "c"], ["a", "a", "a"]], multilabel=False)
    assert rel.tolist() == [[True, False, True], [True, False, False], [False, False, False]]
    assert gains.tolist() == [[1, 0, 1], [1, 0, 0], [0, 0, 0]]


def test_relevance_multilabel_sets_and_strings():
    rel, gains = relevance_from_labels(
        ["a|b", {"c"}],
        [[{"a"}, "b|c|a", "c", "", None], ["c | d", ["x"], frozenset({"c", "y"}), "c", "a"]],
        multilabel=True)
    assert gains.tolist() == [[1, 2, 0, 0, 0], [1, 0, 1, 1, 0]]
    assert rel.tolist() == [[True, True, False, False, False], [True, False, True, True, False]]


# ----------------------------------------------------------------------------- bootstrap
def test_bootstrap_ci_deterministic_and_contains_mean():
    v = np.random.default_rng(1).random(200)
    a = bootstrap_ci(v, n_boot=500, seed=3)
    b = bootstrap_ci(v, n_boot=500, seed=3)
    c = bootstrap_ci(v, n_boot=500, seed=4)
    assert a == b
    assert a != c
    mean, lo, hi = a
    assert mean == pytest.approx(v.mean())
    assert lo < mean < hi
    # roughly mean ± 1.96·sd/sqrt(n)
    half = 1.96 * v.std() / math.sqrt(v.size)
    assert hi - lo == pytest.approx(2 * half, rel=0.25)
    assert bootstrap_ci(np.full(10, 0.3)) == pytest.approx((0.3, 0.3, 0.3))
    assert all(math.isnan(x) for x in bootstrap_ci([]))


def test_bootstrap_ci_is_scipy_bca():
    # skewed AP-like values: BCa differs from the percentile interval here
    v = np.random.default_rng(11).beta(0.5, 2.0, 40)
    rng_arg = "rng" if "rng" in inspect.signature(stats.bootstrap).parameters else "random_state"
    ref, pct = (stats.bootstrap((v,), np.mean, n_resamples=2000, confidence_level=0.9, method=m,
                                **{rng_arg: np.random.default_rng(5)}).confidence_interval
                for m in ("BCa", "percentile"))
    mean, lo, hi = bootstrap_ci(v, n_boot=2000, alpha=0.1, seed=5)
    assert mean == pytest.approx(v.mean(), abs=1e-12)
    assert lo == pytest.approx(ref.low, abs=1e-12) and hi == pytest.approx(ref.high, abs=1e-12)
    assert abs(lo - pct.low) > 1e-3 and abs(hi - pct.high) > 1e-3
    assert lo < mean < hi
    # degenerate samples: no interval, and no warning from BCa
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m = float(np.full(25, 0.4).mean())
        assert bootstrap_ci(np.full(25, 0.4), n_boot=500) == (m, m, m)
        assert bootstrap_ci([0.7], n_boot=500) == (0.7, 0.7, 0.7)
    with pytest.raises(InputError, match="alpha"):
        bootstrap_ci(v, alpha=1.0)


# ----------------------------------------------------------------------------- end to end
def _clusters(rng, n, centres, noise):
    lab = rng.integers(0, len(centres), n)
    return (centres[lab] + noise * rng.standard_normal((n, centres.shape[1]))).astype(np.float32), lab


def test_well_separated_clusters_map_near_one_and_random_low():
    rng = np.random.default_rng(0)
    centres = 10.0 * rng.standard_normal((8, 16))
    db, dl = _clusters(rng, 400, centres, 0.3)
    q, ql = _clusters(rng, 80, centres, 0.3)
    for metric in ("cosine", "l2"):
        out = retrieval_metrics(q, db, ql.astype(str), dl.astype(str), 10, metric=metric,
                                n_boot=200)
        assert out["num_queries"] == 80 and out["num_skipped"] == 0
        assert out["map@10"][0] > 0.99
        assert out["precision@10"][0] > 0.99
        assert out["ndcg@10"][0] > 0.99
        # recall@10 = 10 / cluster size (~50)
        assert 0.1 < out["recall@10"][0] < 0.4
        for name in ("map@10", "precision@10", "ndcg@10", "recall@10"):
            m, lo, hi = out[name]
            assert lo <= m <= hi
    # random embeddings and labels: low
    rdb = rng.standard_normal((400, 16))
    rq = rng.standard_normal((80, 16))
    out = retrieval_metrics(rq, rdb, rng.integers(0, 8, 80), rng.integers(0, 8, 400), 10,
                            n_boot=100)
    assert out["map@10"][0] < 0.3
    assert out["precision@10"][0] < 0.3


def test_leave_one_out_exclusion():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((60, 8)).astype(np.float32)
    labels = [str(i % 6) for i in range(60)]
    labels[0] = "unique"        # only item with this label: no relevant item left in LOO
    labels[1] = None            # missing label: skipped
    no_ex = retrieval_metrics(x, x, labels, labels, 1, n_boot=0)
    assert no_ex["precision@1"][0] == pytest.approx(1.0)   # every query finds itself
    assert no_ex["num_queries"] == 59                       # only the missing one skipped
    loo = retrieval_metrics(x, x, labels, labels, 1, exclude=np.arange(60), n_boot=0)
    assert loo["num_queries"] == 58 and loo["num_skipped"] == 2
    assert loo["precision@1"][0] < 0.5
    idx, _ = exact_search(x, x, 3, exclude=np.arange(60))
    assert not np.any(idx == np.arange(60)[:, None])
    # numbers agree with the per-query functions on the same ranking
    rel, _ = relevance_from_labels(labels, [[labels[j] for j in row[:1]] for row in idx])
    counts = np.array([sum(1 for j, b in enumerate(labels) if b == a and j != i and a)
                       for i, a in enumerate(labels)])
    keep = (counts > 0) & np.array([a is not None for a in labels])
    assert loo["precision@1"][0] == pytest.approx(precision_at_k(rel, 1)[keep].mean())


def test_multilabel_metrics_match_per_query_functions():
    rng = np.random.default_rng(5)
    vocab = list("abcdef")
    dl = ["|".join(sorted(set(rng.choice(vocab, rng.integers(1, 3))))) for _ in range(120)]
    ql = [set(rng.choice(vocab, rng.integers(1, 3))) for _ in range(30)]
    ql[0] = set()   # skipped
    db = rng.standard_normal((120, 6))
    q = rng.standard_normal((30, 6))
    k = 7
    out = retrieval_metrics(q, db, ql, dl, k, multilabel=True, n_boot=0)
    idx, _ = exact_search(q, db, k)
    rel, gains = relevance_from_labels(ql, [[dl[j] for j in row] for row in idx], multilabel=True)
    _, all_gains = relevance_from_labels(ql, [dl] * 30, multilabel=True)
    num_rel = (all_gains > 0).sum(axis=1)
    ideal = -np.sort(-all_gains, axis=1)[:, :k]
    keep = num_rel > 0
    assert out["num_queries"] == keep.sum() == 29
    assert out[f"map@{k}"][0] == pytest.approx(average_precision_at_k(rel, num_rel, k)[keep].mean())
    assert out[f"recall@{k}"][0] == pytest.approx(recall_at_k(rel, num_rel, k)[keep].mean())
    assert out[f"ndcg@{k}"][0] == pytest.approx(ndcg_at_k(gains, ideal, k)[keep].mean())
    # precomputed ranking (e.g. from an index) gives the same numbers
    out2 = retrieval_metrics(None, None, ql, dl, k, multilabel=True, n_boot=0, ranked=idx)
    assert out2 == out


def test_exact_search_matches_brute_force():
    rng = np.random.default_rng(7)
    q, d = rng.standard_normal((13, 5)), rng.standard_normal((700, 5))
    idx, sc = exact_search(q, d, 4, metric="l2")
    dist = ((q[:, None, :] - d[None]) ** 2).sum(-1)
    np.testing.assert_array_equal(idx, np.argsort(dist, axis=1)[:, :4])
    np.testing.assert_allclose(sc, -np.sort(dist, axis=1)[:, :4], rtol=1e-5)
    idx, _ = exact_search(q, d, 4, metric="cosine")
    cos = (q / np.linalg.norm(q, axis=1, keepdims=True)) @ (d / np.linalg.norm(d, axis=1, keepdims=True)).T
    np.testing.assert_array_equal(idx, np.argsort(-cos, axis=1)[:, :4])


# ----------------------------------------------------------------------------- reporting
def test_markdown_table_and_csv(tmp_path):
    rows = [{"model": "poe", "map@10": (0.81234, 0.8, 0.83), "n": 12},
            {"model": "m|oe", "map@10": (0.5, 0.4, 0.6), "n": 3, "extra": 0.25}]
    md = format_markdown_table(rows, ["model", "map@10", "n"])
    lines = md.strip().splitlines()
    assert lines[0] == "| model | map@10 | n |"
    assert lines[2] == "| poe | 0.8123 [0.8000, 0.8300] | 12 |"
    assert lines[3] == "| m\\|oe | 0.5000 [0.4000, 0.6000] | 3 |"
    p = tmp_path / "out" / "metrics.csv"
    write_csv(rows, p)
    with open(p, newline="") as f:
        got = list(csv.reader(f))
    assert got[0] == ["model", "map@10", "map@10_lo", "map@10_hi", "n", "extra"]
    assert got[1] == ["poe", "0.81234", "0.8", "0.83", "12", ""]
    assert got[2][-1] == "0.25"
    assert sorted(x.name for x in p.parent.iterdir()) == ["metrics.csv"]  # no temp files
