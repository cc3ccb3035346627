"""Binary-feedback (unpaired) losses: KTO and APO-zero-unpaired.

Each row is one (prompt, completion) with a boolean label: True = desirable, False = undesirable.
Arrays are keyword arguments of shape [B]; every function returns `(losses [B] fp32, metrics)`.

Metrics that only make sense for one class (`rewards/chosen`, `logps/chosen` for desirable rows,
`rewards/rejected`, `logps/rejected` for undesirable rows) are 0 on the other rows, and the float
masks `mask/chosen`, `mask/rejected` say which rows count. TRL's logged value is the masked mean,
e.g. `sum(m["rewards/chosen"]) / sum(m["mask/chosen"])`; `rewards/margins` is the difference of the
two masked means. (Zeros rather than NaN keep `jax_debug_nans` usable.)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxalign.losses._checks import check_batch

__all__ = ["kto_loss", "kto_kl_estimate", "apo_zero_unpaired_loss"]

Array = jax.Array


def _f32(x) -> Array:
    return jnp.asarray(x, jnp.float32)


def _bool_labels(name: str, labels) -> Array:
    labels = jnp.asarray(labels)
    if not (jnp.issubdtype(labels.dtype, jnp.bool_) or jnp.issubdtype(labels.dtype, jnp.integer)):
        raise ValueError(
            f"{name}: `labels` must be bool (True = desirable) or integer 0/1, got dtype {labels.dtype}"
        )
    return labels.astype(bool)


def _unpaired_metrics(logps: Array, logratios: Array, labels: Array, beta: float) -> dict[str, Array]:
    rewards = jax.lax.stop_gradient(beta * logratios)
    logps = jax.lax.stop_gradient(logps)
    zero = jnp.zeros_like(rewards)
    return {
        "rewards/chosen": jnp.where(labels, rewards, zero),
        "rewards/rejected": jnp.where(labels, zero, rewards),
        "logps/chosen": jnp.where(labels, logps, zero),
        "logps/rejected": jnp.where(labels, zero, logps),
        "mask/chosen": labels.astype(jnp.float32),
        "mask/rejected": (~labels).astype(jnp.float32),
    }


def kto_kl_estimate(policy_kl_logps: Array, ref_kl_logps: Array) -> Array:
    """KTO's reference point z0 (Ethayarajh et al. 2024, eq. 8 and section 4.1).

        z0 = stop_gradient(max(0, mean_j [log pi(y'_j | x_j) - log ref(y'_j | x_j)]))

    estimated, as in the paper and TRL, on mismatched pairs: each prompt x_j with the completion
    y'_j of another row of the batch (e.g. the batch's completions shifted by one).

    Args:
      policy_kl_logps, ref_kl_logps: [M] summed log-probs of the mismatched completions.

    Returns:
      scalar fp32 z0 >= 0, with no gradient (the paper treats it as a constant).
    """
    check_batch("kto_kl_estimate", policy_kl_logps=policy_kl_logps, ref_kl_logps=ref_kl_logps)
    kl = jnp.mean(_f32(policy_kl_logps) - _f32(ref_kl_logps))
    return jax.lax.stop_gradient(jnp.maximum(kl, 0.0))


def kto_loss(
    *,
    policy_logps: Array,
    ref_logps: Array,
    labels: Array,
    kl: Array,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> tuple[Array, dict[str, Array]]:
    """KTO loss (Ethayarajh et al. 2024, "KTO: Model Alignment as Prospect Theoretic
    Optimization", eq. 7).

        r     = log pi(y|x) - log ref(y|x)
        loss  = w_D * (1 - sigmoid(beta * (r - z0)))    if y is desirable
                w_U * (1 - sigmoid(beta * (z0 - r)))    if y is undesirable

    computed as w * sigmoid(-.) (= 1 - sigmoid(.) without cancellation).

    Args:
      policy_logps, ref_logps: [B] summed log-probs of each completion under policy and reference.
      labels: [B] bool (True = desirable) or integer 0/1.
      kl: the reference point z0, a scalar or [B] (per-row estimates), usually
        `kto_kl_estimate(...)`. It is wrapped in stop_gradient here as well.
      beta: inverse temperature of the value function.
      desirable_weight, undesirable_weight: lambda_D, lambda_U (paper eq. 9 suggests
        lambda_D n_D / (lambda_U n_U) in [1, 4/3] for imbalanced data).

    Returns:
      losses [B] fp32 and metrics [B]: `rewards/chosen`, `rewards/rejected` (beta * r on rows of that
      class, 0 elsewhere), `logps/chosen`, `logps/rejected`, `mask/chosen`, `mask/rejected` (see the
      module docstring for the reduction) and `kl` (z0 broadcast to [B]).
    """
    size = check_batch("kto_loss", policy_logps=policy_logps, ref_logps=ref_logps, labels=labels)
    kl_shape = jnp.shape(kl)
    if kl_shape not in ((), (1,), (size,)):
        raise ValueError(f"kto_loss: `kl` must be a scalar or have shape ({size},), got shape {kl_shape}")
    labels = _bool_labels("kto_loss", labels)
    policy = _f32(policy_logps)
    logratios = policy - _f32(ref_logps)
    z0 = jnp.broadcast_to(jax.lax.stop_gradient(_f32(kl)), (size,))
    desirable = desirable_weight * jax.nn.sigmoid(-beta * (logratios - z0))
    undesirable = undesirable_weight * jax.nn.sigmoid(-beta * (z0 - logratios))
    losses = jnp.where(labels, desirable, undesirable)
    metrics = _unpaired_metrics(policy, logratios, labels, beta)
    metrics["kl"] = z0
    return losses, metrics


def apo_zero_unpaired_loss(
    *,
    policy_logps: Array,
    ref_logps: Array,
    labels: Array,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> tuple[Array, dict[str, Array]]:
    """Unpaired APO-zero loss (D'Oosterlinck et al. 2024, "Anchored Preference Optimization and
    Contrastive Revisions", eq. 7, unpaired form as TRL's KTOTrainer loss_type="apo_zero_unpaired").

        r     = log pi(y|x) - log ref(y|x)
        loss  = w_D * (1 - sigmoid(beta * r))    if y is desirable   (push its likelihood up)
                w_U * sigmoid(beta * r)          if y is undesirable (push its likelihood down)

    Use it when desirable outputs are better than the model's own outputs; no KL estimate needed.

    Args:
      policy_logps, ref_logps: [B] summed log-probs under policy and reference.
      labels: [B] bool (True = desirable) or integer 0/1.
      beta, desirable_weight, undesirable_weight: as in `kto_loss`.

    Returns:
      losses [B] fp32 and metrics [B] as in `kto_loss`, without `kl`.
    """
    check_batch("apo_zero_unpaired_loss", policy_logps=policy_logps, ref_logps=ref_logps, labels=labels)
    labels = _bool_labels("apo_zero_unpaired_loss", labels)
    policy = _f32(policy_logps)
    logratios = policy - _f32(ref_logps)
    desirable = desirable_weight * jax.nn.sigmoid(-beta * logratios)
    undesirable = undesirable_weight * jax.nn.sigmoid(beta * logratios)
    losses = jnp.where(labels, desirable, undesirable)
    return losses, _unpaired_metrics(policy, logratios, labels, beta)


LOSSES = {"kto": kto_loss, "apo_zero_unpaired": apo_zero_unpaired_loss}
