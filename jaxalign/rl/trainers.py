"""The online methods as `Trainer`s (objective + round builder) from plain keyword arguments.

    grpo_trainer        GRPO / Dr. GRPO / DAPO (group advantages, token-level clipped surrogate)
    rloo_trainer        RLOO (leave-one-out baseline, KL in the reward, sequence-level clip)
    ppo_trainer         PPO with a value head and GAE
    preference_trainer  online DPO (pairs every step), iterative DPO (rounds, reference updated
                        per round) and RSO (statistical rejection sampling pairs), any pairwise loss
    best_of_n_trainer   best-of-N rejection-sampling fine-tuning

Nothing here reads a config: `jaxalign.rl.run` maps the experiment config onto these arguments.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from jaxalign.rl import grpo, online_dpo, ppo, rejection
from jaxalign.rl.loop import RoundTools, Trainer
from jaxalign.rl.rollout import Rollout, terminated

PAIR_SELECTIONS = ("best_worst", "ranked", "rso")


def _needs_old(epochs: int, batch_size: int, rows: int) -> bool:
    """Old log-probs are needed once the policy moves before the last update on the rows."""
    return epochs > 1 or (0 < batch_size < rows)


def grpo_trainer(model, *, group_size: int, beta: float = 0.0, epsilon_low: float = 0.2,
                 epsilon_high: float | None = None, delta: float | None = None,
                 loss_type: str = "grpo", scale_rewards: str = "group",
                 max_completion_length: int | None = None, temperature: float = 1.0,
                 epochs: int = 1, batch_size: int = 0, grad_accum: int = 1,
                 log_kl: bool = True) -> Trainer:
    """GRPO; `beta` > 0 adds the k3 KL to the reference (which must then exist). With `log_kl` the
    KL is also reported (not optimised) when beta = 0 and a reference exists."""
    if group_size < 2:
        raise ValueError(f"GRPO needs group_size >= 2 (a group baseline), got {group_size}")
    objective = grpo.make_grpo_objective(
        model, beta=beta, epsilon_low=epsilon_low, epsilon_high=epsilon_high, delta=delta,
        loss_type=loss_type, max_completion_length=max_completion_length, temperature=temperature)

    def build(rollout: Rollout, tools: RoundTools):
        n = len(rollout.rewards)
        if beta and not tools.has_reference:
            raise ValueError(f"GRPO with beta={beta} needs a reference model")
        ref = tools.ref_logps(rollout) if tools.has_reference and (beta or log_kl) else None
        old = tools.policy_logps(rollout) if _needs_old(epochs, batch_size, n) else None
        accum = grad_accum * (n // batch_size if batch_size else 1)
        return grpo.build_grpo_batch(rollout, scale_rewards=scale_rewards, ref_logps=ref,
                                     old_logps=old, loss_type=loss_type, grad_accum=accum)

    return Trainer("grpo", objective, build, group_size, epochs, batch_size)


def rloo_trainer(model, *, group_size: int, beta: float = 0.0, epsilon_low: float = 0.2,
                 epsilon_high: float | None = None, normalize_advantages: bool = False,
                 temperature: float = 1.0, epochs: int = 1, batch_size: int = 0) -> Trainer:
    """RLOO with TRL's sequence-level KL penalty in the reward (`beta`)."""
    if group_size < 2:
        raise ValueError(f"RLOO needs group_size >= 2 (a leave-one-out baseline), got {group_size}")
    objective = grpo.make_rloo_objective(model, epsilon_low=epsilon_low, epsilon_high=epsilon_high,
                                         temperature=temperature)

    def build(rollout: Rollout, tools: RoundTools):
        old = tools.policy_logps(rollout)
        ref = tools.ref_logps(rollout) if beta else None
        return grpo.build_rloo_batch(rollout, old_logps=old, ref_logps=ref, beta=beta,
                                     normalize_advantages=normalize_advantages)

    return Trainer("rloo", objective, build, group_size, epochs, batch_size)


