"""Latent-space figures of a trained run, gathered in one self-contained HTML page.

The work of ``experiments/visualize_latent.py`` (which documents the outputs), in steps:
:func:`load_run` (run, cohort, embeddings, labels), :func:`projections`,
:func:`posteriors`, :func:`trajectory`, :func:`generation_grids`, :func:`report_terms`,
:func:`remove_stale` and :func:`write_page`; :func:`run` chains them. The drawing
primitives are :mod:`mmvae.experiments.figures`.
"""
from __future__ import annotations

import csv
import dataclasses
import html
import json
import re
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from mmvae.atomic import atomic_path, atomic_write_text
from mmvae.errors import ConfigError, InputError
from mmvae.experiments import figures as FG

METHODS = ("pca", "tsne", "umap")
TITLES = {"pca": "PCA", "tsne": "t-SNE", "umap": "UMAP"}
OWN_PNG = re.compile(r"^(projection_(pca|tsne|umap)|posteriors|trajectory|generation_\d+_.*)\.png$")


# ------------------------------------------------------------------------------ helpers
def check_options(workdir, methods: str, cases: int, sigma: float) -> tuple[Path, list[str]]:
    """The run directory and the list of projections; bad values raise ConfigError / InputError."""
    wd = Path(workdir)
    if not wd.is_dir():
        raise InputError("run directory not found", path=str(wd))
    names = [m.strip().lower() for m in methods.split(",") if m.strip()]
    bad = [m for m in names if m not in METHODS]
    if bad or not names:
        raise ConfigError(f"--methods: unknown projection {bad or methods!r}; choose from {list(METHODS)}")
    if cases < 1:
        raise ConfigError(f"--cases must be >= 1, got {cases}")
    if not sigma > 0:
        raise ConfigError(f"--sigma must be > 0, got {sigma}")
    return wd, names


def save_json(path: Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=1))


def save_npz(path: Path, **arrays) -> None:
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


def words(text: str | None) -> set[str]:
    return set(re.findall(r"[a-z0-9]+", (text or "").lower()))


def retrieval_section(wd: Path) -> str:
    """The run's ``retrieval.csv`` (or ``retrieval.md``) as an HTML section."""
    csv_path, md_path = wd / "retrieval.csv", wd / "retrieval.md"
    if csv_path.is_file():
        rows = list(csv.DictReader(open(csv_path, newline="")))
        cols = [c for c in (rows[0].keys() if rows else []) if not c.endswith(("_lo", "_hi"))]
        return (f"<h2>Retrieval ({html.escape(csv_path.name)})</h2><p class=\"note\">from {html.escape(str(csv_path))}; "
                f"95% bootstrap intervals are in the CSV.</p>" + FG.html_table(rows, cols))
    if md_path.is_file():
        return f"<h2>Retrieval ({html.escape(md_path.name)})</h2><pre>{html.escape(md_path.read_text())}</pre>"
    return "<h2>Retrieval</h2><p class=\"note\">no retrieval.csv or retrieval.md in the run directory.</p>"


def _var(logvar) -> np.ndarray:
    return np.exp(np.asarray(logvar, np.float64))


# ------------------------------------------------------------------------------ the run
@dataclasses.dataclass
class Run:
    """A loaded run, its embedded cohort and what the figure steps write (``written``,
    ``png_bytes``) or note for the page (``notes``)."""
    wd: Path
    out: Path
    config: Any
    spec: Any
    model: Any
    tok: Any
    step: int
    cohort: Any
    emb: Any
    label_name: str
    labels: list[str]
    mods: list[str]
    patterns: list[str]
    k_sigma: float
    log: Callable[[str], None]
    written: list[Path] = dataclasses.field(default_factory=list)
    png_bytes: dict[str, bytes] = dataclasses.field(default_factory=dict)
    notes: list[str] = dataclasses.field(default_factory=list)

    @property
    def n(self) -> int:
        return len(self.emb.case_ids)

    @property
    def std(self):
        """The embeddings' affine map (retrieval.standardize), applied to the experts too."""
        return self.emb.identity.get("standardize")

    def save_fig(self, fig, name: str) -> None:
        self.png_bytes[name] = FG.save_png(fig, self.out / name)
        self.written.append(self.out / name)

    def save_json(self, name: str, obj) -> None:
        save_json(self.out / name, obj)
        self.written.append(self.out / name)


