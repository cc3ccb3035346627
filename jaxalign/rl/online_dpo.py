"""Online and iterative DPO: preference pairs made from the policy's own samples, judged by the
reward sources, trained with any pairwise loss of `jaxalign.losses.REGISTRY` (dpo, ipo, hinge, ...).

Online DPO (Guo et al. 2024, "Direct language model alignment from online AI feedback",
arXiv:2402.04792; TRL's OnlineDPOTrainer): every step samples `group_size` (2) completions per
prompt from the current policy; the higher-reward one is chosen, the lower-reward one rejected;
the reference is the initial policy.

Iterative DPO (Xiong et al. 2024, arXiv:2312.11456; Dong et al. 2024, "RLHF workflow",
arXiv:2405.07863; Yuan et al. 2024, self-rewarding): in rounds, round k's policy samples the pairs
(best vs worst of `group_size`) that round k+1 trains on, with the round's starting policy as the
reference (`ref_update="round"`). `ranked_pairs` makes up to group_size // 2 disjoint pairs per
group instead of one (i-th best vs i-th worst), so more of each round's samples are used.

Pairs whose two rewards are equal carry no preference: they get weight 0 (online) or are dropped
(rounds). The loss is the weighted mean  sum_i w_i l_i / max(sum_i w_i, 1).
"""

from __future__ import annotations

import inspect
from typing import Callable

import jax.numpy as jnp
import numpy as np

from jaxalign.losses.logps import reduce_sequence
from jaxalign.rl.rollout import Rollout, forward_logps
from jaxalign.train.objectives import policy_variables


def _grouped(rewards, group_size: int, name: str) -> np.ndarray:
    """[N] rewards -> [N / group_size, group_size] float64, with clear errors naming `name`."""
    r = np.asarray(rewards, np.float64)
    if r.ndim != 1 or r.size % group_size:
        raise ValueError(f"{name}: `rewards` must be [N] with N a multiple of "
                         f"group_size={group_size}, got shape {r.shape}")
    if group_size < 2:
        raise ValueError(f"{name}: `group_size` must be >= 2, got {group_size}")
    return r.reshape(-1, group_size)


