"""Shared plumbing of the reference-model pairwise preference losses.

Input validation and casting, the f-divergence score map of f-DPO, and the TRL-named reward
metrics. The losses themselves live in `preference.py` (losses of the chosen-minus-rejected
margin) and `preference_anchored.py` (losses that also anchor each response's reward on its own).
"""

from __future__ import annotations

import math
import numbers

import jax
import jax.numpy as jnp

from jaxalign.losses._checks import check_batch

F_DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")

# exp(80) ~ 5.5e34 stays finite in fp32 with room for a difference and a factor beta; TRL clamps
# its alpha-divergence exponent at the same value for fp32/bf16.
_EXP_CLAMP = 80.0


def as_float(x) -> jax.Array:
    """Casts to a floating dtype of at least fp32 (bf16/fp16/int -> fp32; fp64 stays fp64)."""
    x = jnp.asarray(x)
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def prepare(name: str, /, **arrays) -> dict[str, jax.Array | None]:
    """Checks that all given [B] arrays share one batch size and casts them to >= fp32.

    Arguments passed as None are kept as None. Raises ValueError naming the argument and its shape.
    """
    check_batch(name, **arrays)
    return {k: None if v is None else as_float(v) for k, v in arrays.items()}


def is_static_number(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def check_positive(name: str, arg: str, value) -> None:
    """Raises ValueError if a static hyperparameter is not > 0 (traced values are not checked)."""
    if is_static_number(value) and not value > 0:
        raise ValueError(f"{name}: `{arg}` must be > 0, got {value}")


def check_interval(name: str, arg: str, value, lo: float, hi: float, *, closed_lo: bool) -> None:
    """Raises ValueError if a static hyperparameter is outside [lo, hi) (or (lo, hi))."""
    if not is_static_number(value):
        return
    ok_lo = value >= lo if closed_lo else value > lo
    if not (ok_lo and value < hi):
        left = "[" if closed_lo else "("
        raise ValueError(f"{name}: `{arg}` must lie in {left}{lo}, {hi}), got {value}")


def check_scalar_or_batch(name: str, arg: str, value, batch: int) -> None:
    """Raises ValueError unless `value` is a scalar or has shape [batch]."""
    shape = tuple(jnp.shape(value))
    if shape not in ((), (batch,)):
        raise ValueError(f"{name}: `{arg}` must be a scalar or have shape ({batch},), got shape {shape}")


def f_divergence_scores(
    logratios: jax.Array,
    *,
    f_divergence_type: str = "reverse_kl",
    f_alpha_divergence_coef: float = 0.5,
) -> jax.Array:
    """Maps log-ratios log(pi/ref) [B] to f-DPO scores f'(pi/ref) [B] (Wang et al. 2023).

    "Beyond Reverse KL: Generalizing Direct Preference Optimization with Diverse Divergence
    Constraints" (arXiv:2309.16240), Thm. 1: with u = pi/ref and r = log u,
      reverse_kl:        f'(u) = log u                      -> r  (standard DPO)
      forward_kl:        f'(u) = 1 - 1/u                    -> 1 - exp(-r)
      js_divergence:     f'(u) = log(2u / (1 + u))          -> log 2 + log_sigmoid(r)
      alpha_divergence:  f'(u) = (u^(a-1) - 1) / (a - 1)    -> (exp((a-1) r) - 1) / (a - 1)
    with a = `f_alpha_divergence_coef`; a within 1e-6 of 1 is the reverse-KL limit. Matches TRL's
    `DPOConfig.f_divergence_type` / `f_alpha_divergence_coef` (TRL clamps the alpha exponent at 80).
    Deliberate difference from TRL: the forward-KL exponent -r is clamped at 80 as well, so
    |r| ~ 1e4 gives a huge but finite score instead of inf (and NaN after inf - inf); the gradient is
    zero beyond the clamp, as for TRL's alpha-divergence.

    `f_divergence_type` and `f_alpha_divergence_coef` must be static Python values.
    """
    if f_divergence_type == "reverse_kl":
        return logratios
    if f_divergence_type == "forward_kl":
        return 1.0 - jnp.exp(jnp.minimum(-logratios, _EXP_CLAMP))
    if f_divergence_type == "js_divergence":
        return math.log(2.0) + jax.nn.log_sigmoid(logratios)
    if f_divergence_type == "alpha_divergence":
        if not is_static_number(f_alpha_divergence_coef):
            raise ValueError(
                "f_divergence_scores: `f_alpha_divergence_coef` must be a static Python number, got "
                f"{type(f_alpha_divergence_coef).__name__}"
            )
        a = float(f_alpha_divergence_coef)
        if abs(a - 1.0) < 1e-6:
            return logratios
        t = jnp.minimum((a - 1.0) * logratios, _EXP_CLAMP)
        return jnp.expm1(t) / (a - 1.0)
    raise ValueError(
        f"f_divergence_scores: `f_divergence_type` must be one of {F_DIVERGENCES}, got "
        f"{f_divergence_type!r}"
    )


def smoothed_sigmoid_loss(z: jax.Array, label_smoothing) -> jax.Array:
    """-(1 - eps) log sigmoid(z) - eps log sigmoid(-z) elementwise, eps = `label_smoothing`."""
    return -(1.0 - label_smoothing) * jax.nn.log_sigmoid(z) - label_smoothing * jax.nn.log_sigmoid(-z)


def reward_metrics(
    *,
    policy_chosen_logps: jax.Array,
    policy_rejected_logps: jax.Array,
    chosen_rewards: jax.Array,
    rejected_rewards: jax.Array,
) -> dict[str, jax.Array]:
    """TRL-named per-example metrics [B] (gradients stopped, as TRL detaches them).

    `chosen_rewards`/`rejected_rewards` are the implicit rewards, beta * (pi - ref) for the
    reference-model losses.
    """
    c = jax.lax.stop_gradient(chosen_rewards)
    r = jax.lax.stop_gradient(rejected_rewards)
    return {
        "rewards/chosen": c,
        "rewards/rejected": r,
        "rewards/margins": c - r,
        "rewards/accuracies": (c > r).astype(c.dtype),
        "logps/chosen": jax.lax.stop_gradient(policy_chosen_logps),
        "logps/rejected": jax.lax.stop_gradient(policy_rejected_logps),
    }


def logratio_inputs(name: str, /, *, beta, **arrays):
    """Validates the four [B] log-prob arrays (plus extras) and returns them with the log-ratios.

    Returns (arrays as >= fp32 dict, chosen_logratios [B], rejected_logratios [B], metrics).
    """
    a = prepare(name, **arrays)
    chosen = a["policy_chosen_logps"] - a["ref_chosen_logps"]
    rejected = a["policy_rejected_logps"] - a["ref_rejected_logps"]
    metrics = reward_metrics(
        policy_chosen_logps=a["policy_chosen_logps"],
        policy_rejected_logps=a["policy_rejected_logps"],
        chosen_rewards=beta * chosen,
        rejected_rewards=beta * rejected,
    )
    return a, chosen, rejected, metrics
