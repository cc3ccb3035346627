"""Bradley-Terry loss for training a scalar reward model on preference pairs."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxalign.losses._checks import check_batch

__all__ = ["bradley_terry_loss"]

Array = jax.Array


def _f32(x) -> Array:
    return jnp.asarray(x, jnp.float32)


def bradley_terry_loss(
    *,
    rewards_chosen: Array,
    rewards_rejected: Array,
    margin: Array | float | None = None,
    center_rewards_coefficient: float | None = None,
) -> tuple[Array, dict[str, Array]]:
    """Pairwise Bradley-Terry reward-model loss (Ouyang et al. 2022, "Training language models to
    follow instructions with human feedback", eq. 1), with Llama 2's margin (Touvron et al. 2023,
    eq. 2) and the reward-centering auxiliary term of Eisenstein et al. 2023 (as TRL's
    RewardTrainer `center_rewards_coefficient`).

        loss = -log sigmoid(r_w - r_l - m) + c * (r_w + r_l)^2

    Args:
      rewards_chosen, rewards_rejected: [B] scalar rewards of the chosen and rejected completions.
      margin: m, None (0), a scalar or [B] (e.g. larger for pairs rated "significantly better").
      center_rewards_coefficient: c, None (0) or a float; pulls rewards towards zero mean.

    Returns:
      losses [B] fp32 and metrics [B] under TRL's RewardTrainer names: `accuracy` (r_w > r_l),
      `margin` (r_w - r_l, without m), plus `rewards/chosen` and `rewards/rejected`.
    """
    size = check_batch(
        "bradley_terry_loss", rewards_chosen=rewards_chosen, rewards_rejected=rewards_rejected
    )
    chosen = _f32(rewards_chosen)
    rejected = _f32(rewards_rejected)
    diff = chosen - rejected
    logits = diff
    if margin is not None:
        margin_shape = jnp.shape(margin)
        if margin_shape not in ((), (size,)):
            raise ValueError(
                f"bradley_terry_loss: `margin` must be a scalar or have shape ({size},), "
                f"got shape {margin_shape}"
            )
        logits = diff - _f32(margin)
    losses = -jax.nn.log_sigmoid(logits)
    if center_rewards_coefficient is not None:
        losses = losses + center_rewards_coefficient * (chosen + rejected) ** 2
    diff = jax.lax.stop_gradient(diff)
    metrics = {
        "accuracy": (diff > 0).astype(jnp.float32),
        "margin": diff,
        "rewards/chosen": jax.lax.stop_gradient(chosen),
        "rewards/rejected": jax.lax.stop_gradient(rejected),
    }
    return losses, metrics


LOSSES = {"bradley_terry": bradley_terry_loss}