def load_run(wd: Path, out: Path, label: str | None, sigma: float, verbose: bool, log) -> Run:
    """Load the trained run and its cohort, embed every case and resolve the colouring label."""
    from mmvae.retrieval.embed import embed_cohort
    from mmvae.runs.trained import load_cohort, load_trained

    config, spec, model, tok, step = load_trained(wd, return_step=True)
    stats_path = wd / "clinical_stats.json"
    stats = json.loads(stats_path.read_text()) if stats_path.is_file() else None
    if not config.data.manifest:
        raise ConfigError(f"{wd}/config.json has no data.manifest: cannot find the run's cohort")
    cohort, _, _ = load_cohort(config, wd, tokenizer=tok, clinical_stats=stats, show_progress=verbose)
    if len(cohort) == 0:
        raise InputError("the run's cohort has no usable case", path=str(config.data.manifest))
    emb = embed_cohort(model, cohort, show_progress=verbose)
    log(f"embedded {len(cohort)} cases")

    label_name = label or str(config.data.label)
    if any(lab for lab in emb.labels) and not any(label_name in lab for lab in emb.labels):
        known = sorted({k for lab in emb.labels for k in lab})
        raise ConfigError(f"no case has label {label_name!r}; known labels: {known}")
    labels = [str(lab.get(label_name, "")) or FG.NO_LABEL for lab in emb.labels]
    mods = list(emb.modalities)
    patterns = [FG.presence_key(p, mods) for p in emb.present]
    return Run(wd, out, config, spec, model, tok, step, cohort, emb, label_name, labels, mods, patterns,
               float(sigma), log)


# ------------------------------------------------------------------------------ 1. projections
def projections(r: Run, methods: list[str], seed: int) -> tuple[FG.PCABasis, dict[str, np.ndarray]]:
    """PCA (always), t-SNE and UMAP of the fused posterior means: figures and ``projections.npz``."""
    X = np.asarray(r.emb.mu, np.float64)
    basis = FG.pca_basis(X)
    coords = {"pca": FG.project_pca(X, basis)}
    if "tsne" in methods:
        c = FG.tsne_2d(X, seed=seed)
        if c is None:
            r.notes.append(f"t-SNE skipped: only {r.n} cases.")
        else:
            coords["tsne"] = c
    if "umap" in methods:
        c, why = FG.umap_2d(X, seed=seed)
        if c is None:
            r.notes.append(f"UMAP skipped: {why}.")
        else:
            coords["umap"] = c
    for m in methods:
        if m in coords:
            axes = tuple(FG._pca_axis_names(basis)) if m == "pca" else (f"{TITLES[m]} 1", f"{TITLES[m]} 2")
            r.save_fig(FG.plot_projection(coords[m], r.labels, r.patterns, axis_names=axes, label_name=r.label_name,
                                          title=f"{TITLES[m]} of the fused posterior means ({r.n} cases, "
                                                f"{r.spec.fusion}, latent {r.spec.embedding_dim})"),
                       f"projection_{m}.png")
    emb = r.emb
    save_npz(r.out / "projections.npz", case_ids=np.asarray(emb.case_ids, str), labels=np.asarray(r.labels, str),
             patterns=np.asarray(r.patterns, str), modalities=np.asarray(r.mods, str),
             present=np.asarray(emb.present, np.float32),
             pca_center=basis.center, pca_components=basis.W, pca_explained=basis.explained,
             **{m: np.asarray(c, np.float64) for m, c in coords.items()})
    r.written.append(r.out / "projections.npz")
    r.log(f"projections: {sorted(coords)}")
    return basis, coords


# ------------------------------------------------------------------------------ 2. posteriors
def sample_cases(r: Run, cases: int, rng: np.random.Generator) -> np.ndarray:
    """A sorted seeded sample of up to ``cases`` cases with two or more modalities."""
    candidates = np.nonzero(r.emb.present.sum(1) >= 2)[0]
    if not len(candidates):
        return np.zeros(0, int)
    return np.sort(rng.choice(candidates, size=min(cases, len(candidates)), replace=False))


