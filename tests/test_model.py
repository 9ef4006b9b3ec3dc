"""Model core: layers, encoders, one compiled step for every presence pattern, errors."""
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mmvae.config import base_config
from mmvae.errors import ConfigError
from mmvae.models.modalities.image import ImageEncoder
from mmvae.models.layers import depth_to_space, space_to_depth
from mmvae.models.mvae import build_model
from mmvae.objectives.elbo import elbo_loss, draw_subsets, ObjectiveSpec
from mmvae.runs.setup import model_spec, objective_spec, optimizer
from mmvae.runs.setup import init_state
from mmvae.train.step import make_train_step

VOCAB = 40


def tiny_config(**obj):
    c = base_config()
    c.data.image_modalities = ["t1", "t2", "dwi"]
    c.data.shape = (8, 8, 8)
    c.data.text.max_len = 12
    c.model.latent_dim = 4
    c.model.image.channels = (4, 8)
    c.model.text.hidden = 16
    c.model.text.heads = 2
    c.model.text.layers = 1
    c.model.text.intermediate = 16
    c.model.report_decoder.hidden = 16
    c.train.steps = 5
    for k, v in obj.items():
        c.objective[k] = v
    return c


def make_batch(pattern, b=2, seed=0, shape=(8, 8, 8), t=12):
    rng = np.random.default_rng(seed)
    batch = {}
    for i, m in enumerate(["t1", "t2", "dwi"]):
        batch[f"image/{m}"] = rng.normal(size=(b, 1) + shape).astype(np.float32)
        batch[f"series_mask/{m}"] = np.full((b, 1), float(pattern[i]), np.float32)
    batch["report/ids"] = rng.integers(5, VOCAB, size=(b, t)).astype(np.int32)
    batch["report/mask"] = np.full((b, t), int(pattern[3]), np.int32)
    batch["clinical/num"] = np.zeros((b, 0), np.float32)
    batch["clinical/num_mask"] = np.zeros((b, 0), np.float32)
    batch["clinical/cat"] = np.zeros((b, 0), np.int32)
    batch["clinical/cat_mask"] = np.zeros((b, 0), np.float32)
    return batch


def jitted(model, fn):
    """``fn(model, *args)`` compiled: eager dispatch compiles every primitive of the model once
    (tens of seconds on 2 cores); one jit of the whole function is a few."""
    gd, state = nnx.split(model)
    f = jax.jit(lambda st, *a: fn(nnx.merge(gd, st), *a))
    return lambda *a: f(state, *a)


def test_space_to_depth_round_trip_and_block_layout():
    x = jnp.arange(2 * 4 * 6 * 8 * 3, dtype=jnp.float32).reshape(2, 4, 6, 8, 3)
    y = space_to_depth(x, 2)
    assert y.shape == (2, 2, 3, 4, 24)
    np.testing.assert_array_equal(depth_to_space(y, 2), x)
    np.testing.assert_array_equal(np.sort(np.asarray(y[1, 1, 2, 3])), np.sort(np.asarray(x[1, 2:4, 4:6, 6:8]).ravel()))
    x2 = jnp.arange(2 * 4 * 6 * 3, dtype=jnp.float32).reshape(2, 4, 6, 3)
    np.testing.assert_array_equal(depth_to_space(space_to_depth(x2, 2), 2), x2)
    with pytest.raises(ValueError, match="divisible"):
        space_to_depth(jnp.zeros((1, 5, 4, 4, 1)), 2)


def test_one_compilation_for_all_15_presence_patterns():
    c = tiny_config()
    spec = model_spec(c, VOCAB)
    assert spec.modalities == ("t1", "t2", "dwi", "report")
    obj = objective_spec(c, spec)
    tx, lr = optimizer(c)
    gd, state = init_state(build_model(spec, 0), tx)
    step = jax.jit(make_train_step(gd, tx, obj, lr), donate_argnums=0)
    losses = []
    for pattern in itertools.product([0, 1], repeat=4):
        if sum(pattern) == 0:
            continue
        state, m = step(state, make_batch(pattern), jax.random.key(0))
        losses.append(float(m["loss"]))
    assert step._cache_size() == 1
    assert len(losses) == 15 and np.all(np.isfinite(losses))
    # More present modalities reconstruct more data: the all-present loss is the largest.
    assert losses[-1] == max(losses)


@pytest.mark.parametrize("obj", [dict(subsets="all"), dict(subsets="unimodal"), dict(subsets="mopoe", num_subset_samples=3),
                                 dict(subsets="mvae", iw_samples=3), dict(subsets="mvae", alignment_weight=1.0,
                                                                          kl_warmup_steps=10),
                                 dict(subsets="mvae", likelihood="gaussian", learn_scale=True, report="tokens"),
                                 dict(subsets="mvae", text_encoder="bow"),
                                 dict(subsets="mvae", report="embedding")])
