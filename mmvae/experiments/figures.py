r"""Latent-space figures: pure geometry and plotting, testable without a model.

Geometry
--------
* :func:`pca_basis` / :func:`project_pca`: a 2-D PCA plane of case embeddings
  (the fused posterior means), centred on their mean; axes are the rows of ``W (2, L)``
  with a fixed sign convention (largest-magnitude loading positive), so a run gives the
  same picture every time.
* :func:`project_cov`: a diagonal Gaussian ``N(mu, diag(var))`` in the latent projects
  onto the plane as ``N(W (mu - c), Σ₂)`` with :math:`Σ_2 = W\,\mathrm{diag}(σ^2)\,W^T`
  (exact: a linear map of a Gaussian is Gaussian).
* :func:`ellipse_2d`: the k-σ ellipse of that projected Gaussian — the contour at
  Mahalanobis distance ``k`` (semi-axes ``k·sqrt(eig(Σ₂))`` along the eigenvectors).
  The figures draw the **1-σ** ellipse (``k = 1``; it holds 39.3 % of the projected
  mass, 2-σ holds 86.5 %) unless told otherwise.

Since a product of Gaussian experts has precision ``1 + Σ_m 1/σ²_m`` per dimension,
the PoE joint's variance is below every expert's in every dimension, hence
``Σ₂(expert) − Σ₂(joint) = W diag(σ²_m − σ²_joint) Wᵀ`` is positive semi-definite:
the joint's ellipse, moved onto the expert's centre, lies inside it.

Plotting
--------
Figures are built as :class:`matplotlib.figure.Figure` objects on the Agg canvas (no
pyplot, no global figure registry, nothing left open), rendered to PNG bytes with
:func:`figure_png` and written atomically with :func:`save_png`. :func:`html_page` and
friends assemble one self-contained HTML report (PNG images as base64 data URIs).
"""
from __future__ import annotations

import base64
import dataclasses
import html
import io
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from mmvae.atomic import atomic_write_bytes

DEFAULT_SIGMA = 1.0
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">", "p", "h", "8", "d", "H")
NO_LABEL = "(none)"


# ------------------------------------------------------------------------------ geometry
@dataclasses.dataclass(frozen=True)
class PCABasis:
    """A 2-D PCA plane: ``center (L,)``, orthonormal axes ``W (2, L)``, explained variance ratios ``(2,)``."""

    center: np.ndarray
    W: np.ndarray
    explained: np.ndarray


def pca_basis(x: np.ndarray, k: int = 2) -> PCABasis:
    """PCA of the rows of ``x (N, L)``; fewer than ``k`` informative components are
    padded with zero axes (explained ratio 0)."""
    x = np.asarray(x, np.float64)
    if x.ndim != 2 or x.shape[0] < 1:
        raise ValueError(f"need a non-empty (N, L) array, got shape {x.shape}")
    center = x.mean(0)
    xc = x - center
    _, s, vt = np.linalg.svd(xc, full_matrices=False)
    total = float(np.sum(s ** 2))
    W = np.zeros((k, x.shape[1]))
    explained = np.zeros(k)
    for i in range(min(k, vt.shape[0])):
        if s[i] <= 1e-12 * max(1.0, s[0]):
            break
        v = vt[i]
        j = int(np.argmax(np.abs(v)))
        W[i] = v if v[j] >= 0 else -v
        explained[i] = s[i] ** 2 / total if total > 0 else 0.0
    return PCABasis(center=center, W=W, explained=explained)


def project_pca(x: np.ndarray, basis: PCABasis) -> np.ndarray:
    """Coordinates ``(..., 2)`` of latent points ``x (..., L)`` in the PCA plane."""
    return (np.asarray(x, np.float64) - basis.center) @ basis.W.T


def project_cov(var: np.ndarray, W: np.ndarray) -> np.ndarray:
    """``Σ₂ = W diag(var) Wᵀ`` for diagonal variances ``var (..., L)`` → ``(..., 2, 2)``."""
    var = np.asarray(var, np.float64)
    W = np.asarray(W, np.float64)
    return np.einsum("il,...l,jl->...ij", W, var, W)


