"""The ablation grid: train × embed × evaluate cells, resumable and parallel.

A :class:`Cell` is one trained method on one cohort: a VAE (``method='vae'``) trained on
the modalities of ``train_subset`` with a fusion and an objective variant and a seed, a
late fusion of unimodal VAEs (``'late_fusion'``), or a baseline
(:mod:`mmvae.experiments.baselines`). Every cell is evaluated with the shared protocol
(:mod:`mmvae.experiments.protocol`) for every query subset of its modalities, and
writes ``cells/<id>/result.json`` atomically: ``status`` ``ok`` (with tidy metric rows)
or ``failed`` (with the error). A rerun skips finished cells (``retry_failed`` reruns
the failed ones), so an interrupted grid resumes where it stopped. With ``jobs > 1``
cells run in separate processes (spawned, so each has its own XLA runtime).

All cells share the cohort (``<out>/data`` when the config synthesises one), the
preprocessing cache (``<out>/cache``) and the held-out split of the full cohort.
"""
from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import itertools
import json
import multiprocessing
import time
import traceback
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from mmvae.atomic import atomic_write_text
from mmvae.config import load_config, to_json
from mmvae.data.manifest import group_cases, read_manifest
from mmvae.errors import ConfigError
from mmvae.experiments import baselines, protocol
from mmvae.experiments.baselines import run_baseline
from mmvae.experiments.protocol import BlockEmbeddings, held_out
from mmvae.quickstart import synthesize
from mmvae.retrieval.embed import embedding_kind, Embeddings
from mmvae.retrieval.evaluate import evaluate
from mmvae.retrieval.pipeline import embed_run
from mmvae.runs.trained import load_cohort
from mmvae.train.loop import train_and_evaluate

# Objective variants: dotted config overrides applied on top of the base config.
OBJECTIVES: dict[str, dict] = {
    "default": {},
    "no_align": {"objective.alignment_weight": 0.0},
    "all_subsets": {"objective.subsets": "all", "objective.num_subset_samples": 0},
    "unimodal": {"objective.subsets": "unimodal", "objective.num_subset_samples": 0},
    "no_ssl": {"objective.ssl_weight": 0.0},
    # semi-supervised: the label expert sees the label of this fraction of training cases,
    # plus SupCon on the labelled cases' subset posteriors; no private blocks (the label
    # shapes the shared block only; measured on the quickstart cohort, labels on every
    # training case, seed 0: 0.618 mAP@10 without private blocks at 200 steps, 0.463 with 8
    # per modality at 300 steps)
    "labels10": {"data.label_fraction": 0.1, "objective.supcon_weight": 5000.0, "model.private_dim": 0},
    "labels20": {"data.label_fraction": 0.2, "objective.supcon_weight": 5000.0, "model.private_dim": 0},
    "labels100": {"data.label_fraction": 1.0, "objective.supcon_weight": 5000.0, "model.private_dim": 0},
}
VAE_METHODS = ("vae", "late_fusion")
BASELINES = tuple(baselines.BASELINES)     # in the order of the report tables


@dataclasses.dataclass(frozen=True)
class Cell:
    method: str                       # 'vae' | 'late_fusion' | a baseline name
    train_subset: tuple[str, ...]     # modalities the method is trained on / uses
    fusion: str = "poe"
    objective: str = "default"
    seed: int = 0

    @property
    def id(self) -> str:
        if self.method in VAE_METHODS:
            return f"{self.method}-{self.fusion}-{self.objective}-{'+'.join(self.train_subset)}-s{self.seed}"
        return f"{self.method}-{'+'.join(self.train_subset)}-s{self.seed}"

    def columns(self) -> dict:
        vae = self.method in VAE_METHODS
        return {"cell": self.id, "method": self.method, "fusion": self.fusion if vae else "",
                "objective": self.objective if vae else "", "train_subset": "+".join(self.train_subset),
                "seed": self.seed}


def all_modalities(config) -> list[str]:
    """The cohort's modalities in model order: images, report, clinical."""
    mods = list(config.data.image_modalities)
    if config.data.report:
        mods.append("report")
    if list(config.data.clinical.numeric) or dict(config.data.clinical.categorical):
        mods.append("clinical")
    return mods