def test_objective_variants_are_finite_and_differentiable(obj):
    obj = dict(obj)
    report_kind = obj.pop("report", "bow")
    text_encoder = obj.pop("text_encoder", "bert")
    c = tiny_config(**obj)
    c.model.report_decoder.kind = report_kind
    c.model.text.encoder = text_encoder
    spec = model_spec(c, VOCAB)
    model = build_model(spec, 0)
    o = objective_spec(c, spec)
    batch = make_batch((1, 0, 1, 1), b=3)
    gd, params = nnx.split(model, nnx.Param)

    def f(p):
        return elbo_loss(nnx.merge(gd, p), batch, jax.random.key(1), jnp.asarray(5), o)[0]

    loss, grads = jax.jit(jax.value_and_grad(f))(params)
    assert np.isfinite(float(loss))
    assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))


def test_draw_subsets_stay_inside_present_modalities():
    present = jnp.array([[1, 0, 1, 1], [0, 1, 0, 0], [0, 0, 0, 0]], jnp.float32)
    for spec in [ObjectiveSpec("mvae", 2), ObjectiveSpec("all"), ObjectiveSpec("unimodal"),
                 ObjectiveSpec("mopoe", num_subset_samples=5)]:
        s = np.asarray(draw_subsets(jax.random.key(0), present, spec))
        assert np.all(s <= np.asarray(present)[None])
        assert np.all(s[:, 2] == 0)   # a case with nothing present gets empty subsets
        assert np.all(s[:, 1].sum(-1) <= 1)


def test_kl_warmup_and_iw_bound_ordering():
    c = tiny_config(subsets="mvae")
    spec = model_spec(c, VOCAB)
    model = build_model(spec, 0)
    batch = make_batch((1, 1, 1, 1), b=4)
    o1 = objective_spec(c, spec)
    import dataclasses
    o_iw = dataclasses.replace(o1, iw_samples=16, num_random_subsets=0)
    o_1 = dataclasses.replace(o1, num_random_subsets=0)
    _, m1 = jitted(model, lambda m, b, k, t: elbo_loss(m, b, k, t, o_1))(batch, jax.random.key(0), jnp.asarray(0))
    _, miw = jitted(model, lambda m, b, k, t: elbo_loss(m, b, k, t, o_iw))(batch, jax.random.key(0), jnp.asarray(0))
    # The importance-weighted bound is tighter (higher) than the single-sample ELBO in expectation.
    assert float(miw["elbo"]) > float(m1["elbo"]) - 1.0
    ow = dataclasses.replace(o1, kl_warmup_steps=100)
    _, mw = jitted(model, lambda m, b, k, t: elbo_loss(m, b, k, t, ow))(batch, jax.random.key(0), jnp.asarray(25))
    assert float(mw["beta"]) == pytest.approx(0.25)


def test_nonfinite_inputs_are_masked_and_counted():
    c = tiny_config()
    spec = model_spec(c, VOCAB)
    model = build_model(spec, 0)
    o = objective_spec(c, spec)
    batch = make_batch((1, 1, 1, 1), b=2)
    batch["image/t2"][0, 0, 1, 2, 3] = np.nan
    batch["image/dwi"][1, 0, 0, 0, 0] = np.inf
    loss, m = jitted(model, lambda mm, b, k, t: elbo_loss(mm, b, k, t, o))(batch, jax.random.key(0), jnp.asarray(0))
    assert np.isfinite(float(loss))
    assert int(m["nonfinite_inputs"]) == 2
    _, present, _ = jitted(model, lambda mm, b: mm.encode(b))(batch)
    np.testing.assert_array_equal(np.asarray(present), [[1, 0, 1, 1], [1, 1, 0, 1]])


