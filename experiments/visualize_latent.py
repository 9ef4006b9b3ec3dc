"""Latent-space figures of a trained run, gathered in one self-contained HTML page.

    python experiments/visualize_latent.py --workdir RUN [--out DIR] [--label class]
        [--cases 3] [--seed 0] [--methods pca,tsne,umap] [--sigma 1]

Loads the run (``mmvae train`` / ``mmvae quickstart`` work dir: config, newest intact
checkpoint, tokenizer), prepares its cohort (``data.manifest`` of the run's config,
the run's preprocessing cache), embeds every case and writes into ``--out``
(default ``RUN/figures``):

* ``projection_pca.png``, ``projection_tsne.png``, ``projection_umap.png`` (UMAP only
  when ``umap`` is importable; the page says when it was skipped) — the fused posterior
  means of every case, colour = label, marker = modalities present;
* ``posteriors.png`` — for ``--cases`` sampled cases with ≥ 2 modalities: each unimodal
  expert and the joint posterior in the PCA plane with ``--sigma``-σ ellipses of
  ``Σ₂ = W diag(σ²) Wᵀ`` (1-σ by default), expert means joined to the joint mean;
* ``trajectory.png`` — one case (most modalities; seeded choice among ties) as its
  modalities are added one by one in model order, ellipses shrinking (under PoE);
* ``generation_NN_<case>.png`` — per sampled case: rows = image sequences (middle axial
  slice); columns = input, decoded from all present modalities, from each single
  modality, and from all but the row's own sequence (true cross-modal synthesis);
* ``projections.npz`` (case ids, labels, modality patterns, PCA/t-SNE/UMAP coordinates
  — one row per case — and the PCA basis), ``posteriors.json``, ``trajectory.json``;
* ``index.html`` — every PNG above as a base64 data URI, per-class and per-pattern
  counts, the top report terms predicted from the images alone next to the true report,
  and the run's ``retrieval.csv`` (or ``retrieval.md``) if present.

Every file is written atomically; the result is deterministic given ``--seed``.
Figures of an earlier run in ``--out`` that this run did not produce (e.g. a UMAP panel)
are removed so the page and the folder agree. A missing run dir, config or checkpoint
exits with status 2 and one line on stderr.
"""
from __future__ import annotations

import argparse
import csv
import html
import json
import re
import sys
import time
from pathlib import Path

import numpy as np

PROG = "visualize_latent"
METHODS = ("pca", "tsne", "umap")
OWN_PNG = re.compile(r"^(projection_(pca|tsne|umap)|posteriors|trajectory|generation_\d+_.*)\.png$")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", required=True, help="trained run directory (mmvae train / quickstart)")
    p.add_argument("--out", default=None, help="output folder (default: WORKDIR/figures)")
    p.add_argument("--label", default=None, help="label to colour by (default: the run's data.label)")
    p.add_argument("--cases", type=int, default=3, help="cases for the posterior and generation figures")
    p.add_argument("--seed", type=int, default=0, help="seed of the case sample and of t-SNE/UMAP")
    p.add_argument("--methods", default="pca,tsne,umap", help="comma list of projections: pca, tsne, umap")
    p.add_argument("--sigma", type=float, default=1.0, help="ellipse radius in standard deviations (1 or 2)")
    p.add_argument("--top-terms", type=int, default=10, help="report terms listed per case")
    p.add_argument("--verbose", action="store_true", help="progress bars and timings")
    return p


def main(argv: list[str] | None = None) -> int:
    from mmvae.errors import MmvaeError
    args = build_parser().parse_args(argv)
    try:
        summary = run(args)
    except MmvaeError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    print(f"{PROG}: {len(summary['png'])} figures -> {summary['html']}")
    return 0


