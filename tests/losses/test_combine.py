"""Tests for combine_losses (weighted sum of registered losses, as TRL's MPO)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxalign.losses.combine import combine_losses
from jaxalign.losses.reference_free import cpo_loss, simpo_loss
from jaxalign.losses.sft import masked_nll


def toy_loss(*, policy_chosen_logps, policy_rejected_logps, beta=1.0):
    """beta * (rejected - chosen); deliberately takes no lengths, so passing them would raise."""
    diff = policy_rejected_logps - policy_chosen_logps
    return beta * diff, {"diff": diff}


def kwargs_loss(*, policy_chosen_logps, **rest):
    return jnp.full_like(policy_chosen_logps, float(len(rest))), {"n_extra": jnp.full_like(policy_chosen_logps, len(rest))}


REGISTRY = {"simpo": simpo_loss, "cpo": cpo_loss, "toy": toy_loss, "nll": masked_nll, "kw": kwargs_loss}
ARRAYS = dict(
    policy_chosen_logps=jnp.array([-3.0, -7.5, -2.0]),
    policy_rejected_logps=jnp.array([-4.0, -6.0, -9.0]),
    chosen_lengths=jnp.array([3, 5, 2]),
    rejected_lengths=jnp.array([4, 4, 6]),
)


def test_weighted_sum_and_prefixed_metrics():
    losses, metrics = combine_losses([("simpo", 0.7), ("toy", 0.3)], REGISTRY, **ARRAYS, beta=2.0, gamma=0.5)
    simpo, simpo_metrics = simpo_loss(**ARRAYS, beta=2.0, gamma=0.5)
    toy, toy_metrics = toy_loss(
        policy_chosen_logps=ARRAYS["policy_chosen_logps"], policy_rejected_logps=ARRAYS["policy_rejected_logps"], beta=2.0
    )
    np.testing.assert_allclose(losses, 0.7 * simpo + 0.3 * toy, rtol=1e-6)
    assert losses.shape == (3,) and losses.dtype == jnp.float32
    np.testing.assert_allclose(metrics["simpo/loss"], simpo)
    np.testing.assert_allclose(metrics["toy/loss"], toy)
    np.testing.assert_allclose(metrics["toy/diff"], toy_metrics["diff"])
    for key, value in simpo_metrics.items():
        np.testing.assert_allclose(metrics[f"simpo/{key}"], value)
    assert set(metrics) == {"simpo/loss", "toy/loss", "toy/diff"} | {f"simpo/{k}" for k in simpo_metrics}


def test_per_term_overrides_take_precedence():
    losses, _ = combine_losses([("simpo", 1.0, {"beta": 3.0}), ("toy", 1.0)], REGISTRY, **ARRAYS, beta=0.5)
    expected = simpo_loss(**ARRAYS, beta=3.0)[0] + toy_loss(
        policy_chosen_logps=ARRAYS["policy_chosen_logps"], policy_rejected_logps=ARRAYS["policy_rejected_logps"], beta=0.5
    )[0]
    np.testing.assert_allclose(losses, expected, rtol=1e-6)
    with pytest.raises(ValueError, match=r"'toy' does not accept the override\(s\) \['gamma'\]"):
        combine_losses([("toy", 1.0, {"gamma": 1.0})], REGISTRY, **ARRAYS)


def test_mixed_preference_and_sft_terms():
    """MPO-style: CPO's preference part plus the per-sequence NLL, with arrays of other shapes."""
    token_logps = jnp.array([[-1.0, -2.0], [-0.5, -0.5], [-3.0, -1.0]])
    mask = jnp.array([[1, 1], [1, 0], [0, 1]], bool)
    losses, metrics = combine_losses(
        [("cpo", 0.8), ("nll", 1.0)], REGISTRY, **ARRAYS, token_logps=token_logps, mask=mask, cpo_alpha=0.0, beta=0.1
    )
    nll, _ = masked_nll(token_logps=token_logps, mask=mask)
    cpo, _ = cpo_loss(**{k: ARRAYS[k] for k in ("policy_chosen_logps", "policy_rejected_logps")}, cpo_alpha=0.0, beta=0.1)
    np.testing.assert_allclose(losses, 0.8 * cpo + nll, rtol=1e-6)
    np.testing.assert_allclose(metrics["nll/num_tokens"], [2.0, 1.0, 1.0])