def posteriors(r: Run, sample: np.ndarray, basis: FG.PCABasis, coords: dict) -> None:
    """Unimodal experts and the joint posterior of the sampled cases: figure and ``posteriors.json``."""
    from mmvae.retrieval.embed import apply_standardize
    emb, mods = r.emb, r.mods
    post_cases, post_json = [], []
    for i in sample:
        experts = []
        for j, m in enumerate(mods):
            if emb.present[i, j] > 0:
                mu, lv = apply_standardize(emb.experts_mu[i, j], emb.experts_logvar[i, j], r.std)
                experts.append((m, mu, _var(lv)))
        joint = (emb.mu[i], _var(emb.logvar[i]))
        post_cases.append({"case_id": emb.case_ids[i], "label": r.labels[i], "experts": experts, "joint": joint})
        post_json.append({
            "case_id": emb.case_ids[i], "label": r.labels[i],
            "experts": [{"modality": m, "mu_2d": FG.project_pca(mu, basis).tolist(),
                         "cov_2d": FG.project_cov(v, basis.W).tolist()} for m, mu, v in experts],
            "joint": {"mu_2d": FG.project_pca(joint[0], basis).tolist(),
                      "cov_2d": FG.project_cov(joint[1], basis.W).tolist()}})
    if post_cases:
        r.save_fig(FG.plot_case_posteriors(post_cases, basis, coords["pca"], k=r.k_sigma, modality_order=mods,
                                           fusion=r.spec.fusion), "posteriors.png")
    else:
        r.notes.append("Posterior figure skipped: no case has two or more modalities.")
    r.save_json("posteriors.json", {"sigma": r.k_sigma, "fusion": r.spec.fusion, "cases": post_json})


# ------------------------------------------------------------------------------ 3. trajectory
def trajectory(r: Run, rng: np.random.Generator, basis: FG.PCABasis, coords: dict) -> dict:
    """One case (most modalities; seeded choice among ties) as its modalities are added in
    model order: figure and ``trajectory.json``. Returns the case index, order and monotonicity."""
    from mmvae.retrieval.embed import apply_standardize, fused
    emb, mods = r.emb, r.mods
    counts = emb.present.sum(1)
    ti = int(rng.choice(np.nonzero(counts == counts.max())[0]))
    order = [j for j in range(len(mods)) if emb.present[ti, j] > 0]
    masks = np.zeros((len(order), len(mods)), np.float32)
    for s in range(len(order)):
        masks[s, order[:s + 1]] = 1.0
    reps = lambda a: np.repeat(a[ti:ti + 1], len(order), 0)  # noqa: E731
    tmu, tlv = apply_standardize(*fused(reps(emb.experts_mu), reps(emb.experts_logvar), masks, r.spec.fusion), r.std)
    steps = [{"modalities": [mods[j] for j in order[:s + 1]], "mu": tmu[s].astype(np.float64),
              "var": _var(tlv[s])} for s in range(len(order))]
    monotone = bool(all(np.all(b["var"] <= a["var"] * (1 + 1e-5)) for a, b in zip(steps, steps[1:])))
    if len(steps):
        r.save_fig(FG.plot_trajectory(steps, basis, coords["pca"], k=r.k_sigma,
                                      title=f"case {emb.case_ids[ti]} ({r.labels[ti]}): modalities added in model order"),
                   "trajectory.png")
    r.save_json("trajectory.json", {
        "case_id": emb.case_ids[ti], "label": r.labels[ti], "fusion": r.spec.fusion, "sigma": r.k_sigma,
        "variance_non_increasing": monotone,
        "steps": [{"modalities": st["modalities"], "mu": st["mu"].tolist(), "var": st["var"].tolist(),
                   "mu_2d": FG.project_pca(st["mu"], basis).tolist(),
                   "cov_2d": FG.project_cov(st["var"], basis.W).tolist()} for st in steps]})
    r.log(f"trajectory of {emb.case_ids[ti]}: {len(steps)} steps")
    return {"index": ti, "order": order, "monotone": monotone}


