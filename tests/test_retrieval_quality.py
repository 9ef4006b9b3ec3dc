"""Options for retrieval quality: pooling, the label expert, self-supervision, weights,
diagnostics and the TF-IDF / logistic-regression baselines."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mmvae.config import load_config
from mmvae.data.augment import AugmentSpec, augment_batch, augment_images
from mmvae.data.dataset import with_label_supervision
from mmvae.experiments import baselines as B
from mmvae.experiments.diagnose import linear_probe, variance_explained
from mmvae.experiments.protocol import held_out
from mmvae.retrieval.evaluate import chance_map, evaluate
from mmvae.models.modalities.image import ImageEncoder
from mmvae.models.modalities.label import LABEL
from mmvae.models.mvae import ModelSpec, build_model
from mmvae.objectives.elbo import ObjectiveSpec, elbo_loss, paired_info_nce
from mmvae.quickstart import synthesize
from mmvae.retrieval.embed import embed_cohort
from mmvae.runs.trained import load_cohort, load_trained
from mmvae.train.loop import train_and_evaluate
from mmvae.runs.setup import model_spec, objective_spec

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny.py")


# ------------------------------------------------------------------ pooling
def _blob(shape, centre, value=3.0):
    x = np.zeros(shape, np.float32)
    sl = tuple(slice(c - 1, c + 2) for c in centre)
    x[sl] = value
    return x


def _randomise(module, seed=0):
    """Random weights everywhere (residual blocks start as the identity: zero last conv)."""
    state = nnx.state(module, nnx.Param)
    leaves, tree = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    nnx.update(module, jax.tree.unflatten(tree, [0.3 * jax.random.normal(k, x.shape, x.dtype)
                                                 for k, x in zip(keys, leaves)]))


@pytest.mark.parametrize("pooling", ["max", "attention", "multiscale"])
def test_pooling_is_translation_invariant(pooling):
    """A lesion moved by a multiple of the down-sampling factor gives the same features (away
    from the borders, where zero padding differs)."""
    enc = ImageEncoder((64, 64, 64), (4, 8), 4, patch=2, blocks=1, full_res_blocks=True, pooling=pooling,
                       rngs=nnx.Rngs(0))
    _randomise(enc)
    a = _blob((64, 64, 64), (29, 29, 29))
    b = _blob((64, 64, 64), (37, 29, 37))       # shifted by (8, 0, 8): multiples of the factor 4
    fa, fb = enc.features(jnp.asarray(a[None])), enc.features(jnp.asarray(b[None]))
    np.testing.assert_allclose(np.asarray(fa), np.asarray(fb), rtol=1e-5, atol=1e-6)
    c = _blob((64, 64, 64), (29, 29, 29), value=-3.0)   # the contrast sign is not lost
    assert float(jnp.max(jnp.abs(enc.features(jnp.asarray(c[None])) - fa))) > 1e-3


def test_flatten_pooling_is_not_translation_invariant():
    enc = ImageEncoder((16, 16, 16), (4, 8), 4, patch=2, pooling="flatten", rngs=nnx.Rngs(0))
    a, b = _blob((16, 16, 16), (5, 5, 5)), _blob((16, 16, 16), (9, 5, 9))
    assert float(jnp.max(jnp.abs(enc.features(jnp.asarray(a[None])) - enc.features(jnp.asarray(b[None]))))) > 1e-4


def test_unknown_pooling_rejected():
    with pytest.raises(Exception, match="pooling"):
        load_config(TINY, ["--config.model.image.pooling=mean"])


# ------------------------------------------------------------------ augmentation
def test_augmentation_is_deterministic_and_keeps_background():
    x = np.zeros((2, 1, 16, 16, 16), np.float32)
    x[0, 0, 4:12, 4:12, 4:12] = np.random.default_rng(0).normal(size=(8, 8, 8))
    k = jax.random.key(3)
    a1, a2 = augment_images(k, jnp.asarray(x)), augment_images(k, jnp.asarray(x))
    np.testing.assert_array_equal(np.asarray(a1), np.asarray(a2))
    a3 = augment_images(jax.random.key(4), jnp.asarray(x))
    assert float(jnp.max(jnp.abs(a1 - a3))) > 1e-3
    assert a1.shape == x.shape and a1.dtype == x.dtype
    assert float(jnp.max(jnp.abs(a1[1]))) == 0.0                     # an absent image stays zero
    assert int(jnp.sum(a1[0] != 0)) == int(np.sum(x[0] != 0))        # foreground size kept (flip/shift move it)
    nothing = augment_images(k, jnp.asarray(x), AugmentSpec(gain=0.0, bias=0.0, noise=0.0, flip=False, shift=0.0))
    np.testing.assert_allclose(np.asarray(nothing), x, atol=1e-6)


def test_augment_batch_touches_images_only():
    batch = {"image/t1": jnp.ones((2, 1, 8, 8, 8)), "report/ids": jnp.ones((2, 4), jnp.int32)}
    out = augment_batch(jax.random.key(0), batch, ["t1"])
    assert out["report/ids"] is batch["report/ids"]
    assert not np.allclose(np.asarray(out["image/t1"]), 1.0)


def test_paired_info_nce_prefers_matching_pairs():
    a = jax.random.normal(jax.random.key(0), (8, 16))
    good, use = paired_info_nce(a, a, jnp.ones(8), 0.1)
    bad, _ = paired_info_nce(a, jnp.roll(a, 1, 0), jnp.ones(8), 0.1)
    assert float(use) == 1.0 and float(good) < 0.05 < float(bad)
    _, use1 = paired_info_nce(a, a, jnp.zeros(8).at[0].set(1), 0.1)
    assert float(use1) == 0.0


# ------------------------------------------------------------------ label expert
def _spec(**kw):
    return ModelSpec(image_modalities=("t1",), shape=(8, 8, 8), latent_dim=4, channels=(4,), report=False,
                     clinical_numeric=("age",), **kw)


def test_label_expert_with_missing_labels():
    spec = _spec(label_classes=("a", "b", "c"))
    assert spec.modalities == ("t1", "clinical", LABEL) and spec.query_modalities == ("t1", "clinical")
    model = build_model(spec, 0)
    rng = np.random.default_rng(0)
    batch = {"image/t1": jnp.asarray(rng.normal(size=(4, 1, 8, 8, 8)), jnp.float32),
             "series_mask/t1": jnp.ones((4, 1)), "clinical/num": jnp.zeros((4, 1)), "clinical/num_mask": jnp.ones((4, 1)),
             "clinical/cat": jnp.zeros((4, 0), jnp.int32), "clinical/cat_mask": jnp.zeros((4, 0)),
             "label/id": jnp.asarray([0, 2, 1, 0], jnp.int32), "label/mask": jnp.asarray([1.0, 0.0, 1.0, 0.0])}
    experts, present, _ = model.encode(batch)
    np.testing.assert_array_equal(np.asarray(present[:, 2]), [1, 0, 1, 0])
    # A case whose label is missing has the posterior of its other modalities only.
    no_label = {k: v for k, v in batch.items() if not k.startswith("label/")}
    np.testing.assert_allclose(np.asarray(model.posterior(batch).mu[1]), np.asarray(model.posterior(no_label).mu[1]),
                               rtol=1e-6)
    assert not np.allclose(np.asarray(model.posterior(batch).mu[0]), np.asarray(model.posterior(no_label).mu[0]))
    # The label's likelihood enters the ELBO only where the label is given.
    key = jax.random.key(0)
    loss, m = elbo_loss(model, batch, key, jnp.int32(0), ObjectiveSpec(weights=(1.0, 1.0, 100.0)))
    loss0, _ = elbo_loss(model, batch, key, jnp.int32(0), ObjectiveSpec(weights=(1.0, 1.0, 0.0)))
    assert np.isfinite(float(loss)) and float(loss) > float(loss0) + 1.0
    unlabelled = dict(batch, **{"label/mask": jnp.zeros(4)})
    a, _ = elbo_loss(model, unlabelled, key, jnp.int32(0), ObjectiveSpec(weights=(1.0, 1.0, 100.0)))
    b, _ = elbo_loss(model, unlabelled, key, jnp.int32(0), ObjectiveSpec(weights=(1.0, 1.0, 0.0)))
    np.testing.assert_allclose(float(a), float(b), rtol=1e-6)


def test_with_label_supervision_fractions_nest(tmp_path):
    config = load_config(TINY + ":cases=40")
    config.data.manifest = str(synthesize(config, tmp_path / "data", show_progress=False))
    cohort, _, _ = load_cohort(config, tmp_path, show_progress=False)
    classes = tuple(sorted(set(cohort.label_array("class"))))
    small = with_label_supervision(cohort, "class", classes, 0.1, seed=0)
    large = with_label_supervision(cohort, "class", classes, 0.5, seed=0)
    assert int(small.label_mask.sum()) == 4 and int(large.label_mask.sum()) == 20
    assert np.all(large.label_mask[small.label_mask > 0] == 1)                   # nested
    again = with_label_supervision(cohort, "class", classes, 0.5, seed=0)
    np.testing.assert_array_equal(again.label_mask, large.label_mask)
    assert [classes[i] for i in large.label_id] == list(cohort.label_array("class"))
    b = large.batch([0, 1, 2])
    assert b["label/id"].shape == (3,) and b["label/mask"].shape == (3,)
    assert "label/id" not in cohort.batch([0])


def test_semi_supervised_training_embeds_without_label(tmp_path):
    """Train with labels on half the training cases: the embeddings hold no label expert."""
    config = load_config(TINY + ":cases=40,steps=4", ["--config.data.label_fraction=0.5",
                                                      "--config.model.image.pooling=max",
                                                      "--config.objective.ssl_weight=1.0",
                                                      "--config.objective.supcon_weight=1.0",
                                                      "--config.model.text.freeze=true",
                                                      "--config.train.tensorboard=false"])
    config.data.manifest = str(synthesize(config, tmp_path / "data", show_progress=False))
    summary = train_and_evaluate(config, tmp_path, show_progress=False)
    assert summary["step"] == 4
    spec_d = json.loads((tmp_path / "model_spec.json").read_text())
    assert len(spec_d["label_classes"]) == 7 and spec_d["pooling"] == "max"
    rows = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert any("recon_per_modality/label" in r for r in rows)
    assert all(np.isfinite(r["self_supervised"]) and r["self_supervised"] > 0 for r in rows if "self_supervised" in r)
    assert any(r.get("supcon", 0) > 0 for r in rows)
    _, spec, model, tok = load_trained(tmp_path)
    cohort, _, _ = load_cohort(config, tmp_path, tokenizer=tok, show_progress=False)
    emb = embed_cohort(model, cohort, show_progress=False)
    assert LABEL not in emb.modalities and emb.experts_mu.shape[1] == len(spec.query_modalities)
    # model.text.freeze: the report BERT keeps its initial weights, the head above it trains.
    # the initial weights as the training loop makes them (one jitted init: mmvae.train.loop.initial_state)
    fresh_bert, fresh_head = jax.jit(lambda: (lambda m: (nnx.state(m.encoders["report"].bert, nnx.Param),
                                                         m.encoders["report"].head.layers[0].kernel[...]))(
        build_model(spec, int(config.seed))))()
    same = jax.tree.map(lambda a, b: bool(np.array_equal(np.asarray(a), np.asarray(b))),
                        fresh_bert, nnx.state(model.encoders["report"].bert, nnx.Param))
    assert all(jax.tree.leaves(same))
    assert not np.array_equal(np.asarray(fresh_head), np.asarray(model.encoders["report"].head.layers[0].kernel[...]))
    # The diagnostics tool on this run: probe, chance, variance explained, lesion contrast.
    from mmvae.experiments.diagnose import diagnose, markdown
    d = diagnose(tmp_path)
    assert 0.0 < d["chance_map"] < 0.5 and d["num_queries_heldout"] == 8
    assert set(d["probe"]) == {"fused", "t1", "t2", "dwi", "report", "clinical"}
    assert all(0.0 <= p["accuracy"] <= 1.0 for p in d["probe"].values() if np.isfinite(p["accuracy"]))
    assert 0.0 <= d["clinical_variance_explained"] <= 1.0
    assert set(d["lesion_contrast"]) == {"t1", "t2", "dwi"} and all(v["n"] > 10 for v in d["lesion_contrast"].values())
    # lesions have a clear contrast against white matter in the inputs (z units)
    assert all(v["input_sd"] > 0.3 for v in d["lesion_contrast"].values())
    assert "chance mAP@10" in markdown(d)


def test_frozen_report_cache_gives_the_same_loss(tmp_path):
    """model.text.freeze: the once-computed pooled BERT output (report/pooled) gives the same
    posterior, loss and head gradients as running the BERT; a case without report gets zeros."""
    from mmvae.models.modalities.report import POOLED
    from mmvae.train.loop import cache_frozen_report
    config = load_config(TINY + ":cases=12", ["--config.model.text.freeze=true"])
    config.data.manifest = str(synthesize(config, tmp_path / "data", show_progress=False))
    cohort, tok, _ = load_cohort(config, tmp_path, show_progress=False)
    spec = model_spec(config, len(tok))
    model = build_model(spec, 0)
    gd, params = nnx.split(model, nnx.Param)
    cached = cache_frozen_report(model.encoders["report"], cohort, batch_size=5)   # 12 cases: a padded last batch
    assert cached.arrays[POOLED].shape == (12, spec.bert.hidden_size) and POOLED not in cohort.arrays
    idx = [0, 3, 7, 11]
    plain = {k: jnp.asarray(v) for k, v in cohort.batch(idx).items()}
    fast = {k: jnp.asarray(v) for k, v in cached.batch(idx).items()}
    fast_no_report = dict(fast, **{"report/mask": fast["report/mask"].at[1].set(0)})
    # Compiled, not op by op: eager dispatch compiles every primitive of the model once (~40 s on 2 cores).
    posterior_mu = jax.jit(lambda p, b: nnx.merge(gd, p).posterior(b).mu)
    np.testing.assert_allclose(np.asarray(posterior_mu(params, plain)), np.asarray(posterior_mu(params, fast)),
                               rtol=1e-4, atol=1e-5)
    obj = objective_spec(config, spec)
    key, step = jax.random.key(0), jnp.asarray(3)

    def loss(p, b):
        return elbo_loss(nnx.merge(gd, p), b, key, step, obj)[0]

    value_and_grad = jax.jit(jax.value_and_grad(loss))
    (la, ga), (lb, gb) = value_and_grad(params, plain), value_and_grad(params, fast)
    np.testing.assert_allclose(float(la), float(lb), rtol=1e-5)
    head_a, head_b = ga["encoders"]["report"]["head"], gb["encoders"]["report"]["head"]
    for a, b in zip(jax.tree.leaves(head_a), jax.tree.leaves(head_b)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-3, atol=1e-5)
    # the cached path computes no BERT gradient at all (it is frozen anyway)
    assert all(float(jnp.abs(g).max()) == 0.0 for g in jax.tree.leaves(gb["encoders"]["report"]["bert"]))
    # a case without a report: the report expert is absent whichever path (same fused posterior)
    plain_no_report = dict(plain, **{"report/mask": fast_no_report["report/mask"]})
    np.testing.assert_allclose(np.asarray(posterior_mu(params, fast_no_report)),
                               np.asarray(posterior_mu(params, plain_no_report)), rtol=1e-4, atol=1e-5)
    present = jax.jit(lambda p, b: nnx.merge(gd, p).encode(b)[1])(params, fast_no_report)
    assert float(np.asarray(present)[1, spec.modalities.index("report")]) == 0.0
    empty = dataclasses.replace(cohort, arrays={**cohort.arrays, "report/mask": np.zeros_like(cohort.arrays["report/mask"])})
    assert not np.any(cache_frozen_report(model.encoders["report"], empty, batch_size=5).arrays[POOLED])


def test_report_embedding_likelihood(tmp_path):
    """model.report_decoder.kind='embedding': a diagonal Gaussian over the frozen BERT's pooled
    output (cached or recomputed: the same value), zero for a case without report, and a config
    error unless the BERT is pretrained and frozen."""
    from mmvae.models.modalities.report import POOLED
    from mmvae.train.loop import cache_frozen_report
    for extra in ([], ["--config.model.text.pretrained_dir=/some/bert"]):
        with pytest.raises(Exception, match="model.text.freeze=True"):
            load_config(TINY, ["--config.model.report_decoder.kind=embedding"] + extra)
    config = load_config(TINY + ":cases=8", ["--config.model.text.freeze=true"])
    config.data.manifest = str(synthesize(config, tmp_path / "data", show_progress=False))
    with config.unlocked():
        config.model.report_decoder.kind = "embedding"     # tiny BERT from scratch, frozen: allowed below config level
    cohort, tok, _ = load_cohort(config, tmp_path, show_progress=False)
    spec = model_spec(config, len(tok))
    assert spec.dims()["report"] == spec.bert.hidden_size
    model = build_model(spec, 0)
    gd, params = nnx.split(model, nnx.Param)
    cached = cache_frozen_report(model.encoders["report"], cohort)
    idx = [0, 1, 2, 3]
    plain = {k: jnp.asarray(v) for k, v in cohort.batch(idx).items()}
    fast = {k: jnp.asarray(v) for k, v in cached.batch(idx).items()}
    z = jax.random.normal(jax.random.key(0), (2 * 4, spec.embedding_dim))
    # compiled, not op by op (eager dispatch compiles every primitive of the model once: ~20 s)
    out = jax.jit(lambda p, z: nnx.merge(gd, p).decode(z))(params, z)
    lls = jax.jit(lambda p, o, b: nnx.merge(gd, p).log_likelihoods(o, b, 2))
    ll_plain, ll_fast = lls(params, out, plain), lls(params, out, fast)
    r = spec.modalities.index("report")
    np.testing.assert_allclose(np.asarray(ll_plain[..., r]), np.asarray(ll_fast[..., r]), rtol=1e-4)
    mean = np.asarray(out["report"]).reshape(2, 4, -1)
    ls = np.asarray(model.decoders["report"].log_scale[...])
    x = np.asarray(fast[POOLED])[None]
    has = np.asarray(fast["report/mask"]).sum(-1) > 0                   # the synthetic cohort has missing reports
    assert has.sum() >= 2
    want = np.sum(-0.5 * ((x - mean) / np.exp(ls)) ** 2 - ls - 0.5 * np.log(2 * np.pi), -1) * has[None]
    np.testing.assert_allclose(np.asarray(ll_fast[..., r]), want, rtol=1e-4)
    assert np.all(want[:, has] < 0)
    j = int(np.nonzero(has)[0][0])
    no_report = dict(fast, **{"report/mask": fast["report/mask"].at[j].set(0)})
    assert np.all(np.asarray(lls(params, out, no_report)[:, j, r]) == 0.0)
    # the per-dimension scale learns (the ELBO's gradient reaches it)
    obj = objective_spec(config, spec)
    g = jax.jit(jax.grad(lambda p: elbo_loss(nnx.merge(gd, p), fast, jax.random.key(0), jnp.asarray(3), obj)[0]))(params)
    gls = np.asarray(g["decoders"]["report"]["log_scale"][...])
    assert np.all(np.isfinite(gls)) and np.abs(gls).max() > 0


def test_embedding_decoder_trains_end_to_end_on_a_frozen_pretrained_bert(tmp_path):
    """A (tiny, random) pretrained BERT checkpoint, frozen, with the sentence-embedding report
    decoder: trains with a validation pass (the validation cases' pooled BERT outputs cached
    like the training cases'), resumes the BERT unchanged, and embeds the cohort."""
    from test_text import _write_ckpt
    from mmvae.data.text import build_word_tokenizer, load_tokenizer
    from mmvae.models.text import BertConfig, load_hf_bert
    from mmvae.runs.trained import report_texts
    config = load_config(TINY + ":cases=20,steps=4")
    config.data.manifest = str(synthesize(config, tmp_path / "data", show_progress=False))
    tok_dir = build_word_tokenizer(report_texts(config.data.manifest), tmp_path / "tok")
    pre = tmp_path / "pretrained"
    _write_ckpt(pre, BertConfig.tiny(vocab_size=len(load_tokenizer(tok_dir))))
    for f in Path(tok_dir).iterdir():
        (pre / f.name).write_bytes(f.read_bytes())
    with config.unlocked():
        config.model.text.pretrained_dir = str(pre)
        config.model.text.freeze = True
        config.model.report_decoder.kind = "embedding"
        config.train.eval_every = 2
    summary = train_and_evaluate(config, tmp_path / "run", show_progress=False)
    assert summary["step"] == 4
    rows = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in rows if r.get("split") == "val"]
    assert val and all(np.isfinite(r["recon_per_modality/report"]) and r["recon_per_modality/report"] != 0 for r in val)
    _, spec, model, tok = load_trained(tmp_path / "run")
    assert spec.report_decoder == "embedding" and spec.dims()["report"] == 32
    ref = load_hf_bert(pre)[1]
    same = jax.tree.map(lambda a, b: bool(np.array_equal(np.asarray(a), np.asarray(b))),
                        nnx.state(ref, nnx.Param), nnx.state(model.encoders["report"].bert, nnx.Param))
    assert all(jax.tree.leaves(same))                                     # frozen: still the checkpoint
    assert not np.allclose(np.asarray(model.decoders["report"].log_scale[...]), -2.0)   # the scale trained
    cohort, _, _ = load_cohort(config, tmp_path / "run", tokenizer=tok, show_progress=False)
    emb = embed_cohort(model, cohort, show_progress=False)
    assert np.all(np.isfinite(emb.mu)) and emb.mu.shape[0] == 20


