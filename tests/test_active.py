"""Uncertainty and active learning: uncertainty measures, ``mmvae suggest`` and a tiny end-to-end
active-learning run (2 rounds) on a synthetic cohort."""
from __future__ import annotations

import csv
import dataclasses
import io
import json
from pathlib import Path

import numpy as np
import pytest

from mmvae.cli import main
from mmvae.errors import InputError
from mmvae.retrieval.embed import Embeddings
from mmvae.retrieval.suggest import k_center_greedy, suggest
from mmvae.retrieval.uncertainty import case_uncertainty, expert_disagreement, label_entropy, posterior_spread

ROOT = Path(__file__).resolve().parents[1]


def fake_embeddings(n=12, m=3, e=4, seed=0) -> Embeddings:
    rng = np.random.default_rng(seed)
    emu = rng.normal(size=(n, m, e)).astype(np.float32)
    elv = rng.normal(-1, 0.3, size=(n, m, e)).astype(np.float32)
    present = np.ones((n, m), np.float32)
    present[0, 1:] = 0                                     # case 0: one modality
    mu = emu.mean(1)
    lv = -np.log(np.exp(-elv).sum(1))
    return Embeddings([f"c{i:02d}" for i in range(n)], ["t1", "t2", "dwi"][:m], emu, elv, present, mu, lv,
                      [{"class": "ab"[i % 2]} for i in range(n)], {"model_fingerprint": "x"})


# ----------------------------------------------------------------------------- measures
def test_uncertainty_measures():
    mv, ld = posterior_spread(np.log(np.array([[1.0, 3.0]])))
    assert mv[0] == pytest.approx(2.0) and ld[0] == pytest.approx(np.log(3.0))
    mu = np.zeros((2, 2, 3))
    lv = np.zeros((2, 2, 3))
    mu[1, 1] = 2.0                                          # case 1: experts 2 apart on 3 dims
    d = expert_disagreement(mu, lv, np.array([[1, 1], [1, 1]]))
    assert d[0] == pytest.approx(0.0) and d[1] == pytest.approx(0.5 * 3 * 4)     # KL = ½ Σ Δ²  (unit variances)
    assert np.isnan(expert_disagreement(mu, lv, np.array([[1, 0], [1, 1]]))[0])
    assert label_entropy(np.array([[0.5, 0.5], [1.0, 0.0]])) == pytest.approx([np.log(2), 0.0], abs=1e-9)


def test_k_center_picks_the_farthest_point():
    x = np.array([[0.0, 0], [1, 0], [0, 1], [10, 10], [5, 0], [0, 6]])
    picks = k_center_greedy(x, centers=[0], budget=3, pool=[1, 2, 3, 4, 5])
    assert [i for i, _ in picks] == [3, 5, 4]               # farthest from {0}, then from {0, 3}, ...
    assert picks[0][1] == pytest.approx(np.hypot(10, 10)) and picks[1][1] == pytest.approx(6.0)


def test_suggest_strategies_and_errors():
    emb = fake_embeddings()
    unc = case_uncertainty(emb)
    for strategy in ("random", "uncertainty", "disagreement", "coreset", "hybrid"):
        rows = suggest(emb, 4, strategy, ["c01", "c02"], seed=3)
        ids = [r["case_id"] for r in rows]
        assert len(set(ids)) == 4 and not {"c01", "c02"} & set(ids) and all(r["reason"] for r in rows)
        again = suggest(emb, 4, strategy, ["c01", "c02"], seed=3)                  # same seed, same answer
        assert [(r["case_id"], r["reason"]) for r in rows] == [(r["case_id"], r["reason"]) for r in again]
    top = suggest(emb, 3, "uncertainty")
    order = np.argsort(-unc["mean_variance"])
    assert [r["case_id"] for r in top] == [emb.case_ids[i] for i in order[:3]]
    assert suggest(emb, 12, "disagreement")[-1]["case_id"] == "c00"            # one modality ranks last
    with pytest.raises(InputError, match="larger than the unlabelled pool"):
        suggest(emb, 11, "random", ["c01", "c02"])
    with pytest.raises(InputError, match="not in the embeddings"):
        suggest(emb, 1, "random", ["nope"])
    with pytest.raises(InputError, match="unknown strategy"):
        suggest(emb, 1, "greedy")


# ----------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def al_run(tmp_path_factory):
    from mmvae.config import load_config
    from mmvae.data.synth import make_cohort
    from mmvae.experiments.active import run_active_learning
    tmp = tmp_path_factory.mktemp("active")
    c = load_config(str(ROOT / "configs" / "tiny.py"))
    c.objective.supcon_weight = 100.0                     # valid once run_active_learning gives the labels
    c.data.manifest = str(make_cohort(tmp / "data", 40, seed=0, shape=(16, 16, 16), spacing=(4.0, 4.0, 4.0)))
    rows = run_active_learning(c, tmp / "out", seeds=[0], strategies=["hybrid"], start=0.1, target=0.4,
                               rounds=2, round_steps=3, log=lambda *a: None)
    return tmp, c, rows