def test_set_pooling_is_permutation_invariant_and_masked():
    for pooling in ("poe", "mean", "attention"):
        enc = ImageEncoder((8, 8, 8), (4, 8), 4, set_pooling=pooling, rngs=nnx.Rngs(0))
        if pooling == "attention":
            enc.query[...] = jnp.linspace(-1, 1, enc.query.shape[0])
        x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 3, 8, 8, 8)), jnp.float32)
        mask = jnp.array([[1, 1, 0], [1, 1, 1]], jnp.float32)
        g = enc(x, mask)
        g_perm = enc(x[:, [1, 0, 2]], mask[:, [1, 0, 2]])
        np.testing.assert_allclose(g.mu, g_perm.mu, rtol=1e-4, atol=1e-5)
        # Masked series content must not matter.
        g_junk = enc(x.at[0, 2].set(100.0), mask)
        np.testing.assert_allclose(g.mu[0], g_junk.mu[0], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("field,value,match", [
    ("model.fusion", "sum", "unknown fusion"),
    ("model.latent_dim", 0, "latent_dim"),
    ("objective.likelihood", "poisson", "likelihood"),
    ("objective.subsets", "some", "subsets"),
])
def test_bad_model_config_fails_at_build_naming_the_field(field, value, match):
    c = tiny_config()
    group, key = field.split(".")
    c[group][key] = value
    with pytest.raises(ConfigError, match=match):
        spec = model_spec(c, VOCAB)
        objective_spec(c, spec)


def test_report_modality_without_encoder_config_fails():
    c = tiny_config()
    with pytest.raises(ConfigError, match="report"):
        model_spec(c, 0)   # no tokenizer → no encoder for 'report'


def test_cross_modal_generation_shapes():
    c = tiny_config()
    spec = model_spec(c, VOCAB)
    model = build_model(spec, 0)
    batch = make_batch((1, 0, 0, 0), b=2)
    g = model.posterior(batch)
    out = model.decode(g.mu)
    assert out["t2"].shape == (2, 8, 8, 8)        # a missing sequence synthesised from T1
    assert out["report"].shape == (2, VOCAB)      # report word logits from images alone


def test_2d_model_trains_one_step():
    c = tiny_config()
    c.data.spatial_dims = 2
    c.data.shape = (16, 16)
    spec = model_spec(c, VOCAB)
    obj = objective_spec(c, spec)
    tx, lr = optimizer(c)
    gd, state = init_state(build_model(spec, 0), tx)
    step = jax.jit(make_train_step(gd, tx, obj, lr))
    batch = make_batch((1, 1, 0, 1), b=2, shape=(16, 16))
    state, m = step(state, batch, jax.random.key(0))
    assert np.isfinite(float(m["loss"])) and int(state["step"]) == 1


def test_top_report_terms_from_images_alone():
    from mmvae.models.generate import top_report_terms

    class Tok:
        def convert_ids_to_tokens(self, ids):
            return [f"w{i}" for i in ids]

    c = tiny_config()
    spec = model_spec(c, VOCAB, special_ids=(0, 1, 2))
    model = build_model(spec, 0)
    batch = make_batch((1, 1, 1, 1), b=2)
    terms = top_report_terms(model, batch, Tok(), given=["t1", "t2", "dwi"], k=5)
    assert len(terms) == 2 and len(terms[0]) == 5
    assert all(w not in ("w0", "w1", "w2") for w, _ in terms[0])
    probs = [p for _, p in terms[0]]
    assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1
    with pytest.raises(ConfigError, match="unknown modality"):
        top_report_terms(model, batch, Tok(), given=["pet"])


def _conv_params(jaxpr):
    """Every conv_general_dilated equation in a (closed) jaxpr, sub-jaxprs included."""
    out = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "conv_general_dilated":
            out.append(eqn.params)
        for v in eqn.params.values():
            for sub in (v if isinstance(v, (list, tuple)) else [v]):
                if hasattr(sub, "jaxpr"):
                    out += _conv_params(sub.jaxpr if hasattr(sub.jaxpr, "eqns") else sub.jaxpr.jaxpr)
                elif hasattr(sub, "eqns"):
                    out += _conv_params(sub)
    return out


def test_default_blocks_are_the_fast_ones_no_strided_or_transposed_convs():
    """Forward and backward of the default model use stride-1, undilated convs only:
    sampling is space-to-depth / depth-to-space (strided and transposed conv gradients
    are 35-70x slower on XLA CPU)."""
    c = tiny_config()
    spec = model_spec(c, VOCAB)
    model = build_model(spec, 0)
    o = objective_spec(c, spec)
    gd, params = nnx.split(model, nnx.Param)
    batch = make_batch((1, 1, 1, 1))

    def f(p):
        return elbo_loss(nnx.merge(gd, p), batch, jax.random.key(1), jnp.asarray(5), o)[0]

    convs = _conv_params(jax.make_jaxpr(jax.grad(f))(params).jaxpr)
    assert len(convs) >= 6          # encoder + decoder convs, forward and gradients
    for p in convs:
        # Gradients of a stride-1 'SAME' conv are stride-1 convs too; anything strided or
        # dilated in the lhs (a transposed conv) would show here.
        # (3-D convs, or the 2-D convs over depth slices of model.image.conv=depth2d)
        assert set(p["window_strides"]) == {1}, p["window_strides"]
        assert set(p["lhs_dilation"]) == {1}, p["lhs_dilation"]


def _elbo_and_grads(c):
    """``((loss, parameter gradients), spec, loss function, parameters)`` of the tiny model
    built from config ``c``, on a fixed batch with one modality missing."""
    spec = model_spec(c, VOCAB)
    o = objective_spec(c, spec)
    gd, params = nnx.split(build_model(spec, 0), nnx.Param)
    batch = make_batch((1, 0, 1, 1), b=3)

    def f(p):
        return elbo_loss(nnx.merge(gd, p), batch, jax.random.key(1), jnp.asarray(5), o)[0]

    return jax.jit(jax.value_and_grad(f))(params), spec, f, params


@pytest.mark.parametrize("chunks,iw", [(2, 1), (3, 1), (3, 2)])
def test_chunked_subset_decoding_matches_one_pass(chunks, iw):
    """objective.decode_chunks only trades memory for recomputation: same loss, same gradients.
    With iw_samples = 1 the chunks' gradients are computed in the forward pass
    (fused_subset_reconstruction, a custom VJP); with importance weighting each chunk is
    rematerialised instead."""
    (l1, g1), (l2, g2) = (_elbo_and_grads(tiny_config(subsets="all", decode_chunks=n, iw_samples=iw))[0]
                          for n in (1, chunks))
    np.testing.assert_allclose(float(l1), float(l2), rtol=1e-5)
    _, _, f, params = _elbo_and_grads(tiny_config(subsets="all", decode_chunks=chunks, iw_samples=iw))
    program = str(jax.make_jaxpr(f)(params))
    assert ("custom_vjp_call" in program) == (iw == 1)
    assert ("checkpoint" in program or "remat" in program) == (iw > 1)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-4, atol=1e-5)


