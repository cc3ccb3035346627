"""Reference-free preference losses: SimPO, CPO and ORPO.

None of these needs a frozen reference model: the implicit reward is the policy's own (possibly
length-normalised) log-probability. All arrays are keyword arguments of shape [B], one entry per
(prompt, chosen, rejected) triple; every function returns `(losses [B] fp32, metrics)` with
per-example metrics of shape [B] under TRL's names, and leaves the reduction to the caller.
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp

from jaxalign.losses._checks import check_batch

__all__ = ["simpo_loss", "cpo_loss", "orpo_loss", "log1mexp"]

Array = jax.Array

# ORPO's log-odds log(p / (1 - p)) is infinite at p = 1. Average log-probs above this value (exact
# zeros, which fp32 log-softmax produces for a confident model, or invalid positive values) are
# clamped to it, which bounds |log-odds| by about 69 and keeps the loss and its gradient finite.
_ORPO_MAX_AVG_LOGP = -1e-30
_LOG_HALF = -0.6931471805599453


def _f32(x) -> Array:
    return jnp.asarray(x, jnp.float32)


def _smoothed_sigmoid_loss(logits: Array, label_smoothing: float) -> Array:
    """-(1 - eps) log sigmoid(z) - eps log sigmoid(-z): the conservative (cDPO-style) form."""
    positive = jax.nn.log_sigmoid(logits)
    negative = jax.nn.log_sigmoid(-logits)
    return -(1.0 - label_smoothing) * positive - label_smoothing * negative


def _pair_metrics(chosen: Array, rejected: Array, scale: float) -> dict[str, Array]:
    rewards_chosen = jax.lax.stop_gradient(scale * chosen)
    rewards_rejected = jax.lax.stop_gradient(scale * rejected)
    return {
        "rewards/chosen": rewards_chosen,
        "rewards/rejected": rewards_rejected,
        "rewards/margins": rewards_chosen - rewards_rejected,
        "rewards/accuracies": (rewards_chosen > rewards_rejected).astype(jnp.float32),
        "logps/chosen": jax.lax.stop_gradient(chosen),
        "logps/rejected": jax.lax.stop_gradient(rejected),
    }


def _average(logps: Array, lengths: Array) -> Array:
    """Summed log-probs [B] divided by token counts [B]; a count below 1 is treated as 1."""
    return logps / jnp.maximum(_f32(lengths), 1.0)


def simpo_loss(
    *,
    policy_chosen_logps: Array,
    policy_rejected_logps: Array,
    chosen_lengths: Array,
    rejected_lengths: Array,
    beta: float = 2.0,
    gamma: float = 1.0,
    label_smoothing: float = 0.0,
) -> tuple[Array, dict[str, Array]]:
    """SimPO loss (Meng, Xia & Chen 2024, "SimPO: Simple Preference Optimization with a
    Reference-Free Reward", eq. 6).

        r(y)  = beta / |y| * log pi(y | x)
        loss  = -log sigmoid(r(y_w) - r(y_l) - gamma)

    with conservative label smoothing eps: -(1-eps) log sigmoid(z) - eps log sigmoid(-z).

    Args:
      policy_chosen_logps, policy_rejected_logps: [B] summed log-probs of the completions.
      chosen_lengths, rejected_lengths: [B] completion token counts (a count below 1 counts as 1,
        so an empty completion has average log-prob 0 instead of NaN).
      beta: reward scale (paper default 2.0).
      gamma: target reward margin, in reward units (the paper's gamma). Defaults to 1.0, i.e.
        the SimPO code's default ratio gamma/beta = 0.5 at beta = 2. The SimPO repository
        parameterises it as `gamma_beta_ratio` = gamma / beta; TRL's `CPOConfig(loss_type="simpo",
        simpo_gamma=g)` computes `logsigmoid(beta * (avg_c - avg_r - g / beta))`, so TRL's
        `simpo_gamma` equals this `gamma` (not the ratio).
      label_smoothing: probability eps that the preference label is flipped.

    Returns:
      losses [B] fp32 and metrics [B]: `rewards/*` are beta times the average log-probs and
      `logps/chosen`, `logps/rejected` are the average log-probs, as TRL's CPOTrainer logs them.
    """
    check_batch(
        "simpo_loss",
        policy_chosen_logps=policy_chosen_logps,
        policy_rejected_logps=policy_rejected_logps,
        chosen_lengths=chosen_lengths,
        rejected_lengths=rejected_lengths,
    )
    chosen = _average(_f32(policy_chosen_logps), chosen_lengths)
    rejected = _average(_f32(policy_rejected_logps), rejected_lengths)
    logits = beta * (chosen - rejected) - gamma
    losses = _smoothed_sigmoid_loss(logits, label_smoothing)
    return losses, _pair_metrics(chosen, rejected, beta)


def cpo_loss(
    *,
    policy_chosen_logps: Array,
    policy_rejected_logps: Array,
    chosen_nll: Array | None = None,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    cpo_alpha: float = 1.0,
    loss_type: Literal["sigmoid", "hinge", "ipo"] = "sigmoid",
) -> tuple[Array, dict[str, Array]]:
    """CPO loss (Xu et al. 2024, "Contrastive Preference Optimization: Pushing the Boundaries of
    LLM Performance in Machine Translation", eq. 3 and 6).

        z     = log pi(y_w | x) - log pi(y_l | x)
        loss  = -(1-eps) log sigmoid(beta z) - eps log sigmoid(-beta z) + cpo_alpha * nll(y_w)

    `loss_type="hinge"` uses relu(1 - beta z) and `loss_type="ipo"` uses (z - 1 / (2 beta))^2 as the
    preference term instead, as TRL's CPOTrainer does (TRL feeds average log-probs to "ipo").

    Args:
      policy_chosen_logps, policy_rejected_logps: [B] log-probs of the completions (summed, as the
        paper and TRL use them for "sigmoid" and "hinge").
      chosen_nll: [B] negative log-likelihood of each chosen completion (the behaviour-cloning
        term), e.g. `masked_nll(...)[0]` on the chosen tokens. TRL uses one token-averaged value
        for the whole batch instead; pass it broadcast to [B] to reproduce TRL exactly. May be
        None only when `cpo_alpha == 0`.
      beta: temperature of the preference term.
      label_smoothing: conservative label smoothing eps ("sigmoid" only).
      cpo_alpha: weight of the NLL term (TRL's `cpo_alpha`; 1 in the paper).
      loss_type: "sigmoid" (paper), "hinge" or "ipo".

    Returns:
      losses [B] fp32 and metrics [B]: `rewards/*` = beta * log-probs, `logps/*`, `nll_loss`.
    """
    check_batch(
        "cpo_loss",
        policy_chosen_logps=policy_chosen_logps,
        policy_rejected_logps=policy_rejected_logps,
        chosen_nll=chosen_nll,
    )
    if chosen_nll is None and (not isinstance(cpo_alpha, (int, float)) or cpo_alpha != 0):
        raise ValueError(f"cpo_loss: `chosen_nll` [B] is required when cpo_alpha != 0 (got {cpo_alpha})")
    chosen = _f32(policy_chosen_logps)
    rejected = _f32(policy_rejected_logps)
    logits = chosen - rejected
    if loss_type == "sigmoid":
        losses = _smoothed_sigmoid_loss(beta * logits, label_smoothing)
    elif loss_type == "hinge":
        losses = jax.nn.relu(1.0 - beta * logits)
    elif loss_type == "ipo":
        losses = (logits - 1.0 / (2.0 * beta)) ** 2
    else:
        raise ValueError(f"cpo_loss: `loss_type` must be 'sigmoid', 'hinge' or 'ipo', got {loss_type!r}")
    nll = jnp.zeros_like(chosen) if chosen_nll is None else _f32(chosen_nll)
    losses = losses + cpo_alpha * nll
    metrics = _pair_metrics(chosen, rejected, beta)
    metrics["nll_loss"] = jax.lax.stop_gradient(nll)
    return losses, metrics


def log1mexp(x: Array) -> Array:
    """log(1 - exp(x)) for x < 0, accurate everywhere (Maechler 2012, "Accurately Computing
    log(1 - exp(-|a|))"): log(-expm1(x)) for x > -log 2, log1p(-exp(x)) below.

    Each branch only sees inputs from its own range, so gradients stay finite (no NaN leaks
    through `where`). Returns -inf at x = 0 and NaN for x > 0, like the formula.
    """
    x = _f32(x)
    small = x < _LOG_HALF
    x_small = jnp.where(small, x, _LOG_HALF)
    x_large = jnp.where(small, _LOG_HALF, x)
    return jnp.where(small, jnp.log1p(-jnp.exp(x_small)), jnp.log(-jnp.expm1(x_large)))


def orpo_loss(
    *,
    policy_chosen_logps: Array,
    policy_rejected_logps: Array,
    chosen_nll: Array,
    chosen_lengths: Array | None = None,
    rejected_lengths: Array | None = None,
    lambda_: float = 0.1,
) -> tuple[Array, dict[str, Array]]:
    """ORPO loss (Hong, Lee & Thorne 2024, "ORPO: Monolithic Preference Optimization without
    Reference Model", eq. 4-7).

        a_w, a_l = average per-token log-probs of y_w, y_l
        log_odds = (a_w - a_l) - (log1mexp(a_w) - log1mexp(a_l))     # log(odds(y_w) / odds(y_l))
        loss     = nll(y_w) - lambda_ * log sigmoid(log_odds)

    with odds(y) = P(y|x) / (1 - P(y|x)) and P(y|x) = exp(a). Average log-probs above -1e-30
    (exact zeros from a confident fp32 model) are clamped to -1e-30, where their gradient is 0, so
    the loss stays finite; TRL's `ORPOTrainer.odds_ratio_loss` returns inf/NaN there and agrees
    everywhere else.

    Args:
      policy_chosen_logps, policy_rejected_logps: [B] summed log-probs when `chosen_lengths` and
        `rejected_lengths` [B] are given, otherwise already-averaged log-probs (as TRL computes them
        with `average_log_prob=True`).
      chosen_nll: [B] SFT negative log-likelihood of each chosen completion (TRL uses one
        token-averaged value over prompt and completion for the batch; broadcast it to [B] to
        reproduce TRL exactly).
      chosen_lengths, rejected_lengths: [B] token counts, both or neither.
      lambda_: weight of the odds-ratio term (the paper's lambda, TRL's `beta`).

    Returns:
      losses [B] fp32 and metrics [B] under TRL's names: `rewards/*` = lambda_ * average log-probs,
      `logps/*` (average log-probs), `nll_loss`, `log_odds_ratio` = log sigmoid(log_odds) and
      `log_odds_chosen` = log_odds.
    """
    check_batch(
        "orpo_loss",
        policy_chosen_logps=policy_chosen_logps,
        policy_rejected_logps=policy_rejected_logps,
        chosen_nll=chosen_nll,
        chosen_lengths=chosen_lengths,
        rejected_lengths=rejected_lengths,
    )
    if (chosen_lengths is None) != (rejected_lengths is None):
        raise ValueError("orpo_loss: pass both `chosen_lengths` and `rejected_lengths` or neither")
    chosen = _f32(policy_chosen_logps)
    rejected = _f32(policy_rejected_logps)
    if chosen_lengths is not None:
        chosen = _average(chosen, chosen_lengths)
        rejected = _average(rejected, rejected_lengths)
    chosen = jnp.minimum(chosen, _ORPO_MAX_AVG_LOGP)
    rejected = jnp.minimum(rejected, _ORPO_MAX_AVG_LOGP)
    log_odds = (chosen - rejected) - (log1mexp(chosen) - log1mexp(rejected))
    ratio = jax.nn.log_sigmoid(log_odds)
    nll = _f32(chosen_nll)
    losses = nll - lambda_ * ratio
    metrics = _pair_metrics(chosen, rejected, lambda_)
    metrics["nll_loss"] = jax.lax.stop_gradient(nll)
    metrics["log_odds_ratio"] = jax.lax.stop_gradient(ratio)
    metrics["log_odds_chosen"] = jax.lax.stop_gradient(log_odds)
    return losses, metrics


LOSSES = {"simpo": simpo_loss, "cpo": cpo_loss, "orpo": orpo_loss}
