"""Tests for SimPO, CPO and ORPO: closed forms, TRL oracle, stability, grads, properties, shapes."""

import math
import os
import types

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

import jax
import jax.numpy as jnp
import mpmath
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.test_util import check_grads
from trl.experimental.cpo import CPOTrainer
from trl.experimental.orpo import ORPOTrainer
from trl.experimental.orpo.orpo_trainer import log1mexp as trl_log1mexp

from jaxalign.losses.reference_free import LOSSES, cpo_loss, log1mexp, orpo_loss, simpo_loss

B = 6


def softplus(x):
    return math.log1p(math.exp(-abs(x))) + max(x, 0.0)


def _random(seed, scale=10.0):
    rng = np.random.default_rng(seed)
    chosen = -rng.uniform(0.1, scale, B).astype(np.float32)
    rejected = -rng.uniform(0.1, scale, B).astype(np.float32)
    lengths_c = rng.integers(1, 20, B).astype(np.float32)
    lengths_r = rng.integers(1, 20, B).astype(np.float32)
    return chosen, rejected, lengths_c, lengths_r


# Extreme summed log-probs: |log-ratio| up to 1e4, including exact ties and zeros.
EXTREME_C = np.array([-1e4, -1e-3, 0.0, -5e3, -1.0, -1e4], np.float32)
EXTREME_R = np.array([-1e-3, -1e4, 0.0, -5e3, -1e4, -1e4], np.float32)


# ---------------------------------------------------------------------------- TRL oracle


def trl_cpo(chosen, rejected, *, beta, label_smoothing=0.0, loss_type="sigmoid", simpo_gamma=0.5):
    fake = types.SimpleNamespace(
        alpha=0.0,
        beta=beta,
        label_smoothing=label_smoothing,
        loss_type=loss_type,
        simpo_gamma=simpo_gamma,
        accelerator=types.SimpleNamespace(device=torch.device("cpu")),
    )
    losses, rc, rr = CPOTrainer.cpo_loss(fake, torch.tensor(chosen), torch.tensor(rejected))
    return losses.numpy(), rc.numpy(), rr.numpy()


def trl_orpo(avg_chosen, avg_rejected, *, beta):
    fake = types.SimpleNamespace(beta=beta, accelerator=types.SimpleNamespace(device=torch.device("cpu")))
    return [
        t.detach().numpy()
        for t in ORPOTrainer.odds_ratio_loss(fake, torch.tensor(avg_chosen), torch.tensor(avg_rejected))
    ]


# ---------------------------------------------------------------------------- SimPO


def test_simpo_closed_form():
    # averages -2 and -3; beta (−2 − −3) − gamma = 2 − 1 = 1
    kw = dict(
        policy_chosen_logps=jnp.array([-4.0]),
        policy_rejected_logps=jnp.array([-9.0]),
        chosen_lengths=jnp.array([2]),
        rejected_lengths=jnp.array([3]),
        beta=2.0,
        gamma=1.0,
    )
    losses, metrics = simpo_loss(**kw)
    np.testing.assert_allclose(losses, [softplus(-1.0)], rtol=1e-6)
    losses, _ = simpo_loss(**kw, label_smoothing=0.1)
    np.testing.assert_allclose(losses, [0.9 * softplus(-1.0) + 0.1 * softplus(1.0)], rtol=1e-6)
    np.testing.assert_allclose(metrics["rewards/chosen"], [-4.0])
    np.testing.assert_allclose(metrics["rewards/rejected"], [-6.0])
    np.testing.assert_allclose(metrics["rewards/margins"], [2.0])
    np.testing.assert_allclose(metrics["rewards/accuracies"], [1.0])
    np.testing.assert_allclose(metrics["logps/chosen"], [-2.0])
    assert losses.dtype == jnp.float32