def test_patch_stem_shapes_and_bad_patch():
    c = tiny_config()
    c.data.shape = (16, 16, 16)
    c.model.image.patch = 4
    c.model.image.decoder_blocks = 0
    c.model.image.full_res_channels = 0          # unpatchify head: no full-resolution feature maps
    spec = model_spec(c, VOCAB)
    assert spec.patch == 4 and spec.decoder_blocks == 0 and spec.full_res_channels == 0
    model = build_model(spec, 0)
    batch = make_batch((1, 1, 1, 1), shape=(16, 16, 16))
    experts, present, _ = model.encode(batch)
    assert experts.mu.shape == (2, 4, 4)
    out = model.decode(jnp.zeros((5, 4)))
    assert out["t1"].shape == (5, 16, 16, 16) and out["report"].shape == (5, VOCAB)
    dec = model.decoders["t1"]
    assert dec.out is None and dec.layers[-1].proj.kernel.shape == (4, 4 ** 3)   # c_0 = 4 -> 4³ voxels
    # The loss path scores the patched layout (no depth-to-space): same log-likelihoods.
    z = jax.random.normal(jax.random.key(3), (2 * 2, 4))
    patched = model.decode(z, patched=True)
    # no decoder blocks: the hierarchical (deferred) layout, (N, P, 1, 1, f³), P = 16³ / 4³
    assert patched["t1"].shape == (4, 64, 1, 1, 64) and patched["report"].shape == (4, VOCAB)
    np.testing.assert_allclose(np.asarray(model.log_likelihoods(patched, batch, 2)),
                               np.asarray(model.log_likelihoods(model.decode(z), batch, 2)), rtol=1e-5)
    # The encoder down-samples by patch 4 x 2 ** (2 stages - 1) = 8: 12 does not divide.
    c.data.shape = (12, 12, 12)
    with pytest.raises(ConfigError, match=r"data.shape \(12, 12, 12\) must be divisible by 8"):
        model_spec(c, VOCAB)
    c.data.shape = (16, 16, 16)
    c.model.image.patch = 0
    with pytest.raises(ConfigError, match="patch"):
        model_spec(c, VOCAB)