def nonempty_subsets(modalities: Sequence[str]) -> list[tuple[str, ...]]:
    """Every non-empty subset, in model order, smallest first."""
    return [tuple(c) for r in range(1, len(modalities) + 1) for c in itertools.combinations(modalities, r)]


def restrict(config, subset: Sequence[str]):
    """A copy of ``config`` that uses only the modalities of ``subset``."""
    c = config.copy_and_resolve_references() if hasattr(config, "copy_and_resolve_references") else config
    with c.unlocked():
        c.data.image_modalities = [m for m in config.data.image_modalities if m in subset]
        c.data.report = bool(config.data.report) and "report" in subset
        if "clinical" not in subset:
            c.data.clinical.numeric = []
            c.data.clinical.categorical = {}
        c.data.extra_modalities = "ignore"
    return c


def apply_overrides(config, overrides: dict):
    with config.unlocked():
        for key, value in overrides.items():
            node = config
            *parents, leaf = key.split(".")
            for p in parents:
                node = node[p]
            node[leaf] = value
    return config


def cell_config(base, cell: Cell, manifest: str, cache_dir: str):
    if cell.objective not in OBJECTIVES:
        raise ConfigError(f"unknown objective variant {cell.objective!r}; known: {sorted(OBJECTIVES)}")
    c = restrict(base, cell.train_subset)
    apply_overrides(c, OBJECTIVES[cell.objective])
    with c.unlocked():
        c.model.fusion = cell.fusion
        if cell.fusion != "poe" and int(c.model.get("private_dim", 0)) > 0:
            c.model.private_dim = 0      # private blocks are a PoE construction (ModelSpec.validate)
        c.seed = int(cell.seed)
        c.data.manifest = manifest
        c.data.cache_dir = cache_dir
    return c


# --------------------------------------------------------------------------- context
@dataclasses.dataclass
class GridContext:
    """What every cell of a grid shares."""
    config_path: str
    overrides: list[str]
    out: Path
    label: str                        # retrieval label; several comma-separated, e.g. "grade,volume"
    k: int = 10
    baseline_steps: int = 0           # 0: each baseline's default
    queries: str = "held_out"         # 'held_out': the training split's held-out cases;
                                      # 'all': every case queries the rest (leave-one-out; for
                                      # cohorts too small to hold cases out; baselines fit on all)
    hybrid: bool = False              # also evaluate each VAE cell's hybrid rankings (legs, fused,
                                      # fitted, simulated feedback; :func:`hybrid_rows`); added to
                                      # finished cells from their saved embeddings, no retraining

    @property
    def labels(self) -> list[str]:
        return [x.strip() for x in str(self.label).split(",") if x.strip()]

    def base_config(self):
        return load_config(self.config_path, list(self.overrides))

    def prepare(self, show_progress: bool = False) -> str:
        """Synthesise the cohort when the config asks for one; return the manifest path."""
        base = self.base_config()
        if base.data.manifest:
            return str(base.data.manifest)
        return str(synthesize(base, self.out / "data", show_progress=show_progress))

    def cell_dir(self, cell: Cell) -> Path:
        return self.out / "cells" / cell.id


