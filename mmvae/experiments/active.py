"""Simulated active learning: which cases to label next, measured on a cohort with known labels.

Per seed: a run is trained with its label expert given the labels of a random seed set
(``start`` × training cases); then, for each strategy (:mod:`mmvae.retrieval.suggest`), from a
copy of that run, ``rounds`` times: embed the cohort, suggest ``budget`` training cases from the
unlabelled pool, "annotate" them from the hidden labels (``data.labelled_cases``), fine-tune
``round_steps`` more steps **resuming from the last checkpoint** (not from scratch), and
evaluate retrieval. Every evaluation is the all-modality mAP@k of the fixed held-out cases
(the validation split) against the whole cohort — the queries never use a label.

Output rows (tidy): seed, strategy, round, labelled, fraction, map@k, round_seconds.
"""
from __future__ import annotations

import copy
import csv
import dataclasses
import shutil
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from mmvae.atomic import atomic_write_text
from mmvae.data.manifest import group_cases, read_manifest
from mmvae.errors import ConfigError
from mmvae.experiments.protocol import held_out
from mmvae.retrieval.embed import embed_cohort, embedding_kind
from mmvae.retrieval.evaluate import evaluate
from mmvae.retrieval.suggest import STRATEGIES, suggest
from mmvae.runs.files import fingerprint
from mmvae.runs.trained import load_cohort, load_trained
from mmvae.train.loop import train_and_evaluate

__all__ = ["run_active_learning", "curve_table", "FIELDS"]

FIELDS = ("seed", "strategy", "round", "labelled", "fraction", "map", "round_seconds")


def _embed(workdir: Path, manifest: str):
    config, spec, model, tok = load_trained(workdir)
    cohort, _, _ = load_cohort(config, workdir, manifest, tokenizer=tok, show_progress=False)
    return embed_cohort(model, cohort, identity={"model_fingerprint": fingerprint(spec)}, show_progress=False,
                        standardize=bool(config.retrieval.standardize),
                        embedding=embedding_kind(config))


def _map(emb, config, k: int) -> float:
    _, q = held_out(len(emb.case_ids), config)
    rows = evaluate(emb, config.data.label, k, query_idx=q, subsets=[np.ones(len(emb.modalities), np.float32)],
                    n_boot=0)
    return float(rows[0].get(f"map@{k}", float("nan")))


def _write_list(path: Path, ids: Sequence[str]) -> str:
    atomic_write_text(path, "case_id\n" + "".join(f"{c}\n" for c in ids))
    return str(path)


