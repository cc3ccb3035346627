"""Rejection sampling: RSO pairs and best-of-N fine-tuning.

RSO (Liu et al. 2023, "Statistical Rejection Sampling Improves Preference Optimization",
arXiv:2309.06657): the optimal KL-regularised policy is pi*(y|x) ∝ pi_sft(y|x) exp(r(x, y) / beta).
Candidates y_1..y_n ~ pi_sft are turned into samples of pi* by their Algorithm 1: repeatedly, with
r_max the highest reward among the candidates left, accept each remaining candidate with
probability exp((r - r_max) / beta) until `num_samples` are accepted (a candidate with r = r_max is
always accepted, so this terminates). Accepted samples are paired in acceptance order, (1, 2),
(3, 4), ..., and each pair is labelled by the reward ("rso-sample-rank"); pairs with equal rewards
are dropped. Train on them with `hinge` (RSO's loss) or any pairwise loss.

Best-of-N / rejection-sampling fine-tuning (Llama 3, Dubey et al. 2024, arXiv:2407.21783, Sec.
4.2.2; RAFT, Dong et al. 2023; ReST-EM, Singh et al. 2023): sample N completions per prompt, keep
the highest-reward one (optionally only if its reward >= min_reward), and fine-tune on the kept
completions with the masked NLL.
"""

from __future__ import annotations

from typing import Sequence

import jax.numpy as jnp
import numpy as np

from jaxalign.rl.rollout import Rollout, forward_logps
from jaxalign.train.objectives import policy_variables


def statistical_rejection_sample(rewards: Sequence[float], *, num_samples: int, beta: float,
                                 rng: np.random.Generator) -> list[int]:
    """Indices of the accepted candidates, in acceptance order (Liu et al. 2023, Algorithm 1).

    Args:
      rewards: [n] reward of each candidate.
      num_samples: how many to accept (<= n).
      beta: temperature of pi* ∝ pi_sft exp(r / beta) (> 0); small beta keeps only the best.
      rng: numpy Generator; one uniform draw per candidate examined.
    """
    r = np.asarray(rewards, np.float64)
    if r.ndim != 1:
        raise ValueError(f"`rewards` must be 1-D [n], got shape {r.shape}")
    if not 1 <= num_samples <= r.size:
        raise ValueError(f"`num_samples` must be in [1, {r.size}] (number of candidates), got "
                         f"{num_samples}")
    if not beta > 0:
        raise ValueError(f"`beta` must be > 0, got {beta}")
    remaining = list(range(r.size))
    accepted: list[int] = []
    while len(accepted) < num_samples:
        max_reward = max(r[i] for i in remaining)
        taken = []
        for i in remaining:
            u = rng.uniform()
            if u >= np.exp((r[i] - max_reward) / beta):
                continue
            accepted.append(i)
            taken.append(i)
            if len(accepted) == num_samples:
                break
        remaining = [i for i in remaining if i not in taken]
    return accepted


def rso_pairs(rollout: Rollout, *, num_samples: int, beta: float, rng: np.random.Generator,
              unique: bool = True) -> tuple[np.ndarray, np.ndarray, dict[str, float]]:
    """RSO preference pairs from a grouped rollout: per group, statistical rejection sampling
    (over distinct completions when `unique`, as the paper's dict of responses), then consecutive
    accepted samples paired and ranked by reward; ties dropped.

    Returns (chosen [P], rejected [P]) row indices and metrics."""
    g = rollout.group_size
    chosen, rejected, n_acc, n_cand = [], [], 0, 0
    for start in range(0, len(rollout.rewards), g):
        rows = list(range(start, start + g))
        if unique:
            seen: dict[str, int] = {}
            for i in rows:
                seen.setdefault(rollout.completions[i], i)
            rows = list(seen.values())
        n_cand += len(rows)
        k = min(num_samples, len(rows))
        acc = [rows[j] for j in statistical_rejection_sample(rollout.rewards[rows], num_samples=k,
                                                             beta=beta, rng=rng)]
        n_acc += len(acc)
        for a, b in zip(acc[0::2], acc[1::2]):
            ra, rb = rollout.rewards[a], rollout.rewards[b]
            if ra == rb:
                continue
            chosen.append(a if ra > rb else b)
            rejected.append(b if ra > rb else a)
    groups = len(rollout.rewards) // g
    metrics = {"rso/accepted_per_prompt": n_acc / groups, "rso/candidates_per_prompt": n_cand / groups,
               "pairs/count": float(len(chosen)), "pairs/valid_fraction": len(chosen) / groups}
    return np.asarray(chosen, np.int64), np.asarray(rejected, np.int64), metrics


def best_of_n(rewards, group_size: int, *, min_reward: float | None = None
              ) -> tuple[np.ndarray, dict[str, float]]:
    """Row index of each group's highest-reward completion (first on ties), keeping only groups
    whose best reward is >= min_reward (when given). Returns (rows [K], metrics)."""
    r = np.asarray(rewards, np.float64)
    if r.ndim != 1 or group_size < 1 or r.size % group_size:
        raise ValueError(f"best_of_n: `rewards` must be [N] with N a multiple of group_size="
                         f"{group_size}, got shape {r.shape}")
    grouped = r.reshape(-1, group_size)
    best = grouped.argmax(1)
    keep = np.ones(grouped.shape[0], bool) if min_reward is None else grouped.max(1) >= min_reward
    rows = (np.arange(grouped.shape[0]) * group_size + best)[keep]
    metrics = {"best_of_n/kept_fraction": float(keep.mean()),
               "best_of_n/best_reward": float(grouped.max(1).mean()),
               "best_of_n/mean_reward": float(r.mean())}
    return rows, metrics


def build_sft_batch(rollout: Rollout, rows) -> dict:
    """SFT arrays of the given rollout rows: tokens, attention_mask, loss_mask [K, L], weight [K]."""
    rows = np.asarray(rows, np.int64)
    return {"tokens": rollout.tokens[rows], "attention_mask": rollout.attention_mask[rows],
            "loss_mask": rollout.loss_mask[rows], "weight": np.ones(rows.shape, np.float32)}


def make_sft_objective(model):
    """objective(...) -> (loss, metrics): token-mean NLL of the completions of rows with weight 1
    (weight-0 rows are padding): loss = -sum_{b,t} w_b m_bt logp_bt / max(sum w_b m_bt, 1)."""

    def objective(trainable, frozen, batch, rng, deterministic=False):
        del rng, deterministic
        tok, entropy, _ = forward_logps(model, policy_variables(trainable, frozen), batch["tokens"],
                                        batch["attention_mask"], batch["loss_mask"])
        wm = batch["weight"].astype(jnp.float32)[:, None] * batch["loss_mask"][:, 1:]
        n = jnp.maximum(jnp.sum(wm), 1.0)
        nll = -jnp.sum(wm * tok) / n
        return nll, {"loss": nll, "nll_loss": nll, "entropy": jnp.sum(wm * entropy) / n,
                     "num_tokens": jnp.sum(wm)}

    return objective