def test_weights_sqrt_and_cap_and_label_weight():
    config = load_config(TINY, ["--config.objective.weights=sqrt", "--config.objective.max_weight=20",
                                "--config.objective.label_weight=50"])
    spec = model_spec(config, vocab_size=30, label_classes=("a", "b"))
    obj = objective_spec(config, spec)
    d = spec.dims()
    expect = [min((4096 / d[m]) ** 0.5, 20.0) for m in spec.query_modalities] + [50.0]
    np.testing.assert_allclose(obj.weights, expect)


# ------------------------------------------------------------------ diagnostics
def test_linear_probe_and_chance():
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(4), 25).astype(str)
    sep = np.eye(4)[y.astype(int)] * 5 + rng.normal(size=(100, 4)) * 0.1
    assert linear_probe(sep, y)["accuracy"] == 1.0
    noise = linear_probe(rng.normal(size=(100, 4)), y)
    assert noise["accuracy"] < 0.5 and noise["majority"] == 0.25
    ch = chance_map(y, np.arange(0, 100, 5), k=10, draws=30)
    # 24 of 99 database cases relevant (p); AP@10 = (1/10) sum_i P@i rel_i, and for a random
    # ranking E[P@i rel_i] ~ p (1 + (i - 1) p) / i.
    p = 24 / 99
    expect = sum(p * (1 + (i - 1) * p) / i for i in range(1, 11)) / 10
    assert abs(ch - expect) < 0.015