def ppo_trainer(model, *, eos_id, group_size: int = 1, epsilon: float = 0.2,
                clip_range_value: float | None = 0.2, vf_coef: float = 0.1,
                kl_coef: float = 0.05, kl_estimator: str = "k1", gamma: float = 1.0,
                lam: float = 0.95, whiten_advantages: bool = True,
                missing_eos_penalty: float | None = None, temperature: float = 1.0,
                epochs: int = 4, batch_size: int = 0) -> Trainer:
    """PPO (value head in trainable['value'], see `jaxalign.rl.ppo`); needs a reference."""
    objective = ppo.make_ppo_objective(model, epsilon=epsilon, clip_range_value=clip_range_value,
                                       vf_coef=vf_coef, temperature=temperature)

    def build(rollout: Rollout, tools: RoundTools):
        old, values = tools.policy_logps_and_values(rollout)
        return ppo.build_ppo_batch(rollout, old_logps=old, old_values=values,
                                   ref_logps=tools.ref_logps(rollout), kl_coef=kl_coef,
                                   kl_estimator=kl_estimator, gamma=gamma, lam=lam,
                                   whiten_advantages=whiten_advantages,
                                   missing_eos_penalty=missing_eos_penalty,
                                   terminated=terminated(rollout, eos_id))

    return Trainer("ppo", objective, build, group_size, epochs, batch_size)


def preference_trainer(model, *, loss_fn: Callable, loss_kwargs: dict | None = None,
                       average_logps: bool = False, group_size: int = 2,
                       pair_selection: str = "best_worst", drop_ties: bool = False,
                       rso_beta: float = 0.5, rso_num_samples: int = 2, epochs: int = 1,
                       batch_size: int = 0, ref_update: str = "never", rpo_alpha: float = 0.0,
                       temperature: float = 1.0, name: str = "online_dpo") -> Trainer:
    """Pairs from the policy's samples, judged by the rewards, trained with a pairwise loss.

    pair_selection: "best_worst" (highest vs lowest reward of each group: online/iterative DPO),
    "ranked" (up to group_size // 2 disjoint pairs per group, i-th best vs i-th worst,
    `jaxalign.rl.online_dpo.ranked_pairs`) or "rso" (statistical rejection sampling,
    `jaxalign.rl.rejection.rso_pairs`). Tied pairs get
    weight 0 (`drop_ties=False`: one fixed-shape update per round, online DPO) or are dropped
    (`drop_ties=True`: rounds of many minibatches, iterative DPO / RSO). rpo_alpha adds the NLL of
    the chosen completions (Iterative RPO)."""
    if pair_selection not in PAIR_SELECTIONS:
        raise ValueError(f"pair_selection must be one of {PAIR_SELECTIONS}, got {pair_selection!r}")
    if group_size < 2:
        raise ValueError(f"preference pairs need group_size >= 2, got {group_size}")
    objective = online_dpo.make_preference_objective(
        model, loss_fn=loss_fn, loss_kwargs=loss_kwargs, average_logps=average_logps,
        rpo_alpha=rpo_alpha, temperature=temperature)

    def build(rollout: Rollout, tools: RoundTools):
        if pair_selection == "rso":
            chosen, rejected, m = rejection.rso_pairs(rollout, num_samples=rso_num_samples,
                                                      beta=rso_beta, rng=tools.rng)
            weight = None
        else:
            select = (online_dpo.ranked_pairs if pair_selection == "ranked"
                      else online_dpo.best_worst_pairs)
            chosen, rejected, valid = select(rollout.rewards, group_size)
            m = online_dpo.pair_metrics(rollout, chosen, rejected, valid)
            if drop_ties:
                chosen, rejected, weight = chosen[valid], rejected[valid], None
            else:
                weight = valid.astype(np.float32)
        if len(chosen) == 0:
            return {}, m
        ref_seq = online_dpo.sequence_logps(tools.ref_logps(rollout), rollout.loss_mask,
                                            average=average_logps)
        return online_dpo.build_pair_batch(rollout, chosen, rejected, ref_seq_logps=ref_seq,
                                           weight=weight), m

    return Trainer(name, objective, build, group_size, epochs, batch_size, ref_update)


def best_of_n_trainer(model, *, group_size: int, min_reward: float | None = None,
                      epochs: int = 1, batch_size: int = 0) -> Trainer:
    """Best-of-N rejection-sampling fine-tuning: NLL on each group's best completion."""
    objective = rejection.make_sft_objective(model)

    def build(rollout: Rollout, tools: RoundTools):
        del tools
        rows, m = rejection.best_of_n(rollout.rewards, group_size, min_reward=min_reward)
        if len(rows) == 0:
            return {}, m
        return rejection.build_sft_batch(rollout, rows), m

    return Trainer("best_of_n", objective, build, group_size, epochs, batch_size)
