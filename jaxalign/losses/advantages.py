"""Advantage estimators for online RL: GAE, masked whitening, GRPO group and RLOO baselines.

Token-level arrays are [B, T] with a `mask` [B, T] (nonzero = completion token that counts);
sequence-level arrays are [B]. Group layouts follow TRL: the `group_size` completions of one prompt
are consecutive rows, so rows ``g * group_size ... (g + 1) * group_size - 1`` form group g.
Everything is computed in (at least) float32 and is jit/vmap friendly.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxalign.losses._checks import check_batch, check_same_shape

SCALES = ("group", "batch", "none")


def _float(x):
    x = jnp.asarray(x)
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _keep(mask):
    return jnp.asarray(mask) != 0


def gae(*, rewards, values, mask, gamma: float = 1.0, lam: float = 0.95):
    """Generalised advantage estimation over the valid tokens of each row.

    Schulman et al. (2016), "High-dimensional continuous control using generalized advantage
    estimation". For the valid tokens t_1 < t_2 < ... < t_n of a row (mask != 0):

        delta_k = r[t_k] + gamma * V[t_{k+1}] - V[t_k],    V[t_{n+1}] = 0 (bootstrap 0 at the end)
        A[t_k]  = delta_k + gamma * lam * A[t_{k+1}],      A[t_{n+1}] = 0
        R[t_k]  = A[t_k] + V[t_k]

    Masked tokens are skipped (they neither discount nor pass on value) and get A = R = 0, so any
    mask works (right padding, left padding, holes such as tool-output tokens). For right-padded
    masks this equals TRL PPO's loop with values and rewards zeroed past the last valid token.
    Runs as one reverse `jax.lax.scan` over T.

    Args:
      rewards: [B, T] per-token rewards (e.g. -kl_coef * kl, plus the score on the last token).
      values: [B, T] value estimates V(s_t).
      mask: [B, T].
      gamma: discount. lam: GAE lambda.
    Returns:
      (advantages [B, T], returns [B, T]), float32, 0 at masked positions.
    """
    check_same_shape("gae", {"rewards": rewards, "values": values, "mask": mask}, ndim=2)
    keep = _keep(mask)
    rewards = jnp.where(keep, _float(rewards), 0.0)
    values = jnp.where(keep, _float(values), 0.0)

    def step(carry, xs):
        next_value, next_adv = carry
        r_t, v_t, k_t = xs
        adv = r_t + gamma * next_value - v_t + gamma * lam * next_adv
        adv = jnp.where(k_t, adv, 0.0)
        carry = (jnp.where(k_t, v_t, next_value), jnp.where(k_t, adv, next_adv))
        return carry, adv

    zeros = jnp.zeros(rewards.shape[:1], rewards.dtype)
    _, adv_TB = jax.lax.scan(step, (zeros, zeros), (rewards.T, values.T, keep.T), reverse=True)
    advantages = adv_TB.T
    returns = jnp.where(keep, advantages + values, 0.0)
    return advantages, returns


def whiten(x, mask, *, shift_mean: bool = True, eps: float = 1e-8):
    """Masked whitening over all valid entries, as TRL's ``masked_whiten``.

        mean = sum(x * m) / sum(m),  var = sum((x - mean)^2 * m) / sum(m) * n / (n - 1),  n = sum(m)
        out = (x - mean) / sqrt(var + eps)          (+ mean again if not shift_mean)

    Shapes: x, mask [B, T] (any common shape) -> [B, T]. Masked positions are 0 in the output
    (TRL leaves them whitened and zeroes them afterwards). Where TRL raises or divides by zero
    (n = 0 or n = 1) this returns finite values: the Bessel correction is dropped for n <= 1.
    """
    check_same_shape("whiten", {"x": x, "mask": mask})
    keep = _keep(mask)
    x = jnp.where(keep, _float(x), 0.0)
    n = jnp.sum(keep, dtype=x.dtype)
    mean = jnp.sum(x) / jnp.maximum(n, 1.0)
    var = jnp.sum(jnp.where(keep, jnp.square(x - mean), 0.0)) / jnp.maximum(n, 1.0)
    var = var * jnp.where(n > 1, n / jnp.maximum(n - 1, 1.0), 1.0)
    out = (x - mean) * jax.lax.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return jnp.where(keep, out, 0.0)


def _grouped(name, rewards, group_size):
    b = check_batch(name, rewards=rewards)
    if not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"{name}: `group_size` must be a positive int, got {group_size!r}")
    if b % group_size:
        raise ValueError(
            f"{name}: batch size of `rewards` (shape ({b},)) must be a multiple of "
            f"`group_size`={group_size}"
        )
    return _float(rewards).reshape(b // group_size, group_size)


def _std(x, axis=None):
    """Unbiased (Bessel-corrected) std, as TRL's ``nanstd`` without NaNs; 0 for a single value."""
    n = x.size if axis is None else x.shape[axis]
    if n < 2:
        return jnp.zeros_like(jnp.mean(x, axis=axis))
    return jnp.std(x, axis=axis, ddof=1)