def test_variance_explained_by_hand():
    rng = np.random.default_rng(1)
    c = rng.normal(size=(200, 1))
    x = np.concatenate([3 * c, rng.normal(size=(200, 1))], 1)     # dim 0 fully explained, dim 1 not
    ve = variance_explained(x, c)
    expect = np.var(3 * c) / (np.var(3 * c) + np.var(x[:, 1]))
    assert abs(ve - expect) < 0.02
    assert variance_explained(x, np.zeros((200, 0))) == 0.0


# ------------------------------------------------------------------ baselines
def test_tfidf_and_logreg_baselines(tmp_path):
    config = load_config(TINY + ":cases=70")
    config.data.manifest = str(synthesize(config, tmp_path / "data", show_progress=False))
    cohort, _, _ = load_cohort(config, tmp_path, show_progress=False)
    tr, q = held_out(len(cohort), config)
    tf = B.run_baseline("report_tfidf", cohort, tr, config)
    assert tf.modalities == ["report"]
    norms = np.linalg.norm(tf.blocks[:, 0], axis=1)
    np.testing.assert_allclose(norms[tf.present[:, 0] > 0], 1.0, rtol=1e-5)
    lr = B.run_baseline("logreg_tfidf", cohort, tr, config, label="class")
    probs = lr.mu
    np.testing.assert_allclose(probs.sum(1), 1.0, rtol=1e-5)
    rows = evaluate(lr, "class", 10, query_idx=q, n_boot=50)
    labels = cohort.label_array("class")
    assert rows[-1]["query"] == "t1+t2+dwi+report" and rows[-1]["map@10"] > chance_map(labels, q, 10)


