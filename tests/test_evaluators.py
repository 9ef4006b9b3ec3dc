"""Validation evaluators chosen by name in ``config.evals``."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from mmvae.config import load_config
from mmvae.data.synth import make_cohort
from mmvae.errors import ConfigError
from mmvae.train import evaluators as E
from mmvae.train.loop import train_and_evaluate
from mmvae.train.metrics import read_metrics

TINY = str(Path(__file__).resolve().parents[1] / "configs" / "tiny.py")


def test_from_config_defaults_names_and_errors():
    c = load_config(TINY, ["--config.train.eval_every=4"])
    got = {e.name: (e.fn, e.every, e.options) for e in E.from_config(c)}
    assert got == {"val": (E.elbo, 4, {}), "retrieval": (E.retrieval, 4, {"queries": "all_and_single"})}
    c = load_config(TINY, ["--config.evals={'x': {'type': 'nope'}}"])
    with pytest.raises(ConfigError, match=r"evals.x.type: unknown evaluator 'nope'"):
        E.from_config(c)
    c = load_config(TINY, ["--config.evals={'x': {'type': 'retrieval', 'kk': 3}}"])
    with pytest.raises(ConfigError, match=r"unknown option\(s\) \['kk'\]"):
        E.from_config(c)
    for bad, match in [("{'x': {'type': 'retrieval', 'k': 0}}", r"evals.x.k must be an integer >= 1"),
                       ("{'x': {'type': 'retrieval', 'queries': 'some'}}", r"evals.x.queries must be one of"),
                       ("{'x': {'type': 'elbo', 'every': -1}}", r"evals.x.every must be an integer >= 0"),
                       ("{'a': {'type': 'retrieval'}, 'b': {'type': 'retrieval', 'queries': 'all_subsets'}}",
                        r"two retrieval evaluators with the same k")]:
        with pytest.raises(ConfigError, match=match):
            E.from_config(load_config(TINY, [f"--config.evals={bad}"]))
    ev = E.Evaluator("r", E.retrieval, 3, {})
    assert [s for s in range(1, 8) if ev.due(s, 7)] == [3, 6, 7]


def test_loop_runs_the_named_evaluators_only(tmp_path):
    manifest = make_cohort(tmp_path / "data", 40, seed=0, shape=(16, 16, 16), spacing=(4.0, 4.0, 4.0))
    c = load_config(TINY, [f"--config.data.manifest={manifest}", "--config.train.steps=6",
                           "--config.evals={'r': {'type': 'retrieval', 'every': 3, 'k': 5, 'queries': 'all_subsets'}}"])
    summary = train_and_evaluate(c, tmp_path / "run", show_progress=False)
    val = read_metrics(tmp_path / "run", "val")
    assert [r["step"] for r in val] == [3, 6]
    keys = set(val[-1]) - {"step", "split"}
    assert "loss" not in keys and "num_cases" not in keys                      # no ELBO evaluator
    assert {"retrieval/map@5/all", "retrieval/map@5/t1+report", "retrieval/num_queries/t2+dwi"} <= keys
    assert len([k for k in keys if k.startswith("retrieval/map@5/")]) == 2 ** 5 - 1
    assert summary["best_val_map"] == max(r["retrieval/map@5/all"] for r in val if np.isfinite(r["retrieval/map@5/all"]))
    assert 0.0 <= val[-1]["retrieval/map@5/all"] <= 1.0 and val[-1]["retrieval/num_queries/all"] > 0