def _read_result(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _split(ctx: GridContext, n: int, config) -> tuple[np.ndarray, np.ndarray]:
    """``(fit_idx, query_idx)`` of a cohort of ``n`` cases under the grid's query mode."""
    if ctx.queries == "all":
        return np.arange(n), np.arange(n)
    if ctx.queries != "held_out":
        raise ConfigError(f"queries must be 'held_out' or 'all', got {ctx.queries!r}")
    return held_out(n, config)


def _index_of(case_ids: Sequence[str], wanted: Sequence[str]) -> np.ndarray:
    pos = {c: i for i, c in enumerate(case_ids)}
    return np.asarray(sorted(pos[c] for c in wanted if c in pos), int)


def _train_vae(config, workdir: Path):
    """Train (or resume) a VAE run and embed its whole cohort → ``Embeddings``."""
    emb_path = workdir / "embeddings.npz"
    kind, standardize = embedding_kind(config), bool(config.retrieval.standardize)
    if emb_path.exists() and (workdir / "train_done.json").exists():
        emb = Embeddings.load(emb_path)
        if emb.embedding != kind:     # a retrieval option: the saved experts suffice, no retraining
            emb = emb.as_embedding(kind)
            emb = emb.standardized() if standardize else emb
            emb.save(emb_path)        # the cell's file holds what it was evaluated with
        return emb, json.loads((workdir / "train_done.json").read_text())
    summary = train_and_evaluate(config, workdir, show_progress=False)
    emb = embed_run(workdir, config.data.manifest, out=emb_path, show_progress=False).embeddings
    info = {"train_seconds": summary.get("train_seconds"), "steps": summary.get("step"),
            "compile_seconds": summary.get("compile_seconds")}
    atomic_write_text(workdir / "train_done.json", json.dumps(info))
    return emb, info


def run_cell(ctx: GridContext, cell: Cell, manifest: str) -> dict:
    """Run one cell (no skipping; see :func:`run_grid`) → its result dict."""
    base = ctx.base_config()
    wd = ctx.cell_dir(cell)
    wd.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    # The split of the full cohort, by case id: a cell whose modalities leave some cases out
    # has fewer cases, and a split recomputed over those would differ (and could fit a
    # baseline on query cases).
    fit_ids, query_ids = _query_split(ctx, manifest)
    info: dict = {}
    if cell.method == "vae":
        emb, info = _train_vae(cell_config(base, cell, manifest, str(ctx.out / "cache")), wd)
    elif cell.method == "late_fusion":
        emb = _late_fusion(ctx, base, cell, manifest)
    elif cell.method in BASELINES:
        cfg = cell_config(base, Cell("vae", cell.train_subset, seed=cell.seed), manifest, str(ctx.out / "cache"))
        cohort, _, _ = load_cohort(cfg, wd, manifest, show_progress=False,
                                   features=True if cell.method == "pretrained" else None)
        train_idx = _index_of(cohort.case_ids, fit_ids)
        kwargs = {"steps": ctx.baseline_steps} if ctx.baseline_steps else {}
        emb = run_baseline(cell.method, cohort, train_idx, cfg, label=ctx.labels[0], seed=cell.seed, **kwargs)
    else:
        raise ConfigError(f"unknown method {cell.method!r}; known: {VAE_METHODS + BASELINES}")
    q_idx = _index_of(emb.case_ids, query_ids)                 # into this cell's case order
    tidy = []
    for label in ctx.labels:
        rows = evaluate(emb, label, ctx.k, query_idx=q_idx, seed=cell.seed)
        tidy += protocol.tidy(rows, ctx.k, **cell.columns(), label=label)
    result = {"status": "ok", **cell.columns(), "seconds": time.time() - t0, "train": info, "rows": tidy}
    if ctx.hybrid and cell.method == "vae":
        result.update(_hybrid_or_error(ctx, cell, emb, manifest, fit_ids, query_ids))
    return result


def _hybrid_or_error(ctx: GridContext, cell: Cell, emb, manifest: str, fit_ids, query_ids) -> dict:
    """``{'hybrid': rows}``, or ``{'hybrid_error': message}`` when they cannot be evaluated (a
    report the loader cannot read, ...): the cell's vector rows stand either way."""
    try:
        return {"hybrid": hybrid_rows(ctx, cell, emb, manifest, fit_ids, query_ids)}
    except Exception as e:         # an extra evaluation must not fail the cell it describes
        return {"hybrid_error": f"{type(e).__name__}: {e}"}


def _query_split(ctx: GridContext, manifest: str) -> tuple[list[str], list[str]]:
    """``(fit_ids, query_ids)`` of the full cohort under the grid's query mode (by case id)."""
    base = ctx.base_config()
    full_cfg = cell_config(base, Cell("vae", tuple(all_modalities(base))), manifest, str(ctx.out / "cache"))
    full_ids = [c.case_id for c in group_cases(read_manifest(manifest))]
    fit, q = _split(ctx, len(full_ids), full_cfg)
    return [full_ids[i] for i in fit], [full_ids[i] for i in q]


def hybrid_rows(ctx: GridContext, cell: Cell, emb, manifest: str, fit_ids, query_ids) -> list[dict]:
    """The hybrid rankings of a VAE cell for every label
    (:func:`mmvae.retrieval.hybrid.evaluate.evaluate_hybrid`): the cell's embeddings as an index
    (one dense leg per expert block, or the fused posterior), plus BM25 on the report when the
    cell was trained with it; fitted weights fitted on the training split's cases (``held_out``)
    or by 5-fold cross-validation (``all``); the same queries as the cell's vector rows."""
    from mmvae.retrieval.hybrid.evaluate import evaluate_hybrid
    from mmvae.retrieval.pipeline import index_embeddings, manifest_reports
    reports = manifest_reports(manifest, emb.case_ids) if "report" in cell.train_subset else None
    ix = index_embeddings(emb, reports=reports)
    out = []
    for label in ctx.labels:
        if sum(str(lab.get(label, "")) != "" for lab in emb.labels) < 2:
            continue                 # no retrieval for this label (the vector rows have none either)
        rows, fit = evaluate_hybrid(ix, label, k=ctx.k, queries=query_ids,    # the split's parts are disjoint
                                    fit_cases=fit_ids if ctx.queries == "held_out" else None, seed=cell.seed)
        out += [dict(cell.columns(), label=label, fitted_on=fit["fitted_on"],
                     weights=json.dumps(fit["weights"], sort_keys=True), **r) for r in rows]
    return out


def _add_hybrid(ctx: GridContext, cell: Cell, manifest: str, result: dict) -> dict:
    """A finished VAE cell without hybrid rows: evaluate them from its saved embeddings."""
    emb_path = ctx.cell_dir(cell) / "embeddings.npz"
    result = {k: v for k, v in result.items() if k != "hybrid_error"}
    if not emb_path.is_file():
        result["hybrid_error"] = f"no saved embeddings at {emb_path}: rerun the cell to evaluate its hybrid rankings"
    else:
        fit_ids, query_ids = _query_split(ctx, manifest)
        result.update(_hybrid_or_error(ctx, cell, Embeddings.load(emb_path), manifest, fit_ids, query_ids))
    atomic_write_text(ctx.cell_dir(cell) / "result.json", json.dumps(result, indent=1))
    return result


def _late_fusion(ctx: GridContext, base, cell: Cell, manifest: str):
    """Baseline 4: one VAE per modality of the cell, each embedding L2-normalised and concatenated."""
    embs = []
    for m in cell.train_subset:
        uni = Cell("vae", (m,), cell.fusion, cell.objective, cell.seed)
        wd = ctx.cell_dir(uni)        # shared with the grid's own unimodal cell, if any
        emb, _ = _train_vae(cell_config(base, uni, manifest, str(ctx.out / "cache")), wd)
        embs.append(emb)
    ids = embs[0].case_ids
    for e in embs[1:]:
        if e.case_ids != ids:
            raise ConfigError("unimodal runs embedded different cohorts; cannot fuse them late")
    blocks = np.stack([e.mu for e in embs], 1)                                  # (N, M, L)
    present = np.concatenate([e.present for e in embs], 1)                      # (N, M)
    return BlockEmbeddings(list(ids), list(cell.train_subset), blocks, present, list(embs[0].labels))


def _run_and_record(ctx: GridContext, cell: Cell, manifest: str) -> dict:
    path = ctx.cell_dir(cell) / "result.json"
    try:
        result = run_cell(ctx, cell, manifest)
    except Exception as e:   # a failed cell is recorded and the grid goes on
        result = {"status": "failed", **cell.columns(), "error": f"{type(e).__name__}: {e}",
                  "traceback": traceback.format_exc(limit=20)}
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(result, indent=1))
    return result