def ellipse_axes(cov2: np.ndarray, k: float = DEFAULT_SIGMA) -> tuple[np.ndarray, np.ndarray]:
    """Semi-axis lengths ``k·sqrt(λ)`` (descending) and unit directions (columns) of the
    k-σ ellipse of a 2×2 covariance."""
    cov2 = 0.5 * (np.asarray(cov2, np.float64) + np.asarray(cov2, np.float64).T)
    lam, vec = np.linalg.eigh(cov2)
    order = np.argsort(-lam)
    return float(k) * np.sqrt(np.maximum(lam[order], 0.0)), vec[:, order]


def ellipse_2d(mean: np.ndarray, var: np.ndarray, W: np.ndarray, *, center: np.ndarray | None = None,
               k: float = DEFAULT_SIGMA, num: int = 128) -> np.ndarray:
    """Points ``(num, 2)`` (closed: the last equals the first) of the k-σ ellipse of
    ``N(mean, diag(var))`` projected by ``W (2, L)``; ``center`` (L,) is the PCA centre
    subtracted before projecting (default none)."""
    mean = np.asarray(mean, np.float64)
    c2 = (mean - (0.0 if center is None else np.asarray(center, np.float64))) @ np.asarray(W, np.float64).T
    lengths, dirs = ellipse_axes(project_cov(var, W), k)
    t = np.linspace(0.0, 2 * np.pi, num)
    circle = np.stack([np.cos(t), np.sin(t)], -1)                       # (num, 2)
    return c2 + (circle * lengths) @ dirs.T


def mahalanobis2(points: np.ndarray, center2: np.ndarray, cov2: np.ndarray) -> np.ndarray:
    """Squared Mahalanobis distance of 2-D ``points (..., 2)`` under ``N(center2, cov2)``."""
    d = np.asarray(points, np.float64) - np.asarray(center2, np.float64)
    return np.einsum("...i,ij,...j->...", d, np.linalg.pinv(np.asarray(cov2, np.float64)), d)


