"""Policy-gradient surrogate losses: PPO clip (with DAPO clip-higher and dual clip), value loss,
token aggregation modes, and the GRPO, RLOO and PPO objectives as TRL computes them.

Token-level arrays are [B, T] with a `mask` [B, T] (nonzero = completion token that counts);
sequence-level arrays are [B]. Everything is computed in (at least) float32. Masked positions
contribute exactly 0 and may hold anything (padding garbage, inf, NaN) without producing NaN in the
loss or its gradient; fully masked rows give finite values.

Advantage estimators live in `advantages.py`, KL estimators in `kl_estimators.py`; both are
re-exported here.
"""

from __future__ import annotations

import numbers

import jax
import jax.numpy as jnp

from jaxalign.losses._checks import check_same_shape
from jaxalign.losses.advantages import gae, group_advantages, rloo_advantages, whiten
from jaxalign.losses.kl_estimators import kl_estimate, kl_k1, kl_k2, kl_k3

__all__ = [
    "AGGREGATION_MODES", "LOSSES", "aggregate_token_losses", "gae", "group_advantages",
    "grpo_loss", "kl_estimate", "kl_k1", "kl_k2", "kl_k3", "ppo_clip_loss", "ppo_loss",
    "rloo_advantages", "rloo_loss", "value_loss", "whiten",
]

AGGREGATION_MODES = ("grpo", "bnpo", "dr_grpo", "dapo")


def _float(x):
    x = jnp.asarray(x)
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _check_nonneg(name, **hparams):
    for arg, value in hparams.items():
        if isinstance(value, numbers.Real) and not value >= 0:
            raise ValueError(f"{name}: `{arg}` must be >= 0, got {value!r}")


def _token_arrays(name, **arrays):
    """Checks that the given token-level arrays are [B, T] with one shape; returns that shape."""
    return check_same_shape(name, arrays, ndim=2)


def _masked_mean(x, keep):
    """Mean of x over kept entries (scalar); 0 when nothing is kept."""
    return jnp.sum(jnp.where(keep, x, 0.0)) / jnp.maximum(jnp.sum(keep), 1)


def ppo_clip_loss(*, logps, old_logps=None, advantages, mask, epsilon_low: float = 0.2,
                  epsilon_high: float | None = None, delta: float | None = None):
    """Per-token PPO clipped surrogate (Schulman et al. 2017) with asymmetric clipping.

        r_t  = exp(logps_t - old_logps_t)
        loss_t = -min(min(r_t, delta) * A_t, clip(r_t, 1 - eps_low, 1 + eps_high) * A_t)

    ``epsilon_high > epsilon_low`` is DAPO's clip-higher (Yu et al. 2025). ``delta`` (optional)
    caps the unclipped ratio, bounding the loss for negative advantages (dual clip; Ye et al. 2020;
    TRL GRPO's two-sided ``delta``, recommended > 1 + eps_high). This is TRL GRPOTrainer's
    token-level loss for ``loss_type`` in grpo/bnpo/dr_grpo/dapo; with eps_high = eps_low and no
    delta it equals TRL PPO's ``max(-A r, -A clip(r))``.

    Args:
      logps: [B, T] log-probs of the sampled tokens under the current policy.
      old_logps: [B, T] log-probs under the sampling policy; None = ``stop_gradient(logps)`` (one
        update per generation, ratio 1 with the policy gradient).
      advantages: [B] (one per sequence, broadcast over tokens: GRPO/RLOO) or [B, T] (PPO/GAE).
      mask: [B, T].
      epsilon_low, epsilon_high: clip range; epsilon_high defaults to epsilon_low.
      delta: optional upper bound on the unclipped ratio.
    Returns:
      (losses [B, T], metrics) with per-token float [B, T] arrays, 0 at masked positions:
      ``ratio``, ``clip_ratio/low`` (r < 1 - eps_low and A < 0), ``clip_ratio/high``
      (r > 1 + eps_high and A > 0; r after the delta cap, as TRL) and ``clip_ratio/region``
      (either); reduce them with `jaxalign.losses.policy_gradient.aggregate_token_losses` or a
      masked mean.
    """
    epsilon_high = epsilon_low if epsilon_high is None else epsilon_high
    _check_nonneg("ppo_clip_loss", epsilon_low=epsilon_low, epsilon_high=epsilon_high)
    shape = _token_arrays("ppo_clip_loss", logps=logps, old_logps=old_logps, mask=mask)
    adv_shape = tuple(jnp.shape(advantages))
    if adv_shape not in (shape[:1], shape):
        raise ValueError(
            f"ppo_clip_loss: `advantages` must have shape [B]={shape[:1]} or [B, T]={shape} "
            f"(from `logps`), got shape {adv_shape}"
        )
    keep = jnp.asarray(mask) != 0
    logps = jnp.where(keep, _float(logps), 0.0)
    old_logps = jax.lax.stop_gradient(logps) if old_logps is None else old_logps
    old_logps = jnp.where(keep, _float(old_logps), 0.0)
    adv = _float(advantages)
    adv = jnp.where(keep, adv[:, None] if adv.ndim == 1 else adv, 0.0)

    ratio = jnp.exp(logps - old_logps)
    clipped = jnp.clip(ratio, 1.0 - epsilon_low, 1.0 + epsilon_high)
    if delta is not None:
        ratio = jnp.minimum(ratio, delta)
    losses = -jnp.minimum(ratio * adv, clipped * adv)

    low = keep & (ratio < 1.0 - epsilon_low) & (adv < 0)
    high = keep & (ratio > 1.0 + epsilon_high) & (adv > 0)
    dtype = losses.dtype
    metrics = {
        "ratio": jnp.where(keep, jax.lax.stop_gradient(ratio), 0.0),
        "clip_ratio/low": low.astype(dtype),
        "clip_ratio/high": high.astype(dtype),
        "clip_ratio/region": (low | high).astype(dtype),
    }
    return jnp.where(keep, losses, 0.0), metrics