def _worker(ctx_dict: dict, cell_dict: dict, manifest: str) -> dict:
    ctx = GridContext(**{**ctx_dict, "out": Path(ctx_dict["out"])})
    cell = Cell(**{**cell_dict, "train_subset": tuple(cell_dict["train_subset"])})
    return _run_and_record(ctx, cell, manifest)


def check_settings(ctx: GridContext) -> None:
    """Record the settings that decide a cell's result in ``<out>/grid.json``; refuse to
    resume a grid folder made with other settings (its finished cells would be reused)."""
    import hashlib
    resolved = hashlib.sha256(to_json(ctx.base_config()).encode()).hexdigest()[:16]
    settings = {"config": str(Path(ctx.config_path).resolve()), "overrides": list(ctx.overrides),
                "resolved_config": resolved,
                "label": ctx.labels, "k": int(ctx.k), "queries": ctx.queries, "baseline_steps": int(ctx.baseline_steps)}
    path = ctx.out / "grid.json"
    prev = _read_result(path)
    if prev is not None and prev != settings:
        diff = {k: (prev.get(k), v) for k, v in settings.items() if prev.get(k) != v}
        raise ConfigError(f"{ctx.out} holds a grid run with other settings {diff} (before, now); "
                          "finished cells would be reused: choose another --out")
    if prev is None:
        ctx.out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(settings, indent=1))