# ------------------------------------------------------------------------------ helpers
def _check_args(args):
    from mmvae.errors import ConfigError, InputError
    wd = Path(args.workdir)
    if not wd.is_dir():
        raise InputError("run directory not found", path=str(wd))
    methods = [m.strip().lower() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in methods if m not in METHODS]
    if bad or not methods:
        raise ConfigError(f"--methods: unknown projection {bad or args.methods!r}; choose from {list(METHODS)}")
    if args.cases < 1:
        raise ConfigError(f"--cases must be >= 1, got {args.cases}")
    if not args.sigma > 0:
        raise ConfigError(f"--sigma must be > 0, got {args.sigma}")
    return wd, methods


def _save_json(path: Path, obj) -> None:
    from mmvae.atomic import atomic_write_text
    atomic_write_text(path, json.dumps(obj, indent=1))


def _save_npz(path: Path, **arrays) -> None:
    from mmvae.atomic import atomic_path
    with atomic_path(path, suffix=".npz") as tmp:
        np.savez(tmp, **arrays)


class JittedModel:
    """The ``spec``, ``encode`` and ``decode`` of a model, each jitted once for fixed
    shapes: what :func:`mmvae.models.generate.generate` and ``top_report_terms`` call, so
    every generation condition reuses one compiled encoder and decoder instead of
    running the network eagerly."""

    def __init__(self, model):
        import jax
        from flax import nnx
        graphdef, self._state = nnx.split(model)
        self.spec = model.spec
        self._encode = jax.jit(lambda st, batch: nnx.merge(graphdef, st).encode(batch))
        self._decode = jax.jit(lambda st, z: nnx.merge(graphdef, st).decode(z))

    def encode(self, batch):
        return self._encode(self._state, batch)

    def decode(self, z):
        return self._decode(self._state, z)


def _words(text: str | None) -> set[str]:
    return set(re.findall(r"[a-z0-9]+", (text or "").lower()))


def _retrieval_section(wd: Path) -> str:
    from mmvae.experiments.figures import html_table
    csv_path, md_path = wd / "retrieval.csv", wd / "retrieval.md"
    if csv_path.is_file():
        rows = list(csv.DictReader(open(csv_path, newline="")))
        cols = [c for c in (rows[0].keys() if rows else []) if not c.endswith(("_lo", "_hi"))]
        return (f"<h2>Retrieval ({html.escape(csv_path.name)})</h2><p class=\"note\">from {html.escape(str(csv_path))}; "
                f"95% bootstrap intervals are in the CSV.</p>" + html_table(rows, cols))
    if md_path.is_file():
        return f"<h2>Retrieval ({html.escape(md_path.name)})</h2><pre>{html.escape(md_path.read_text())}</pre>"
    return "<h2>Retrieval</h2><p class=\"note\">no retrieval.csv or retrieval.md in the run directory.</p>"