# ----------------------------------------------------------------- conv implementations
def test_depth2d_conv_matches_xla_conv_values_and_gradients():
    """conv3d_depth2d (three 2-D convs over depth slices, custom VJP) is lax.conv_general_dilated
    up to float summation order: output, input gradient and kernel gradient, odd shapes."""
    from jax import lax
    from mmvae.models.layers import conv3d_depth2d
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(2, 5, 6, 7, 8)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(3, 3, 3, 8, 12)) * 0.2, jnp.float32)
    xla = lambda x, w: lax.conv_general_dilated(x, w, (1, 1, 1), "SAME",
                                                dimension_numbers=("NDHWC", "DHWIO", "NDHWC"))
    outs = []
    for f in (xla, conv3d_depth2d):
        loss = lambda x, w, f=f: jnp.sum(jnp.sin(f(x, w)) * jnp.arange(12.0))
        outs.append((f(x, w),) + jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(x, w))
    (y1, l1, (gx1, gw1)), (y2, l2, (gx2, gw2)) = outs
    assert y2.shape == (2, 5, 6, 7, 12)
    np.testing.assert_allclose(y2, y1, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(float(l2), float(l1), rtol=1e-5)
    for got, ref in ((gx2, gx1), (gw2, gw1)):
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5 * float(jnp.max(jnp.abs(ref))))
    # not trivially equal: a shifted kernel would give a different output
    assert float(jnp.max(jnp.abs(xla(x, jnp.roll(w, 1, axis=0)) - y1))) > 0.1
    # bf16 compute: the three slices are summed in f32 and rounded once, so the error is one
    # bf16 rounding of the f32 result (XLA's own bf16 conv is no closer)
    xb, wb = x.astype(jnp.bfloat16), w.astype(jnp.bfloat16)
    yb = conv3d_depth2d(xb, wb)
    assert yb.dtype == jnp.bfloat16
    exact = xla(xb.astype(jnp.float32), wb.astype(jnp.float32))
    scale = float(jnp.max(jnp.abs(exact)))
    err_d2 = float(jnp.max(jnp.abs(yb.astype(jnp.float32) - exact)))
    err_xla = float(jnp.max(jnp.abs(xla(xb, wb).astype(jnp.float32) - exact)))
    assert err_d2 <= max(err_xla, 2 ** -8 * scale), (err_d2, err_xla, scale)


def test_conv_option_gives_the_same_model_loss_and_gradients():
    """model.image.conv only chooses how the 3³ convs are computed: the ELBO and every
    parameter gradient of a model with residual blocks agree between xla and depth2d (and
    auto: xla for these tiny convs, below layers.AUTO_MIN_FLOPS); the options share one
    parameter layout and one fingerprint."""
    from mmvae.runs.files import fingerprint
    res, specs = {}, {}
    for impl in ("xla", "depth2d", "auto"):
        c = tiny_config(subsets="all")
        c.model.image.full_res_blocks = True
        c.model.image.conv = impl
        res[impl], specs[impl], f, params = _elbo_and_grads(c)
        if impl == "depth2d":
            names = {e.primitive.name for e in jax.make_jaxpr(f)(params).jaxpr.eqns}
            assert any("custom_vjp" in n for n in names), names     # the path is really taken
    assert fingerprint(specs["xla"]) == fingerprint(specs["depth2d"])
    l0, g0 = res["xla"]
    for impl in ("depth2d", "auto"):
        l1, g1 = res[impl]
        np.testing.assert_allclose(float(l1), float(l0), rtol=1e-5)
        assert jax.tree.structure(g1) == jax.tree.structure(g0)
        for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g0)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-4, atol=2e-5)


def test_depth2d_falls_back_to_xla_where_it_does_not_apply():
    from jax import lax
    from mmvae.models.layers import conv_general_dilated
    rng = np.random.default_rng(1)
    x2 = jnp.asarray(rng.normal(size=(2, 6, 6, 4)), jnp.float32)
    w2 = jnp.asarray(rng.normal(size=(3, 3, 4, 5)), jnp.float32)
    dn = ("NHWC", "HWIO", "NHWC")
    got = conv_general_dilated("depth2d", x2, w2, (1, 1), "SAME", dimension_numbers=dn)
    np.testing.assert_array_equal(got, lax.conv_general_dilated(x2, w2, (1, 1), "SAME", dimension_numbers=dn))
    x3 = jnp.asarray(rng.normal(size=(1, 6, 6, 6, 4)), jnp.float32)
    w3 = jnp.asarray(rng.normal(size=(3, 3, 3, 4, 5)), jnp.float32)
    dn3 = ("NDHWC", "DHWIO", "NDHWC")
    strided = conv_general_dilated("depth2d", x3, w3, (2, 2, 2), "SAME", dimension_numbers=dn3)
    assert strided.shape == (1, 3, 3, 3, 5)
    ref3 = lax.conv_general_dilated(x3, w3, (1, 1, 1), "SAME", dimension_numbers=dn3)
    dnums = lax.conv_dimension_numbers(x3.shape, w3.shape, dn3)
    for kw in (dict(padding=[(1, 1)] * 3), dict(dimension_numbers=dnums), dict(lhs_dilation=(1, 1, 1))):
        args = dict(padding="SAME", dimension_numbers=dn3) | kw
        jaxpr = jax.make_jaxpr(lambda x, w: conv_general_dilated("depth2d", x, w, (1, 1, 1), **args))(x3, w3)
        assert any("custom_vjp" in e.primitive.name for e in jaxpr.jaxpr.eqns), kw          # the fast path
        np.testing.assert_allclose(conv_general_dilated("depth2d", x3, w3, (1, 1, 1), **args), ref3, rtol=1e-5, atol=1e-5)
    for kw in (dict(padding=[(0, 0)] * 3), dict(preferred_element_type=jnp.float32), dict(rhs_dilation=np.array([2, 2, 2]))):
        args = dict(padding="SAME", dimension_numbers=dn3) | kw
        jaxpr = jax.make_jaxpr(lambda x, w: conv_general_dilated("depth2d", x, w, (1, 1, 1), **args))(x3, w3)
        assert not any("custom_vjp" in e.primitive.name for e in jaxpr.jaxpr.eqns), kw      # XLA's conv
    with pytest.raises(ValueError, match="unknown conv implementation 'fast'"):
        conv_general_dilated("fast", x3, w3, (1, 1, 1), "SAME", dimension_numbers=dn3)


