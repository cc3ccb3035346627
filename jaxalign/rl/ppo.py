"""PPO with a value head on the policy's hidden states and GAE (Schulman et al. 2017,
arXiv:1707.06347; the RLHF recipe of Ziegler et al. 2019 / Ouyang et al. 2022, as TRL's PPOTrainer).

Per completion token t (valid tokens of a row t_1 < ... < t_n):

    r_t   = -kl_coef * kl_t  (+ score on the last completion token t_n)
    kl_t  = k1 = old_t - ref_t  (TRL's default estimator; k3 selectable)
    A, R  = gae(r, V_old, gamma, lam);  A <- whiten(A)  (masked, as TRL)
    loss  = masked_mean(-min(rho A, clip(rho, 1 - eps, 1 + eps) A))
            + vf_coef * masked_mean(0.5 * max((V - R)^2, (clip(V, V_old +- c) - R)^2))

The value head is `{'kernel': [D, 1], 'bias': [1]}` (zeros at init) on the final hidden state of
position t-1 (the state from which token t is sampled), so values are aligned with the token
log-probs: [N, L-1]. Policy and value share the trunk: one forward pass gives both.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxalign.losses import gae, kl_estimate, ppo_loss, whiten
from jaxalign.rl.rollout import Rollout, forward_logps
from jaxalign.train.objectives import policy_variables


def init_value_head(hidden_size: int) -> dict:
    """Zero-initialised scalar head {'kernel': [D, 1], 'bias': [1]} (V = 0 before training)."""
    return {"kernel": jnp.zeros((hidden_size, 1), jnp.float32), "bias": jnp.zeros((1,), jnp.float32)}


def apply_value_head(head: dict, hidden) -> jax.Array:
    """hidden [N, L, D] -> values [N, L-1] fp32 (position t-1 values the state before token t)."""
    h = hidden[:, :-1].astype(jnp.float32)
    return (h @ head["kernel"].astype(jnp.float32))[..., 0] + head["bias"].astype(jnp.float32)[0]


def make_policy_value_fn(model, *, temperature: float = 1.0):
    """Jitted `(trainable, frozen, tokens, attention_mask, loss_mask) -> (logps, values)`, both
    [N, L-1] (values 0 where loss_mask[:, 1:] is 0): the rollout's old log-probs and values."""

    @jax.jit
    def fn(trainable, frozen, tokens, attention_mask, loss_mask):
        lp, _, hidden = forward_logps(model, policy_variables(trainable, frozen), tokens,
                                      attention_mask, loss_mask, temperature=temperature,
                                      return_hidden=True)
        v = apply_value_head(trainable["value"], hidden)
        return lp, jnp.where(loss_mask[:, 1:], v, 0.0)

    return fn


def last_token_onehot(mask) -> np.ndarray:
    """[N, T] float32 with a 1 at each row's last nonzero mask entry (none for empty rows)."""
    mask = np.asarray(mask) != 0
    t = mask.shape[1]
    last = t - 1 - np.argmax(mask[:, ::-1], axis=1)
    out = np.zeros(mask.shape, np.float32)
    rows = np.flatnonzero(mask.any(1))
    out[rows, last[rows]] = 1.0
    return out


def build_ppo_batch(rollout: Rollout, *, old_logps, old_values, ref_logps, kl_coef: float = 0.05,
                    kl_estimator: str = "k1", gamma: float = 1.0, lam: float = 0.95,
                    whiten_advantages: bool = True, missing_eos_penalty: float | None = None,
                    terminated=None) -> tuple[dict, dict]:
    """Per-token rewards, GAE advantages and returns for one rollout.

    Args:
      old_logps, old_values, ref_logps: [N, L-1] under the sampling policy / its value head / the
        reference (aligned with tokens[:, 1:]).
      missing_eos_penalty: subtracted from the score of rows that did not emit EOS
        (`terminated` [N] bool is then required), as TRL's `missing_eos_penalty`.
    Returns (batch: tokens, attention_mask, loss_mask, old_logps, old_values, advantages, returns;
    metrics with TRL's `objective/*` names and `kl`).
    """
    mask = np.asarray(rollout.loss_mask[:, 1:])
    scores = np.asarray(rollout.rewards, np.float32)
    if missing_eos_penalty:
        if terminated is None:
            raise ValueError("build_ppo_batch: `terminated` is required with missing_eos_penalty")
        scores = scores - np.float32(missing_eos_penalty) * (~np.asarray(terminated, bool))
    kl = np.asarray(kl_estimate(old_logps, ref_logps, mask, kind=kl_estimator), np.float32)
    non_score = -np.float32(kl_coef) * kl
    token_rewards = non_score + last_token_onehot(mask) * scores[:, None]
    adv, returns = gae(rewards=token_rewards, values=old_values, mask=mask, gamma=gamma, lam=lam)
    if whiten_advantages:
        adv = whiten(adv, mask)
    batch = {"tokens": rollout.tokens, "attention_mask": rollout.attention_mask,
             "loss_mask": rollout.loss_mask, "old_logps": np.asarray(old_logps, np.float32),
             "old_values": np.asarray(old_values, np.float32),
             "advantages": np.asarray(adv, np.float32), "returns": np.asarray(returns, np.float32)}
    seq_kl = kl.sum(1)
    metrics = {
        "objective/kl": float(seq_kl.mean()),
        "objective/non_score_reward": float(non_score.sum(1).mean()),
        "objective/rlhf_reward": float((scores + non_score.sum(1)).mean()),
        "objective/scores": float(scores.mean()),
        "kl": float(kl.sum() / max(mask.sum(), 1)),
    }
    return batch, metrics


def make_ppo_objective(model, *, epsilon: float = 0.2, clip_range_value: float | None = 0.2,
                       vf_coef: float = 0.1, temperature: float = 1.0):
    """objective(trainable, frozen, batch, rng, deterministic) -> (loss, metrics): `ppo_loss` on
    the policy log-probs and the value head (trainable['value']) of one shared forward pass."""

    def objective(trainable, frozen, batch, rng, deterministic=False):
        del rng, deterministic
        logps, entropy, hidden = forward_logps(model, policy_variables(trainable, frozen),
                                               batch["tokens"], batch["attention_mask"],
                                               batch["loss_mask"], temperature=temperature,
                                               return_hidden=True)
        mask = batch["loss_mask"][:, 1:]
        values = apply_value_head(trainable["value"], hidden)
        loss, m = ppo_loss(logps=logps, old_logps=batch["old_logps"],
                           advantages=batch["advantages"], values=values,
                           old_values=batch["old_values"], returns=batch["returns"], mask=mask,
                           epsilon=epsilon, clip_range_value=clip_range_value, vf_coef=vf_coef)
        n = jnp.maximum(jnp.sum(mask), 1)
        m = {**m, "loss": loss, "clip_ratio/region_mean": m["policy/clipfrac"],
             "entropy": jnp.sum(entropy) / n, "num_tokens": jnp.sum(mask).astype(jnp.float32)}
        return loss, m

    return objective