def test_supervised_contrastive_rewards_clusters():
    from mmvae.objectives.elbo import supervised_contrastive
    labels = jnp.asarray([0, 0, 1, 1, 2, 2])
    clustered = jnp.eye(3)[labels] * 5.0
    mixed = jnp.eye(3)[jnp.asarray([0, 1, 2, 0, 1, 2])] * 5.0
    ok = jnp.ones(6)
    assert float(supervised_contrastive(clustered, labels, ok, 0.1)) < 0.01
    assert float(supervised_contrastive(mixed, labels, ok, 0.1)) > 1.0
    # Views left out do not count; with no positive left, the loss is 0.
    assert float(supervised_contrastive(mixed, labels, jnp.asarray([1, 0, 1, 0, 1, 0.0]), 0.1)) == 0.0


# ------------------------------------------------------------------ private latent blocks
def test_private_blocks_belong_to_their_modality():
    spec = ModelSpec(image_modalities=("t1", "t2"), shape=(8, 8, 8), latent_dim=4, channels=(4,), report=False,
                     private_dim=3)
    assert spec.embedding_dim == 4 + 2 * 3
    own = spec.ownership()
    np.testing.assert_array_equal(own, [[1] * 4 + [1] * 3 + [0] * 3, [1] * 4 + [0] * 3 + [1] * 3])
    model = build_model(spec, 0)
    rng = np.random.default_rng(0)
    batch = {"image/t1": jnp.asarray(rng.normal(size=(2, 1, 8, 8, 8)), jnp.float32), "series_mask/t1": jnp.ones((2, 1)),
             "image/t2": jnp.asarray(rng.normal(size=(2, 1, 8, 8, 8)), jnp.float32),
             "series_mask/t2": jnp.asarray([[1.0], [0.0]])}
    experts, present, _ = model.encode(batch)
    assert experts.mu.shape == (2, 2, 10)
    post = model.posterior(batch)
    # case 1 has no t2: t2's private block is the prior N(0, 1) (up to the e^-10 precision of "no information")
    np.testing.assert_allclose(np.asarray(post.mu[1, 7:]), 0.0, atol=1e-4)
    np.testing.assert_allclose(np.asarray(post.logvar[1, 7:]), 0.0, atol=1e-3)
    assert float(jnp.max(jnp.abs(post.mu[0, 7:]))) > 1e-3
    # the t1 decoder never reads t2's private block
    z = jax.random.normal(jax.random.key(1), (3, 10))
    g = jax.grad(lambda z: jnp.sum(model.decode(z)["t1"]))(z)
    assert float(jnp.max(jnp.abs(g[:, 7:]))) == 0.0 and float(jnp.max(jnp.abs(g[:, 4:7]))) > 0.0


