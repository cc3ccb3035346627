"""Pairwise preference losses that anchor each response's implicit reward on its own.

Unlike the margin losses in `preference.py`, these push the chosen and the rejected reward
separately towards fixed targets (zero, a running mean, +-1/2), so they are not invariant to
shifting both log-ratios by the same constant. Same contract: keyword arrays [B]
(`policy_chosen_logps`, `policy_rejected_logps`, `ref_chosen_logps`, `ref_rejected_logps`),
keyword-only hyperparameters, `(losses [B], metrics dict of [B])`, no reduction, >= fp32.

Notation: r_c = pi_c - ref_c, r_r = pi_r - ref_r; rewards R_c = beta * r_c, R_r = beta * r_r.
"""

from __future__ import annotations

import jax

from jaxalign.losses.preference_base import (
    as_float,
    check_positive,
    check_scalar_or_batch,
    logratio_inputs,
)

_log_sigmoid = jax.nn.log_sigmoid


def _rewards(name, beta, **arrays):
    """Returns (chosen log-ratio [B], rejected log-ratio [B], metrics)."""
    _, rc, rr, metrics = logratio_inputs(name, beta=beta, **arrays)
    return rc, rr, metrics


def nca_pair_loss(
    *,
    policy_chosen_logps,
    policy_rejected_logps,
    ref_chosen_logps,
    ref_rejected_logps,
    beta=0.1,
):
    """NCA, pairwise form (Chen et al. 2024, "Noise Contrastive Alignment of Language Models with
    Explicit Rewards", arXiv:2402.05369). TRL's `loss_type="nca_pair"`.

      loss = -log sigmoid(R_c) - 1/2 log sigmoid(-R_c) - 1/2 log sigmoid(-R_r)

    Args: the four log-prob arrays, each [B]. Returns (losses [B], metrics dict of [B]).
    """
    rc, rr, metrics = _rewards(
        "nca_pair_loss", beta,
        policy_chosen_logps=policy_chosen_logps, policy_rejected_logps=policy_rejected_logps,
        ref_chosen_logps=ref_chosen_logps, ref_rejected_logps=ref_rejected_logps,
    )
    big_rc, big_rr = beta * rc, beta * rr
    losses = -_log_sigmoid(big_rc) - 0.5 * _log_sigmoid(-big_rc) - 0.5 * _log_sigmoid(-big_rr)
    return losses, metrics


def bco_pair_loss(
    *,
    policy_chosen_logps,
    policy_rejected_logps,
    ref_chosen_logps,
    ref_rejected_logps,
    beta=0.1,
    delta=0.0,
):
    """BCO, pairwise form (Jung et al. 2024, "Binary Classifier Optimization for Large Language
    Model Alignment", arXiv:2404.04656): a binary classifier on rewards with a reward shift delta.

      loss = -log sigmoid(R_c - delta) - log sigmoid(-(R_r - delta))

    `delta` (scalar or [B]) is the running mean of the rewards {R_c, R_r} over past batches,
    maintained by the caller (e.g. from the `rewards/chosen` and `rewards/rejected` metrics);
    its gradient is stopped. delta = 0 is TRL 1.x's `loss_type="bco_pair"` (which dropped the
    running mean that older TRL versions used).

    Args: the four log-prob arrays, each [B]; `delta` scalar or [B].
    Returns (losses [B], metrics dict of [B]).
    """
    name = "bco_pair_loss"
    rc, rr, metrics = _rewards(
        name, beta,
        policy_chosen_logps=policy_chosen_logps, policy_rejected_logps=policy_rejected_logps,
        ref_chosen_logps=ref_chosen_logps, ref_rejected_logps=ref_rejected_logps,
    )
    check_scalar_or_batch(name, "delta", delta, rc.shape[0])
    d = jax.lax.stop_gradient(as_float(delta))
    losses = -_log_sigmoid(beta * rc - d) - _log_sigmoid(-(beta * rr - d))
    return losses, metrics


def sppo_hard_loss(
    *,
    policy_chosen_logps,
    policy_rejected_logps,
    ref_chosen_logps,
    ref_rejected_logps,
    beta=0.1,
):
    """SPPO with hard win probabilities (Wu et al. 2024, "Self-Play Preference Optimization for
    Language Model Alignment", arXiv:2405.00675, Eq. 4.7 with P = 1 for the winner, 0 for the
    loser). TRL's `loss_type="sppo_hard"`.

      loss = (r_c - 1 / (2 beta))^2 + (r_r + 1 / (2 beta))^2

    Args: the four log-prob arrays, each [B]. Returns (losses [B], metrics dict of [B]).
    """
    name = "sppo_hard_loss"
    check_positive(name, "beta", beta)
    rc, rr, metrics = _rewards(
        name, beta,
        policy_chosen_logps=policy_chosen_logps, policy_rejected_logps=policy_rejected_logps,
        ref_chosen_logps=ref_chosen_logps, ref_rejected_logps=ref_rejected_logps,
    )
    half = 0.5 / beta
    return (rc - half) ** 2 + (rr + half) ** 2, metrics


def apo_zero_loss(
    *,
    policy_chosen_logps,
    policy_rejected_logps,
    ref_chosen_logps,
    ref_rejected_logps,
    beta=0.1,
):
    """APO-zero (D'Oosterlinck et al. 2024, "Anchored Preference Optimization and Contrastive
    Revisions", arXiv:2408.06266, Eq. 7): raise the chosen and lower the rejected likelihood, for
    chosen outputs better than the model's own. TRL's `loss_type="apo_zero"`.

      loss = (1 - sigmoid(R_c)) + sigmoid(R_r)      in (0, 2)

    Args: the four log-prob arrays, each [B]. Returns (losses [B], metrics dict of [B]).
    """
    rc, rr, metrics = _rewards(
        "apo_zero_loss", beta,
        policy_chosen_logps=policy_chosen_logps, policy_rejected_logps=policy_rejected_logps,
        ref_chosen_logps=ref_chosen_logps, ref_rejected_logps=ref_rejected_logps,
    )
    return jax.nn.sigmoid(-beta * rc) + jax.nn.sigmoid(beta * rr), metrics


def apo_down_loss(
    *,
    policy_chosen_logps,
    policy_rejected_logps,
    ref_chosen_logps,
    ref_rejected_logps,
    beta=0.1,
):
    """APO-down (D'Oosterlinck et al. 2024, arXiv:2408.06266, Eq. 8): lower both likelihoods, the
    rejected one more, for chosen outputs worse than the model's own. TRL's `loss_type="apo_down"`.

      loss = sigmoid(R_c) + (1 - sigmoid(R_c - R_r))      in (0, 2)

    Args: the four log-prob arrays, each [B]. Returns (losses [B], metrics dict of [B]).
    """
    rc, rr, metrics = _rewards(
        "apo_down_loss", beta,
        policy_chosen_logps=policy_chosen_logps, policy_rejected_logps=policy_rejected_logps,
        ref_chosen_logps=ref_chosen_logps, ref_rejected_logps=ref_rejected_logps,
    )
    return jax.nn.sigmoid(beta * rc) + jax.nn.sigmoid(-beta * (rc - rr)), metrics
