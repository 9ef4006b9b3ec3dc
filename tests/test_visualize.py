"""Latent-space figures: ellipse geometry by hand, the PoE shrinkage the figures show,
mmvae.experiments.latent_figures on a tiny quickstart run, and the command line of
experiments/visualize_latent.py."""
import base64
import io
import json
import re
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from mmvae.cli import main as mmvae_main
from mmvae.experiments import figures as FG
from mmvae.experiments import latent_figures as LF
from mmvae.models.fusion import poe

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny.py")
IMG = '<img src="data:image/png;base64,'


def _visualize(*argv: str) -> subprocess.CompletedProcess:
    """``python experiments/visualize_latent.py ARGV`` as a command line."""
    return subprocess.run([sys.executable, str(ROOT / "experiments" / "visualize_latent.py"), *argv],
                          capture_output=True, text=True, cwd=ROOT)


# ------------------------------------------------------------------------------ geometry
def test_ellipse_axes_are_k_times_sqrt_eigenvalues_of_the_projected_covariance():
    # W's rows span the first two latent axes, rotated: W diag(var) Wᵀ = R diag(1, 4) Rᵀ.
    W = np.array([[0.6, 0.8, 0.0], [0.8, -0.6, 0.0]])
    var = np.array([1.0, 4.0, 2.0])
    cov = FG.project_cov(var, W)
    np.testing.assert_allclose(cov, [[0.36 + 2.56, 0.48 - 1.92], [0.48 - 1.92, 0.64 + 1.44]], atol=1e-12)
    for k in (1.0, 2.0):
        lengths, dirs = FG.ellipse_axes(cov, k)
        np.testing.assert_allclose(lengths, [2.0 * k, 1.0 * k], atol=1e-12)      # k·sqrt(4), k·sqrt(1)
        # the major axis is W's image of latent axis 2 (variance 4): (0.8, -0.6) up to sign
        assert abs(abs(dirs[:, 0] @ np.array([0.8, -0.6])) - 1.0) < 1e-12
        mean, center = np.array([1.0, 2.0, 3.0]), np.array([0.5, 0.5, 0.5])
        pts = FG.ellipse_2d(mean, var, W, center=center, k=k, num=400)
        c2 = np.array([0.6 * 0.5 + 0.8 * 1.5, 0.8 * 0.5 - 0.6 * 1.5])            # W (mean - center)
        np.testing.assert_allclose(pts[0], pts[-1], atol=1e-12)                    # closed curve
        np.testing.assert_allclose((pts.max(0) + pts.min(0)) / 2, c2, atol=1e-3)
        r = np.linalg.norm(pts - c2, axis=1)
        np.testing.assert_allclose([r.max(), r.min()], [2.0 * k, 1.0 * k], atol=1e-3)
        np.testing.assert_allclose(FG.mahalanobis2(pts, c2, cov), k ** 2, atol=1e-9)
    # axis-aligned case, W = first two axes: semi-axes sqrt(var[0]), sqrt(var[1])
    pts = FG.ellipse_2d(np.zeros(3), np.array([9.0, 0.25, 5.0]), np.eye(3)[:2], num=401)
    np.testing.assert_allclose(np.abs(pts).max(0), [3.0, 0.5], atol=1e-9)


def test_poe_joint_ellipse_is_inside_every_unimodal_ellipse():
    rng = np.random.default_rng(0)
    L = 6
    mus = rng.normal(size=(3, L))
    variances = np.exp(rng.normal(size=(3, L)))
    g = poe(jnp.asarray(mus), jnp.asarray(np.log(variances)), jnp.ones(3))
    jmu, jvar = FG.poe_diag(mus, variances)
    np.testing.assert_allclose(np.asarray(g.mu), jmu, rtol=1e-5, atol=1e-6)        # the model's PoE
    np.testing.assert_allclose(np.exp(np.asarray(g.logvar)), jvar, rtol=1e-5)
    W = np.linalg.qr(rng.normal(size=(L, 2)))[0].T                                 # orthonormal rows
    cj = FG.project_cov(jvar, W)
    for m in range(3):
        cm = FG.project_cov(variances[m], W)
        assert np.linalg.eigvalsh(cm - cj).min() >= -1e-12                         # Σ_m − Σ_joint ⪰ 0
        assert np.linalg.det(cj) < np.linalg.det(cm)                               # smaller area
        assert FG.ellipse_axes(cj)[0][0] < FG.ellipse_axes(cm)[0][0]
        # moved onto the expert's centre, every point of the joint's ellipse is inside the expert's
        pts = FG.ellipse_2d(mus[m], jvar, W, k=2.0)
        assert np.all(FG.mahalanobis2(pts, mus[m] @ W.T, cm) <= 4.0 + 1e-9)


def test_pca_basis_is_orthonormal_signed_and_centred():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(50, 5)) * np.array([5.0, 2.0, 1.0, 0.5, 0.1])
    b = FG.pca_basis(x)
    np.testing.assert_allclose(b.W @ b.W.T, np.eye(2), atol=1e-12)
    assert b.explained[0] >= b.explained[1] > 0 and b.explained.sum() <= 1
    assert abs(b.W[0, 0]) > 0.9 and all(w[np.argmax(np.abs(w))] > 0 for w in b.W)
    xy = FG.project_pca(x, b)
    np.testing.assert_allclose(xy.mean(0), 0, atol=1e-12)
    np.testing.assert_allclose(xy.var(0).sum() / (x - x.mean(0)).var(0).sum(), b.explained.sum(), rtol=1e-9)
    np.testing.assert_allclose(FG.tsne_2d(x, seed=3), FG.tsne_2d(x, seed=3))        # seeded


