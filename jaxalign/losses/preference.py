"""Pairwise preference losses with a reference model: the DPO family built on the margin.

Every loss takes keyword arrays [B] of summed sequence log-probs (`policy_chosen_logps`,
`policy_rejected_logps`, `ref_chosen_logps`, `ref_rejected_logps`, see `sequence_logps`), plus
keyword-only hyperparameters with TRL's names, and returns `(losses [B], metrics)` with
`metrics: dict[str, Array[B]]` under TRL's names (`rewards/chosen` = beta * (pi_c - ref_c), ...).
Nothing is reduced. Inputs are cast to at least fp32.

Notation: r_c = pi_c - ref_c, r_r = pi_r - ref_r (log-ratios), s(.) the f-DPO score map
(`f_divergence_scores`, identity for the default reverse KL), Delta = s(r_c) - s(r_r), z = beta * Delta.

Losses that anchor each response's reward separately (NCA, BCO, SPPO, APO) are in
`preference_anchored.py`, the batch-sorting AOT losses in `preference_aot.py`; `LOSSES` below maps
TRL's `loss_type` strings to all of them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxalign.losses import preference_anchored as _anchored
from jaxalign.losses.preference_aot import aot_loss, aot_unpaired_loss
from jaxalign.losses.preference_base import (
    check_interval,
    check_positive,
    f_divergence_scores,
    logratio_inputs,
    prepare,
    reward_metrics,
    smoothed_sigmoid_loss,
)

__all__ = [
    "dpo_loss", "robust_dpo_loss", "ipo_loss", "sigmoid_norm_loss", "hinge_loss", "exo_loss",
    "discopop_loss", "dpop_loss", "aot_loss", "aot_unpaired_loss", "slic_loss", "nca_pair_loss",
    "bco_pair_loss", "sppo_hard_loss", "apo_zero_loss", "apo_down_loss", "f_divergence_scores",
]

_log_sigmoid = jax.nn.log_sigmoid


def _margin(name, *, beta, f_divergence_type, f_alpha_divergence_coef, **arrays):
    """Returns (arrays >= fp32, chosen scores [B], rejected scores [B], metrics)."""
    a, chosen, rejected, metrics = logratio_inputs(name, beta=beta, **arrays)
    kw = dict(f_divergence_type=f_divergence_type, f_alpha_divergence_coef=f_alpha_divergence_coef)
    return a, f_divergence_scores(chosen, **kw), f_divergence_scores(rejected, **kw), metrics


def dpo_loss(
    *,
    policy_chosen_logps,
    policy_rejected_logps,
    ref_chosen_logps,
    ref_rejected_logps,
    beta=0.1,
    label_smoothing=0.0,
    f_divergence_type: str = "reverse_kl",
    f_alpha_divergence_coef: float = 0.5,
):
    """Sigmoid DPO (Rafailov et al. 2023, arXiv:2305.18290, Eq. 7), with cDPO label smoothing.

      loss = -(1 - eps) * log sigmoid(z) - eps * log sigmoid(-z),   z = beta * (s(r_c) - s(r_r))

    eps = `label_smoothing` is conservative DPO (cDPO; Mitchell 2023, "A note on DPO with noisy
    preferences & relationship to IPO"): the label is flipped with probability eps. With eps = 0
    and the reverse-KL default this is TRL's `loss_type="sigmoid"`; `f_divergence_type` selects
    f-DPO (Wang et al. 2023, see `f_divergence_scores`). Note TRL 1.x ignores `label_smoothing` for
    `"sigmoid"`; here it is applied.

    Args: the four log-prob arrays, each [B]. Returns (losses [B], metrics dict of [B]).
    """
    name = "dpo_loss"
    check_interval(name, "label_smoothing", label_smoothing, 0.0, 1.0, closed_lo=True)
    _, sc, sr, metrics = _margin(
        name, beta=beta, f_divergence_type=f_divergence_type,
        f_alpha_divergence_coef=f_alpha_divergence_coef,
        policy_chosen_logps=policy_chosen_logps, policy_rejected_logps=policy_rejected_logps,
        ref_chosen_logps=ref_chosen_logps, ref_rejected_logps=ref_rejected_logps,
    )
    return smoothed_sigmoid_loss(beta * (sc - sr), label_smoothing), metrics


def robust_dpo_loss(
    *,
    policy_chosen_logps,
    policy_rejected_logps,
    ref_chosen_logps,
    ref_rejected_logps,
    beta=0.1,
    label_smoothing=0.0,
    f_divergence_type: str = "reverse_kl",
    f_alpha_divergence_coef: float = 0.5,
):
    """Robust DPO (Chowdhury et al. 2024, "Provably Robust DPO", arXiv:2403.00409).

      loss = ((1 - eps) * (-log sigmoid(z)) - eps * (-log sigmoid(-z))) / (1 - 2 eps)

    an unbiased estimate of the clean DPO loss when labels flip with probability
    eps = `label_smoothing` in [0, 0.5). TRL's `loss_type="robust"`.

    Args: the four log-prob arrays, each [B]. Returns (losses [B], metrics dict of [B]).
    """
    name = "robust_dpo_loss"
    check_interval(name, "label_smoothing", label_smoothing, 0.0, 0.5, closed_lo=True)
    _, sc, sr, metrics = _margin(
        name, beta=beta, f_divergence_type=f_divergence_type,
        f_alpha_divergence_coef=f_alpha_divergence_coef,
        policy_chosen_logps=policy_chosen_logps, policy_rejected_logps=policy_rejected_logps,
        ref_chosen_logps=ref_chosen_logps, ref_rejected_logps=ref_rejected_logps,
    )
    z = beta * (sc - sr)
    eps = label_smoothing
    losses = (-(1.0 - eps) * _log_sigmoid(z) + eps * _log_sigmoid(-z)) / (1.0 - 2.0 * eps)
    return losses, metrics


def ipo_loss(
    *,
    policy_chosen_logps,
    policy_rejected_logps,
    ref_chosen_logps,
    ref_rejected_logps,
    beta=0.1,
    chosen_lengths=None,
    rejected_lengths=None,
    f_divergence_type: str = "reverse_kl",
    f_alpha_divergence_coef: float = 0.5,
):
    """IPO (Azar et al. 2023, arXiv:2310.12036, Eq. 17; beta is the paper's tau).

      loss = (s(r_c) / L_c - s(r_r) / L_r - 1 / (2 beta))^2

    TRL's `loss_type="ipo"` length-normalises: it divides the summed-log-prob scores by the
    completion lengths. Two equivalent ways to match it:
      * pass average log-probs (`sequence_logps(..., average=True)`) and no lengths (L = 1), or
      * pass summed log-probs and `chosen_lengths`/`rejected_lengths` [B] (clamped to >= 1).
    With a non-reverse-KL `f_divergence_type` only the second form equals TRL (TRL applies s(.) to
    the summed log-ratio before dividing). IPO squares the score, so with forward-KL/alpha scores
    beyond ~1.8e19 (|log-ratio| > ~44) the loss overflows fp32 to inf, as TRL's does.

    Args: the four log-prob arrays, each [B]; optional lengths [B]. Returns (losses [B], metrics).
    """
    name = "ipo_loss"
    check_positive(name, "beta", beta)
    if (chosen_lengths is None) != (rejected_lengths is None):
        raise ValueError(f"{name}: pass both `chosen_lengths` and `rejected_lengths` or neither")
    a, sc, sr, metrics = _margin(
        name, beta=beta, f_divergence_type=f_divergence_type,
        f_alpha_divergence_coef=f_alpha_divergence_coef,
        policy_chosen_logps=policy_chosen_logps, policy_rejected_logps=policy_rejected_logps,
        ref_chosen_logps=ref_chosen_logps, ref_rejected_logps=ref_rejected_logps,
        chosen_lengths=chosen_lengths, rejected_lengths=rejected_lengths,
    )
    if chosen_lengths is not None:
        sc = sc / jnp.maximum(a["chosen_lengths"], 1.0)
        sr = sr / jnp.maximum(a["rejected_lengths"], 1.0)
    return (sc - sr - 1.0 / (2.0 * beta)) ** 2, metrics


def sigmoid_norm_loss(
    *,
    policy_chosen_logps,
    policy_rejected_logps,
    ref_chosen_logps,
    ref_rejected_logps,
    chosen_lengths,
    rejected_lengths,
    beta=0.1,
    f_divergence_type: str = "reverse_kl",
    f_alpha_divergence_coef: float = 0.5,
):
    """Length-normalised sigmoid DPO, TRL's `loss_type="sigmoid_norm"` (as in Tulu 3, Lambert et al.
    2024, arXiv:2411.15124, "length-normalized DPO").

      loss = -log sigmoid(beta * (s(r_c) / L_c - s(r_r) / L_r)),   L = max(lengths, 1)

    Args: the four summed log-prob arrays and `chosen_lengths`/`rejected_lengths` (completion
    token counts), each [B]. Returns (losses [B], metrics dict of [B]).
    """
    a, sc, sr, metrics = _margin(
        "sigmoid_norm_loss", beta=beta, f_divergence_type=f_divergence_type,
        f_alpha_divergence_coef=f_alpha_divergence_coef,
        policy_chosen_logps=policy_chosen_logps, policy_rejected_logps=policy_rejected_logps,
        ref_chosen_logps=ref_chosen_logps, ref_rejected_logps=ref_rejected_logps,
        chosen_lengths=chosen_lengths, rejected_lengths=rejected_lengths,
    )
    delta = sc / jnp.maximum(a["chosen_lengths"], 1.0) - sr / jnp.maximum(a["rejected_lengths"], 1.0)
    return -_log_sigmoid(beta * delta), metrics


def hinge_loss(
    *,
    policy_chosen_logps,
    policy_rejected_logps,
    ref_chosen_logps,
    ref_rejected_logps,
    beta=0.1,
    f_divergence_type: str = "reverse_kl",
    f_alpha_divergence_coef: float = 0.5,
):
    """Hinge loss of RSO (Liu et al. 2023, "Statistical Rejection Sampling Improves Preference
    Optimization", arXiv:2309.06657). TRL's `loss_type="hinge"`.

      loss = relu(1 - z),   z = beta * (s(r_c) - s(r_r))

    Args: the four log-prob arrays, each [B]. Returns (losses [B], metrics dict of [B]).
    """
    _, sc, sr, metrics = _margin(
        "hinge_loss", beta=beta, f_divergence_type=f_divergence_type,
        f_alpha_divergence_coef=f_alpha_divergence_coef,
        policy_chosen_logps=policy_chosen_logps, policy_rejected_logps=policy_rejected_logps,
        ref_chosen_logps=ref_chosen_logps, ref_rejected_logps=ref_rejected_logps,
    )
    return jax.nn.relu(1.0 - beta * (sc - sr)), metrics


def exo_loss(
    *,
    policy_chosen_logps,
    policy_rejected_logps,
    ref_chosen_logps,
    ref_rejected_logps,
    beta=0.1,
    label_smoothing=1e-3,
    f_divergence_type: str = "reverse_kl",
    f_alpha_divergence_coef: float = 0.5,
):
    """EXO-pair (Ji et al. 2024, "Towards Efficient Exact Optimization of Language Model
    Alignment", arXiv:2402.00856, Eq. 16 with K = 2). TRL's `loss_type="exo_pair"`.

      loss = KL(q || p) = q_w (log q_w - log(1 - eps)) + q_l (log q_l - log eps),
      q_w = sigmoid(z), q_l = sigmoid(-z), z = beta * (s(r_c) - s(r_r)), eps = `label_smoothing`

    Zero exactly when sigmoid(z) = 1 - eps, i.e. z = log((1 - eps) / eps).

    Args: the four log-prob arrays, each [B]. Returns (losses [B], metrics dict of [B]).
    """
    name = "exo_loss"
    check_interval(name, "label_smoothing", label_smoothing, 0.0, 1.0, closed_lo=False)
    _, sc, sr, metrics = _margin(
        name, beta=beta, f_divergence_type=f_divergence_type,
        f_alpha_divergence_coef=f_alpha_divergence_coef,
        policy_chosen_logps=policy_chosen_logps, policy_rejected_logps=policy_rejected_logps,
        ref_chosen_logps=ref_chosen_logps, ref_rejected_logps=ref_rejected_logps,
    )
    z = beta * (sc - sr)
    log_qw, log_ql = _log_sigmoid(z), _log_sigmoid(-z)
    eps = jnp.asarray(label_smoothing, z.dtype)
    losses = jnp.exp(log_qw) * (log_qw - jnp.log1p(-eps)) + jnp.exp(log_ql) * (log_ql - jnp.log(eps))
    return losses, metrics


def discopop_loss(
    *,
    policy_chosen_logps,
    policy_rejected_logps,
    ref_chosen_logps,
    ref_rejected_logps,
    beta=0.1,
    tau=0.05,
    f_divergence_type: str = "reverse_kl",
    f_alpha_divergence_coef: float = 0.5,
):
    """DiscoPOP / log-ratio modulated loss (Chris Lu et al. 2024, "Discovering Preference
    Optimization Algorithms with and for Large Language Models", arXiv:2406.08414, Eq. 5).

      m = sigmoid(z / tau),   loss = (1 - m) * (-log sigmoid(z)) + m * exp(-z)

    with z = beta * (s(r_c) - s(r_r)); TRL's `loss_type="discopop"` (`discopop_tau`).
    Computed stably as softplus(-z) * sigmoid(-z / tau) + exp(-z + log_sigmoid(z / tau)).
    Deliberate difference from TRL: TRL forms exp(-z) * m literally, which is inf * 0 = NaN once
    exp(-z) overflows (z < ~-88 in fp32); here the loss stays finite (~ -z for z -> -inf, tau < 1).

    Args: the four log-prob arrays, each [B]. Returns (losses [B], metrics dict of [B]).
    """
    name = "discopop_loss"
    check_positive(name, "tau", tau)
    _, sc, sr, metrics = _margin(
        name, beta=beta, f_divergence_type=f_divergence_type,
        f_alpha_divergence_coef=f_alpha_divergence_coef,
        policy_chosen_logps=policy_chosen_logps, policy_rejected_logps=policy_rejected_logps,
        ref_chosen_logps=ref_chosen_logps, ref_rejected_logps=ref_rejected_logps,
    )
    z = beta * (sc - sr)
    logistic = jax.nn.softplus(-z) * jax.nn.sigmoid(-z / tau)
    exponential = jnp.exp(-z + _log_sigmoid(z / tau))
    return logistic + exponential, metrics


def dpop_loss(
    *,
    policy_chosen_logps,
    policy_rejected_logps,
    ref_chosen_logps,
    ref_rejected_logps,
    beta=0.1,
    lambda_=50.0,
):
    """DPO-Positive (Pal et al. 2024, "Smaug: Fixing Failure Modes of Preference Optimisation with
    DPO-Positive", arXiv:2402.13228), the penalty inside the sigmoid as in the paper:

      loss = -log sigmoid(beta * (r_c - r_r - lambda_ * max(0, ref_c - pi_c)))

    Equals DPO whenever the policy has not lost likelihood on the chosen response (pi_c >= ref_c).
    Not in TRL 1.x.

    Args: the four log-prob arrays, each [B]. Returns (losses [B], metrics dict of [B]).
    """
    _, rc, rr, metrics = logratio_inputs(
        "dpop_loss", beta=beta,
        policy_chosen_logps=policy_chosen_logps, policy_rejected_logps=policy_rejected_logps,
        ref_chosen_logps=ref_chosen_logps, ref_rejected_logps=ref_rejected_logps,
    )
    penalty = jax.nn.relu(-rc)
    return -_log_sigmoid(beta * (rc - rr - lambda_ * penalty)), metrics


def slic_loss(
    *,
    policy_chosen_logps,
    policy_rejected_logps,
    target_logps=None,
    ref_chosen_logps=None,
    ref_rejected_logps=None,
    delta=1.0,
    lambda_=0.1,
):
    """SLiC-HF (Zhao et al. 2023, "SLiC-HF: Sequence Likelihood Calibration with Human Feedback",
    arXiv:2305.10425): rank calibration plus a cross-entropy regulariser.

      loss = max(0, delta - (pi_c - pi_r)) - lambda_ * target_logps

    `target_logps` [B] is the policy log-prob of the regularisation target sequence (SFT target or
    the chosen response); None uses `policy_chosen_logps`. SLiC has no reference model:
    `ref_chosen_logps`/`ref_rejected_logps` are optional, only shape-checked, and never used, so that
    callers can pass the same arrays to every loss. The metrics' "rewards" are the policy log-probs
    themselves (rewards/chosen = pi_c), the quantity the calibration term ranks. The default
    lambda_ = 0.1 is this library's choice, not a value from the paper.

    Args: `policy_chosen_logps`, `policy_rejected_logps`, optional `target_logps`, each [B].
    Returns (losses [B], metrics dict of [B]).
    """
    a = prepare(
        "slic_loss",
        policy_chosen_logps=policy_chosen_logps, policy_rejected_logps=policy_rejected_logps,
        target_logps=target_logps, ref_chosen_logps=ref_chosen_logps,
        ref_rejected_logps=ref_rejected_logps,
    )
    pc, pr = a["policy_chosen_logps"], a["policy_rejected_logps"]
    target = pc if target_logps is None else a["target_logps"]
    losses = jax.nn.relu(delta - (pc - pr)) - lambda_ * target
    metrics = reward_metrics(
        policy_chosen_logps=pc, policy_rejected_logps=pr, chosen_rewards=pc, rejected_rewards=pr
    )
    return losses, metrics


nca_pair_loss = _anchored.nca_pair_loss
bco_pair_loss = _anchored.bco_pair_loss
sppo_hard_loss = _anchored.sppo_hard_loss
apo_zero_loss = _anchored.apo_zero_loss
apo_down_loss = _anchored.apo_down_loss

# TRL `DPOConfig.loss_type` strings (plus "dpo", "slic", "dpop") -> loss function.
LOSSES = {
    "dpo": dpo_loss,
    "sigmoid": dpo_loss,
    "robust": robust_dpo_loss,
    "ipo": ipo_loss,
    "hinge": hinge_loss,
    "sigmoid_norm": sigmoid_norm_loss,
    "exo_pair": exo_loss,
    "discopop": discopop_loss,
    "dpop": dpop_loss,
    "aot": aot_loss,
    "aot_unpaired": aot_unpaired_loss,
    "slic": slic_loss,
    "nca_pair": nca_pair_loss,
    "bco_pair": bco_pair_loss,
    "sppo_hard": sppo_hard_loss,
    "apo_zero": apo_zero_loss,
    "apo_down": apo_down_loss,
}
