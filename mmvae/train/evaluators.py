"""Validation evaluators, chosen by name in ``config.evals`` (as big_vision's ``config.evals``).

``config.evals`` maps a name of your choice to ``{"type": <evaluator>, "every": N, ...options}``;
``every`` defaults to ``train.eval_every`` (0: never). When any evaluator is due, the loop
makes one pass over the validation split (:class:`ValidationPass`: the ELBO terms of every
case and its experts) and each due evaluator turns it into metrics, written under
``split='val'``. Evaluators (``EVALUATORS``):

* ``elbo``: the objective's terms averaged over validation cases (+ ``num_cases``);
* ``retrieval``: leave-one-out retrieval among the validation cases with
  :func:`mmvae.retrieval.evaluate.evaluate`: ``retrieval/map@k/<query>`` and
  ``retrieval/num_queries/<query>`` for the all-modality query and each single modality
  (``queries='all_and_single'``) or every non-empty subset (``queries='all_subsets'``);
  ``k`` defaults to ``retrieval.k``, the bootstrap to ``train.eval_n_boot``. Its
  ``retrieval/map@k/all`` is the value ``train.keep_best`` keeps checkpoints by.

A new evaluator is a function ``(ValidationPass, spec, config, **options) -> {name: value}``
added to ``EVALUATORS``.
"""
from __future__ import annotations

import dataclasses
import inspect
from typing import Callable

import numpy as np

from mmvae.errors import ConfigError
from mmvae.retrieval.embed import Embeddings
from mmvae.retrieval.evaluate import all_query_subsets, evaluate, subset_name


@dataclasses.dataclass
class ValidationPass:
    """One pass of the eval step over the validation cases.

    ``metrics``: the ELBO terms averaged over cases; ``embeddings``: every case's experts
    ``(N, M, E)``, presence and labels (observed modalities only)."""
    metrics: dict[str, np.ndarray]
    num_cases: int
    embeddings: Embeddings


def elbo(vp: ValidationPass, spec, config) -> dict:
    out = {k: v for k, v in vp.metrics.items() if k not in ("nonfinite_inputs", "beta")}
    out["num_cases"] = np.asarray(vp.num_cases)
    return out


def retrieval(vp: ValidationPass, spec, config, *, queries: str = "all_and_single", k: int | None = None,
              n_boot: int | None = None) -> dict:
    k = int(config.retrieval.k) if k is None else int(k)
    n_boot = int(config.train.eval_n_boot) if n_boot is None else int(n_boot)
    mods = list(spec.query_modalities)
    m = len(mods)
    if queries == "all_and_single":
        subsets = [np.ones(m, np.float32)] + [np.eye(m, dtype=np.float32)[i] for i in range(m)]
        names = ["all"] + mods
    elif queries == "all_subsets":
        subsets = all_query_subsets(mods)
        names = ["all" if s.all() else subset_name(mods, s) for s in subsets]
    else:
        raise ConfigError(f"evals retrieval: queries must be one of {QUERY_SETS}, got {queries!r}")
    rows = evaluate(vp.embeddings, config.data.label, k, subsets=subsets, metric=config.retrieval.metric,
                    n_boot=n_boot, seed=int(config.seed))
    out = {}
    for q, r in zip(names, rows):
        out[f"retrieval/map@{k}/{q}"] = np.asarray(r.get(f"map@{k}", np.nan))
        out[f"retrieval/num_queries/{q}"] = np.asarray(r.get("num_queries", 0))
        if q == "all" and f"map@{k}_lo" in r and n_boot > 0:
            out[f"retrieval/map@{k}_lo/all"] = np.asarray(r[f"map@{k}_lo"])
            out[f"retrieval/map@{k}_hi/all"] = np.asarray(r[f"map@{k}_hi"])
    return out


EVALUATORS: dict[str, Callable[..., dict]] = {"elbo": elbo, "retrieval": retrieval}
QUERY_SETS = ("all_and_single", "all_subsets")


@dataclasses.dataclass(frozen=True)
class Evaluator:
    name: str
    fn: Callable[..., dict]
    every: int
    options: dict

    def due(self, step: int, total: int) -> bool:
        return self.every > 0 and (step % self.every == 0 or step == total)

    def __call__(self, vp: ValidationPass, spec, config) -> dict:
        return self.fn(vp, spec, config, **self.options)


def from_config(config) -> list[Evaluator]:
    """The evaluators ``config.evals`` names (ConfigError for an unknown type or option)."""
    out = []
    for name, opts in dict(config.evals).items():
        opts = dict(opts)
        kind = opts.pop("type", None)
        if kind not in EVALUATORS:
            raise ConfigError(f"evals.{name}.type: unknown evaluator {kind!r}; choose one of {sorted(EVALUATORS)}")
        every = opts.pop("every", config.train.eval_every)
        if isinstance(every, bool) or not isinstance(every, int) or every < 0:
            raise ConfigError(f"evals.{name}.every must be an integer >= 0, got {every!r}")
        known = [p for p, v in inspect.signature(EVALUATORS[kind]).parameters.items() if v.kind == v.KEYWORD_ONLY]
        bad = sorted(set(opts) - set(known))
        if bad:
            raise ConfigError(f"evals.{name}: unknown option(s) {bad} for evaluator {kind!r}; known: {known}")
        if kind == "retrieval":
            for key, low in (("k", 1), ("n_boot", 0)):
                v = opts.get(key)
                if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < low):
                    raise ConfigError(f"evals.{name}.{key} must be an integer >= {low}, got {v!r}")
            if opts.get("queries", "all_and_single") not in QUERY_SETS:
                raise ConfigError(f"evals.{name}.queries must be one of {QUERY_SETS}, got {opts['queries']!r}")
        out.append(Evaluator(str(name), EVALUATORS[kind], int(every), opts))
    ks = [int(e.options.get("k", config.retrieval.k)) for e in out if e.fn is retrieval]
    if len(ks) != len(set(ks)):
        raise ConfigError(f"evals: two retrieval evaluators with the same k ({sorted(ks)}) would write the same "
                          "metric names; give them different k")
    return out