@pytest.mark.parametrize("shape,channels,patch", [((16, 16, 16), (4, 8, 8), 2), ((32, 24), (4, 8), 4)])
def test_deferred_decoder_layout_is_a_relabelling_of_the_image(shape, channels, patch):
    """A decoder without residual blocks skips every depth-to-space in its patched output;
    patchify puts an image in the same voxel order, so the likelihood is unchanged."""
    from mmvae.models.modalities.image import ImageDecoder
    from mmvae.models import likelihoods
    dec = ImageDecoder(shape, channels, 5, patch=patch, blocks=0, full_res_channels=0, rngs=nnx.Rngs(0))
    assert dec.deferred
    z = jax.random.normal(jax.random.key(0), (3, 5))
    full, pat = dec(z), dec(z, patched=True)
    d = len(shape)
    assert pat.shape == (3, int(np.prod(shape)) // patch ** d) + (1,) * (d - 1) + (patch ** d,)
    np.testing.assert_allclose(dec.patchify(full), pat, rtol=1e-6, atol=1e-6)
    # patchify is a permutation: every voxel once (coordinates survive the round trip)
    coords = jnp.arange(int(np.prod(shape)), dtype=jnp.float32).reshape((1,) + shape)
    assert sorted(np.asarray(dec.patchify(coords)).ravel().tolist()) == list(range(int(np.prod(shape))))
    x = jax.random.normal(jax.random.key(1), (3,) + shape)
    ll_full = likelihoods.image_log_likelihood(x, full, jnp.asarray(0.1), "laplace")
    ll_pat = likelihoods.image_log_likelihood(dec.patchify(x), pat, jnp.asarray(0.1), "laplace")
    np.testing.assert_allclose(ll_pat, ll_full, rtol=1e-6)
    # and the same gradients: the patched path's dense layers (layers.dense, custom VJP) vs
    # the plain path's nnx.Linear autodiff, through the likelihood
    gd, params = nnx.split(dec, nnx.Param)
    loss_pat = lambda p: jnp.sum(likelihoods.image_log_likelihood(
        dec.patchify(x), nnx.merge(gd, p)(z, patched=True), jnp.asarray(0.1), "gaussian"))
    loss_full = lambda p: jnp.sum(likelihoods.image_log_likelihood(
        x, nnx.merge(gd, p)(z), jnp.asarray(0.1), "gaussian"))
    g_pat, g_full = jax.grad(loss_pat)(params), jax.grad(loss_full)(params)
    for a, b in zip(jax.tree.leaves(g_pat), jax.tree.leaves(g_full)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-4 * float(jnp.max(jnp.abs(b))))
    assert max(float(jnp.max(jnp.abs(b))) for b in jax.tree.leaves(g_full)) > 0
    blocks = ImageDecoder(shape, channels, 5, patch=patch, blocks=1, full_res_channels=0, rngs=nnx.Rngs(0))
    assert not blocks.deferred       # residual blocks mix neighbouring voxels: plain space-to-depth layout
    np.testing.assert_array_equal(blocks.patchify(full), space_to_depth(full[..., None], patch))


def test_dense_matches_linear_values_and_gradients():
    """layers.dense (kernel gradient as (gᵀx)ᵀ, custom VJP) = nnx.Linear, values and
    gradients w.r.t. input, kernel and bias; also in bfloat16 compute."""
    from mmvae.models.layers import dense
    for dtype, tol in ((jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)):
        lin = nnx.Linear(6, 5, dtype=dtype, rngs=nnx.Rngs(0), bias_init=nnx.initializers.normal(1.0))
        x = jax.random.normal(jax.random.key(2), (3, 4, 6))
        gd, p = nnx.split(lin, nnx.Param)
        ref = lambda x, p: jnp.sum(jnp.sin(nnx.merge(gd, p)(x).astype(jnp.float32)))
        new = lambda x, p: jnp.sum(jnp.sin(dense(x, nnx.merge(gd, p)).astype(jnp.float32)))
        assert dense(x, lin).dtype == lin(x).dtype
        np.testing.assert_allclose(np.asarray(dense(x, lin), np.float32), np.asarray(lin(x), np.float32), rtol=tol, atol=tol)
        (gx0, gp0), (gx1, gp1) = jax.grad(ref, (0, 1))(x, p), jax.grad(new, (0, 1))(x, p)
        for a, b in zip(jax.tree.leaves((gx1, gp1)), jax.tree.leaves((gx0, gp0))):
            np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=tol, atol=tol)