def test_private_blocks_need_poe():
    config = load_config(TINY, ["--config.model.private_dim=2", "--config.model.fusion=moe"])
    with pytest.raises(Exception, match="private_dim"):
        model_spec(config, vocab_size=10)


def test_query_dims_and_masked_index_search():
    """With private blocks a query is compared on the dimensions it informs, in the
    evaluation protocol and in the FAISS index (exactly for flat, by re-scoring otherwise)."""
    from mmvae.retrieval.embed import query_dims
    from mmvae.retrieval.index import build_index
    ident = {"private_dim": 2, "shared_dim": 3}
    dims = query_dims(ident, ["t1", "t2", "report"], ["t2"])
    np.testing.assert_array_equal(dims, [1, 1, 1, 0, 0, 1, 1, 0, 0])
    assert query_dims({"private_dim": 0, "shared_dim": 3}, ["t1"], ["t1"]) is None
    rng = np.random.default_rng(0)
    db = rng.normal(size=(200, 9)).astype(np.float32)
    q = db[7] * dims + 0.01 * rng.normal(size=9).astype(np.float32)
    masked = db * dims
    want = np.argsort(-(masked / np.linalg.norm(masked, axis=1, keepdims=True)) @ (q / np.linalg.norm(q)))[:5]
    ids = [f"c{i}" for i in range(200)]
    for kind in ("flat", "hnsw"):
        idx = build_index(db, np.zeros_like(db), ids, kind=kind)
        got = [r.case_id for r in idx.search(q, 5, dims=dims)[0]]
        if kind == "flat":
            assert got == [ids[i] for i in want]
        else:
            assert got[0] == "c7"
    with pytest.raises(Exception, match="dims"):
        build_index(db, np.zeros_like(db), ids).search(q, 5, dims=np.ones(4))