# ------------------------------------------------------------------------------ the script
@pytest.fixture(scope="module")
def figures_run(tmp_path_factory):
    wd = tmp_path_factory.mktemp("viz")
    assert mmvae_main(["quickstart", "--workdir", str(wd), "--config", TINY, "--cases", "32", "--steps", "4",
                       "--quiet"]) == 0
    out = wd / "figs"
    summary = LF.run(wd, out, cases=2, seed=1, methods="pca,tsne,umap")
    assert summary["html"] == out / "index.html" and len(summary["sample"]) == 2
    return wd, out


def test_html_embeds_every_png_and_names_every_label(figures_run):
    wd, out = figures_run
    page = (out / "index.html").read_text()
    pngs = sorted(out.glob("*.png"))
    names = {p.name for p in pngs}
    assert {"projection_pca.png", "projection_tsne.png", "posteriors.png", "trajectory.png"} <= names
    assert len([n for n in names if n.startswith("generation_")]) == 2              # --cases 2
    assert page.count(IMG) == len(pngs)
    embedded = {base64.b64decode(m) for m in re.findall(r'data:image/png;base64,([A-Za-z0-9+/=]+)"', page)}
    for p in pngs:
        assert p.read_bytes() in embedded, p.name
        im = Image.open(io.BytesIO(p.read_bytes()))
        im.load()
        assert im.format == "PNG" and im.size[0] > 100 and im.size[1] > 100
        assert np.asarray(im.convert("L")).std() > 1                              # not blank
    emb = np.load(wd / "embeddings.npz", allow_pickle=False)
    classes = {json.loads(str(s))["class"] for s in emb["labels"]}
    assert len(classes) > 1
    for c in classes:
        assert f"<td>{c}</td>" in page
    # the run's retrieval.csv as a table: header + 31 query subsets, mAP column included
    table = page.split("<h2>Retrieval (retrieval.csv)</h2>", 1)[1].split("</table>", 1)[0]
    assert table.count("<tr>") == 1 + 31 and "<th>map@10</th>" in table
    assert "Report terms predicted from the images alone" in page
    try:
        import umap  # noqa: F401
        assert "projection_umap.png" in names
    except ImportError:
        assert "projection_umap.png" not in names and "UMAP skipped" in page


def _fused(wd):
    """The run's embeddings as the fused posterior (the figures draw the latent, whatever the run's
    retrieval vectors are), standardised as they are."""
    from mmvae.retrieval.embed import Embeddings
    e = Embeddings.load(wd / "embeddings.npz").as_embedding("fused").standardized()
    return {"case_ids": np.asarray(e.case_ids), "mu": e.mu, "logvar": e.logvar, "present": e.present}


def test_projections_have_one_row_per_case_and_match_the_embeddings(figures_run):
    wd, out = figures_run
    emb = _fused(wd)
    with np.load(out / "projections.npz", allow_pickle=False) as z:
        assert list(z["case_ids"]) == list(emb["case_ids"])
        assert z["pca"].shape == (32, 2) and z["tsne"].shape == (32, 2) and len(z["labels"]) == 32
        assert np.all(np.isfinite(z["tsne"]))
        np.testing.assert_allclose(z["pca"], (emb["mu"] - z["pca_center"]) @ z["pca_components"].T, atol=1e-4)
    post = json.loads((out / "posteriors.json").read_text())
    assert len(post["cases"]) == 2 and post["sigma"] == 1.0
    for case in post["cases"]:
        assert len(case["experts"]) >= 2
        cj = np.asarray(case["joint"]["cov_2d"])
        for e in case["experts"]:
            assert np.linalg.eigvalsh(np.asarray(e["cov_2d"]) - cj).min() >= -1e-6


def test_trajectory_variances_shrink_as_modalities_are_added(figures_run):
    wd, out = figures_run
    traj = json.loads((out / "trajectory.json").read_text())
    steps = traj["steps"]
    assert traj["fusion"] == "poe" and len(steps) >= 2
    for a, b in zip(steps, steps[1:]):
        assert b["modalities"][:-1] == a["modalities"] and len(b["modalities"]) == len(a["modalities"]) + 1
        assert np.all(np.asarray(b["var"]) <= np.asarray(a["var"]) * (1 + 1e-5))
        assert np.trace(np.asarray(b["cov_2d"])) < np.trace(np.asarray(a["cov_2d"]))
    assert traj["variance_non_increasing"] is True
    # the last step (every modality the case has) is the case's fused embedding
    emb = _fused(wd)
    i = list(emb["case_ids"]).index(traj["case_id"])
    assert int(emb["present"][i].sum()) == len(steps[-1]["modalities"])
    np.testing.assert_allclose(steps[-1]["mu"], emb["mu"][i], atol=1e-4)
    np.testing.assert_allclose(steps[-1]["var"], np.exp(emb["logvar"][i]), rtol=1e-4)


def test_missing_run_dir_or_checkpoint_exits_2_naming_the_path(tmp_path):
    missing = tmp_path / "no such run"
    res = _visualize("--workdir", str(missing))
    assert res.returncode == 2, res.stderr
    err = res.stderr.strip()
    assert len(err.splitlines()) == 1 and str(missing) in err
    empty = tmp_path / "empty"
    empty.mkdir()
    res = _visualize("--workdir", str(empty))
    assert res.returncode == 2, res.stderr
    err = res.stderr.strip()
    assert len(err.splitlines()) == 1 and str(empty) in err
    res = _visualize("--workdir", str(empty), "--methods", "pca,isomap")
    assert res.returncode == 2 and "isomap" in res.stderr
