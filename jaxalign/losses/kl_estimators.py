"""Per-token estimators of KL(pi_theta || pi_ref) from samples of pi_theta.

Schulman (2020), "Approximating KL divergence", http://joschu.net/blog/kl-approx.html. With tokens
sampled from the policy and the log-ratio ``log_r = ref_logps - logps`` (= log pi_ref / pi_theta):

    k1 = -log_r                      unbiased, high variance, can be negative
    k2 = 0.5 * log_r ** 2            biased, low variance, >= 0
    k3 = exp(log_r) - log_r - 1      unbiased, low variance, >= 0

k3 is TRL's GRPO ``per_token_kl``; k1 is the per-token KL that TRL's RLOO and PPO (with
``kl_estimator="k1"``) put into the reward.

All functions take arrays of one common shape (token level: [B, T]) and an optional `mask` of the
same shape (nonzero = token counts). They return the per-token estimate in (at least) float32, with
masked positions exactly 0; masked inputs may hold anything (padding garbage, inf, NaN) without
producing NaN in the values or in the gradients.
"""

from __future__ import annotations

import jax.numpy as jnp

from jaxalign.losses._checks import check_same_shape

KL_KINDS = ("k1", "k2", "k3")


def _log_ratio(name, logps, ref_logps, mask):
    check_same_shape(name, {"logps": logps, "ref_logps": ref_logps, "mask": mask})
    logps, ref_logps = jnp.asarray(logps), jnp.asarray(ref_logps)
    dtype = jnp.promote_types(jnp.result_type(logps, ref_logps), jnp.float32)
    log_r = ref_logps.astype(dtype) - logps.astype(dtype)
    if mask is None:
        return log_r, None
    keep = jnp.asarray(mask) != 0
    # Zero masked inputs *before* the nonlinearity so that neither values nor gradients see them.
    return jnp.where(keep, log_r, 0.0), keep


def _finish(value, keep):
    return value if keep is None else jnp.where(keep, value, 0.0)


def kl_k1(logps, ref_logps, mask=None):
    """k1 = logps - ref_logps per token (Schulman 2020). Shapes: any, e.g. [B, T] -> [B, T]."""
    log_r, keep = _log_ratio("kl_k1", logps, ref_logps, mask)
    return _finish(-log_r, keep)


def kl_k2(logps, ref_logps, mask=None):
    """k2 = 0.5 * (ref_logps - logps)^2 per token (Schulman 2020). Shapes: [B, T] -> [B, T]."""
    log_r, keep = _log_ratio("kl_k2", logps, ref_logps, mask)
    return _finish(0.5 * jnp.square(log_r), keep)


def kl_k3(logps, ref_logps, mask=None):
    """k3 = exp(ref - logp) - (ref - logp) - 1 per token, TRL GRPO's ``per_token_kl``.

    Schulman (2020). Shapes: [B, T] -> [B, T]. Computed with ``expm1`` for accuracy near 0.
    """
    log_r, keep = _log_ratio("kl_k3", logps, ref_logps, mask)
    return _finish(jnp.expm1(log_r) - log_r, keep)


def kl_estimate(logps, ref_logps, mask=None, *, kind: str = "k3"):
    """Dispatches to `kl_k1`, `kl_k2` or `kl_k3` by `kind`. Shapes: [B, T] -> [B, T]."""
    fns = {"k1": kl_k1, "k2": kl_k2, "k3": kl_k3}
    if kind not in fns:
        raise ValueError(f"kl_estimate: `kind` must be one of {KL_KINDS}, got {kind!r}")
    return fns[kind](logps, ref_logps, mask)