def test_standardized_embeddings_are_an_affine_map_of_the_posterior(tmp_path):
    """retrieval.standardize: μ' = (μ − c)/s, ℓ' = ℓ − 2 log s with the cohort's statistics, the same map
    for every subset posterior, stored with the embeddings (and so with the index)."""
    from mmvae.retrieval.embed import Embeddings, apply_standardize
    rng = np.random.default_rng(0)
    n, m, e = 40, 3, 6
    emu = rng.normal(size=(n, m, e)).astype(np.float32) * np.array([5, 1, 0.1, 1, 1, 1], np.float32)
    elv = rng.normal(size=(n, m, e)).astype(np.float32) * 0.1
    present = (rng.random((n, m)) > 0.2).astype(np.float32)
    present[0] = 0                                                   # a case with nothing: not in the statistics
    from mmvae.retrieval.embed import fused
    mu, lv = fused(emu, elv, present, "poe")
    raw = Embeddings([f"c{i}" for i in range(n)], ["a", "b", "c"], emu, elv, present, mu, lv,
                     [{"class": "x"}] * n, {"latent_dim": e}, "poe")
    z = raw.standardized()
    st = z.identity["standardize"]
    have = present.sum(1) > 0
    np.testing.assert_allclose(z.mu[have].mean(0), 0, atol=1e-5)
    np.testing.assert_allclose(z.mu[have].std(0), 1, atol=1e-4)
    np.testing.assert_allclose(z.logvar, lv - 2 * np.log(np.asarray(st["scale"])), atol=1e-5)
    sub = np.array([1, 0, 1], np.float32)
    q_raw, lv_raw = raw.subset_posterior(sub)
    q, qlv = z.subset_posterior(sub)
    np.testing.assert_allclose(q, (q_raw - np.asarray(st["center"])) / np.asarray(st["scale"]), atol=1e-5)
    np.testing.assert_allclose(apply_standardize(q_raw, lv_raw, st)[1], qlv, atol=1e-6)
    assert z.standardized() is z                                     # idempotent
    z.save(tmp_path / "e.npz")
    back = Embeddings.load(tmp_path / "e.npz")
    assert back.identity["standardize"] == st
    np.testing.assert_allclose(back.subset_posterior(sub)[0], q, atol=1e-6)