# ------------------------------------------------------------------------------ 4. generation
def decode_conditions(jm: JittedModel, batch, mods: list[str], image_mods: list[str]) -> dict:
    """Decoded images given all modalities, each single one, and all but each image sequence."""
    from mmvae.models.generate import generate
    image = lambda out: {m: np.asarray(out[m]) for m in image_mods}  # noqa: E731
    decoded = {"all": image(generate(jm, batch, mods))}
    for m in mods:
        decoded[f"from {m}"] = image(generate(jm, batch, [m]))
    for m in image_mods:
        decoded[f"but {m}"] = image(generate(jm, batch, [o for o in mods if o != m]))
    return decoded


def grid_cells(batch, b: int, decoded: dict, has: dict, mods: list[str], image_mods: list[str], ncols: int):
    """The images and grey-cell notes of one case's generation grid (row = image sequence)."""
    images, cell_notes = {}, {}
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
        c = ncols - 1
        if any(has[o] for o in mods if o != m):
            images[(r, c)] = FG.axial_slice(decoded[f"but {m}"][m][b])
        else:
            cell_notes[(r, c)] = "no other modality"
    return images, cell_notes


def generation_grids(r: Run, sample: np.ndarray):
    """One ``generation_NN_<case>.png`` per sampled case. Returns ``(rows, jitted model, batch)``
    with rows ``(case id, file name)``; ``([], None, None)`` when nothing is generated."""
    image_mods = list(r.spec.image_modalities)
    if not image_mods:
        r.notes.append("Generation grids skipped: the model has no image modality.")
        return [], None, None
    if not len(sample):
        return [], None, None
    emb, mods = r.emb, r.mods
    batch = r.cohort.batch(sample)
    present = emb.present[sample].astype(np.float32)                      # (B, M)
    jm = JittedModel(r.model)
    decoded = decode_conditions(jm, batch, mods, image_mods)
    cols = ["input", "all present"] + [f"from {m}" for m in mods] + ["from all but this"]
    gen_rows = []
    for b, i in enumerate(sample):
        has = {m: present[b, j] > 0 for j, m in enumerate(mods)}
        images, cell_notes = grid_cells(batch, b, decoded, has, mods, image_mods, len(cols))
        name = f"generation_{len(gen_rows):02d}_{re.sub(r'[^A-Za-z0-9_.-]+', '_', emb.case_ids[i])[:40]}.png"
        r.save_fig(FG.plot_generation_grid(image_mods, cols, images, notes=cell_notes,
                                           title=f"case {emb.case_ids[i]} ({r.labels[i]}; has {r.patterns[i]}): "
                                                 "middle axial slices, decoded posterior means"), name)
        gen_rows.append((emb.case_ids[i], name))
    r.log("generation grids written")
    return gen_rows, jm, batch


def report_terms(r: Run, sample: np.ndarray, jm, batch, top_terms: int) -> list[str]:
    """HTML table rows: the top report words predicted from the images alone per sampled case."""
    if jm is None or "report" not in r.mods or r.tok is None:
        return []
    if jm.spec.report_decoder == "embedding":
        r.log("report terms skipped: the report decoder predicts the sentence embedding, not words")
        return []
    from mmvae.models.generate import top_report_terms
    emb, image_mods = r.emb, list(r.spec.image_modalities)
    # Ask for more than needed and keep words: punctuation tokens are not terms.
    top = top_report_terms(jm, batch, r.tok, image_mods, k=int(top_terms) + 20)
    top = [[(w, p) for w, p in row if re.search(r"[A-Za-z0-9]", w)][:int(top_terms)] for row in top]
    rows = []
    for b, i in enumerate(sample):
        truth = r.cohort.reports[i]
        tw = words(truth)
        has_img = [m for m in image_mods if emb.present[i, r.mods.index(m)] > 0]
        terms = ", ".join((f"<b>{html.escape(w)}</b>" if w.lower() in tw else html.escape(w)) + f" ({p:.2g})"
                          for w, p in top[b])
        rows.append(
            f"<tr><td>{html.escape(emb.case_ids[i])}</td><td>{html.escape(r.labels[i])}</td>"
            f"<td>{html.escape('+'.join(has_img) or 'none: prior mean')}</td><td>{terms}</td>"
            f"<td class=\"report\">{html.escape(truth) if truth else '<i>no report</i>'}</td></tr>")
    return rows