def run_grid(ctx: GridContext, cells: Iterable[Cell], *, jobs: int = 1, retry_failed: bool = False,
             log=print) -> list[dict]:
    """Run every unfinished cell; return the results of all cells (finished before or now)."""
    cells = list(dict.fromkeys(cells))
    if ctx.queries == "all":
        labelled = [c.id for c in cells if c.method in VAE_METHODS
                    and float(OBJECTIVES.get(c.objective, {}).get("data.label_fraction", 0.0)) > 0]
        if labelled or float(ctx.base_config().data.get("label_fraction", 0.0)) > 0:
            raise ConfigError(f"cells {labelled or 'of this config'} train with labels, but every case is a query "
                              "(--queries all): the queries' own labels would be in training")
    check_settings(ctx)
    manifest = ctx.prepare()
    todo, results = [], {}
    for cell in cells:
        prev = _read_result(ctx.cell_dir(cell) / "result.json")
        if prev and (prev.get("status") == "ok" or (prev.get("status") == "failed" and not retry_failed)):
            if (ctx.hybrid and cell.method == "vae" and prev["status"] == "ok" and "hybrid" not in prev
                    and ("hybrid_error" not in prev or retry_failed)):
                prev = _add_hybrid(ctx, cell, manifest, prev)
            if prev.get("hybrid_error"):
                log(f"  {cell.id}: hybrid rankings not evaluated: {prev['hybrid_error']}")
            results[cell.id] = prev
        else:
            todo.append(cell)
    log(f"grid: {len(cells)} cells, {len(cells) - len(todo)} finished before, {len(todo)} to run")

    def report(cell, r):
        results[cell.id] = r
        msg = f"{r.get('seconds', 0):.0f}s" if r["status"] == "ok" else r["error"]
        log(f"  [{len(results)}/{len(cells)}] {cell.id}: {r['status']} ({msg})")

    if jobs <= 1:
        for cell in todo:
            report(cell, _run_and_record(ctx, cell, manifest))
    else:
        ctx_dict = dict(dataclasses.asdict(ctx), out=str(ctx.out))
        with cf.ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = {pool.submit(_worker, ctx_dict, dataclasses.asdict(c), manifest): c for c in todo}
            for fut in cf.as_completed(futures):
                cell = futures[fut]
                try:
                    r = fut.result()
                except Exception as e:   # the worker process died
                    r = {"status": "failed", **cell.columns(), "error": f"worker died: {type(e).__name__}: {e}"}
                    atomic_write_text(ctx.cell_dir(cell) / "result.json", json.dumps(r))
                report(cell, r)
    return [results[c.id] for c in cells]


# --------------------------------------------------------------------------- outputs
def tidy_rows(results: Sequence[dict], default_label: str = "") -> list[dict]:
    """All metric rows of the ok cells, plus one row per failed cell (``status``, ``error``).

    Rows recorded without a ``label`` (one-label grids) get ``default_label``.
    """
    out = []
    for r in results:
        if r["status"] == "ok":
            out.extend(dict({"label": default_label}, **row, status="ok", error="") for row in r["rows"])
        else:
            cols = {k: r.get(k, "") for k in ("cell", "method", "fusion", "objective", "train_subset", "seed")}
            out.append(dict(cols, label="", query="", num_queries=0, metric="", value="", lo="", hi="",
                            status="failed", error=r.get("error", "")))
    return out