def _two_expert_cohort(n=60, e=4, seed=0):
    """Expert ``a`` carries the class (unit variance), expert ``b`` is confident noise (σ² = e⁻⁶):
    the PoE mean follows ``b``; the concatenated experts keep ``a``'s evidence."""
    from mmvae.retrieval.embed import Embeddings, fused
    rng = np.random.default_rng(seed)
    cls = np.arange(n) % 3
    centroids = rng.normal(size=(3, e)) * 3.0
    emu = np.stack([centroids[cls] + rng.normal(size=(n, e)), rng.normal(size=(n, e))], 1).astype(np.float32)
    elv = np.stack([np.zeros((n, e)), np.full((n, e), -6.0)], 1).astype(np.float32)
    present = np.ones((n, 2), np.float32)
    present[::7, 1] = 0                                              # some cases lack b
    mu, lv = fused(emu, elv, present, "poe")
    return Embeddings([f"c{i}" for i in range(n)], ["a", "b"], emu, elv, present, mu, lv,
                      [{"class": str(c)} for c in cls], {"shared_dim": e, "private_dim": 0}, "poe")


def test_experts_embedding_concatenates_standardised_experts(tmp_path):
    """retrieval.embedding=experts: (N, M·E) vectors, each block standardised over the cases that have
    the modality, mean 0 and the standardised prior's log-variance for an absent one; a query is compared on its own modalities' blocks."""
    from mmvae.retrieval.embed import Embeddings, query_dims
    raw = _two_expert_cohort()
    n, m, e = raw.experts_mu.shape
    x = raw.as_embedding("experts").standardized()
    assert x.mu.shape == (n, m * e) and x.identity["latent_dim"] == m * e and x.embedding == "experts"
    for j in range(m):
        have = raw.present[:, j] > 0
        block = x.mu[:, j * e:(j + 1) * e]
        np.testing.assert_allclose(block[have].mean(0), 0, atol=1e-5)
        np.testing.assert_allclose(block[have].std(0), 1, atol=1e-4)
        prior_lv = -2 * np.log(np.asarray(x.identity["standardize"]["scale"])[j * e:(j + 1) * e])
        assert np.all(block[~have] == 0)
        np.testing.assert_allclose(x.logvar[~have, j * e:(j + 1) * e], np.broadcast_to(prior_lv, (int((~have).sum()), e)),
                                   rtol=1e-5)
    # a query from a alone is a's block of the database vector; its dims are a's block
    qa, _ = x.subset_posterior(np.array([1, 0], np.float32))
    np.testing.assert_allclose(qa[:, :e], x.mu[:, :e], atol=1e-6)
    assert np.all(qa[:, e:] == 0)
    np.testing.assert_array_equal(x.query_dims(np.array([1, 0])), np.r_[np.ones(e), np.zeros(e)])
    np.testing.assert_array_equal(query_dims(x.identity, x.modalities, ["a", "b"]), np.ones(m * e))
    # the fused kind is unchanged by the round trip, and the kind survives save/load
    np.testing.assert_allclose(x.as_embedding("fused").mu, raw.mu, atol=1e-5)
    x.save(tmp_path / "x.npz")
    back = Embeddings.load(tmp_path / "x.npz")
    assert back.embedding == "experts" and back.identity["standardize"] == x.identity["standardize"]
    np.testing.assert_allclose(back.subset_posterior(np.array([0, 1], np.float32))[0],
                               x.subset_posterior(np.array([0, 1], np.float32))[0], atol=1e-6)
    with pytest.raises(Exception, match="retrieval.embedding"):
        raw.as_embedding("mean")


