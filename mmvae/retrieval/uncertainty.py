"""How sure the model is about a case: measures from its posterior (pure NumPy functions).

For a case with fused posterior :math:`q(z\\mid x_S) = \\mathcal N(\\mu, \\operatorname{diag}\\sigma^2)`
and unimodal experts :math:`q_m = \\mathcal N(\\mu_m, \\operatorname{diag}\\sigma_m^2)`, :math:`m \\in S`:

* **posterior spread** — ``mean_variance`` :math:`= \\frac1E\\sum_j \\sigma_j^2` and ``log_det``
  :math:`= \\log\\det\\Sigma = \\sum_j \\log\\sigma_j^2` (nats); in a product of experts precisions
  add, so removing a modality can only widen the posterior.
* **expert disagreement** — mean over pairs :math:`m \\ne m'` of the observed experts of the
  symmetrised KL divergence :math:`\\tfrac12[\\mathrm{KL}(q_m\\|q_{m'}) + \\mathrm{KL}(q_{m'}\\|q_m)]`,
  with :math:`\\mathrm{KL}(p\\|q) = \\tfrac12\\sum_j[\\log\\frac{\\sigma_{q,j}^2}{\\sigma_{p,j}^2}
  + \\frac{\\sigma_{p,j}^2 + (\\mu_{p,j}-\\mu_{q,j})^2}{\\sigma_{q,j}^2} - 1]` (nats); NaN for a case with
  fewer than two observed experts. Invariant to the embedding's standardisation (an affine map
  of both Gaussians).
* **label entropy** — :math:`H = -\\sum_c p_c \\log p_c` (nats) of the label expert's predicted class
  distribution :math:`p = \\operatorname{softmax}(\\text{decoder}(\\mu))` at the fused mean, when the
  model has a label expert (semi-supervised runs).
"""
from __future__ import annotations

import numpy as np

__all__ = ["posterior_spread", "expert_disagreement", "label_entropy", "case_uncertainty", "FIELDS"]

FIELDS = ("mean_variance", "log_det", "disagreement", "label_entropy")


def posterior_spread(logvar: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(mean_variance, log_det)`` of diagonal Gaussians, ``logvar (..., E)`` → ``(...)`` each."""
    lv = np.asarray(logvar, np.float64)
    return np.exp(lv).mean(-1), lv.sum(-1)


def _kl(mu_p, lv_p, mu_q, lv_q) -> np.ndarray:
    return 0.5 * np.sum(lv_q - lv_p + (np.exp(lv_p) + (mu_p - mu_q) ** 2) / np.exp(lv_q) - 1.0, axis=-1)


def expert_disagreement(experts_mu: np.ndarray, experts_logvar: np.ndarray, present: np.ndarray) -> np.ndarray:
    """Mean pairwise symmetrised KL between the observed experts: ``(N, M, E)``, ``(N, M, E)``,
    ``(N, M)`` → ``(N,)`` nats (NaN with fewer than two observed experts)."""
    mu = np.asarray(experts_mu, np.float64)
    lv = np.asarray(experts_logvar, np.float64)
    pres = np.asarray(present) > 0
    n, m = pres.shape
    total = np.zeros(n)
    pairs = np.zeros(n)
    for a in range(m):
        for b in range(a + 1, m):
            both = pres[:, a] & pres[:, b]
            if not both.any():
                continue
            sym = 0.5 * (_kl(mu[:, a], lv[:, a], mu[:, b], lv[:, b]) + _kl(mu[:, b], lv[:, b], mu[:, a], lv[:, a]))
            total += np.where(both, sym, 0.0)
            pairs += both
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(pairs > 0, total / np.maximum(pairs, 1), np.nan)


def label_entropy(probs: np.ndarray) -> np.ndarray:
    """Entropy (nats) of class distributions ``(N, C)`` → ``(N,)``."""
    p = np.clip(np.asarray(probs, np.float64), 1e-12, 1.0)
    return -(p * np.log(p)).sum(-1)


def case_uncertainty(emb) -> dict[str, np.ndarray]:
    """Every field of :data:`FIELDS` for each case of an :class:`~mmvae.retrieval.embed.Embeddings`
    (``label_entropy`` only when it holds label probabilities). Arrays ``(N,)``. The spread is
    the fused posterior's: the retrieval vectors' own when they are ``fused`` (standardised as
    they are), else recomputed from the experts (unstandardised)."""
    lv = emb.logvar if getattr(emb, "embedding", "fused") == "fused" else emb.fused_posterior()[1]
    mv, ld = posterior_spread(lv)
    out = {"mean_variance": mv, "log_det": ld,
           "disagreement": expert_disagreement(emb.experts_mu, emb.experts_logvar, emb.present)}
    if getattr(emb, "label_probs", None) is not None:
        out["label_entropy"] = label_entropy(emb.label_probs)
    return out
