"""AOT: distributional preference alignment by sorting over the batch (Melnyk et al. 2024).

"Distributional Preference Alignment of LLMs via Optimal Transport", arXiv:2406.05882. The
one-dimensional optimal transport between the empirical distributions of two batch quantities is
the matching of their sorted values, so these losses sort over the batch axis [B]: loss_i belongs
to the i-th quantile, not to pair i, and only the batch mean is meaningful (the metrics stay per
pair). Same contract as `preference.py`.
"""

from __future__ import annotations

import jax.numpy as jnp

from jaxalign.losses.preference_base import logratio_inputs, smoothed_sigmoid_loss


def aot_loss(
    *,
    policy_chosen_logps,
    policy_rejected_logps,
    ref_chosen_logps,
    ref_rejected_logps,
    beta=0.1,
    label_smoothing=0.0,
):
    """AOT, paired (Melnyk et al. 2024, "Distributional Preference Alignment of LLMs via Optimal
    Transport", arXiv:2406.05882). TRL's `loss_type="aot"`.

      h = sort_B(pi_c - pi_r),  h_ref = sort_B(ref_c - ref_r),  d = beta * (h - h_ref)
      loss_i = -(1 - eps) log sigmoid(d_i) - eps log sigmoid(-d_i)

    The sort runs over the batch axis, so loss_i belongs to the i-th quantile, not to pair i: only
    the batch mean is meaningful (the metrics stay per pair). Under `jax.vmap` each mapped slice
    is sorted on its own.

    Args: the four log-prob arrays, each [B]. Returns (losses [B], metrics dict of [B]).
    """
    a, _, _, metrics = logratio_inputs(
        "aot_loss", beta=beta,
        policy_chosen_logps=policy_chosen_logps, policy_rejected_logps=policy_rejected_logps,
        ref_chosen_logps=ref_chosen_logps, ref_rejected_logps=ref_rejected_logps,
    )
    h = jnp.sort(a["policy_chosen_logps"] - a["policy_rejected_logps"])
    h_ref = jnp.sort(a["ref_chosen_logps"] - a["ref_rejected_logps"])
    return smoothed_sigmoid_loss(beta * (h - h_ref), label_smoothing), metrics


def aot_unpaired_loss(
    *,
    policy_chosen_logps,
    policy_rejected_logps,
    ref_chosen_logps,
    ref_rejected_logps,
    beta=0.1,
    label_smoothing=0.0,
):
    """AOT, unpaired (Melnyk et al. 2024, arXiv:2406.05882). TRL's `loss_type="aot_unpaired"`.

      d = beta * (sort_B(r_c) - sort_B(r_r)),  loss_i = -(1 - eps) log sigmoid(d_i) - eps log sigmoid(-d_i)

    Chosen and rejected log-ratios are sorted separately over the batch axis: loss_i belongs to
    the i-th quantile, not to pair i (see `aot_loss`).

    Args: the four log-prob arrays, each [B]. Returns (losses [B], metrics dict of [B]).
    """
    _, rc, rr, metrics = logratio_inputs(
        "aot_unpaired_loss", beta=beta,
        policy_chosen_logps=policy_chosen_logps, policy_rejected_logps=policy_rejected_logps,
        ref_chosen_logps=ref_chosen_logps, ref_rejected_logps=ref_rejected_logps,
    )
    return smoothed_sigmoid_loss(beta * (jnp.sort(rc) - jnp.sort(rr)), label_smoothing), metrics