def test_experts_embedding_keeps_the_evidence_a_confident_expert_hides():
    """The reason for the option: a confident uninformative expert owns the PoE mean (all-modality mAP
    near chance); the concatenated experts still retrieve by the informative one."""
    from mmvae.retrieval.evaluate import chance_map, evaluate
    raw = _two_expert_cohort()
    both = [np.ones(2, np.float32)]
    fused_map = evaluate(raw.standardized(), "class", 10, subsets=both, n_boot=0)[0]["map@10"]
    experts_map = evaluate(raw.as_embedding("experts").standardized(), "class", 10, subsets=both,
                           n_boot=0)[0]["map@10"]
    chance = chance_map([lab["class"] for lab in raw.labels], range(len(raw.labels)))
    assert fused_map < chance + 0.15, (fused_map, chance)
    assert experts_map > fused_map + 0.3, (experts_map, fused_map)


def test_evaluate_own_queries_each_case_with_what_it_has():
    """evaluate(own=True): every case with at least one modality of the subset queries with those it has,
    compared on their blocks; a case lacking ``b`` ranks exactly as its ``a``-only query does."""
    from mmvae.retrieval.evaluate import evaluate
    x = _two_expert_cohort().as_embedding("experts").standardized()
    both, a_only = np.ones(2, np.float32), np.array([1, 0], np.float32)
    lacks_b = np.nonzero(x.present[:, 1] == 0)[0]
    strict = evaluate(x, "class", 10, subsets=[both], n_boot=0)[0]
    own = evaluate(x, "class", 10, subsets=[both], n_boot=0, own=True)[0]
    assert strict["num_queries"] == len(x.case_ids) - len(lacks_b) and own["num_queries"] == len(x.case_ids)
    mixed = evaluate(x, "class", 10, subsets=[both], n_boot=0, own=True, query_idx=lacks_b)[0]
    alone = evaluate(x, "class", 10, subsets=[a_only], n_boot=0, query_idx=lacks_b)[0]
    assert mixed["num_queries"] == len(lacks_b) and mixed["map@10"] == pytest.approx(alone["map@10"])


def test_experts_embedding_with_private_blocks_keeps_each_experts_own_dimensions():
    """With private blocks an expert holds the prior placeholder (mean 0, log-variance 10) on the other
    modalities' private blocks: its block in the retrieval vector is its shared + own private dims only,
    and an absent block carries the standardised prior's log-variance (−2 log s: wider than a posterior)."""
    from mmvae.retrieval.embed import Embeddings, embedding_width, fused, own_dims
    rng = np.random.default_rng(1)
    n, m, shared, p = 30, 3, 4, 2
    e = shared + m * p
    emu = np.zeros((n, m, e), np.float32)
    elv = np.full((n, m, e), 10.0, np.float32)
    for j in range(m):
        own = np.r_[np.arange(shared), shared + j * p + np.arange(p)]
        emu[:, j, own] = rng.normal(size=(n, len(own))) * 0.5
        elv[:, j, own] = -2.0
    present = np.ones((n, m), np.float32)
    present[:5, 2] = 0
    mu, lv = fused(emu, elv, present, "poe")
    raw = Embeddings([f"c{i}" for i in range(n)], ["a", "b", "c"], emu, elv, present, mu, lv,
                     [{"class": str(i % 2)} for i in range(n)], {"shared_dim": shared, "private_dim": p}, "poe")
    x = raw.as_embedding("experts").standardized()
    b = shared + p
    assert x.mu.shape == (n, m * b) == (n, embedding_width("experts", e, m, p))
    np.testing.assert_allclose(own_dims(emu, p)[:, 1], emu[:, 1, np.r_[0:shared, shared + p:shared + 2 * p]])
    assert np.all(np.abs(x.logvar[5:]) < 20)                          # no placeholder dims left
    scale = np.asarray(x.identity["standardize"]["scale"])
    np.testing.assert_allclose(x.logvar[:5, 2 * b:], np.broadcast_to(-2 * np.log(scale[2 * b:]), (5, b)), rtol=1e-5)
    assert np.all(x.logvar[:5, 2 * b:] > x.logvar[5:, 2 * b:].max())  # absent = wider than any posterior here
    np.testing.assert_array_equal(x.query_dims(np.array([0, 1, 0])), np.r_[np.zeros(b), np.ones(b), np.zeros(b)])