def best_worst_pairs(rewards, group_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per group of `group_size` consecutive rows: the row with the highest reward (first on ties)
    as chosen and the lowest (first on ties) as rejected.

    Returns (chosen [G], rejected [G]) row indices into `rewards` and valid [G] bool
    (max reward > min reward)."""
    grouped = _grouped(rewards, group_size, "best_worst_pairs")
    base = np.arange(grouped.shape[0]) * group_size
    hi, lo = grouped.argmax(1), grouped.argmin(1)
    valid = grouped.max(1) > grouped.min(1)
    return base + hi, base + lo, valid


def ranked_pairs(rewards, group_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per group of `group_size` consecutive rows, sorted by reward (descending, stable): the i-th
    best as chosen against the i-th worst as rejected, i = 0 .. group_size // 2 - 1, so every
    completion is in at most one pair and the first pair is best-vs-worst. With a 0/1 reward these
    are min(#correct, #incorrect) disjoint (correct, incorrect) pairs per group, where
    `best_worst_pairs` makes at most one.

    Returns (chosen [G * K], rejected [G * K]) row indices, K = group_size // 2, group by group, and
    valid [G * K] bool (chosen reward > rejected reward)."""
    grouped = _grouped(rewards, group_size, "ranked_pairs")
    order = np.argsort(-grouped, axis=1, kind="stable")
    k = group_size // 2
    hi, lo = order[:, :k], order[:, ::-1][:, :k]
    valid = np.take_along_axis(grouped, hi, 1) > np.take_along_axis(grouped, lo, 1)
    base = (np.arange(grouped.shape[0]) * group_size)[:, None]
    return (base + hi).reshape(-1), (base + lo).reshape(-1), valid.reshape(-1)


def sequence_logps(token_logps, loss_mask, *, average: bool = False) -> np.ndarray:
    """[N, L-1] token log-probs -> [N] sums (or means) over the completion tokens."""
    return np.asarray(reduce_sequence(jnp.asarray(token_logps), jnp.asarray(loss_mask[:, 1:]),
                                      average=average), np.float32)


def build_pair_batch(rollout: Rollout, chosen, rejected, *, ref_seq_logps, weight=None) -> dict:
    """Arrays for the preference objective from row indices of `rollout`.

    ref_seq_logps: [N] reference sequence log-probs of every rollout row (sum over completion
    tokens, or mean for length-averaging losses). weight: [P] (default ones)."""
    chosen, rejected = np.asarray(chosen, np.int64), np.asarray(rejected, np.int64)
    if chosen.shape != rejected.shape or chosen.ndim != 1:
        raise ValueError(f"`chosen` {chosen.shape} and `rejected` {rejected.shape} must be equal [P]")
    ref = np.asarray(ref_seq_logps, np.float32)
    w = np.ones(chosen.shape, np.float32) if weight is None else np.asarray(weight, np.float32)
    out = {"weight": w, "ref_chosen_logps": ref[chosen], "ref_rejected_logps": ref[rejected]}
    for side, idx in (("chosen", chosen), ("rejected", rejected)):
        out[f"{side}_tokens"] = rollout.tokens[idx]
        out[f"{side}_attention_mask"] = rollout.attention_mask[idx]
        out[f"{side}_loss_mask"] = rollout.loss_mask[idx]
    return out


def pair_metrics(rollout: Rollout, chosen, rejected, valid) -> dict[str, float]:
    valid = np.asarray(valid, bool)
    r = rollout.rewards
    gap = (r[chosen] - r[rejected])[valid]
    return {"pairs/valid_fraction": float(valid.mean()) if valid.size else 0.0,
            "pairs/count": float(valid.sum()),
            "pairs/reward_gap": float(gap.mean()) if gap.size else 0.0}


def _call_loss(fn, kwargs, available):
    params = inspect.signature(fn).parameters
    if any(p.kind == p.VAR_KEYWORD for p in params.values()):
        return fn(**available, **kwargs)
    return fn(**{k: v for k, v in available.items() if k in params}, **kwargs)


def make_preference_objective(model, *, loss_fn: Callable, loss_kwargs: dict | None = None,
                              average_logps: bool = False, rpo_alpha: float = 0.0,
                              temperature: float = 1.0):
    """objective(trainable, frozen, batch, rng, deterministic) -> (loss, metrics) for a pairwise
    loss on sampled pairs. batch: {chosen,rejected}_{tokens,attention_mask,loss_mask} [P, L],
    ref_chosen_logps, ref_rejected_logps, weight [P]. Metrics are weighted means (TRL names).

    rpo_alpha > 0 adds the chosen completions' token-mean NLL (TRL's `rpo_alpha`; Iterative RPO,
    Pang et al. 2024, arXiv:2404.19733, for verifiable-reward tasks):
        loss = sum_i w_i l_i / sum_i w_i + rpo_alpha * sum_{i,t} w_i m_it (-logp_it) / sum w_i m_it
    """
    hp = dict(loss_kwargs or {})

    def objective(trainable, frozen, batch, rng, deterministic=False):
        del rng, deterministic
        p = batch["chosen_tokens"].shape[0]
        cat = lambda k: jnp.concatenate([batch[f"chosen_{k}"], batch[f"rejected_{k}"]], 0)  # noqa
        tokens, am, lm = cat("tokens"), cat("attention_mask"), cat("loss_mask")
        tok, entropy, _ = forward_logps(model, policy_variables(trainable, frozen), tokens, am, lm,
                                        temperature=temperature)
        mask = lm[:, 1:]
        seq = reduce_sequence(tok, mask, average=average_logps)
        lengths = mask.sum(-1).astype(jnp.float32)
        avail = {"policy_chosen_logps": seq[:p], "policy_rejected_logps": seq[p:],
                 "ref_chosen_logps": batch["ref_chosen_logps"],
                 "ref_rejected_logps": batch["ref_rejected_logps"],
                 "chosen_lengths": lengths[:p], "rejected_lengths": lengths[p:],
                 "chosen_nll": -reduce_sequence(tok[:p], mask[:p], average=True),
                 "target_logps": reduce_sequence(tok[:p], mask[:p])}
        losses, metrics = _call_loss(loss_fn, hp, avail)
        w = batch["weight"].astype(jnp.float32)
        denom = jnp.maximum(jnp.sum(w), 1.0)
        loss = jnp.sum(w * losses) / denom
        out = {k: jnp.sum(w * jnp.asarray(v, jnp.float32)) / denom for k, v in metrics.items()}
        if rpo_alpha:
            wc = w[:, None] * mask[:p]
            nll = -jnp.sum(wc * tok[:p]) / jnp.maximum(jnp.sum(wc), 1.0)
            out.update({"loss/preference": loss, "nll_loss": nll})
            loss = loss + rpo_alpha * nll
        wt = jnp.concatenate([w, w])[:, None] * mask
        out.update(loss=loss, entropy=jnp.sum(wt * entropy) / jnp.maximum(jnp.sum(wt), 1.0),
                   num_tokens=jnp.sum(wt))
        return loss, out

    return objective