def test_active_learning_tiny_run(al_run):
    tmp, c, rows = al_run
    with open(tmp / "out" / "curve.csv") as f:
        table = list(csv.DictReader(f))
    assert len(table) == len(rows) == 1 * 1 * 3                 # seeds × strategies × (rounds + 1)
    for s in ("hybrid",):
        n = [int(r["labelled"]) for r in table if r["strategy"] == s]
        assert n == sorted(n) and n[0] < n[1] < n[2] and n[0] == 3 and n[2] == 13
        assert all(0 <= float(r["map"]) <= 1 for r in table if r["strategy"] == s)
    listed = (tmp / "out" / "seed0" / "hybrid" / "labelled-r2.csv").read_text().split()[1:]
    assert len(listed) == 13 and len(set(listed)) == 13
    from mmvae.runs.checkpoint import read_meta  # noqa: F401  (the run resumed: one metrics log, steps grow)
    steps = [json.loads(x)["step"] for x in (tmp / "out" / "seed0" / "hybrid" / "metrics.jsonl").read_text().splitlines()
             if '"step"' in x]
    assert max(steps) == int(c.train.steps) + 2 * 3


def test_uncertainty_grows_when_modalities_are_removed(al_run):
    from mmvae.experiments.active import _embed
    tmp, c, _ = al_run
    emb = _embed(tmp / "out" / "seed0" / "base", c.data.manifest)
    assert emb.label_probs is not None and emb.label_probs.shape[1] == len(emb.label_classes)
    assert "label_entropy" in case_uncertainty(emb)
    emb = emb.as_embedding("fused").standardized()     # the spread of the fused posterior
    full = np.ones(len(emb.modalities), np.float32)
    mv_all = posterior_spread(emb.subset_posterior(full)[1])[0]
    n_checked = 0
    for j, m in enumerate(emb.modalities):
        drop = full.copy()
        drop[j] = 0
        have = (emb.present[:, j] > 0) & (emb.present.sum(1) > 1)
        mv = posterior_spread(emb.subset_posterior(drop)[1])[0]
        assert np.all(mv[have] > mv_all[have]), m
        n_checked += int(have.sum())
    assert n_checked > 50


def test_cli_suggest(al_run, tmp_path, capsys):
    from mmvae.experiments.active import _embed
    tmp, c, _ = al_run
    wd = tmp / "out" / "seed0" / "base"
    emb = _embed(wd, c.data.manifest)
    emb.save(tmp_path / "e.npz")
    labelled = tmp_path / "labels.csv"
    labelled.write_text("case_id,class\n" + "".join(f"{cid},{lab['class']}\n" for cid, lab in
                                                     zip(emb.case_ids[:3], emb.labels[:3])))
    out = tmp_path / "next.csv"
    assert main(["suggest", "--workdir", str(wd), "--embeddings", str(tmp_path / "e.npz"), "--budget", "5",
                 "--strategy", "coreset", "--labelled", str(labelled), "--out", str(out)]) == 0
    rows = list(csv.DictReader(io.StringIO(out.read_text())))
    assert len(rows) == 5 and not {r["case_id"] for r in rows} & set(emb.case_ids[:3])
    assert rows[0]["reason"].startswith("distance ")
    capsys.readouterr()
    bad = [(["--budget", "1000"], "larger than the unlabelled pool"),
           (["--labelled", str(tmp_path / "x.csv")], "cannot read the labels file")]
    (tmp_path / "x.csv").write_text("case_id,class\nghost,glioma\n")
    bad[1] = (["--labelled", str(tmp_path / "x.csv")], "case 'ghost' is not in the embeddings")
    (tmp_path / "y.csv").write_text(f"case_id,class\n{emb.case_ids[0]},dragon\n")
    bad.append((["--labelled", str(tmp_path / "y.csv")], "'dragon' is not one the model was built with"))
    other = dataclasses.replace(emb, identity={"model_fingerprint": "another"})
    other.save(tmp_path / "o.npz")
    bad.append((["--embeddings", str(tmp_path / "o.npz")], "embeddings of another model"))
    for extra, msg in bad:
        args = {"--workdir": str(wd), "--embeddings": str(tmp_path / "e.npz"), "--budget": "5"}
        for i in range(0, len(extra), 2):
            args[extra[i]] = extra[i + 1]
        rc = main(["suggest", *[x for kv in args.items() for x in kv]])
        err = capsys.readouterr().err.strip()
        assert rc == 2 and msg in err and "\n" not in err, (extra, err)
