"""GRPO and RLOO: critic-free policy gradient with a baseline from the other completions of the
same prompt.

GRPO (Shao et al. 2024, DeepSeekMath, arXiv:2402.03300), as TRL's GRPOTrainer:

    A_i   = (r_i - mean_g r) / (std_g r + 1e-4)                 (scale_rewards="group"; "batch" uses
                                                                  the batch std, "none" is Dr. GRPO)
    l_t   = -min(rho_t A_i, clip(rho_t, 1 - eps_low, 1 + eps_high) A_i) + beta * k3_t
    loss  = aggregate(l, mode=loss_type)                         grpo | bnpo | dr_grpo | dapo

with rho_t = pi(o_t) / pi_old(o_t) (1 with the policy gradient for one update per rollout) and
k3 = exp(ref - logp) - (ref - logp) - 1 to a frozen reference. eps_high > eps_low is DAPO's
clip-higher (Yu et al. 2025, arXiv:2503.14476); loss_type="dr_grpo" with scale_rewards="none" is
Dr. GRPO (Liu et al. 2025, arXiv:2503.20783).

RLOO (Ahmadian et al. 2024, arXiv:2402.14740), as TRL's RLOOTrainer: the KL enters the reward,
r_i <- r_i - beta * sum_t (old_t - ref_t), the advantage is r_i minus the mean of the other k-1
rewards of its group, and the clip acts on the sequence ratio exp(sum_t (logp_t - old_t)).

`build_*_batch` turn a `Rollout` into the arrays the jitted objective reads; the objectives plug
into `jaxalign.train.step.make_train_step` (one jitted, donated update).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from jaxalign.losses import grpo_loss, group_advantages, kl_k1, rloo_advantages, rloo_loss
from jaxalign.losses.policy_gradient import AGGREGATION_MODES
from jaxalign.rl.rollout import Rollout, forward_logps
from jaxalign.train.objectives import policy_variables


def _base_batch(rollout: Rollout) -> dict:
    return {"tokens": rollout.tokens, "attention_mask": rollout.attention_mask,
            "loss_mask": rollout.loss_mask}


def build_grpo_batch(rollout: Rollout, *, scale_rewards: str = "group", ref_logps=None,
                     old_logps=None, loss_type: str = "grpo", grad_accum: int = 1
                     ) -> tuple[dict, dict]:
    """GRPO arrays for one rollout: group advantages [N], plus `ref_logps` / `old_logps`
    [N, L-1] when given, plus `num_items_in_batch` (completion tokens per micro-batch) for DAPO.
    Returns (batch of numpy arrays, metrics)."""
    adv, m = group_advantages(rewards=rollout.rewards, group_size=rollout.group_size,
                              scale=scale_rewards)
    batch = {**_base_batch(rollout), "advantages": np.asarray(adv, np.float32)}
    if ref_logps is not None:
        batch["ref_logps"] = np.asarray(ref_logps, np.float32)
    if old_logps is not None:
        batch["old_logps"] = np.asarray(old_logps, np.float32)
    if loss_type == "dapo":
        batch["num_items_in_batch"] = np.float32(rollout.loss_mask.sum() / grad_accum)
    metrics = {"advantages/abs_mean": float(np.mean(np.abs(np.asarray(adv))))}
    return batch, metrics


def build_rloo_batch(rollout: Rollout, *, old_logps, ref_logps=None, beta: float = 0.0,
                     normalize_advantages: bool = False) -> tuple[dict, dict]:
    """RLOO arrays: KL-penalised rewards -> leave-one-out advantages [N] and `old_logps`."""
    rewards = np.asarray(rollout.rewards, np.float32)
    mask = rollout.loss_mask[:, 1:]
    metrics = {}
    if beta:
        if ref_logps is None:
            raise ValueError(f"build_rloo_batch: `ref_logps` is required when beta != 0 (beta={beta})")
        seq_kl = np.asarray(kl_k1(old_logps, ref_logps, mask)).sum(-1)
        rewards = rewards - np.float32(beta) * seq_kl.astype(np.float32)
        metrics["kl"] = float(seq_kl.sum() / max(mask.sum(), 1))  # per-token mean, as TRL logs it
    adv = rloo_advantages(rewards=rewards, group_size=rollout.group_size,
                          normalize=normalize_advantages)
    batch = {**_base_batch(rollout), "advantages": np.asarray(adv, np.float32),
             "old_logps": np.asarray(old_logps, np.float32)}
    metrics["advantages/abs_mean"] = float(np.mean(np.abs(np.asarray(adv))))
    return batch, metrics


def _masked_mean(x, mask):
    return jnp.sum(jnp.where(mask, x, 0.0)) / jnp.maximum(jnp.sum(mask), 1)


def make_grpo_objective(model, *, beta: float = 0.0, epsilon_low: float = 0.2,
                        epsilon_high: float | None = None, delta: float | None = None,
                        loss_type: str = "grpo", max_completion_length: int | None = None,
                        temperature: float = 1.0):
    """objective(trainable, frozen, batch, rng, deterministic) -> (loss, metrics) for GRPO.

    batch: tokens, attention_mask, loss_mask [N, L]; advantages [N]; optional old_logps,
    ref_logps [N, L-1] (required when beta != 0) and num_items_in_batch (scalar, DAPO)."""
    if loss_type not in AGGREGATION_MODES:
        raise ValueError(f"loss_type must be one of {AGGREGATION_MODES}, got {loss_type!r}")

    def objective(trainable, frozen, batch, rng, deterministic=False):
        del rng, deterministic
        logps, entropy, _ = forward_logps(model, policy_variables(trainable, frozen),
                                          batch["tokens"], batch["attention_mask"],
                                          batch["loss_mask"], temperature=temperature)
        mask = batch["loss_mask"][:, 1:]
        loss, m = grpo_loss(logps=logps, old_logps=batch.get("old_logps"),
                            ref_logps=batch.get("ref_logps"), advantages=batch["advantages"],
                            mask=mask, beta=beta, epsilon_low=epsilon_low,
                            epsilon_high=epsilon_high, delta=delta, loss_type=loss_type,
                            max_completion_length=max_completion_length,
                            num_items_in_batch=batch.get("num_items_in_batch"))
        m = {**m, "loss": loss, "entropy": _masked_mean(entropy, mask),
             "num_tokens": jnp.sum(mask).astype(jnp.float32)}
        return loss, m

    return objective


def make_rloo_objective(model, *, epsilon_low: float = 0.2, epsilon_high: float | None = None,
                        temperature: float = 1.0):
    """objective(...) for RLOO: batch tokens/attention_mask/loss_mask [N, L], advantages [N],
    old_logps [N, L-1]; the clip acts on the sequence ratio (`rloo_loss`)."""

    def objective(trainable, frozen, batch, rng, deterministic=False):
        del rng, deterministic
        logps, entropy, _ = forward_logps(model, policy_variables(trainable, frozen),
                                          batch["tokens"], batch["attention_mask"],
                                          batch["loss_mask"], temperature=temperature)
        mask = batch["loss_mask"][:, 1:]
        loss, m = rloo_loss(logps=logps, old_logps=batch["old_logps"],
                            advantages=batch["advantages"], mask=mask, epsilon_low=epsilon_low,
                            epsilon_high=epsilon_high)
        m = {k: v for k, v in m.items() if k != "ratio"}
        m = {**m, "loss": loss, "entropy": _masked_mean(entropy, mask),
             "num_tokens": jnp.sum(mask).astype(jnp.float32)}
        return loss, m

    return objective