def remove_stale(r: Run) -> None:
    """Remove figures of an earlier run in the output folder that this run did not write."""
    names = {p.name for p in r.written}
    if r.out.is_dir():
        for p in r.out.iterdir():
            if p.is_file() and OWN_PNG.match(p.name) and p.name not in names:
                p.unlink()


# ------------------------------------------------------------------------------ index.html
def page_header(r: Run, seed: int) -> list[str]:
    """The run line, the ellipse note, the notes and the per-class / per-pattern tables."""
    body = ["<p>" + html.escape(
        f"Run {r.wd.resolve()} (checkpoint step {r.step}); {r.n} cases of {r.config.data.manifest}; modalities "
        f"{', '.join(r.mods)}; latent {r.spec.embedding_dim}; fusion {r.spec.fusion}; coloured by label "
        f"'{r.label_name}'; seed {seed}.") + "</p>"]
    k = r.k_sigma
    body.append(f"<p class=\"note\">Ellipses are the {k:g}-σ contours of each diagonal Gaussian "
                f"posterior N(μ, diag(σ²)) projected onto the two PCA axes W (rows of a 2×L matrix): "
                f"Σ₂ = W diag(σ²) Wᵀ, semi-axes {k:g}·√λ(Σ₂). The PCA plane is fitted on the fused "
                f"posterior means of all cases.</p>")
    for note in r.notes:
        body.append(f"<p class=\"note\"><b>Note:</b> {html.escape(note)}</p>")
    count_rows = []
    for lab in sorted(set(r.labels), key=lambda v: (v == FG.NO_LABEL, v)):
        sel = [i for i in range(r.n) if r.labels[i] == lab]
        row = {r.label_name: lab, "cases": len(sel)}
        for j, m in enumerate(r.mods):
            row[f"with {m}"] = int(sum(r.emb.present[i, j] > 0 for i in sel))
        count_rows.append(row)
    body.append(f"<h2>Cases per {html.escape(r.label_name)}</h2>" + FG.html_table(count_rows))
    pats = r.patterns
    pat_rows = [{"modalities present": p, "cases": pats.count(p)}
                for p in sorted(set(pats), key=lambda p: (-pats.count(p), p))]
    body.append("<h2>Modality patterns</h2>" + FG.html_table(pat_rows))
    body.append(retrieval_section(r.wd))
    return body


def figure_sections(r: Run, methods: list[str], sample: np.ndarray, traj: dict) -> list[str]:
    """Sections 1-3: projections, posteriors, trajectory."""
    png, ids = r.png_bytes, r.emb.case_ids
    body = ["<h2>1. Projections of the case embeddings</h2><p class=\"note\">Fused posterior means; "
            "colour = label, marker = modalities present. Coordinates: projections.npz.</p>"]
    for m in methods:
        if f"projection_{m}.png" in png:
            body.append(f"<h3>{TITLES[m]}</h3>" + FG.img_tag(png[f"projection_{m}.png"], f"{m} projection"))
        else:
            body.append(f"<h3>{TITLES[m]}</h3><p class=\"note\">skipped (see note above).</p>")
    if "posteriors.png" in png:
        body.append(f"<h2>2. Unimodal and joint posteriors</h2><p class=\"note\">Cases "
                    f"{html.escape(', '.join(ids[i] for i in sample))} (seeded sample of cases with "
                    f"two or more modalities). Coloured: each modality's expert; black star: the joint "
                    f"{r.spec.fusion} posterior; dotted: the prior N(0, I). Numbers: posteriors.json.</p>"
                    + FG.img_tag(png["posteriors.png"], "posteriors"))
    if "trajectory.png" in png:
        shrink = ("the variance never grows, in any latent dimension" if traj["monotone"] else
                  "the variance does not shrink monotonically in every dimension"
                  + (" (expected for mixture fusions)" if r.spec.fusion != "poe" else ""))
        body.append(f"<h2>3. Trajectory of case {html.escape(ids[traj['index']])}</h2><p class=\"note\">Modalities "
                    f"added in the order {html.escape(' → '.join(r.mods[j] for j in traj['order']))}; {shrink}. "
                    f"Numbers: trajectory.json.</p>" + FG.img_tag(png["trajectory.png"], "trajectory"))
    return body