# ------------------------------------------------------------------------------ main work
def run(args) -> dict:
    wd, methods = _check_args(args)
    out = Path(args.out) if args.out else wd / "figures"
    t0 = time.time()
    log = (lambda s: print(f"[{time.time() - t0:5.1f}s] {s}", file=sys.stderr)) if args.verbose else (lambda s: None)

    from mmvae.errors import ConfigError, InputError
    from mmvae.experiments import figures as FG
    from mmvae.models.generate import generate, top_report_terms
    from mmvae.retrieval.embed import apply_standardize, embed_cohort, fused
    from mmvae.runs.trained import load_cohort, load_trained

    config, spec, model, tok, step = load_trained(wd, return_step=True)
    stats_path = wd / "clinical_stats.json"
    stats = json.loads(stats_path.read_text()) if stats_path.is_file() else None
    if not config.data.manifest:
        raise ConfigError(f"{wd}/config.json has no data.manifest: cannot find the run's cohort")
    cohort, _, _ = load_cohort(config, wd, tokenizer=tok, clinical_stats=stats, show_progress=args.verbose)
    if len(cohort) == 0:
        raise InputError("the run's cohort has no usable case", path=str(config.data.manifest))
    emb = embed_cohort(model, cohort, show_progress=args.verbose)
    log(f"embedded {len(cohort)} cases")

    label_name = args.label or str(config.data.label)
    if any(lab for lab in emb.labels) and not any(label_name in lab for lab in emb.labels):
        known = sorted({k for lab in emb.labels for k in lab})
        raise ConfigError(f"no case has label {label_name!r}; known labels: {known}")
    labels = [str(lab.get(label_name, "")) or FG.NO_LABEL for lab in emb.labels]
    mods = list(emb.modalities)
    patterns = [FG.presence_key(p, mods) for p in emb.present]
    rng = np.random.default_rng(args.seed)
    n = len(emb.case_ids)
    k_sigma = float(args.sigma)
    written: list[Path] = []
    png_bytes: dict[str, bytes] = {}
    notes: list[str] = []

    def save_fig(fig, name):
        png_bytes[name] = FG.save_png(fig, out / name)
        written.append(out / name)

    # 1. projections -----------------------------------------------------------------------
    X = np.asarray(emb.mu, np.float64)
    basis = FG.pca_basis(X)
    coords = {"pca": FG.project_pca(X, basis)}
    if "tsne" in methods:
        c = FG.tsne_2d(X, seed=args.seed)
        if c is None:
            notes.append(f"t-SNE skipped: only {n} cases.")
        else:
            coords["tsne"] = c
    if "umap" in methods:
        c, why = FG.umap_2d(X, seed=args.seed)
        if c is None:
            notes.append(f"UMAP skipped: {why}.")
        else:
            coords["umap"] = c
    titles = {"pca": "PCA", "tsne": "t-SNE", "umap": "UMAP"}
    for m in methods:
        if m in coords:
            axes = tuple(FG._pca_axis_names(basis)) if m == "pca" else (f"{titles[m]} 1", f"{titles[m]} 2")
            save_fig(FG.plot_projection(coords[m], labels, patterns, axis_names=axes, label_name=label_name,
                                        title=f"{titles[m]} of the fused posterior means ({n} cases, "
                                              f"{spec.fusion}, latent {spec.embedding_dim})"),
                     f"projection_{m}.png")
    _save_npz(out / "projections.npz", case_ids=np.asarray(emb.case_ids, str), labels=np.asarray(labels, str),
              patterns=np.asarray(patterns, str), modalities=np.asarray(mods, str),
              present=np.asarray(emb.present, np.float32),
              pca_center=basis.center, pca_components=basis.W, pca_explained=basis.explained,
              **{m: np.asarray(c, np.float64) for m, c in coords.items()})
    written.append(out / "projections.npz")
    log(f"projections: {sorted(coords)}")

    # 2. unimodal vs joint posteriors of sampled cases ------------------------------------
    counts = emb.present.sum(1)
    candidates = np.nonzero(counts >= 2)[0]
    sample = np.sort(rng.choice(candidates, size=min(args.cases, len(candidates)), replace=False)) \
        if len(candidates) else np.zeros(0, int)
    var_of = lambda lv: np.exp(np.asarray(lv, np.float64))
    post_cases, post_json = [], []
    std = emb.identity.get("standardize")     # the embeddings' affine map (retrieval.standardize): experts too
    for i in sample:
        experts = [(m, *(lambda g: (g[0], var_of(g[1])))(apply_standardize(emb.experts_mu[i, j], emb.experts_logvar[i, j],
                                                                            std)))
                   for j, m in enumerate(mods) if emb.present[i, j] > 0]
        joint = (emb.mu[i], var_of(emb.logvar[i]))
        post_cases.append({"case_id": emb.case_ids[i], "label": labels[i], "experts": experts, "joint": joint})
        post_json.append({
            "case_id": emb.case_ids[i], "label": labels[i],
            "experts": [{"modality": m, "mu_2d": FG.project_pca(mu, basis).tolist(),
                         "cov_2d": FG.project_cov(v, basis.W).tolist()} for m, mu, v in experts],
            "joint": {"mu_2d": FG.project_pca(joint[0], basis).tolist(),
                      "cov_2d": FG.project_cov(joint[1], basis.W).tolist()}})
    if post_cases:
        save_fig(FG.plot_case_posteriors(post_cases, basis, coords["pca"], k=k_sigma, modality_order=mods,
                                         fusion=spec.fusion), "posteriors.png")
    else:
        notes.append("Posterior figure skipped: no case has two or more modalities.")
    _save_json(out / "posteriors.json", {"sigma": k_sigma, "fusion": spec.fusion, "cases": post_json})
    written.append(out / "posteriors.json")

    # 3. trajectory of one case as modalities are added ------------------------------------
    best = np.nonzero(counts == counts.max())[0]
    ti = int(rng.choice(best))
    order = [j for j in range(len(mods)) if emb.present[ti, j] > 0]
    masks = np.zeros((len(order), len(mods)), np.float32)
    for s in range(len(order)):
        masks[s, order[:s + 1]] = 1.0
    tmu, tlv = apply_standardize(*fused(np.repeat(emb.experts_mu[ti:ti + 1], len(order), 0),
                                        np.repeat(emb.experts_logvar[ti:ti + 1], len(order), 0), masks, spec.fusion),
                                 std)
    steps = [{"modalities": [mods[j] for j in order[:s + 1]], "mu": tmu[s].astype(np.float64),
              "var": var_of(tlv[s])} for s in range(len(order))]
    monotone = bool(all(np.all(b["var"] <= a["var"] * (1 + 1e-5)) for a, b in zip(steps, steps[1:])))
    if len(steps):
        save_fig(FG.plot_trajectory(steps, basis, coords["pca"], k=k_sigma,
                                    title=f"case {emb.case_ids[ti]} ({labels[ti]}): modalities added in model order"),
                 "trajectory.png")
    _save_json(out / "trajectory.json", {
        "case_id": emb.case_ids[ti], "label": labels[ti], "fusion": spec.fusion, "sigma": k_sigma,
        "variance_non_increasing": monotone,
        "steps": [{"modalities": st["modalities"], "mu": st["mu"].tolist(), "var": st["var"].tolist(),
                   "mu_2d": FG.project_pca(st["mu"], basis).tolist(),
                   "cov_2d": FG.project_cov(st["var"], basis.W).tolist()} for st in steps]})
    written.append(out / "trajectory.json")
    log(f"trajectory of {emb.case_ids[ti]}: {len(steps)} steps")

    # 4. cross-modal generation ------------------------------------------------------------
    gen_rows, terms_rows = [], []
    image_mods = list(spec.image_modalities)
    if len(sample) and image_mods:
        batch = cohort.batch(sample)
        present = emb.present[sample].astype(np.float32)                      # (B, M)
        jm = JittedModel(model)
        image = lambda out: {m: np.asarray(out[m]) for m in image_mods}
        decoded = {"all": image(generate(jm, batch, mods))}
        for m in mods:
            decoded[f"from {m}"] = image(generate(jm, batch, [m]))
        for m in image_mods:
            decoded[f"but {m}"] = image(generate(jm, batch, [o for o in mods if o != m]))
        cols = ["input", "all present"] + [f"from {m}" for m in mods] + ["from all but this"]
        for b, i in enumerate(sample):
            images, cell_notes = {}, {}
            has = {m: present[b, j] > 0 for j, m in enumerate(mods)}
            for r, m in enumerate(image_mods):
                if has[m]:
                    images[(r, 0)] = FG.axial_slice(batch[f"image/{m}"][b, 0])
                else:
                    cell_notes[(r, 0)] = f"{m} absent"
                images[(r, 1)] = FG.axial_slice(decoded["all"][m][b])
                for c, src in enumerate(mods, start=2):
                    if has[src]:
                        images[(r, c)] = FG.axial_slice(decoded[f"from {src}"][m][b])
                    else:
                        cell_notes[(r, c)] = f"no {src}"
                c = len(cols) - 1
                if any(has[o] for o in mods if o != m):
                    images[(r, c)] = FG.axial_slice(decoded[f"but {m}"][m][b])
                else:
                    cell_notes[(r, c)] = "no other modality"
            name = f"generation_{len(gen_rows):02d}_{re.sub(r'[^A-Za-z0-9_.-]+', '_', emb.case_ids[i])[:40]}.png"
            save_fig(FG.plot_generation_grid(image_mods, cols, images, notes=cell_notes,
                                             title=f"case {emb.case_ids[i]} ({labels[i]}; has {patterns[i]}): "
                                                   "middle axial slices, decoded posterior means"), name)
            gen_rows.append((emb.case_ids[i], name))
        log("generation grids written")
        if "report" in mods and tok is not None and jm.spec.report_decoder == "embedding":
            log("report terms skipped: the report decoder predicts the sentence embedding, not words")
        elif "report" in mods and tok is not None:
            # Ask for more than needed and keep words: punctuation tokens are not terms.
            top = top_report_terms(jm, batch, tok, image_mods, k=int(args.top_terms) + 20)
            top = [[(w, p) for w, p in row if re.search(r"[A-Za-z0-9]", w)][:int(args.top_terms)] for row in top]
            for b, i in enumerate(sample):
                truth = cohort.reports[i]
                tw = _words(truth)
                has_img = [m for m in image_mods if emb.present[i, mods.index(m)] > 0]
                terms = ", ".join((f"<b>{html.escape(w)}</b>" if w.lower() in tw else html.escape(w)) + f" ({p:.2g})"
                                  for w, p in top[b])
                terms_rows.append(
                    f"<tr><td>{html.escape(emb.case_ids[i])}</td><td>{html.escape(labels[i])}</td>"
                    f"<td>{html.escape('+'.join(has_img) or 'none: prior mean')}</td><td>{terms}</td>"
                    f"<td class=\"report\">{html.escape(truth) if truth else '<i>no report</i>'}</td></tr>")
    elif not image_mods:
        notes.append("Generation grids skipped: the model has no image modality.")

    # stale figures of an earlier run ------------------------------------------------------
    names = {p.name for p in written}
    if out.is_dir():
        for p in out.iterdir():
            if p.is_file() and OWN_PNG.match(p.name) and p.name not in names:
                p.unlink()

    # index.html ---------------------------------------------------------------------------
    body = []
    body.append("<p>" + html.escape(
        f"Run {wd.resolve()} (checkpoint step {step}); {n} cases of {config.data.manifest}; modalities "
        f"{', '.join(mods)}; latent {spec.embedding_dim}; fusion {spec.fusion}; coloured by label "
        f"'{label_name}'; seed {args.seed}.") + "</p>")
    body.append(f"<p class=\"note\">Ellipses are the {k_sigma:g}-σ contours of each diagonal Gaussian "
                f"posterior N(μ, diag(σ²)) projected onto the two PCA axes W (rows of a 2×L matrix): "
                f"Σ₂ = W diag(σ²) Wᵀ, semi-axes {k_sigma:g}·√λ(Σ₂). The PCA plane is fitted on the fused "
                f"posterior means of all cases.</p>")
    for note in notes:
        body.append(f"<p class=\"note\"><b>Note:</b> {html.escape(note)}</p>")
    # tables
    lab_order = sorted(set(labels), key=lambda v: (v == FG.NO_LABEL, v))
    count_rows = []
    for lab in lab_order:
        sel = [i for i in range(n) if labels[i] == lab]
        row = {label_name: lab, "cases": len(sel)}
        for j, m in enumerate(mods):
            row[f"with {m}"] = int(sum(emb.present[i, j] > 0 for i in sel))
        count_rows.append(row)
    body.append(f"<h2>Cases per {html.escape(label_name)}</h2>" + FG.html_table(count_rows))
    pat_rows = [{"modalities present": p, "cases": patterns.count(p)}
                for p in sorted(set(patterns), key=lambda p: (-patterns.count(p), p))]
    body.append("<h2>Modality patterns</h2>" + FG.html_table(pat_rows))
    body.append(_retrieval_section(wd))
    body.append("<h2>1. Projections of the case embeddings</h2><p class=\"note\">Fused posterior means; "
                "colour = label, marker = modalities present. Coordinates: projections.npz.</p>")
    for m in methods:
        if f"projection_{m}.png" in png_bytes:
            body.append(f"<h3>{titles[m]}</h3>" + FG.img_tag(png_bytes[f"projection_{m}.png"], f"{m} projection"))
        else:
            body.append(f"<h3>{titles[m]}</h3><p class=\"note\">skipped (see note above).</p>")
    if "posteriors.png" in png_bytes:
        body.append(f"<h2>2. Unimodal and joint posteriors</h2><p class=\"note\">Cases "
                    f"{html.escape(', '.join(emb.case_ids[i] for i in sample))} (seeded sample of cases with "
                    f"two or more modalities). Coloured: each modality's expert; black star: the joint "
                    f"{spec.fusion} posterior; dotted: the prior N(0, I). Numbers: posteriors.json.</p>"
                    + FG.img_tag(png_bytes["posteriors.png"], "posteriors"))
    if "trajectory.png" in png_bytes:
        shrink = ("the variance never grows, in any latent dimension" if monotone else
                  "the variance does not shrink monotonically in every dimension"
                  + (" (expected for mixture fusions)" if spec.fusion != "poe" else ""))
        body.append(f"<h2>3. Trajectory of case {html.escape(emb.case_ids[ti])}</h2><p class=\"note\">Modalities "
                    f"added in the order {html.escape(' → '.join(mods[j] for j in order))}; {shrink}. "
                    f"Numbers: trajectory.json.</p>" + FG.img_tag(png_bytes["trajectory.png"], "trajectory"))
    if gen_rows:
        body.append("<h2>4. Cross-modal generation</h2><p class=\"note\">Rows: image sequences (middle axial "
                    "slice). Columns: the input; the decoded posterior mean given all modalities the case has; "
                    "given each single modality (the row's own one = its reconstruction); given all but the "
                    "row's sequence (synthesis). Grey cells: the condition is not available for this case. "
                    "Each row shares the grey levels of its input.</p>")
        for cid, name in gen_rows:
            body.append(f"<h3>{html.escape(cid)}</h3>" + FG.img_tag(png_bytes[name], f"generation {cid}"))
        if terms_rows:
            body.append(f"<h3>Report terms predicted from the images alone</h3><p class=\"note\">Top "
                        f"{int(args.top_terms)} words (probability) of the report decoder given only the image "
                        f"sequences (punctuation tokens left out); bold = the word occurs in the true report.</p><table><thead><tr><th>case</th>"
                        f"<th>{html.escape(label_name)}</th><th>images</th><th>predicted terms</th>"
                        f"<th>true report</th></tr></thead><tbody>" + "".join(terms_rows) + "</tbody></table>")
    files = sorted(p.name for p in written) + ["index.html"]
    body.append("<h2>Files</h2><ul>" + "".join(f"<li>{html.escape(f)}</li>" for f in files) + "</ul>")
    from mmvae.atomic import atomic_write_text
    page = FG.html_page(f"Latent space of {wd.name}", body)
    atomic_write_text(out / "index.html", page)
    log(f"wrote {out / 'index.html'}")
    return {"html": out / "index.html", "png": sorted(png_bytes), "files": files, "trajectory_case": emb.case_ids[ti],
            "sample": [emb.case_ids[i] for i in sample], "notes": notes}


if __name__ == "__main__":
    sys.exit(main())