CSV_COLUMNS = ("cell", "method", "fusion", "objective", "train_subset", "seed", "label", "query", "num_queries",
               "metric", "value", "lo", "hi", "status", "error")


def write_csv(rows: Sequence[dict], path: Path) -> Path:
    import csv
    import io
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, extrasaction="ignore")
    w.writeheader()
    w.writerows(rows)
    return atomic_write_text(path, buf.getvalue())


def summarise(rows: Sequence[dict], metric: str = "map@10", label: str | None = None) -> list[dict]:
    """Mean ± sd over seeds of ``metric`` per (method, fusion, objective, train subset, query).

    ``label``: only the rows of that retrieval label (default: every row, which suits a
    grid with one label).

    Each entry: the group's columns, ``mean``, ``sd`` (0 for one seed), ``n_seeds``,
    ``lo``/``hi`` (mean of the per-seed bootstrap CI bounds) and ``num_queries``.
    """
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        if r.get("status") == "ok" and r["metric"] == metric and (label is None or r.get("label") == label):
            key = (r["method"], r["fusion"], r["objective"], r["train_subset"], r["query"])
            groups.setdefault(key, []).append(r)
    out = []
    for key, rs in groups.items():
        v = np.asarray([float(r["value"]) for r in rs])
        out.append({"label": rs[0].get("label", ""), "method": key[0], "fusion": key[1], "objective": key[2], "train_subset": key[3],
                    "query": key[4], "mean": float(v.mean()), "sd": float(v.std(ddof=1)) if len(v) > 1 else 0.0,
                    "n_seeds": len(v), "lo": float(np.mean([float(r["lo"]) for r in rs])),
                    "hi": float(np.mean([float(r["hi"]) for r in rs])),
                    "num_queries": int(rs[0]["num_queries"])})
    return out


def method_label(s: dict) -> str:
    if s["method"] in VAE_METHODS:
        return f"{s['method']} {s['fusion']} {s['objective']} [{s['train_subset']}]"
    return f"{s['method']} [{s['train_subset']}]"


def markdown(summary: Sequence[dict], queries: Sequence[str], metric: str = "map@10", *,
             show_queries: bool = False) -> str:
    """One row per method; one column per query subset: ``mean ± sd`` (or ``mean`` for one seed).

    ``show_queries``: each column's header gives the number of queries (the most any method
    had): on a cohort where few cases have every modality a column can rest on a handful."""
    by_method: dict[str, dict] = {}
    n_q: dict[str, int] = {}
    for s in summary:
        by_method.setdefault(method_label(s), {})[s["query"]] = s
        n_q[s["query"]] = max(n_q.get(s["query"], 0), int(s.get("num_queries", 0)))
    names = [f"{q} (n={n_q.get(q, 0)})" for q in queries] if show_queries else list(queries)
    head = f"| method ({metric}, mean ± sd over seeds) | " + " | ".join(names) + " |\n"
    head += "|---|" + "---:|" * len(queries) + "\n"
    lines = []
    for name, qs in by_method.items():
        cells = []
        for q in queries:
            s = qs.get(q)
            cells.append("–" if s is None else (f"{s['mean']:.3f} ± {s['sd']:.3f}" if s["n_seeds"] > 1
                                                 else f"{s['mean']:.3f}"))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return head + "\n".join(lines) + "\n"