def aggregate_token_losses(token_losses, mask, *, mode: str,
                           max_completion_length: int | None = None, num_items_in_batch=None):
    """Reduces per-token losses [B, T] to a scalar with TRL GRPOTrainer's ``loss_type`` modes.

    With L = sum_{b,t} m_bt * l_bt:
      "grpo":    mean_b (sum_t m_bt l_bt / max(sum_t m_bt, 1))           sequence mean, batch mean
                 (Shao et al. 2024; fully masked rows count as 0 in the batch mean, as TRL)
      "bnpo":    L / max(sum m, 1)                                       local token mean
      "dr_grpo": L / (B * max_completion_length)                         constant normaliser
                 (Liu et al. 2025, "Understanding R1-Zero-like training"); max_completion_length
                 defaults to T
      "dapo":    L / max(num_items_in_batch, 1)                          global token mean
                 (Yu et al. 2025). `num_items_in_batch` is the completion-token count of the
                 whole optimiser batch (all devices, all accumulated micro-batches when their
                 losses are summed; divide it by the number of micro-batches when gradients are
                 averaged, e.g. optax.MultiSteps). None = the local count, which makes it "bnpo".
    These match TRL for one process and no gradient accumulation; TRL additionally divides by
    the accumulation steps, which a JAX loop handles in its own accumulation.

    Shapes: token_losses [B, T], mask [B, T] -> scalar.
    """
    if mode not in AGGREGATION_MODES:
        raise ValueError(
            f"aggregate_token_losses: `mode` must be one of {AGGREGATION_MODES}, got {mode!r}"
        )
    b, t = _token_arrays("aggregate_token_losses", token_losses=token_losses, mask=mask)
    keep = jnp.asarray(mask) != 0
    losses = jnp.where(keep, _float(token_losses), 0.0)
    count = jnp.sum(keep, dtype=losses.dtype)
    total = jnp.sum(losses)
    if mode == "grpo":
        seq_counts = jnp.sum(keep, axis=1, dtype=losses.dtype)
        per_seq = jnp.sum(losses, axis=1) / jnp.maximum(seq_counts, 1.0)
        return jnp.mean(per_seq)
    if mode == "bnpo":
        return total / jnp.maximum(count, 1.0)
    if mode == "dr_grpo":
        length = t if max_completion_length is None else max_completion_length
        if isinstance(length, numbers.Real) and not length > 0:
            raise ValueError(
                f"aggregate_token_losses: `max_completion_length` must be > 0, got {length!r}"
            )
        return total / (b * length)
    denom = count if num_items_in_batch is None else _float(num_items_in_batch)
    return total / jnp.maximum(denom, 1.0)


def value_loss(*, values, old_values, returns, mask, clip_range_value: float | None = 0.2):
    """Per-token clipped value loss of PPO (as in TRL's PPOTrainer and OpenAI baselines).

        v_clip = clip(v, v_old - c, v_old + c)
        loss_t = 0.5 * max((v - R)^2, (v_clip - R)^2)          (0.5 * (v - R)^2 if c is None)

    TRL's ``vf_loss`` is ``aggregate_token_losses(losses, mask, mode="bnpo")`` of this.

    Shapes: values, old_values, returns, mask [B, T] -> (losses [B, T], metrics) with
    ``vf_clipfrac`` [B, T] (1 where the clipped term is strictly larger); 0 at masked positions.
    """
    _check_nonneg("value_loss", clip_range_value=clip_range_value)
    _token_arrays("value_loss", values=values, old_values=old_values, returns=returns, mask=mask)
    keep = jnp.asarray(mask) != 0
    values, old_values, returns = (jnp.where(keep, _float(x), 0.0)
                                   for x in (values, old_values, returns))
    unclipped = jnp.square(values - returns)
    if clip_range_value is None:
        clipped = unclipped
    else:
        v_clip = jnp.clip(values, old_values - clip_range_value, old_values + clip_range_value)
        clipped = jnp.square(v_clip - returns)
    losses = 0.5 * jnp.maximum(unclipped, clipped)
    metrics = {"vf_clipfrac": (keep & (clipped > unclipped)).astype(losses.dtype)}
    return jnp.where(keep, losses, 0.0), metrics