@pytest.mark.parametrize("label_smoothing", [0.0, 0.2])
@pytest.mark.parametrize("extreme", [False, True])
def test_simpo_matches_trl(label_smoothing, extreme):
    chosen, rejected, lc, lr = _random(1)
    if extreme:
        chosen, rejected = EXTREME_C, EXTREME_R
        lc, lr = np.ones(B, np.float32), np.ones(B, np.float32)
    beta, gamma = 2.5, 1.4
    losses, metrics = simpo_loss(
        policy_chosen_logps=chosen,
        policy_rejected_logps=rejected,
        chosen_lengths=lc,
        rejected_lengths=lr,
        beta=beta,
        gamma=gamma,
        label_smoothing=label_smoothing,
    )
    # TRL feeds average log-probs to cpo_loss for "simpo", and `simpo_gamma` is our gamma.
    expected, rc, rr = trl_cpo(
        chosen / lc, rejected / lr, beta=beta, label_smoothing=label_smoothing, loss_type="simpo", simpo_gamma=gamma
    )
    np.testing.assert_allclose(losses, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(metrics["rewards/chosen"], rc, rtol=1e-6)
    np.testing.assert_allclose(metrics["rewards/rejected"], rr, rtol=1e-6)
    assert np.all(np.isfinite(losses))


def test_simpo_zero_length_is_finite():
    losses, metrics = simpo_loss(
        policy_chosen_logps=jnp.zeros(2),
        policy_rejected_logps=jnp.array([-3.0, 0.0]),
        chosen_lengths=jnp.zeros(2),
        rejected_lengths=jnp.array([3, 0]),
        beta=2.0,
        gamma=1.0,
    )
    np.testing.assert_allclose(losses, [softplus(-(2.0 - 1.0)), softplus(1.0)], rtol=1e-6)
    assert all(np.all(np.isfinite(v)) for v in metrics.values())


# ---------------------------------------------------------------------------- CPO


def test_cpo_closed_form():
    c, r, nll = jnp.array([-1.0]), jnp.array([-3.0]), jnp.array([0.7])
    losses, metrics = cpo_loss(policy_chosen_logps=c, policy_rejected_logps=r, chosen_nll=nll, beta=0.5)
    np.testing.assert_allclose(losses, [softplus(-1.0) + 0.7], rtol=1e-6)
    np.testing.assert_allclose(metrics["nll_loss"], [0.7])
    np.testing.assert_allclose(metrics["rewards/chosen"], [-0.5])
    losses, _ = cpo_loss(policy_chosen_logps=c, policy_rejected_logps=r, chosen_nll=nll, beta=0.5, cpo_alpha=2.0)
    np.testing.assert_allclose(losses, [softplus(-1.0) + 1.4], rtol=1e-6)
    losses, _ = cpo_loss(policy_chosen_logps=c, policy_rejected_logps=r, beta=0.25, cpo_alpha=0.0, loss_type="hinge")
    np.testing.assert_allclose(losses, [0.5], rtol=1e-6)
    losses, _ = cpo_loss(policy_chosen_logps=c, policy_rejected_logps=r, beta=0.25, cpo_alpha=0.0, loss_type="ipo")
    np.testing.assert_allclose(losses, [(2.0 - 2.0) ** 2], atol=1e-7)
    losses, _ = cpo_loss(policy_chosen_logps=c, policy_rejected_logps=r, beta=1.0, cpo_alpha=0.0, loss_type="ipo")
    np.testing.assert_allclose(losses, [(2.0 - 0.5) ** 2], rtol=1e-6)


@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge", "ipo"])
@pytest.mark.parametrize("extreme", [False, True])
def test_cpo_matches_trl(loss_type, extreme):
    chosen, rejected, _, _ = _random(2)
    if extreme:
        chosen, rejected = EXTREME_C, EXTREME_R
    nll = np.float32(1.7)  # TRL: one token-averaged NLL per batch, added as cpo_alpha * nll
    beta, cpo_alpha, ls = 0.3, 0.8, (0.1 if loss_type == "sigmoid" else 0.0)
    losses, metrics = cpo_loss(
        policy_chosen_logps=chosen,
        policy_rejected_logps=rejected,
        chosen_nll=jnp.full((B,), nll),
        beta=beta,
        label_smoothing=ls,
        cpo_alpha=cpo_alpha,
        loss_type=loss_type,
    )
    pref, rc, rr = trl_cpo(chosen, rejected, beta=beta, label_smoothing=ls, loss_type=loss_type)
    np.testing.assert_allclose(losses - cpo_alpha * nll, pref, rtol=1e-5, atol=1e-5)
    trl_total = pref.astype(np.float64).mean() + cpo_alpha * nll
    np.testing.assert_allclose(np.mean(np.asarray(losses, np.float64)), trl_total, rtol=1e-5)
    np.testing.assert_allclose(metrics["rewards/chosen"], rc, rtol=1e-6)
    np.testing.assert_allclose(metrics["rewards/rejected"], rr, rtol=1e-6)


def test_cpo_requires_nll_unless_alpha_zero():
    c, r = jnp.array([-1.0]), jnp.array([-2.0])
    with pytest.raises(ValueError, match="chosen_nll"):
        cpo_loss(policy_chosen_logps=c, policy_rejected_logps=r)
    losses, metrics = cpo_loss(policy_chosen_logps=c, policy_rejected_logps=r, cpo_alpha=0.0, beta=1.0)
    np.testing.assert_allclose(losses, [softplus(-1.0)], rtol=1e-6)
    np.testing.assert_allclose(metrics["nll_loss"], [0.0])
    with pytest.raises(ValueError, match="loss_type"):
        cpo_loss(policy_chosen_logps=c, policy_rejected_logps=r, cpo_alpha=0.0, loss_type="bogus")


# ---------------------------------------------------------------------------- ORPO


def test_orpo_closed_form():
    # P(y_w) = 1/2 -> odds 1; P(y_l) = 1/4 -> odds 1/3; log odds ratio = log 3.
    losses, metrics = orpo_loss(
        policy_chosen_logps=jnp.array([math.log(0.5)]),
        policy_rejected_logps=jnp.array([math.log(0.25)]),
        chosen_nll=jnp.array([0.3]),
        lambda_=0.2,
    )
    np.testing.assert_allclose(metrics["log_odds_chosen"], [math.log(3.0)], rtol=1e-6)
    np.testing.assert_allclose(metrics["log_odds_ratio"], [math.log(0.75)], rtol=1e-6)
    np.testing.assert_allclose(losses, [0.3 - 0.2 * math.log(0.75)], rtol=1e-6)
    # Same with summed log-probs and lengths.
    losses2, _ = orpo_loss(
        policy_chosen_logps=jnp.array([3 * math.log(0.5)]),
        policy_rejected_logps=jnp.array([5 * math.log(0.25)]),
        chosen_lengths=jnp.array([3]),
        rejected_lengths=jnp.array([5]),
        chosen_nll=jnp.array([0.3]),
        lambda_=0.2,
    )
    np.testing.assert_allclose(losses2, losses, rtol=1e-6)


def test_log1mexp_matches_reference():
    x = np.array([-1e4, -50.0, -5.0, -0.7, -0.6931, -0.69, -0.1, -1e-3, -1e-6, -1e-20, -1e-30], np.float32)
    with mpmath.workdps(50):  # high-precision reference
        expected = np.array([float(mpmath.log(1 - mpmath.exp(mpmath.mpf(float(v))))) for v in x])
    np.testing.assert_allclose(log1mexp(x), expected, rtol=2e-6, atol=0)
    np.testing.assert_allclose(log1mexp(x), trl_log1mexp(torch.tensor(x)).numpy(), rtol=1e-6, atol=1e-30)
    grads = jax.grad(lambda v: log1mexp(v).sum())(jnp.asarray(x))
    np.testing.assert_allclose(grads, np.exp(x.astype(np.float64)) / np.expm1(x.astype(np.float64)), rtol=1e-5)


@pytest.mark.parametrize("case", ["random", "near_zero", "extreme"])
def test_orpo_matches_trl(case):
    if case == "random":
        chosen, rejected, lc, lr = _random(3)
    elif case == "near_zero":  # average log-probs close to 0 exercise log1mexp's expm1 branch
        chosen = -np.array([1e-6, 1e-3, 0.5, 1e-20, 0.69, 2.0], np.float32)
        rejected = -np.array([1e-3, 1e-6, 0.7, 3.0, 1e-25, 1e-8], np.float32)
        lc = lr = np.ones(B, np.float32)
    else:
        chosen, rejected = EXTREME_C.copy(), EXTREME_R.copy()
        chosen[chosen == 0] = -1e-7  # exact zeros are the documented difference, tested below
        rejected[rejected == 0] = -1e-7
        lc = lr = np.ones(B, np.float32)
    lam = 0.25
    nll = np.linspace(0.5, 2.0, B).astype(np.float32)
    losses, metrics = orpo_loss(
        policy_chosen_logps=chosen,
        policy_rejected_logps=rejected,
        chosen_lengths=lc,
        rejected_lengths=lr,
        chosen_nll=nll,
        lambda_=lam,
    )
    t_losses, t_rc, t_rr, t_ratio_mean, t_odds_mean = trl_orpo(chosen / lc, rejected / lr, beta=lam)
    np.testing.assert_allclose(losses, nll - t_losses, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(metrics["rewards/chosen"], t_rc, rtol=1e-6)
    np.testing.assert_allclose(metrics["rewards/rejected"], t_rr, rtol=1e-6)
    np.testing.assert_allclose(np.mean(metrics["log_odds_ratio"]), t_ratio_mean, rtol=1e-5)
    np.testing.assert_allclose(np.mean(metrics["log_odds_chosen"]), t_odds_mean, rtol=1e-5, atol=1e-5)
    # TRL's total is nll - mean(beta * ratio); with a per-batch nll broadcast it is our mean.
    np.testing.assert_allclose(np.mean(losses), np.mean(nll) - np.mean(t_losses), rtol=1e-5)


def test_orpo_exact_zero_logps_finite_where_trl_is_not():
    chosen = np.array([0.0, 0.0, -1e4, -2.0], np.float32)
    rejected = np.array([0.0, -1e4, 0.0, 0.0], np.float32)
    t_losses = trl_orpo(chosen, rejected, beta=0.1)[0]
    assert not np.all(np.isfinite(t_losses))  # the documented difference
    nll = jnp.zeros(4)

    def total(c, r):
        return orpo_loss(policy_chosen_logps=c, policy_rejected_logps=r, chosen_nll=nll, lambda_=0.1)[0].sum()

    losses, metrics = orpo_loss(policy_chosen_logps=chosen, policy_rejected_logps=rejected, chosen_nll=nll, lambda_=0.1)
    assert np.all(np.isfinite(losses)) and all(np.all(np.isfinite(v)) for v in metrics.values())
    # Both at P = 1: odds ratio 1, loss = -0.1 log(1/2). Chosen certain, rejected impossible: 0.
    np.testing.assert_allclose(losses[:2], [0.1 * math.log(2.0), 0.0], atol=1e-7)
    grads = jax.grad(total, argnums=(0, 1))(jnp.asarray(chosen), jnp.asarray(rejected))
    assert all(np.all(np.isfinite(g)) for g in grads)


# ---------------------------------------------------------------------------- shared checks

PAIR = dict(
    policy_chosen_logps=jnp.array([-3.0, -7.5, -2.0, -11.0]),
    policy_rejected_logps=jnp.array([-4.0, -6.0, -9.0, -10.5]),
)
LENGTHS = dict(chosen_lengths=jnp.array([3, 5, 2, 7]), rejected_lengths=jnp.array([4, 4, 6, 7]))
NLL = dict(chosen_nll=jnp.array([1.0, 1.5, 0.5, 1.2]))
CALLS = {
    "simpo": (simpo_loss, {**LENGTHS}),
    "cpo": (cpo_loss, {**NLL}),
    "orpo": (orpo_loss, {**LENGTHS, **NLL}),
}


def test_registry_names():
    assert LOSSES == {"simpo": simpo_loss, "cpo": cpo_loss, "orpo": orpo_loss}


@pytest.mark.parametrize("name", sorted(CALLS))
def test_grads(name):
    fn, extra = CALLS[name]

    def f(c, r):
        return fn(policy_chosen_logps=c, policy_rejected_logps=r, **extra)[0]

    check_grads(f, (PAIR["policy_chosen_logps"], PAIR["policy_rejected_logps"]), order=1, modes=("fwd", "rev"))


@pytest.mark.parametrize("name", sorted(CALLS))
def test_jit_and_vmap(name):
    fn, extra = CALLS[name]
    kwargs = {**PAIR, **extra}
    eager_losses, eager_metrics = fn(**kwargs)
    jit_losses, jit_metrics = jax.jit(lambda kw: fn(**kw))(kwargs)
    np.testing.assert_allclose(jit_losses, eager_losses, rtol=1e-6)
    assert set(jit_metrics) == set(eager_metrics)
    for value in eager_metrics.values():
        assert value.shape == eager_losses.shape == (4,)
    stacked = jax.tree.map(lambda x: jnp.stack([x, x[::-1]]), kwargs)
    vmapped, _ = jax.vmap(lambda kw: fn(**kw))(stacked)
    np.testing.assert_allclose(vmapped[0], eager_losses, rtol=1e-6)
    np.testing.assert_allclose(vmapped[1], eager_losses[::-1], rtol=1e-6)


@pytest.mark.parametrize("name", sorted(CALLS))
def test_extreme_inputs_are_finite(name):
    fn, extra = CALLS[name]
    extra = {k: jnp.concatenate([v, v[:2]]) for k, v in extra.items()}
    kwargs = dict(policy_chosen_logps=EXTREME_C, policy_rejected_logps=EXTREME_R, **extra)
    losses, metrics = fn(**kwargs)
    assert np.all(np.isfinite(losses)) and all(np.all(np.isfinite(v)) for v in metrics.values())
    grads = jax.grad(lambda c: fn(**{**kwargs, "policy_chosen_logps": c})[0].sum())(jnp.asarray(EXTREME_C))
    assert np.all(np.isfinite(grads))


@pytest.mark.parametrize("name", sorted(CALLS))
def test_bad_shapes_raise(name):
    fn, extra = CALLS[name]
    with pytest.raises(ValueError, match=r"`policy_rejected_logps` has shape \(3,\)"):
        fn(**{**PAIR, **extra, "policy_rejected_logps": jnp.zeros(3)})
    with pytest.raises(ValueError, match=r"`policy_chosen_logps` must have shape \[B\], got shape \(4, 1\)"):
        fn(**{**PAIR, **extra, "policy_chosen_logps": jnp.zeros((4, 1))})
    for key in extra:
        with pytest.raises(ValueError, match=rf"`{key}` has shape \(5,\)"):
            fn(**{**PAIR, **extra, key: jnp.zeros(5)})


def test_orpo_needs_both_lengths():
    with pytest.raises(ValueError, match="chosen_lengths"):
        orpo_loss(**PAIR, **NLL, chosen_lengths=LENGTHS["chosen_lengths"])


# ---------------------------------------------------------------------------- properties

logp = st.floats(-50.0, -0.0078125, width=32)
batch = st.lists(logp, min_size=4, max_size=4)
length = st.lists(st.integers(1, 30), min_size=4, max_size=4)

_simpo = jax.jit(lambda kw: simpo_loss(**kw)[0])
_cpo = jax.jit(lambda kw: cpo_loss(**kw, cpo_alpha=0.0)[0])
_orpo = jax.jit(lambda kw: orpo_loss(**kw)[1]["log_odds_chosen"])


@settings(max_examples=40, deadline=None)
@given(c=batch, r=batch, lc=length, lr=length, shift=st.floats(-3.0, 3.0, width=32))
def test_simpo_properties(c, r, lc, lr, shift):
    base = dict(
        policy_chosen_logps=jnp.array(c),
        policy_rejected_logps=jnp.array(r),
        chosen_lengths=jnp.array(lc),
        rejected_lengths=jnp.array(lr),
        beta=2.0,
        gamma=0.0,
        label_smoothing=0.0,
    )
    loss = _simpo(base)
    # Swapping chosen and rejected with gamma = 0: softplus(-z) - softplus(z) = -z.
    swapped = _simpo({**base, "policy_chosen_logps": base["policy_rejected_logps"],
                      "policy_rejected_logps": base["policy_chosen_logps"],
                      "chosen_lengths": base["rejected_lengths"], "rejected_lengths": base["chosen_lengths"]})
    z = 2.0 * (np.array(c) / np.array(lc) - np.array(r) / np.array(lr))
    np.testing.assert_allclose(loss - swapped, -z, rtol=1e-4, atol=1e-4)
    # A per-token log-prob shift (shift * length on each sum) leaves the average difference unchanged.
    shifted = _simpo({**base, "policy_chosen_logps": base["policy_chosen_logps"] + shift * base["chosen_lengths"],
                      "policy_rejected_logps": base["policy_rejected_logps"] + shift * base["rejected_lengths"]})
    np.testing.assert_allclose(shifted, loss, rtol=1e-4, atol=1e-4)
    assert np.all(np.asarray(loss) >= 0)


@settings(max_examples=40, deadline=None)
@given(c=batch, r=batch, shift=st.floats(-5.0, 5.0, width=32))
def test_cpo_properties(c, r, shift):
    base = dict(policy_chosen_logps=jnp.array(c), policy_rejected_logps=jnp.array(r), beta=0.5, label_smoothing=0.5)
    loss = _cpo(base)
    # With label smoothing 1/2 the loss is symmetric in (chosen, rejected).
    swapped = _cpo({**base, "policy_chosen_logps": base["policy_rejected_logps"],
                    "policy_rejected_logps": base["policy_chosen_logps"]})
    np.testing.assert_allclose(loss, swapped, rtol=1e-5, atol=1e-6)
    # The preference term only sees the difference.
    shifted = _cpo({**base, "policy_chosen_logps": base["policy_chosen_logps"] + shift,
                    "policy_rejected_logps": base["policy_rejected_logps"] + shift})
    np.testing.assert_allclose(shifted, loss, rtol=1e-4, atol=1e-4)


@settings(max_examples=40, deadline=None)
@given(c=st.lists(st.floats(-20.0, -2.0**-13, width=32), min_size=4, max_size=4),
       r=st.lists(st.floats(-20.0, -2.0**-13, width=32), min_size=4, max_size=4))
def test_orpo_log_odds_properties(c, r):
    kw = dict(policy_chosen_logps=jnp.array(c), policy_rejected_logps=jnp.array(r), chosen_nll=jnp.zeros(4))
    log_odds = np.asarray(_orpo(kw), np.float64)
    swapped = np.asarray(_orpo({**kw, "policy_chosen_logps": kw["policy_rejected_logps"],
                                "policy_rejected_logps": kw["policy_chosen_logps"]}), np.float64)
    np.testing.assert_allclose(log_odds, -swapped, rtol=1e-5, atol=1e-5)
    # Closed form in float64: log(p/(1-p)) - log(q/(1-q)).
    p, q = np.exp(np.array(c, np.float64)), np.exp(np.array(r, np.float64))
    expected = np.log(p / -np.expm1(np.array(c, np.float64))) - np.log(q / -np.expm1(np.array(r, np.float64)))
    np.testing.assert_allclose(log_odds, expected, rtol=1e-4, atol=1e-4)
    # The sign of the log odds ratio is the sign of the log-prob difference.
    diff = np.array(c) - np.array(r)
    clear = np.abs(diff) > 1e-3
    np.testing.assert_array_equal(np.sign(log_odds[clear]), np.sign(diff[clear]))