def run_active_learning(base_config, out: str | Path, *, seeds: Sequence[int] = (0, 1, 2),
                        strategies: Sequence[str] = STRATEGIES, start: float = 0.02, target: float = 0.10,
                        rounds: int = 2, round_steps: int = 60, synthesize: Callable | None = None,
                        log=print) -> list[dict]:
    """Run the experiment (module doc); ``base_config`` has a label expert through
    ``data.labelled_cases`` (set here). Work dirs under ``out/seed<S>/``; finished rows are
    appended to ``out/curve.csv`` as they come. Returns the rows."""
    bad = [s for s in strategies if s not in STRATEGIES]
    if bad:
        raise ConfigError(f"unknown strategy {bad[0]!r}; use {list(STRATEGIES)}")
    if not 0 < start < target <= 1:
        raise ConfigError(f"need 0 < start ({start}) < target ({target}) <= 1")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    k = int(base_config.retrieval.k)
    rows: list[dict] = []
    for seed in seeds:
        sdir = out / f"seed{seed}"
        config = copy.deepcopy(base_config)
        with config.unlocked():
            config.seed = int(seed)
        if not config.data.manifest:
            if synthesize is None:
                raise ConfigError("data.manifest is empty and no synthetic cohort maker was given")
            with config.unlocked():
                config.data.manifest = str(synthesize(config, out / "data"))
        manifest = str(config.data.manifest)
        base = sdir / "base"
        # the seed set: random training cases with a label (the same for every strategy)
        cases = group_cases(read_manifest(manifest))
        ids = [c.case_id for c in cases]
        labels = {c.case_id: c.labels.get(config.data.label, "") for c in cases}
        train_idx, _ = held_out(len(ids), config)
        train_ids = [ids[i] for i in train_idx if labels[ids[i]]]
        n_start = max(1, int(round(start * len(train_ids))))
        n_target = max(n_start + rounds, int(round(target * len(train_ids))))
        budgets = np.diff(np.linspace(n_start, n_target, rounds + 1).round().astype(int))
        rng = np.random.default_rng(np.random.SeedSequence([int(seed), 31337]))
        seed_set = sorted(rng.choice(train_ids, size=n_start, replace=False).tolist())
        steps0 = int(config.train.steps)
        with config.unlocked():
            config.data.labelled_cases = _write_list(sdir / "labelled-r0.csv", seed_set)
        t = time.perf_counter()
        train_and_evaluate(config, base, show_progress=False)
        log(f"seed {seed}: base run, {n_start} labelled of {len(train_ids)} training cases, {steps0} steps "
            f"({time.perf_counter() - t:.0f}s)")
        emb0 = _embed(base, manifest)
        m0 = _map(emb0, config, k)
        for strategy in strategies:
            wd = sdir / strategy
            if wd.exists():
                shutil.rmtree(wd)
            shutil.copytree(base, wd)
            labelled = list(seed_set)
            row = {"seed": seed, "strategy": strategy, "round": 0, "labelled": len(labelled),
                   "fraction": len(labelled) / len(train_ids), "map": m0, "round_seconds": 0.0}
            rows.append(row)
            _append(out / "curve.csv", row)
            emb = emb0
            cfg = copy.deepcopy(config)
            for r in range(1, rounds + 1):
                t = time.perf_counter()
                pool = _restrict(emb, set(train_ids))
                picks = suggest(pool, int(budgets[r - 1]), strategy, labelled, seed=int(seed) * 1000 + r)
                labelled += [p["case_id"] for p in picks]
                with cfg.unlocked():
                    cfg.data.labelled_cases = _write_list(wd / f"labelled-r{r}.csv", labelled)
                    cfg.train.steps = steps0 + r * int(round_steps)
                train_and_evaluate(cfg, wd, show_progress=False)      # resumes from the last checkpoint
                secs = time.perf_counter() - t
                emb = _embed(wd, manifest)
                row = {"seed": seed, "strategy": strategy, "round": r, "labelled": len(labelled),
                       "fraction": len(labelled) / len(train_ids), "map": _map(emb, cfg, k), "round_seconds": secs}
                rows.append(row)
                _append(out / "curve.csv", row)
                log(f"seed {seed} {strategy:12s} round {r}: {len(labelled)} labelled ({row['fraction']:.1%}), "
                    f"mAP@{k} {row['map']:.3f} (suggest + fine-tune {secs:.0f}s)")
            shutil.rmtree(wd / "checkpoints", ignore_errors=True)   # keep the logs, not the weights
    return rows


def _restrict(emb, keep: set):
    """The embeddings of the cases in ``keep`` only (the suggestion pool)."""
    idx = [i for i, c in enumerate(emb.case_ids) if c in keep]
    return dataclasses.replace(
        emb, case_ids=[emb.case_ids[i] for i in idx], experts_mu=emb.experts_mu[idx],
        experts_logvar=emb.experts_logvar[idx], present=emb.present[idx], mu=emb.mu[idx], logvar=emb.logvar[idx],
        labels=[emb.labels[i] for i in idx], label_probs=None if emb.label_probs is None else emb.label_probs[idx])


def _append(path: Path, row: dict) -> None:
    new = not path.exists()
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(FIELDS))
        if new:
            w.writeheader()
        w.writerow(row)


def curve_table(rows: Sequence[dict], k: int = 10) -> str:
    """Markdown: mAP@k (mean ± sd over seeds) per strategy × round, with the labelled fraction."""
    strategies = list(dict.fromkeys(r["strategy"] for r in rows))
    rounds = sorted({int(r["round"]) for r in rows})
    head = "| strategy | " + " | ".join(
        f"round {n} ({np.mean([float(r['fraction']) for r in rows if int(r['round']) == n]):.1%} labelled)"
        for n in rounds) + " |"
    head = head.replace("| strategy |", "| strategy | seeds |")
    lines = [head, "|---|---:|" + "---:|" * len(rounds)]
    for s in strategies:
        n_seeds = len({r["seed"] for r in rows if r["strategy"] == s})
        cells = []
        for n in rounds:
            v = [float(r["map"]) for r in rows if r["strategy"] == s and int(r["round"]) == n]
            cells.append(f"{np.mean(v):.3f} ± {np.std(v, ddof=1) if len(v) > 1 else 0:.3f}" if v else "–")
        lines.append(f"| {s} | {n_seeds} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