def heatmaps(summary: Sequence[dict], modalities: Sequence[str], out_dir: Path, metric: str = "map@10",
             tag: str = "") -> list[Path]:
    """One PNG per (fusion, objective) of VAE cells: training subset (rows) × query subset (columns).

    Files: ``heatmap_[<tag>_]<fusion>_<objective>.png``; cells hold the mean over seeds.
    """
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    paths = []
    subsets = ["+".join(s) for s in nonempty_subsets(modalities)]
    for fusion, objective in sorted({(s["fusion"], s["objective"]) for s in summary if s["method"] == "vae"}):
        rows_s = [s for s in summary if s["method"] == "vae" and s["fusion"] == fusion and s["objective"] == objective]
        trains = [t for t in subsets if any(s["train_subset"] == t for s in rows_s)]
        queries = [q for q in subsets if any(s["query"] == q for s in rows_s)]
        grid = np.full((len(trains), len(queries)), np.nan)
        for s in rows_s:
            grid[trains.index(s["train_subset"]), queries.index(s["query"])] = s["mean"]
        fig, ax = plt.subplots(figsize=(1.0 + 0.45 * len(queries), 1.2 + 0.35 * len(trains)))
        im = ax.imshow(np.ma.masked_invalid(grid), vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
        ax.set_xticks(range(len(queries)), queries, rotation=75, ha="right", fontsize=7)
        ax.set_yticks(range(len(trains)), trains, fontsize=7)
        ax.set_xlabel("query subset")
        ax.set_ylabel("training subset")
        ax.set_title(f"{metric}{' (' + tag + ')' if tag else ''}: {fusion}, {objective}", fontsize=9)
        for i, j in zip(*np.nonzero(np.isfinite(grid))):
            ax.text(j, i, f"{grid[i, j]:.2f}", ha="center", va="center", fontsize=5,
                    color="white" if grid[i, j] < 0.5 else "black")
        fig.colorbar(im, ax=ax, fraction=0.03)
        path = out_dir / f"heatmap_{tag + '_' if tag else ''}{fusion}_{objective}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp.png")
        fig.savefig(tmp, dpi=120, bbox_inches="tight")
        plt.close(fig)
        tmp.replace(path)
        paths.append(path)
    return paths


def write_outputs(results: Sequence[dict], modalities: Sequence[str], out: Path, metric: str = "map@10",
                  labels: Sequence[str] = ()) -> dict:
    """results.csv (tidy), results.md (a table per label + failures), summary.json and heat maps.

    With several labels, each gets its own table and heat maps (``heatmap_<label>_...``).
    """
    rows = tidy_rows(results, default_label=labels[0] if labels else "")
    write_csv(rows, out / "results.csv")
    labels = list(labels) or sorted({r["label"] for r in rows if r["status"] == "ok"})
    md, summary, figs = "", [], []
    for label in labels:
        s_label = summarise(rows, metric, label)
        queries = [q for q in ("+".join(s) for s in nonempty_subsets(modalities)) if any(s["query"] == q for s in s_label)]
        if len(labels) > 1:
            md += f"\n### Label `{label}`\n\n"
        md += markdown(s_label, queries, metric)
        figs += heatmaps(s_label, modalities, out, metric, tag=label if len(labels) > 1 else "")
        summary += s_label
    failed = [r for r in results if r["status"] != "ok"]
    if failed:
        md += "\nFailed cells:\n\n" + "\n".join(f"- `{r['cell']}`: {r.get('error', '')}" for r in failed) + "\n"
    atomic_write_text(out / "results.md", md)
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=1))
    written = {"csv": out / "results.csv", "markdown": out / "results.md", "heatmaps": figs, "summary": summary}
    hybrid = [row for r in results if r["status"] == "ok" for row in r.get("hybrid", [])]
    missing = [(r["cell"], r["hybrid_error"]) for r in results if r["status"] == "ok" and r.get("hybrid_error")]
    if hybrid or missing:
        written.update(write_hybrid(hybrid, out, missing))
    return written


HYBRID_COLUMNS = ("cell", "method", "fusion", "objective", "train_subset", "seed", "label", "ranking", "num_queries",
                  "metric", "value", "lo", "hi", "fitted_on", "weights")
HYBRID_KEYS = ("label", "method", "fusion", "objective", "train_subset")