def _seq_means(x, keep):
    """Per-row mean over kept tokens [B] and a [B] flag of rows with any kept token."""
    counts = jnp.sum(keep, axis=1)
    return jnp.sum(jnp.where(keep, x, 0.0), axis=1) / jnp.maximum(counts, 1), counts > 0


def grpo_loss(*, logps, old_logps=None, ref_logps=None, advantages, mask, beta: float = 0.0,
              epsilon_low: float = 0.2, epsilon_high: float | None = None,
              delta: float | None = None, loss_type: str = "grpo",
              max_completion_length: int | None = None, num_items_in_batch=None):
    """GRPO objective (Shao et al. 2024) as TRL's ``GRPOTrainer._compute_loss`` (token-level IS).

        l_t  = ppo_clip_loss(r_t, A) + beta * k3_t
        k3_t = exp(ref_t - logp_t) - (ref_t - logp_t) - 1
        loss = aggregate_token_losses(l, mask, mode=loss_type)

    ``loss_type`` is one of "grpo", "bnpo", "dr_grpo", "dapo" (see `aggregate_token_losses`);
    epsilon_high/delta give DAPO's clip-higher and the two-sided clip (see `ppo_clip_loss`).

    Args:
      logps, old_logps, ref_logps, mask: [B, T]; old_logps None = stop_gradient(logps);
        ref_logps is required when beta != 0 and reported as the ``kl`` metric whenever given.
      advantages: [B] (e.g. from `group_advantages`) or [B, T].
    Returns:
      (scalar loss, metrics) with scalar metrics named as TRL logs them: ``clip_ratio/low_mean``,
      ``clip_ratio/high_mean``, ``clip_ratio/region_mean`` (token means), ``clip_ratio/low_min``,
      ``clip_ratio/high_max`` (over per-sequence means of non-empty rows; 0 if none), and ``kl``
      (masked mean k3) when ref_logps is given.
    """
    if loss_type not in AGGREGATION_MODES:
        raise ValueError(
            f"grpo_loss: `loss_type` must be one of {AGGREGATION_MODES}, got {loss_type!r}"
        )
    if isinstance(beta, numbers.Real) and beta != 0.0 and ref_logps is None:
        raise ValueError(f"grpo_loss: `ref_logps` is required when beta != 0 (beta={beta!r})")
    token_losses, clip = ppo_clip_loss(logps=logps, old_logps=old_logps, advantages=advantages,
                                       mask=mask, epsilon_low=epsilon_low,
                                       epsilon_high=epsilon_high, delta=delta)
    keep = jnp.asarray(mask) != 0
    metrics = {}
    if ref_logps is not None:
        _token_arrays("grpo_loss", logps=logps, ref_logps=ref_logps)
        kl = kl_k3(logps, ref_logps, mask)
        metrics["kl"] = _masked_mean(jax.lax.stop_gradient(kl), keep)
        if not (isinstance(beta, numbers.Real) and beta == 0.0):
            token_losses = token_losses + beta * kl
    loss = aggregate_token_losses(token_losses, mask, mode=loss_type,
                                  max_completion_length=max_completion_length,
                                  num_items_in_batch=num_items_in_batch)
    for kind in ("low", "high", "region"):
        metrics[f"clip_ratio/{kind}_mean"] = _masked_mean(clip[f"clip_ratio/{kind}"], keep)
    low_seq, nonempty = _seq_means(clip["clip_ratio/low"], keep)
    high_seq, _ = _seq_means(clip["clip_ratio/high"], keep)
    any_row = jnp.any(nonempty)
    low_min = jnp.min(jnp.where(nonempty, low_seq, 1.0))
    metrics["clip_ratio/low_min"] = jnp.where(any_row, low_min, 0.0)
    metrics["clip_ratio/high_max"] = jnp.max(jnp.where(nonempty, high_seq, 0.0))
    return loss, metrics


