"""Property tests of the fusion math (pure functions, no model)."""
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmvae.models import fusion as F


def _experts(seed=0, b=3, m=4, l=5):
    rng = np.random.default_rng(seed)
    return (jnp.asarray(rng.normal(size=(b, m, l)), jnp.float32),
            jnp.asarray(rng.uniform(-3, 3, size=(b, m, l)), jnp.float32))


def test_poe_one_expert_and_prior_matches_closed_form():
    mu = jnp.array([[[2.0, -1.0]]])
    lv = jnp.array([[[np.log(0.25), np.log(4.0)]]])
    g = F.poe(mu, lv, jnp.ones((1, 1)))
    # precisions: prior 1, expert 1/var → var = 1/(1 + 1/var_e), mu = var * mu_e / var_e
    var_e = np.array([0.25, 4.0])
    var = 1.0 / (1.0 + 1.0 / var_e)
    np.testing.assert_allclose(np.exp(g.logvar[0]), var, rtol=1e-5)
    np.testing.assert_allclose(g.mu[0], var * np.array([2.0, -1.0]) / var_e, rtol=1e-5)


def test_poe_two_experts_closed_form_without_prior():
    mu = jnp.array([[[1.0], [3.0]]])
    lv = jnp.log(jnp.array([[[1.0], [3.0]]]))
    g = F.poe(mu, lv, jnp.ones((1, 2)), prior=False)
    # T = 1 + 1/3 = 4/3; mu = (1*1 + 3/3) / (4/3) = 1.5
    np.testing.assert_allclose(np.exp(g.logvar), [[0.75]], rtol=1e-5)
    np.testing.assert_allclose(g.mu, [[1.5]], rtol=1e-5)


def test_poe_order_of_experts_does_not_matter():
    mu, lv = _experts()
    mask = jnp.array([[1, 1, 0, 1], [1, 0, 1, 1], [0, 0, 1, 0]], jnp.float32)
    g = F.poe(mu, lv, mask)
    for perm in itertools.permutations(range(4)):
        p = list(perm)
        gp = F.poe(mu[:, p], lv[:, p], mask[:, p])
        np.testing.assert_allclose(gp.mu, g.mu, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(gp.logvar, g.logvar, rtol=1e-5, atol=1e-6)


def test_masking_an_expert_equals_leaving_it_out():
    mu, lv = _experts(1)
    mask = jnp.array([[1, 0, 1, 1]] * 3, jnp.float32)
    g_masked = F.poe(mu, lv, mask)
    keep = [0, 2, 3]
    g_left = F.poe(mu[:, keep], lv[:, keep], jnp.ones((3, 3)))
    np.testing.assert_allclose(g_masked.mu, g_left.mu, rtol=1e-6)
    np.testing.assert_allclose(g_masked.logvar, g_left.logvar, rtol=1e-6)
    # Garbage (even NaN) in a masked expert must not leak.
    mu_bad = mu.at[:, 1].set(jnp.nan)
    lv_bad = lv.at[:, 1].set(jnp.inf)
    g_bad = F.poe(mu_bad, lv_bad, mask)
    np.testing.assert_allclose(g_bad.mu, g_left.mu, rtol=1e-6)


def test_all_experts_missing_gives_the_prior():
    mu, lv = _experts(2)
    for prior in (True, False):
        g = F.poe(mu, lv, jnp.zeros((3, 4)), prior=prior)
        np.testing.assert_allclose(g.mu, 0.0, atol=1e-7)
        np.testing.assert_allclose(g.logvar, 0.0, atol=1e-7)
    for fusion in F.FUSIONS:
        g = F.fuse(mu, lv, jnp.zeros((3, 4)), fusion)
        np.testing.assert_allclose(g.mu, 0.0, atol=1e-7)
        np.testing.assert_allclose(g.logvar, 0.0, atol=1e-6)


@pytest.mark.parametrize("extreme", [80.0, -80.0])
def test_extreme_logvars_give_finite_outputs_and_gradients(extreme):
    mu, lv = _experts(3)
    lv = lv.at[:, 0].set(extreme).at[:, 2].set(-extreme)
    mask = jnp.ones((3, 4))
    for fusion in F.FUSIONS:
        def f(mu, lv):
            g = F.fuse(mu, lv, mask, fusion)
            return jnp.sum(g.mu) + jnp.sum(g.logvar) + jnp.sum(F.kl_to_standard_normal(g))
        val, grads = jax.value_and_grad(f, argnums=(0, 1))(mu, lv)
        assert np.isfinite(val)
        assert all(np.isfinite(np.asarray(x)).all() for x in grads)
    g = F.poe(mu, lv, mask)
    assert float(g.logvar.min()) >= F.LOGVAR_MIN - 1e-3 - np.log(5)  # at most 5 experts' worth below the clamp


def test_moe_and_mopoe_honour_the_mask():
    mu, lv = _experts(4)
    mask = jnp.array([[1, 0, 1, 0]] * 3, jnp.float32)
    keep = [0, 2]
    for fusion in ("moe", "mopoe"):
        a = F.fuse(mu, lv, mask, fusion)
        b = F.fuse(mu[:, keep], lv[:, keep], jnp.ones((3, 2)), fusion)
        np.testing.assert_allclose(a.mu, b.mu, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(a.logvar, b.logvar, rtol=1e-5, atol=1e-6)


def test_moe_of_one_expert_is_that_expert():
    mu, lv = _experts(5)
    mask = jnp.array([[0, 1, 0, 0]] * 3, jnp.float32)
    g = F.fuse(mu, lv, mask, "moe")
    np.testing.assert_allclose(g.mu, mu[:, 1], rtol=1e-5)
    np.testing.assert_allclose(g.logvar, lv[:, 1], rtol=1e-4, atol=1e-5)


def test_mixture_moments_of_two_components():
    mus = jnp.array([[[0.0]], [[2.0]]])
    lvs = jnp.zeros((2, 1, 1))
    g = F.mixture_moments(mus, lvs, jnp.ones((2, 1)))
    np.testing.assert_allclose(g.mu, [[1.0]])
    np.testing.assert_allclose(np.exp(g.logvar), [[2.0]], rtol=1e-6)  # 1 + E[mu^2] - 1 = 1 + 2 - 1


def test_kl_matches_numeric_integral():
    g = F.Gaussian(jnp.array([0.7]), jnp.array([np.log(0.3)]))
    z = np.linspace(-8, 8, 200001)
    q = np.exp(-0.5 * (z - 0.7) ** 2 / 0.3) / np.sqrt(2 * np.pi * 0.3)
    p = np.exp(-0.5 * z ** 2) / np.sqrt(2 * np.pi)
    kl_num = np.trapezoid(q * (np.log(q + 1e-300) - np.log(p)), z)
    np.testing.assert_allclose(float(F.kl_to_standard_normal(g)), kl_num, rtol=1e-4)


def test_all_subsets_enumeration():
    s = F.all_subsets(4)
    assert s.shape == (15, 4)
    assert len({tuple(r) for r in s}) == 15
    assert s[:4].sum(1).tolist() == [1, 1, 1, 1] and s[-1].tolist() == [1, 1, 1, 1]