def hybrid_markdown(summary: Sequence[dict]) -> str:
    """One table per (label, VAE cell group) of :func:`write_hybrid`'s summary."""
    from mmvae.retrieval.hybrid.evaluate import markdown_table
    groups: dict = {}
    for s in summary:
        groups.setdefault(tuple(s[k] for k in HYBRID_KEYS), []).append(s)
    md = ""
    for key, rows in groups.items():
        md += f"\n#### Hybrid rankings: {method_label(dict(zip(HYBRID_KEYS, key)))}, label `{key[0]}`\n\n"
        md += markdown_table(rows, rows[0].get("fitted_on", ""), spread=True) + "\n"
    return md


def write_hybrid(rows: Sequence[dict], out: Path, missing: Sequence[tuple[str, str]] = ()) -> dict:
    """hybrid.csv (one row per cell × label × ranking), hybrid.md (mean ± sd over seeds; the
    ``missing`` cells, whose hybrid rankings could not be evaluated, listed with why) and
    hybrid_summary.json."""
    import csv
    import io
    from mmvae.retrieval.hybrid.evaluate import summarize
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=HYBRID_COLUMNS, extrasaction="ignore")
    w.writeheader()
    w.writerows(rows)
    atomic_write_text(out / "hybrid.csv", buf.getvalue())
    summary = summarize(rows, HYBRID_KEYS)
    fitted_on = {tuple(r[k] for k in HYBRID_KEYS): r.get("fitted_on", "") for r in rows}
    for s in summary:
        s["fitted_on"] = fitted_on[tuple(s[k] for k in HYBRID_KEYS)]
    md = hybrid_markdown(summary)
    if missing:
        md += "\nHybrid rankings not evaluated:\n\n" + "\n".join(f"- `{c}`: {e}" for c, e in missing) + "\n"
    atomic_write_text(out / "hybrid.md", md)
    atomic_write_text(out / "hybrid_summary.json", json.dumps(summary, indent=1))
    return {"hybrid_csv": out / "hybrid.csv", "hybrid_markdown": out / "hybrid.md", "hybrid_summary": summary}


# --------------------------------------------------------------------------- cells of a grid
def training_subsets(spec: str, modalities: list[str]) -> list[tuple[str, ...]]:
    """The training subsets named by ``--train-subsets``: a comma list of ``full``, ``drop-one``,
    ``singletons``, ``all`` or ``a+b`` modality sets; duplicates dropped, order kept."""
    from mmvae.errors import MmvaeError
    out: list[tuple[str, ...]] = []
    for part in [p.strip() for p in spec.split(",") if p.strip()]:
        if part == "full":
            out.append(tuple(modalities))
        elif part == "drop-one":
            out += [tuple(m for m in modalities if m != d) for d in modalities] if len(modalities) > 1 else []
        elif part == "singletons":
            out += [(m,) for m in modalities]
        elif part == "all":
            out += nonempty_subsets(modalities)
        else:
            names = part.split("+")
            unknown = [n for n in names if n not in modalities]
            if unknown:
                raise MmvaeError(f"--train-subsets: unknown modality {unknown} in {part!r}; known: {modalities}")
            out.append(tuple(m for m in modalities if m in names))
    return list(dict.fromkeys(out))


def build_cells(modalities, train_subsets, fusions, objectives, seeds, baselines) -> list[Cell]:
    """VAE cells (seed × fusion × objective × training subset), then each seed's baselines on the
    modalities each one reads (late fusion: first fusion only)."""
    images = tuple(m for m in modalities if m not in ("report", "clinical"))
    cells = [Cell("vae", t, f, o, s) for s in seeds for f in fusions for o in objectives for t in train_subsets]
    for s in seeds:
        for b in baselines:
            if b == "late_fusion":
                cells += [Cell("late_fusion", tuple(modalities), f, objectives[0], s) for f in fusions[:1]]
            elif b in ("raw_pca", "handcrafted"):
                cells.append(Cell(b, images, seed=s))
            elif b in ("report_minilm", "report_tfidf"):
                cells.append(Cell(b, ("report",), seed=s))
            elif b in ("logreg_tfidf", "pretrained"):   # image features + report; no clinical block
                cells.append(Cell(b, images + (("report",) if "report" in modalities else ()), seed=s))
            else:
                cells.append(Cell(b, tuple(modalities), seed=s))
    return cells