def test_var_keyword_loss_receives_everything():
    _, metrics = combine_losses([("kw", 1.0)], REGISTRY, **ARRAYS, beta=1.0)
    np.testing.assert_allclose(metrics["kw/n_extra"], 4.0)  # rejected, two lengths, beta


def test_errors():
    with pytest.raises(ValueError, match=r"unknown loss 'dpo'; registered: \['cpo', 'kw', 'nll', 'simpo', 'toy'\]"):
        combine_losses([("dpo", 1.0)], REGISTRY, **ARRAYS)
    with pytest.raises(ValueError, match=r"loss 'simpo' needs the argument\(s\) \['chosen_lengths', 'rejected_lengths'\]"):
        combine_losses(
            [("simpo", 1.0)],
            REGISTRY,
            policy_chosen_logps=ARRAYS["policy_chosen_logps"],
            policy_rejected_logps=ARRAYS["policy_rejected_logps"],
        )
    with pytest.raises(ValueError, match=r"\['betta'\] are accepted by none of the registered losses"):
        combine_losses([("simpo", 1.0), ("toy", 1.0)], REGISTRY, **ARRAYS, betta=0.1)
    # ... while arrays of an unselected registered loss ride along silently.
    losses, _ = combine_losses([("toy", 1.0)], REGISTRY, **ARRAYS, token_logps=jnp.zeros((3, 2)), gamma=1.0)
    assert losses.shape == (3,)
    with pytest.raises(ValueError, match="repeat"):
        combine_losses([("toy", 1.0), ("toy", 2.0)], REGISTRY, **ARRAYS)
    with pytest.raises(ValueError, match="non-empty"):
        combine_losses([], REGISTRY, **ARRAYS)
    with pytest.raises(ValueError, match=r"terms\[0\]"):
        combine_losses(["toy"], REGISTRY, **ARRAYS)
    with pytest.raises(ValueError, match=r"loss 'nll' returned shape \(2,\) but 'toy' returned \(3,\)"):
        combine_losses(
            [("toy", 1.0), ("nll", 1.0)], REGISTRY, **ARRAYS, token_logps=jnp.zeros((2, 2)), mask=jnp.ones((2, 2))
        )
    with pytest.raises(ValueError, match=r"'pos' has positional-only argument\(s\) \['x'\]"):
        combine_losses([("pos", 1.0)], {**REGISTRY, "pos": lambda x, /: (x, {})}, **ARRAYS)
    # Errors from inside a loss still name the argument.
    with pytest.raises(ValueError, match=r"`chosen_lengths` has shape \(2,\)"):
        combine_losses([("simpo", 1.0)], REGISTRY, **{**ARRAYS, "chosen_lengths": jnp.array([1, 2])})


def test_jit_and_grad():
    terms = [("simpo", 0.5), ("toy", 2.0)]

    @jax.jit
    def total(arrays, weight):
        losses, metrics = combine_losses([("simpo", weight), ("toy", 2.0)], REGISTRY, **arrays, beta=2.0)
        return losses.mean(), metrics

    value, metrics = total(ARRAYS, 0.5)
    eager, _ = combine_losses(terms, REGISTRY, **ARRAYS, beta=2.0)
    np.testing.assert_allclose(value, eager.mean(), rtol=1e-6)
    assert all(v.shape == (3,) for v in metrics.values())

    def mean_loss(chosen, fn_terms):
        return combine_losses(fn_terms, REGISTRY, **{**ARRAYS, "policy_chosen_logps": chosen}, beta=2.0)[0].mean()

    grad = jax.grad(mean_loss)(ARRAYS["policy_chosen_logps"], terms)
    grad_simpo = jax.grad(mean_loss)(ARRAYS["policy_chosen_logps"], [("simpo", 1.0)])
    grad_toy = jax.grad(mean_loss)(ARRAYS["policy_chosen_logps"], [("toy", 1.0)])
    np.testing.assert_allclose(grad, 0.5 * grad_simpo + 2.0 * grad_toy, rtol=1e-6)