def poe_diag(mus: np.ndarray, variances: np.ndarray, *, prior: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Product of diagonal Gaussian experts ``(M, L)`` (and of N(0, I) when ``prior``):
    ``(mean, var)``, by precision weighting. A numpy reference for the figures' claims."""
    mus, variances = np.asarray(mus, np.float64), np.asarray(variances, np.float64)
    prec = 1.0 / variances
    total = prec.sum(0) + (1.0 if prior else 0.0)
    return (prec * mus).sum(0) / total, 1.0 / total


# ---------------------------------------------------------------------- other projections
def tsne_2d(x: np.ndarray, seed: int = 0, perplexity: float | None = None) -> np.ndarray | None:
    """t-SNE coordinates ``(N, 2)`` (PCA initialisation, fixed seed); None when N < 4.

    Exact gradients up to 1000 cases (faster there than Barnes-Hut's threaded setup, and
    thread-count independent), Barnes-Hut beyond."""
    from sklearn.manifold import TSNE
    x = np.asarray(x, np.float64)
    n = x.shape[0]
    if n < 4:
        return None
    p = float(perplexity) if perplexity else min(30.0, max(2.0, (n - 1) / 3.0))
    p = min(p, n - 1.0)
    return TSNE(n_components=2, perplexity=p, init="pca", random_state=int(seed),
                learning_rate="auto", method="exact" if n <= 1000 else "barnes_hut").fit_transform(x)


def umap_2d(x: np.ndarray, seed: int = 0) -> tuple[np.ndarray | None, str]:
    """UMAP coordinates ``(N, 2)`` and ``""``, or ``(None, reason)`` when ``umap`` is not
    importable or there are too few cases."""
    try:
        import umap  # noqa: F401  (optional dependency: umap-learn)
    except Exception as e:  # ImportError, or a broken install
        return None, f"umap is not importable ({type(e).__name__}: {e}); install umap-learn to get this panel"
    x = np.asarray(x, np.float64)
    if x.shape[0] < 4:
        return None, f"only {x.shape[0]} cases"
    reducer = umap.UMAP(n_components=2, n_neighbors=min(15, x.shape[0] - 1), random_state=int(seed))
    return np.asarray(reducer.fit_transform(x)), ""


# ------------------------------------------------------------------------------ helpers
def presence_key(present_row: Sequence[float], modalities: Sequence[str]) -> str:
    """``"t1+t2+report"``: the modalities a case has (``"none"`` if none)."""
    names = [m for m, p in zip(modalities, present_row) if p > 0]
    return "+".join(names) if names else "none"


def axial_slice(volume: np.ndarray) -> np.ndarray:
    """The middle axial slice of a RAS-oriented volume ``(X, Y, Z)``, rotated for display
    (anterior up); a 2-D image is returned as is, rotated the same way."""
    v = np.asarray(volume)
    if v.ndim == 3:
        v = v[:, :, v.shape[2] // 2]
    if v.ndim != 2:
        raise ValueError(f"expected a 2-D or 3-D image, got shape {v.shape}")
    return np.rot90(v)


def _colors(names: Sequence[str]) -> dict[str, tuple]:
    import matplotlib
    cmap = matplotlib.colormaps["tab10" if len(names) <= 10 else "tab20"]
    return {n: cmap(i % cmap.N) for i, n in enumerate(names)}


def _ordered(values: Sequence[str]) -> list[str]:
    """Distinct values, most frequent first (ties by name), ``NO_LABEL`` last."""
    uniq = sorted(set(values), key=lambda v: (v == NO_LABEL, -list(values).count(v), v))
    return uniq


def _figure(figsize):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    fig = Figure(figsize=figsize)
    FigureCanvasAgg(fig)
    return fig


def figure_png(fig, dpi: int = 100) -> bytes:
    """Render a figure to PNG bytes (Agg) and release its artists."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight", metadata={"Software": None})
    fig.clear()
    return buf.getvalue()


def save_png(fig, path: str | Path, dpi: int = 100) -> bytes:
    """Write ``fig`` to ``path`` atomically; returns the PNG bytes."""
    data = figure_png(fig, dpi)
    atomic_write_bytes(path, data)
    return data


# ------------------------------------------------------------------------------ plots
def plot_projection(coords: np.ndarray, labels: Sequence[str], patterns: Sequence[str], *, title: str,
                    axis_names: tuple[str, str] = ("dim 1", "dim 2"), label_name: str = "label"):
    """Scatter of ``coords (N, 2)``: colour = label, marker = modality pattern."""
    coords = np.asarray(coords)
    labels, patterns = list(labels), list(patterns)
    lab_order, pat_order = _ordered(labels), _ordered(patterns)
    colors = _colors(lab_order)
    markers = {p: MARKERS[i % len(MARKERS)] for i, p in enumerate(pat_order)}
    fig = _figure((9.5, 6.0))
    ax = fig.add_subplot(1, 1, 1)
    for lab in lab_order:
        for pat in pat_order:
            sel = np.array([(l == lab and p == pat) for l, p in zip(labels, patterns)])
            if sel.any():
                ax.scatter(coords[sel, 0], coords[sel, 1], c=[colors[lab]], marker=markers[pat], s=42,
                           edgecolors="k", linewidths=0.4, alpha=0.85)
    from matplotlib.lines import Line2D
    lab_handles = [Line2D([], [], ls="", marker="o", color=colors[l], markeredgecolor="k",
                          label=f"{l} ({labels.count(l)})") for l in lab_order]
    pat_handles = [Line2D([], [], ls="", marker=markers[p], color="0.6", markeredgecolor="k",
                          label=f"{p} ({patterns.count(p)})") for p in pat_order]
    leg = ax.legend(handles=lab_handles, title=label_name, loc="upper left", bbox_to_anchor=(1.01, 1.0),
                    fontsize=8, title_fontsize=9)
    ax.add_artist(leg)
    ax.legend(handles=pat_handles, title="modalities present", loc="lower left", bbox_to_anchor=(1.01, 0.0),
              fontsize=7, title_fontsize=9)
    ax.set_title(title)
    ax.set_xlabel(axis_names[0])
    ax.set_ylabel(axis_names[1])
    ax.grid(alpha=0.3)
    return fig


def _pca_axis_names(basis: PCABasis) -> tuple[str, str]:
    return tuple(f"PC{i + 1} ({100 * e:.0f}% var.)" for i, e in enumerate(basis.explained[:2]))


def _ellipse_patch(ax, pts, color, **kw):
    from matplotlib.patches import Polygon
    ax.add_patch(Polygon(pts[:-1], closed=True, fill=False, edgecolor=color, **kw))
    ax.update_datalim(pts)
    ax.autoscale_view()


def _draw_gaussian(ax, mean, var, basis: PCABasis, k: float, color, *, label=None, lw=1.5, ls="-",
                   marker="o", size=40, zorder=3):
    _ellipse_patch(ax, ellipse_2d(mean, var, basis.W, center=basis.center, k=k), color, lw=lw, ls=ls,
                   zorder=zorder)
    c = project_pca(mean, basis)
    ax.scatter([c[0]], [c[1]], color=color, marker=marker, s=size, edgecolors="k", linewidths=0.5,
               zorder=zorder + 1, label=label)
    return c


def plot_case_posteriors(cases: Sequence[Mapping], basis: PCABasis, background: np.ndarray | None = None, *,
                         k: float = DEFAULT_SIGMA, modality_order: Sequence[str] = (), fusion: str = "poe"):
    """One panel per case: each present unimodal expert and the joint posterior in the
    PCA plane, with k-σ ellipses; expert means joined to the joint mean by lines.

    ``cases``: dicts with ``case_id``, ``label``, ``experts`` = ``[(modality, mu, var), ...]``
    and ``joint`` = ``(mu, var)``; ``background``: all cases' projected means (grey).
    """
    n = len(cases)
    cols = min(3, max(1, n))
    rows = -(-n // cols) if n else 1
    fig = _figure((5.2 * cols, 4.6 * rows))
    mods = list(modality_order) or sorted({m for c in cases for m, _, _ in c["experts"]})
    colors = _colors(mods)
    prior_mu, prior_var = np.zeros_like(basis.center), np.ones_like(basis.center)
    for i, case in enumerate(cases):
        ax = fig.add_subplot(rows, cols, i + 1)
        if background is not None and len(background):
            ax.scatter(background[:, 0], background[:, 1], s=8, color="0.8", zorder=1)
        _ellipse_patch(ax, ellipse_2d(prior_mu, prior_var, basis.W, center=basis.center, k=k), "0.55", lw=1.0,
                       ls=":", zorder=2, label="prior N(0, I)")
        jmu, jvar = case["joint"]
        j2 = project_pca(jmu, basis)
        for m, mu, var in case["experts"]:
            c = project_pca(mu, basis)
            ax.plot([c[0], j2[0]], [c[1], j2[1]], color=colors[m], lw=0.8, alpha=0.7, zorder=2)
            _draw_gaussian(ax, mu, var, basis, k, colors[m], label=m)
        _draw_gaussian(ax, jmu, jvar, basis, k, "k", label=f"joint ({fusion})", lw=2.2, marker="*", size=140,
                       zorder=5)
        ax.set_title(f"{case['case_id']} — {case['label']}", fontsize=10)
        ax.set_xlabel(_pca_axis_names(basis)[0], fontsize=8)
        ax.set_ylabel(_pca_axis_names(basis)[1], fontsize=8)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best")
        ax.set_aspect("equal", adjustable="datalim")
    fig.suptitle(f"Unimodal posteriors and the joint posterior ({k:g}-σ ellipses, PCA plane)")
    fig.tight_layout()
    return fig


def plot_trajectory(steps: Sequence[Mapping], basis: PCABasis, background: np.ndarray | None = None, *,
                    k: float = DEFAULT_SIGMA, title: str = ""):
    """Posterior of one case as modalities are added one by one.

    ``steps``: dicts with ``modalities`` (list, cumulative), ``mu``, ``var`` (L,). Left:
    the PCA plane with each step's k-σ ellipse, means joined in order; right: the mean
    posterior variance over latent dimensions and the projected ``trace(Σ₂)`` per step.
    """
    import matplotlib
    fig = _figure((13.0, 5.2))
    ax = fig.add_subplot(1, 2, 1)
    if background is not None and len(background):
        ax.scatter(background[:, 0], background[:, 1], s=8, color="0.8", zorder=1)
    cmap = matplotlib.colormaps["viridis"]
    centres = []
    for i, st in enumerate(steps):
        color = cmap(i / max(1, len(steps) - 1))
        name = "+".join(st["modalities"])
        centres.append(_draw_gaussian(ax, st["mu"], st["var"], basis, k, color, label=f"{i + 1}: {name}",
                                      lw=1.2 + 0.5 * i, zorder=3 + i))
    if len(centres) > 1:
        cc = np.asarray(centres)
        ax.plot(cc[:, 0], cc[:, 1], color="k", lw=1.0, ls="--", zorder=2)
    names = _pca_axis_names(basis)
    ax.set_xlabel(names[0]); ax.set_ylabel(names[1])
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    ax.set_aspect("equal", adjustable="datalim")
    ax.set_title(f"posterior as modalities are added ({k:g}-σ ellipses)", fontsize=10)
    ax2 = fig.add_subplot(1, 2, 2)
    x = np.arange(1, len(steps) + 1)
    mean_var = [float(np.mean(st["var"])) for st in steps]
    tr = [float(np.trace(project_cov(st["var"], basis.W))) for st in steps]
    ax2.plot(x, mean_var, "o-", label="mean latent variance")
    ax2.plot(x, tr, "s--", label="trace Σ₂ (PCA plane)")
    ax2.set_xticks(x)
    ax2.set_xticklabels(["+" + st["modalities"][-1] for st in steps], rotation=30, fontsize=8)
    ax2.set_yscale("log")
    ax2.set_ylabel("variance")
    ax2.grid(alpha=0.3, which="both")
    ax2.legend(fontsize=8)
    ax2.set_title("posterior variance per step", fontsize=10)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_generation_grid(row_names: Sequence[str], col_names: Sequence[str],
                         images: Mapping[tuple[int, int], np.ndarray | None], *, title: str = "",
                         notes: Mapping[tuple[int, int], str] | None = None):
    """A grid of 2-D images: ``images[(r, c)]`` (None = an empty cell, with ``notes[(r, c)]``
    printed in it). Each row shares one grey-level range (1st–99th percentile of its
    column-0 image if present, else of all its images)."""
    nr, nc = len(row_names), len(col_names)
    fig = _figure((1.7 * nc + 0.6, 1.8 * nr + 0.6))
    notes = dict(notes or {})
    for r in range(nr):
        row_imgs = [images.get((r, c)) for c in range(nc)]
        ref = row_imgs[0] if row_imgs[0] is not None else (
            np.concatenate([im.ravel() for im in row_imgs if im is not None]) if any(
                im is not None for im in row_imgs) else np.zeros(1))
        lo, hi = np.percentile(np.asarray(ref, np.float64), [1, 99]) if np.size(ref) > 1 else (0.0, 1.0)
        if hi <= lo:
            hi = lo + 1.0
        for c in range(nc):
            ax = fig.add_subplot(nr, nc, r * nc + c + 1)
            im = row_imgs[c]
            if im is not None:
                ax.imshow(np.asarray(im), cmap="gray", vmin=lo, vmax=hi, interpolation="nearest")
            else:
                ax.set_facecolor("0.92")
                ax.text(0.5, 0.5, notes.get((r, c), "—"), ha="center", va="center", fontsize=7,
                        transform=ax.transAxes, wrap=True)
            ax.set_xticks([]); ax.set_yticks([])
            if r == 0:
                ax.set_title(col_names[c], fontsize=8)
            if c == 0:
                ax.set_ylabel(row_names[r], fontsize=9)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


# ------------------------------------------------------------------------------ HTML
def img_tag(png: bytes, alt: str = "") -> str:
    """``<img src="data:image/png;base64,...">`` embedding the PNG bytes."""
    return (f'<img src="data:image/png;base64,{base64.b64encode(png).decode("ascii")}" '
            f'alt="{html.escape(alt, quote=True)}">')


def html_table(rows: Sequence[Mapping], columns: Sequence[str] | None = None) -> str:
    """An HTML table of dict rows (columns default to the keys in order of appearance)."""
    if columns is None:
        columns = []
        for r in rows:
            columns += [k for k in r if k not in columns]
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(r.get(c, '')))}</td>" for c in columns) + "</tr>"
                   for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3f}"
    if isinstance(v, str):
        try:
            f = float(v)
        except ValueError:
            return v
        return v if (f.is_integer() and "." not in v) else f"{f:.3f}"
    return str(v)


_CSS = """body{font-family:sans-serif;max-width:1300px;margin:1em auto;padding:0 1em;color:#222}
img{max-width:100%;border:1px solid #ddd;margin:.4em 0}table{border-collapse:collapse;margin:.5em 0;font-size:90%}
td,th{border:1px solid #bbb;padding:2px 6px;text-align:left}th{background:#eee}.note{color:#555;font-size:90%}
td.report{white-space:pre-wrap;max-width:45em}pre{background:#f6f6f6;padding:.5em;overflow-x:auto}h2{border-bottom:1px solid #ccc;margin-top:1.6em}"""


def html_page(title: str, body: Sequence[str]) -> str:
    """A self-contained HTML document (inline CSS) from body fragments."""
    return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
            f"<style>{_CSS}</style></head><body>\n<h1>{html.escape(title)}</h1>\n" + "\n".join(body)
            + "\n</body></html>\n")