def test_patched_layout_is_recognised_for_2d_images_whose_width_is_the_patch_area():
    """A 2-D decoder output in the deferred layout must never be mistaken for the plain
    layout: here W = f² (8 × 4 images, f = 2), so P = H and a shape-based guess would match."""
    c = tiny_config()
    c.data.spatial_dims = 2
    c.data.shape = (8, 4)
    c.model.image.channels = (4,)
    c.model.image.decoder_blocks = 0
    c.model.image.full_res_channels = 0
    spec = model_spec(c, VOCAB)
    model = build_model(spec, 0)
    assert model.decoders["t1"].deferred
    batch = make_batch((1, 1, 1, 1), b=2, shape=(8, 4))
    z = jax.random.normal(jax.random.key(3), (4, spec.latent_dim))
    plain, patched = model.decode(z), model.decode(z, patched=True)
    assert patched["t1"].shape == (4, 8, 1, 4) and plain["t1"].shape == (4, 8, 4)
    np.testing.assert_allclose(np.asarray(model.log_likelihoods(patched, batch, 2)),
                               np.asarray(model.log_likelihoods(plain, batch, 2)), rtol=1e-5)


def test_bag_of_words_report_encoder_reads_the_bag_not_the_order_padding_or_special_tokens():
    """model.text.encoder='bow' (NVDM's inference network): the posterior is a function of the
    report's word counts only; the default ('bert') keeps the fingerprints of earlier runs."""
    from mmvae.models.modalities.report import BagOfWordsEncoder, ReportEncoder
    from mmvae.runs.files import fingerprint
    c = tiny_config()
    c.model.text.encoder = "bow"
    spec = model_spec(c, VOCAB)
    model = build_model(spec, 0)
    enc = model.encoders["report"]
    assert isinstance(enc, BagOfWordsEncoder) and not hasattr(enc, "bert")
    ids = np.array([[7, 9, 9, 12, 0, 0], [12, 9, 7, 9, 0, 0], [7, 9, 9, 13, 0, 0]], np.int32)
    mask = np.array([[1, 1, 1, 1, 0, 0]] * 3, np.int32)
    g = enc(jnp.asarray(ids), jnp.asarray(mask))
    assert g.mu.shape == (3, 4) and g.logvar.shape == (3, 4)
    np.testing.assert_allclose(g.mu[0], g.mu[1], atol=1e-6)          # same bag, another order
    assert float(jnp.max(jnp.abs(g.mu[0] - g.mu[2]))) > 1e-4           # one word changed
    # padding beyond the mask and special tokens (id 0) do not count
    padded = ids.copy(); padded[0, 4:] = 21
    with_special = np.array([[0, 7, 9, 9, 12, 0]], np.int32)
    g2 = enc(jnp.asarray(padded), jnp.asarray(mask))
    g3 = enc(jnp.asarray(with_special), jnp.asarray([[1, 1, 1, 1, 1, 0]], np.int32))
    np.testing.assert_allclose(g2.mu[0], g.mu[0], atol=1e-6)
    np.testing.assert_allclose(g3.mu[0], g.mu[0], atol=1e-6)
    # the default encoder is BERT, and a spec that never had the field fingerprints as before
    default = model_spec(tiny_config(), VOCAB)
    assert isinstance(build_model(default, 0).encoders["report"], ReportEncoder)
    assert default.report_encoder == "bert" and fingerprint(default) != fingerprint(spec)
    # this spec's fingerprint before the field existed (commit a5e6e9e): runs trained then still load
    assert fingerprint(default) == "42dd11e14143a64e"