def group_advantages(*, rewards, group_size: int, scale: str = "group", eps: float = 1e-4):
    """GRPO group-relative advantages (Shao et al. 2024, DeepSeekMath), as TRL's GRPOTrainer.

        A_i = (r_i - mean_{j in g(i)} r_j) / (std + eps)

    with std the unbiased std of the group (``scale="group"``, GRPO) or of the whole batch
    (``scale="batch"``), or no division at all (``scale="none"``, Dr. GRPO; Liu et al. 2025,
    "Understanding R1-Zero-like training"). The mean is always the group mean.

    Args:
      rewards: [B] finite rewards, B = num_prompts * group_size, groups in consecutive rows.
      group_size: completions per prompt (TRL's ``num_generations``).
    Returns:
      (advantages [B], metrics) with metrics ``reward_mean/group`` and ``reward_std/group``
      ([B // group_size], unbiased std, 0 if group_size = 1) and ``frac_reward_zero_std`` (scalar:
      fraction of groups whose rewards are all equal; TRL logs the batch std's instead when
      ``scale="batch"``).
    """
    if scale not in SCALES:
        raise ValueError(f"group_advantages: `scale` must be one of {SCALES}, got {scale!r}")
    grouped = _grouped("group_advantages", rewards, group_size)
    mean = jnp.mean(grouped, axis=1, keepdims=True)
    group_std = _std(grouped, axis=1)
    advantages = grouped - mean
    if scale == "group":
        advantages = advantages / (group_std[:, None] + eps)
    elif scale == "batch":
        advantages = advantages / (_std(grouped) + eps)
    metrics = {
        "reward_mean/group": mean[:, 0],
        "reward_std/group": group_std,
        "frac_reward_zero_std": jnp.mean(jnp.isclose(group_std, 0.0).astype(grouped.dtype)),
    }
    return advantages.reshape(-1), metrics


def rloo_advantages(*, rewards, group_size: int, normalize: bool = False, eps: float = 1e-4):
    """REINFORCE leave-one-out advantages (Ahmadian et al. 2024; Kool et al. 2019).

        A_i = r_i - 1/(k-1) * sum_{j in g(i), j != i} r_j,      k = group_size >= 2

    With ``normalize=True`` the advantages are then standardised over the batch,
    ``(A - mean(A)) / (std(A) + eps)`` with the unbiased std (TRL RLOO's ``normalize_advantages``).

    Shapes: rewards [B] -> advantages [B]; groups are consecutive rows (TRL's layout).
    """
    if isinstance(group_size, int) and group_size < 2:
        raise ValueError(
            f"rloo_advantages: `group_size` must be >= 2 for a leave-one-out baseline, got "
            f"{group_size!r}"
        )
    grouped = _grouped("rloo_advantages", rewards, group_size)
    baseline = (jnp.sum(grouped, axis=1, keepdims=True) - grouped) / (group_size - 1)
    advantages = (grouped - baseline).reshape(-1)
    if normalize:
        advantages = (advantages - jnp.mean(advantages)) / (_std(advantages) + eps)
    return advantages