def rloo_loss(*, logps, old_logps, advantages, mask, epsilon_low: float = 0.2,
              epsilon_high: float | None = None):
    """RLOO objective (Ahmadian et al. 2024) as TRL's ``RLOOTrainer._compute_loss``.

    The PPO clip acts on the *sequence* ratio, and the loss is the batch mean:

        r_b  = exp(sum_t m_bt (logps_bt - old_logps_bt))
        loss = mean_b -min(r_b A_b, clip(r_b, 1 - eps_low, 1 + eps_high) A_b)

    Args:
      logps, old_logps, mask: [B, T] (TRL stores old_logps already summed; pass tokens here).
      advantages: [B], e.g. from `rloo_advantages`.
    Returns:
      (scalar loss, metrics) with ``clip_ratio/low_mean``, ``clip_ratio/high_mean``,
      ``clip_ratio/region_mean`` (sequence fractions) and ``ratio`` [B].
    """
    epsilon_high = epsilon_low if epsilon_high is None else epsilon_high
    _check_nonneg("rloo_loss", epsilon_low=epsilon_low, epsilon_high=epsilon_high)
    shape = _token_arrays("rloo_loss", logps=logps, old_logps=old_logps, mask=mask)
    if tuple(jnp.shape(advantages)) != shape[:1]:
        raise ValueError(f"rloo_loss: `advantages` must have shape [B]={shape[:1]}, "
                         f"got shape {tuple(jnp.shape(advantages))}")
    keep = jnp.asarray(mask) != 0
    logps, old_logps = (jnp.where(keep, _float(x), 0.0) for x in (logps, old_logps))
    log_ratio = jnp.sum(logps - old_logps, axis=1)
    adv = _float(advantages)
    ratio = jnp.exp(log_ratio)
    clipped = jnp.clip(ratio, 1.0 - epsilon_low, 1.0 + epsilon_high)
    loss = jnp.mean(-jnp.minimum(ratio * adv, clipped * adv))
    low = ((ratio < 1.0 - epsilon_low) & (adv < 0)).astype(ratio.dtype)
    high = ((ratio > 1.0 + epsilon_high) & (adv > 0)).astype(ratio.dtype)
    metrics = {"clip_ratio/low_mean": jnp.mean(low), "clip_ratio/high_mean": jnp.mean(high),
               "clip_ratio/region_mean": jnp.mean(jnp.maximum(low, high)),
               "ratio": jax.lax.stop_gradient(ratio)}
    return loss, metrics


def ppo_loss(*, logps, old_logps, advantages, values, old_values, returns, mask,
             epsilon: float = 0.2, clip_range_value: float | None = 0.2, vf_coef: float = 0.1):
    """PPO actor-critic objective as TRL's ``PPOTrainer`` (Ziegler et al. 2019; Schulman 2017).

        loss = masked_mean(ppo_clip_loss) + vf_coef * masked_mean(value_loss)

    Args:
      logps, old_logps, advantages (e.g. whitened `gae` output), values, old_values, returns,
      mask: [B, T]. TRL masks the value loss one token further than the policy loss
      (``padding_mask_p1``); here one mask serves both.
    Returns:
      (scalar loss, metrics) with TRL's names: ``loss/policy``, ``loss/value``,
      ``policy/clipfrac``, ``val/clipfrac``, ``policy/approxkl`` (0.5 * masked mean of the squared
      log-ratio), ``val/ratio`` (masked mean ratio).
    """
    pg, clip = ppo_clip_loss(logps=logps, old_logps=old_logps, advantages=advantages, mask=mask,
                             epsilon_low=epsilon, epsilon_high=epsilon)
    vf, vf_metrics = value_loss(values=values, old_values=old_values, returns=returns, mask=mask,
                                clip_range_value=clip_range_value)
    keep = jnp.asarray(mask) != 0
    pg_loss = aggregate_token_losses(pg, mask, mode="bnpo")
    vf_loss = aggregate_token_losses(vf, mask, mode="bnpo")
    log_ratio = jnp.where(keep, _float(logps) - _float(old_logps), 0.0)
    metrics = {
        "loss/policy": pg_loss,
        "loss/value": vf_loss,
        "policy/clipfrac": _masked_mean(clip["clip_ratio/region"], keep),
        "val/clipfrac": _masked_mean(vf_metrics["vf_clipfrac"], keep),
        "policy/approxkl": 0.5 * _masked_mean(jax.lax.stop_gradient(jnp.square(log_ratio)), keep),
        "val/ratio": _masked_mean(clip["ratio"], keep),
    }
    return pg_loss + vf_coef * vf_loss, metrics


LOSSES = {
    "grpo": grpo_loss,
    "rloo": rloo_loss,
    "ppo": ppo_loss,
    "ppo_clip": ppo_clip_loss,
    "value": value_loss,
}