def generation_section(r: Run, gen_rows, terms_rows: list[str], top_terms: int) -> list[str]:
    """Section 4: the generation grids and the predicted report terms."""
    if not gen_rows:
        return []
    body = ["<h2>4. Cross-modal generation</h2><p class=\"note\">Rows: image sequences (middle axial "
            "slice). Columns: the input; the decoded posterior mean given all modalities the case has; "
            "given each single modality (the row's own one = its reconstruction); given all but the "
            "row's sequence (synthesis). Grey cells: the condition is not available for this case. "
            "Each row shares the grey levels of its input.</p>"]
    for cid, name in gen_rows:
        body.append(f"<h3>{html.escape(cid)}</h3>" + FG.img_tag(r.png_bytes[name], f"generation {cid}"))
    if terms_rows:
        body.append(f"<h3>Report terms predicted from the images alone</h3><p class=\"note\">Top "
                    f"{int(top_terms)} words (probability) of the report decoder given only the image "
                    f"sequences (punctuation tokens left out); bold = the word occurs in the true report.</p><table><thead><tr><th>case</th>"
                    f"<th>{html.escape(r.label_name)}</th><th>images</th><th>predicted terms</th>"
                    f"<th>true report</th></tr></thead><tbody>" + "".join(terms_rows) + "</tbody></table>")
    return body


def write_page(r: Run, body: list[str]) -> list[str]:
    """Append the file list and write ``index.html``; returns the file names."""
    files = sorted(p.name for p in r.written) + ["index.html"]
    body = body + ["<h2>Files</h2><ul>" + "".join(f"<li>{html.escape(f)}</li>" for f in files) + "</ul>"]
    atomic_write_text(r.out / "index.html", FG.html_page(f"Latent space of {r.wd.name}", body))
    r.log(f"wrote {r.out / 'index.html'}")
    return files


# ------------------------------------------------------------------------------ all of it
def run(workdir, out=None, *, label: str | None = None, cases: int = 3, seed: int = 0,
        methods: str = "pca,tsne,umap", sigma: float = 1.0, top_terms: int = 10, verbose: bool = False) -> dict:
    """Every figure, data file and ``index.html`` of a trained run (``experiments/visualize_latent.py``).

    Returns ``html`` (the page), ``png`` (figure names), ``files``, ``trajectory_case``,
    ``sample`` (case ids) and ``notes``; raises :class:`mmvae.errors.MmvaeError` on bad input.
    """
    wd, method_list = check_options(workdir, methods, cases, sigma)
    out = Path(out) if out else wd / "figures"
    t0 = time.time()
    log = (lambda s: print(f"[{time.time() - t0:5.1f}s] {s}", file=sys.stderr)) if verbose else (lambda s: None)
    r = load_run(wd, out, label, sigma, verbose, log)
    rng = np.random.default_rng(seed)
    basis, coords = projections(r, method_list, seed)
    sample = sample_cases(r, cases, rng)
    posteriors(r, sample, basis, coords)
    traj = trajectory(r, rng, basis, coords)
    gen_rows, jm, batch = generation_grids(r, sample)
    terms_rows = report_terms(r, sample, jm, batch, top_terms)
    remove_stale(r)
    body = page_header(r, seed) + figure_sections(r, method_list, sample, traj)
    files = write_page(r, body + generation_section(r, gen_rows, terms_rows, top_terms))
    ids = r.emb.case_ids
    return {"html": out / "index.html", "png": sorted(r.png_bytes), "files": files,
            "trajectory_case": ids[traj["index"]], "sample": [ids[i] for i in sample], "notes": r.notes}