def test_bag_of_words_encoder_refuses_a_pretrained_or_frozen_bert():
    from mmvae.config import validate
    for key, value in (("pretrained_dir", "minilm"), ("freeze", True)):
        c = tiny_config()
        c.model.text.encoder = "bow"
        c.model.text[key] = value
        with pytest.raises(ConfigError, match="encoder='bow' has no BERT"):
            validate(c)
    c = tiny_config()
    c.model.text.encoder = "lstm"
    with pytest.raises(ConfigError, match="model.text.encoder"):
        validate(c)


def test_unit_and_info_nce_have_finite_gradients_at_a_zero_mean():
    """An absent expert's mean can be exactly 0: the cosine normalisation must not turn the whole
    step's gradient into NaN (jnp.linalg.norm's gradient at 0 is NaN; such steps were skipped)."""
    from mmvae.objectives.elbo import info_nce, unit
    x = jnp.asarray([[3.0, 4.0], [0.0, 0.0]])
    np.testing.assert_allclose(np.asarray(unit(x)), [[0.6, 0.8], [0.0, 0.0]], rtol=1e-6)
    g = jax.grad(lambda v: jnp.sum(unit(v) * jnp.asarray([[1.0, 2.0], [1.0, 2.0]])))(x)
    assert np.all(np.isfinite(np.asarray(g)))
    mu = jax.random.normal(jax.random.key(0), (4, 2, 3)).at[1, 1].set(0.0)
    present = jnp.asarray([[1, 1], [1, 0], [1, 1], [1, 1]], jnp.float32)
    gi = jax.grad(lambda m: info_nce(m, present, 0.1))(mu)
    assert np.all(np.isfinite(np.asarray(gi))) and float(jnp.abs(gi).sum()) > 0


@pytest.mark.parametrize("blocks", [0, 1])
def test_likelihood_targets_equal_the_raw_batch_path(blocks):
    """model.likelihood_targets (the image targets in the decoder's output layout and the
    finite-series mask, computed once before the chunked decode loop) gives the same
    log-likelihoods and parameter gradients as deriving them from the raw batch, with a
    non-finite series in the batch, for the deferred (no decoder blocks) and the plain
    patched layout; a plain (unpatched) output still reads the raw batch."""
    c = tiny_config()
    c.model.image.decoder_blocks = blocks
    c.model.image.full_res_channels = 0
    spec = model_spec(c, VOCAB)
    model = build_model(spec, 0)
    batch = make_batch((1, 1, 0, 1), b=3)
    batch["image/t1"][1, 0, 2, 3, 4] = np.nan                  # case 1's t1 series is dropped
    prepared = model.likelihood_targets(batch)
    assert {"target/t1", "target_mask/t2"} <= set(prepared) and set(batch) < set(prepared)
    assert float(prepared["target_mask/t1"][1, 0]) == 0.0
    assert np.all(np.isfinite(np.asarray(prepared["target/t1"])))
    z = jax.random.normal(jax.random.key(4), (6, spec.latent_dim))
    gd, params = nnx.split(model, nnx.Param)

    def ll(p, b, patched=True):
        m = nnx.merge(gd, p)
        return m.log_likelihoods(m.decode(z, patched=patched), b, 2)

    raw, pre = jax.jit(ll)(params, batch), jax.jit(ll)(params, prepared)
    assert raw.shape == (2, 3, len(spec.modalities))
    np.testing.assert_allclose(np.asarray(pre), np.asarray(raw), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(jax.jit(ll, static_argnums=2)(params, prepared, False)),
                               np.asarray(raw), rtol=1e-5, atol=1e-4)
    g_raw = jax.grad(lambda p: jnp.sum(ll(p, batch)))(params)
    g_pre = jax.grad(lambda p: jnp.sum(ll(p, prepared)))(params)
    for a, b in zip(jax.tree.leaves(g_pre), jax.tree.leaves(g_raw)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
    assert max(float(jnp.max(jnp.abs(b))) for b in jax.tree.leaves(g_raw)) > 0


def test_fused_chunks_match_one_pass_in_bfloat16():
    """bf16 compute: the fused chunked objective and the one-pass one agree (loss to bf16
    rounding, gradients pointing the same way)."""
    outs = []
    for n in (1, 3):
        c = tiny_config(subsets="all", decode_chunks=n)
        c.model.dtype = "bfloat16"
        outs.append(_elbo_and_grads(c)[0])
    (l1, g1), (l2, g2) = outs
    np.testing.assert_allclose(float(l1), float(l2), rtol=1e-2)
    a = np.concatenate([np.ravel(np.asarray(x, np.float32)) for x in jax.tree.leaves(g1)])
    b = np.concatenate([np.ravel(np.asarray(x, np.float32)) for x in jax.tree.leaves(g2)])
    assert a @ b / np.linalg.norm(a) / np.linalg.norm(b) > 0.99
