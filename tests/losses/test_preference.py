"""Reference-model preference losses: closed-form values, identities, gradients, jit/vmap, errors.

Agreement with TRL's implementation is in test_preference_trl.py.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.test_util import check_grads

from jaxalign.losses import preference as P
from jaxalign.losses.preference_base import f_divergence_scores


def sp(x):  # softplus = -log sigmoid(-x)
    return math.log1p(math.exp(x)) if x < 30 else x + math.log1p(math.exp(-x))


def sig(x):
    return 1.0 / (1.0 + math.exp(-x))


def arr(*xs):
    return jnp.asarray(xs, jnp.float32)


def call(fn, pc, pr, rc, rr, **kw):
    losses, metrics = fn(policy_chosen_logps=arr(*pc), policy_rejected_logps=arr(*pr),
                         ref_chosen_logps=arr(*rc), ref_rejected_logps=arr(*rr), **kw)
    return np.asarray(losses, np.float64), metrics


# pi_c - ref_c = 1, pi_r - ref_r = -1: Delta = 2
PAIR = dict(pc=[-1.0], pr=[-3.0], rc=[-2.0], rr=[-2.0])


def one(fn, **kw):
    return float(call(fn, PAIR["pc"], PAIR["pr"], PAIR["rc"], PAIR["rr"], **kw)[0][0])


# --- closed-form values -----------------------------------------------------------------------

@pytest.mark.parametrize("beta", [0.01, 0.1, 1.0, 7.5])
def test_dpo_equal_logps_is_log2(beta):
    losses, _ = call(P.dpo_loss, [-4.0, -1.0], [-2.0, -9.0], [-4.0, -1.0], [-2.0, -9.0], beta=beta)
    np.testing.assert_allclose(losses, [math.log(2)] * 2, rtol=1e-6)


def test_closed_form_values():
    # z = beta * Delta = 0.5 * 2 = 1
    assert one(P.dpo_loss, beta=0.5) == pytest.approx(sp(-1.0), rel=1e-6)
    assert one(P.dpo_loss, beta=0.5, label_smoothing=0.1) == pytest.approx(0.9 * sp(-1.0) + 0.1 * sp(1.0), rel=1e-6)
    assert one(P.robust_dpo_loss, beta=0.5, label_smoothing=0.25) == pytest.approx(
        (0.75 * sp(-1.0) - 0.25 * sp(1.0)) / 0.5, rel=1e-6)
    assert one(P.ipo_loss, beta=0.5) == pytest.approx(1.0, rel=1e-6)  # (2 - 1)^2
    assert one(P.ipo_loss, beta=0.25) == pytest.approx(0.0, abs=1e-6)  # (2 - 2)^2
    assert one(P.ipo_loss, beta=0.5, chosen_lengths=arr(2.0), rejected_lengths=arr(4.0)) == pytest.approx(
        (0.5 + 0.25 - 1.0) ** 2, rel=1e-6)
    assert one(P.hinge_loss, beta=0.5) == pytest.approx(0.0, abs=1e-7)
    assert one(P.hinge_loss, beta=0.25) == pytest.approx(0.5, rel=1e-6)
    assert one(P.discopop_loss, beta=0.5, tau=0.05) == pytest.approx(
        sp(-1.0) * sig(-20.0) + math.exp(-1.0) * sig(20.0), rel=1e-6)
    # anchored: R_c = beta * 1, R_r = -beta
    assert one(P.nca_pair_loss, beta=0.5) == pytest.approx(sp(-0.5) + 0.5 * sp(0.5) + 0.5 * sp(-0.5), rel=1e-6)
    assert one(P.bco_pair_loss, beta=0.5) == pytest.approx(2 * sp(-0.5), rel=1e-6)
    assert one(P.bco_pair_loss, beta=0.5, delta=0.2) == pytest.approx(sp(-0.3) + sp(-0.7), rel=1e-6)
    assert one(P.sppo_hard_loss, beta=0.5) == pytest.approx(0.0, abs=1e-7)  # r_c = 1/(2 beta), r_r = -1/(2 beta)
    assert one(P.sppo_hard_loss, beta=0.25) == pytest.approx(2 * (1 - 2) ** 2, rel=1e-6)
    assert one(P.apo_zero_loss, beta=0.5) == pytest.approx(1 - sig(0.5) + sig(-0.5), rel=1e-6)
    assert one(P.apo_down_loss, beta=0.5) == pytest.approx(sig(0.5) + 1 - sig(1.0), rel=1e-6)


def test_zero_logratio_values():
    zeros = dict(pc=[-3.0], pr=[-5.0], rc=[-3.0], rr=[-5.0])
    f = lambda fn, **kw: float(call(fn, zeros["pc"], zeros["pr"], zeros["rc"], zeros["rr"], **kw)[0][0])  # noqa: E731
    assert f(P.exo_loss, label_smoothing=0.01) == pytest.approx(
        0.5 * (math.log(0.5) - math.log(0.99)) + 0.5 * (math.log(0.5) - math.log(0.01)), rel=1e-6)
    assert f(P.discopop_loss) == pytest.approx(0.5 * math.log(2) + 0.5, rel=1e-6)
    assert f(P.nca_pair_loss) == pytest.approx(2 * math.log(2), rel=1e-6)
    assert f(P.bco_pair_loss, delta=1.5) == pytest.approx(sp(1.5) + sp(-1.5), rel=1e-6)
    assert f(P.sppo_hard_loss, beta=0.1) == pytest.approx(2 * 25.0, rel=1e-6)
    assert f(P.apo_zero_loss) == pytest.approx(1.0, rel=1e-6)
    assert f(P.apo_down_loss) == pytest.approx(1.0, rel=1e-6)
    assert f(P.ipo_loss, beta=0.1) == pytest.approx(25.0, rel=1e-6)


def test_exo_is_zero_at_target_and_positive_elsewhere():
    eps, beta = 0.05, 0.5
    delta = math.log((1 - eps) / eps) / beta  # sigmoid(beta * Delta) = 1 - eps
    losses, _ = call(P.exo_loss, [delta, 0.0, 2 * delta], [0.0] * 3, [0.0] * 3, [0.0] * 3,
                     beta=beta, label_smoothing=eps)
    assert losses[0] == pytest.approx(0.0, abs=1e-6)

    def kl(q):  # KL([q, 1 - q] || [1 - eps, eps])
        return q * math.log(q / (1 - eps)) + (1 - q) * math.log((1 - q) / eps)

    assert losses[1] == pytest.approx(kl(0.5), rel=1e-5)
    assert losses[2] == pytest.approx(kl(361 / 362), rel=1e-4)  # sigmoid(2 log 19) = 19^2 / (19^2 + 1)


def test_dpop_penalty():
    # pi_c - ref_c = -1 (chosen likelihood fell), pi_r - ref_r = -3: z = 0.1 * (2 - 50 * 1) = -4.8
    losses, _ = call(P.dpop_loss, [-3.0, -1.0], [-5.0, -5.0], [-2.0, -2.0], [-2.0, -2.0], beta=0.1, lambda_=50.0)
    assert losses[0] == pytest.approx(sp(4.8), rel=1e-6)
    assert losses[1] == pytest.approx(sp(-0.1 * 4.0), rel=1e-6)  # pi_c >= ref_c: plain DPO, Delta = 1 + 3


def test_slic_values():
    # relu(delta - (pi_c - pi_r)) - lambda_ * target
    losses, m = P.slic_loss(policy_chosen_logps=arr(-1.0, -1.0, -2.0), policy_rejected_logps=arr(-3.0, -1.5, -2.0),
                            delta=1.0, lambda_=0.1)
    np.testing.assert_allclose(losses, [0.0 + 0.1, 0.5 + 0.1, 1.0 + 0.2], rtol=1e-6)
    losses, _ = P.slic_loss(policy_chosen_logps=arr(-1.0), policy_rejected_logps=arr(-1.5),
                            target_logps=arr(-4.0), delta=2.0, lambda_=0.5,
                            ref_chosen_logps=arr(-9.0), ref_rejected_logps=arr(-9.0))
    np.testing.assert_allclose(losses, [1.5 + 2.0], rtol=1e-6)
    np.testing.assert_allclose(m["rewards/margins"], [2.0, 0.5, 0.0])
    np.testing.assert_allclose(m["rewards/accuracies"], [1.0, 1.0, 0.0])


def test_aot_sorts_over_the_batch():
    # pi_c - pi_r = [3, 1] -> sorted [1, 3]; ref_c - ref_r = [0, 2] -> sorted [0, 2]; d = [1, 1]
    losses, _ = call(P.aot_loss, [3.0, 1.0], [0.0, 0.0], [0.0, 2.0], [0.0, 0.0], beta=1.0)
    np.testing.assert_allclose(losses, [sp(-1.0)] * 2, rtol=1e-6)  # unsorted pairs would give z = [3, -1]
    # r_c = [2, 0] -> [0, 2]; r_r = [1, -1] -> [-1, 1]; d = [1, 1]
    losses, _ = call(P.aot_unpaired_loss, [2.0, 0.0], [1.0, -1.0], [0.0, 0.0], [0.0, 0.0], beta=1.0,
                     label_smoothing=0.2)
    np.testing.assert_allclose(losses, [0.8 * sp(-1.0) + 0.2 * sp(1.0)] * 2, rtol=1e-6)


def test_sigmoid_norm_divides_by_lengths():
    # summed r_c = 4 over 2 tokens, r_r = -2 over 1 token (0 clamps to 1): delta = 2 + 2, z = 1
    losses, _ = P.sigmoid_norm_loss(policy_chosen_logps=arr(0.0, 0.0), policy_rejected_logps=arr(-2.0, -2.0),
                                    ref_chosen_logps=arr(-4.0, -4.0), ref_rejected_logps=arr(0.0, 0.0),
                                    chosen_lengths=jnp.array([2, 4]), rejected_lengths=jnp.array([0, 2]), beta=0.25)
    np.testing.assert_allclose(losses, [sp(-1.0), sp(-0.25 * 2.0)], rtol=1e-6)


def test_f_divergence_scores_closed_form():
    r = arr(math.log(2.0), 0.0)  # u = 2, u = 1
    np.testing.assert_allclose(f_divergence_scores(r, f_divergence_type="forward_kl"), [0.5, 0.0], atol=1e-7)
    np.testing.assert_allclose(f_divergence_scores(r, f_divergence_type="js_divergence"),
                               [math.log(4 / 3), 0.0], atol=1e-7)
    np.testing.assert_allclose(
        f_divergence_scores(r, f_divergence_type="alpha_divergence", f_alpha_divergence_coef=0.5),
        [2 * (1 - 2 ** -0.5), 0.0], atol=1e-7)
    np.testing.assert_allclose(
        f_divergence_scores(r, f_divergence_type="alpha_divergence", f_alpha_divergence_coef=1.0), r)
    # f-DPO on the DPO loss: z = beta * (s(r_c) - s(0))
    losses, _ = call(P.dpo_loss, [math.log(2.0)], [-1.0], [0.0], [-1.0], beta=2.0, f_divergence_type="forward_kl")
    assert losses[0] == pytest.approx(sp(-1.0), rel=1e-6)
    # finite at |log-ratio| = 1e4 (TRL's forward KL gives inf there)
    s = f_divergence_scores(arr(-1e4, 1e4), f_divergence_type="forward_kl")
    assert np.all(np.isfinite(np.asarray(s)))


def test_metrics_follow_trl_names_and_stop_gradients():
    _, m = call(P.dpo_loss, [-1.0, -4.0], [-3.0, -2.0], [-2.0, -2.0], [-2.0, -2.0], beta=0.5)
    np.testing.assert_allclose(m["rewards/chosen"], [0.5, -1.0])
    np.testing.assert_allclose(m["rewards/rejected"], [-0.5, 0.0])
    np.testing.assert_allclose(m["rewards/margins"], [1.0, -1.0])
    np.testing.assert_allclose(m["rewards/accuracies"], [1.0, 0.0])
    np.testing.assert_allclose(m["logps/chosen"], [-1.0, -4.0])
    np.testing.assert_allclose(m["logps/rejected"], [-3.0, -2.0])
    g = jax.grad(lambda x: P.dpo_loss(policy_chosen_logps=x, policy_rejected_logps=x, ref_chosen_logps=x,
                                      ref_rejected_logps=x)[1]["rewards/chosen"].sum())(arr(1.0))
    assert float(g[0]) == 0.0


# --- extreme inputs ---------------------------------------------------------------------------

def _kw(name, b):
    """Extra keyword arrays a registered loss needs, for batch size b."""
    if name == "sigmoid_norm":
        return {"chosen_lengths": jnp.arange(1, b + 1), "rejected_lengths": jnp.full((b,), 3)}
    return {}


EXTREME = [jnp.array(v, jnp.float32) for v in (
    [-1.0, -1e4, -1.0, -1e4, -5.0, 0.0],     # pi_c
    [-1e4, -1.0, -1.0, -1e4, -5.0, -1e4],    # pi_r
    [-1e4, -1.0, -1e4, -1.0, -5.0, -1e4],    # ref_c
    [-1.0, -1e4, -1e4, -1.0, -5.0, 0.0],     # ref_r
)]


F_DIV_NAMES = ("dpo", "robust", "ipo", "hinge", "exo_pair", "discopop", "sigmoid_norm")  # as in TRL
EXTREME_CASES = [(name, "reverse_kl") for name in sorted(P.LOSSES)] + [
    (name, f) for name in F_DIV_NAMES for f in ("forward_kl", "js_divergence", "alpha_divergence")
    if not (name == "ipo" and f != "js_divergence")  # the squared f-score overflows fp32, see below
]


@pytest.mark.parametrize("name,f_div", EXTREME_CASES)
def test_finite_values_and_grads_at_extremes(name, f_div):
    fn = P.LOSSES[name]
    kw = _kw(name, 6)
    if f_div != "reverse_kl":
        kw["f_divergence_type"] = f_div

    def total(pc, pr, rc, rr):
        return fn(policy_chosen_logps=pc, policy_rejected_logps=pr, ref_chosen_logps=rc,
                  ref_rejected_logps=rr, **kw)[0].sum()

    losses = fn(policy_chosen_logps=EXTREME[0], policy_rejected_logps=EXTREME[1], ref_chosen_logps=EXTREME[2],
                ref_rejected_logps=EXTREME[3], **kw)[0]
    assert np.all(np.isfinite(np.asarray(losses))), losses
    grads = jax.grad(total, argnums=(0, 1, 2, 3))(*EXTREME)
    assert all(np.all(np.isfinite(np.asarray(g))) for g in grads), grads


def test_extreme_asymptotes():
    # Delta = +-2e4 - 2 with beta = 0.1: DPO loss ~ softplus(-z)
    losses, _ = call(P.dpo_loss, [-1.0, -1e4], [-1e4, -1.0], [-1e4, -1.0], [-1.0, -1e4], beta=0.1)
    np.testing.assert_allclose(losses, [0.0, 0.1 * (2e4 - 2)], rtol=1e-6, atol=1e-30)
    losses, _ = call(P.discopop_loss, [-1e4], [-1.0], [-1.0], [-1e4], beta=0.1)
    np.testing.assert_allclose(losses, [0.1 * (2e4 - 2)], rtol=1e-6)  # exp term -> 0, sigmoid(-z/tau) -> 1


def test_ipo_with_forward_kl_overflows_only_beyond_fp32():
    """IPO squares the f-score; forward-KL scores are clamped at exp(80) ~ 5.5e34, whose square is
    beyond fp32: the loss is inf exactly as in TRL. At |log-ratio| <= 40 it is finite."""
    losses, _ = call(P.ipo_loss, [-41.0, -1.0], [-1.0, -1.0], [-1.0, -1.0], [-1.0, -1.0],
                     f_divergence_type="forward_kl")
    expected = (1.0 - math.exp(40.0) - 5.0) ** 2
    assert losses[0] == pytest.approx(expected, rel=1e-5) and losses[1] == pytest.approx(25.0)
    losses, _ = call(P.ipo_loss, [-1e4], [-1.0], [-1.0], [-1.0], f_divergence_type="forward_kl")
    assert losses[0] == np.inf


# --- identities (hypothesis) ------------------------------------------------------------------

# dyadic rationals: sums and differences are exact in fp32, so invariances hold exactly
dyadic = st.integers(-800, 800).map(lambda k: k / 8.0)
betas = st.sampled_from([0.05, 0.1, 0.5, 1.0, 2.0])
eps_st = st.sampled_from([0.0, 0.1, 0.3])


def _swap(fn, pc, pr, rc, rr, **kw):
    a, _ = call(fn, [pc], [pr], [rc], [rr], **kw)
    b, _ = call(fn, [pr], [pc], [rr], [rc], **kw)
    return float(a[0]), float(b[0]), beta_delta(pc, pr, rc, rr, kw.get("beta", 0.1))


def beta_delta(pc, pr, rc, rr, beta):
    return beta * ((pc - rc) - (pr - rr))


@settings(max_examples=40, deadline=None)
@given(dyadic, dyadic, dyadic, dyadic, betas, eps_st)
def test_swap_identities(pc, pr, rc, rr, beta, eps):
    # log sigmoid(z) - log sigmoid(-z) = z gives the sigmoid-family identities
    tol = dict(rel=1e-4, abs=2e-4)
    a, b, z = _swap(P.dpo_loss, pc, pr, rc, rr, beta=beta, label_smoothing=eps)
    assert b - a == pytest.approx((1 - 2 * eps) * z, **tol)
    a, b, z = _swap(P.robust_dpo_loss, pc, pr, rc, rr, beta=beta, label_smoothing=eps)
    assert b - a == pytest.approx(z / (1 - 2 * eps), **tol)
    a, b, z = _swap(P.ipo_loss, pc, pr, rc, rr, beta=beta)
    assert b - a == pytest.approx(2 * (z / beta) / beta, rel=1e-4, abs=1e-2)  # (D + 1/2b)^2 - (D - 1/2b)^2
    a, b, z = _swap(P.hinge_loss, pc, pr, rc, rr, beta=beta)
    assert b - a == pytest.approx(z + min(max(z, -1.0), 1.0), **tol)
    a, b, z = _swap(P.exo_loss, pc, pr, rc, rr, beta=beta, label_smoothing=0.1)
    assert b - a == pytest.approx(math.tanh(z / 2) * math.log(0.9 / 0.1), **tol)
    a, b, _ = _swap(P.apo_zero_loss, pc, pr, rc, rr, beta=beta)
    assert a + b == pytest.approx(2.0, abs=1e-6)
    a, b, _ = _swap(P.sppo_hard_loss, pc, pr, rc, rr, beta=beta)  # (r_c - h)^2 + (r_r + h)^2, h = 1/2b
    rcv, rrv, h = pc - rc, pr - rr, 0.5 / beta
    assert b - a == pytest.approx((rrv - h) ** 2 + (rcv + h) ** 2 - (rcv - h) ** 2 - (rrv + h) ** 2,
                                  rel=1e-4, abs=1e-2)


@settings(max_examples=25, deadline=None)
@given(st.lists(st.tuples(dyadic, dyadic, dyadic, dyadic), min_size=2, max_size=5), betas, eps_st)
def test_aot_swap_identity(rows, beta, eps):
    """Swapping chosen and rejected negates and reverses the sorted differences, so
    mean L(swap) - mean L = (1 - 2 eps) * mean(d)."""
    pc, pr, rc, rr = (list(c) for c in zip(*rows))
    for fn, d in ((P.aot_loss, np.sort(np.subtract(pc, pr)) - np.sort(np.subtract(rc, rr))),
                  (P.aot_unpaired_loss, np.sort(np.subtract(pc, rc)) - np.sort(np.subtract(pr, rr)))):
        a, _ = call(fn, pc, pr, rc, rr, beta=beta, label_smoothing=eps)
        b, _ = call(fn, pr, pc, rr, rc, beta=beta, label_smoothing=eps)
        assert b.mean() - a.mean() == pytest.approx((1 - 2 * eps) * beta * d.mean(), rel=1e-4, abs=2e-4)


REF_LOSSES = sorted(set(P.LOSSES) - {"slic"})
# losses that depend on (r_c, r_r) only through r_c - r_r (or pi_c - pi_r)
MARGIN_ONLY = {"dpo", "sigmoid", "robust", "ipo", "hinge", "exo_pair", "discopop", "aot", "aot_unpaired"}


@settings(max_examples=15, deadline=None)
@given(st.lists(st.tuples(dyadic, dyadic, dyadic, dyadic), min_size=3, max_size=3), dyadic, dyadic)
def test_shift_invariances(rows, c1, c2):
    pc, pr, rc, rr = (np.array(c, np.float32) for c in zip(*rows))
    for name in REF_LOSSES:
        fn, kw = P.LOSSES[name], _kw(name, 3)
        base, _ = fn(policy_chosen_logps=pc, policy_rejected_logps=pr, ref_chosen_logps=rc,
                     ref_rejected_logps=rr, **kw)
        # the same constant on policy and reference log-probs of one response leaves r_c, r_r unchanged
        shifted, _ = fn(policy_chosen_logps=pc + c1, policy_rejected_logps=pr + c2, ref_chosen_logps=rc + c1,
                        ref_rejected_logps=rr + c2, **kw)
        np.testing.assert_allclose(shifted, base, rtol=1e-6, atol=1e-6, err_msg=name)
        if name in MARGIN_ONLY:  # the same constant on both policy log-probs leaves the margin unchanged
            moved, _ = fn(policy_chosen_logps=pc + c1, policy_rejected_logps=pr + c1, ref_chosen_logps=rc,
                          ref_rejected_logps=rr, **kw)
            np.testing.assert_allclose(moved, base, rtol=1e-6, atol=1e-6, err_msg=name)
    s0, _ = P.slic_loss(policy_chosen_logps=pc, policy_rejected_logps=pr, target_logps=rc)
    s1, _ = P.slic_loss(policy_chosen_logps=pc + c1, policy_rejected_logps=pr + c1, target_logps=rc)
    np.testing.assert_allclose(s1, s0, rtol=1e-6, atol=1e-6)


@settings(max_examples=25, deadline=None)
@given(dyadic, dyadic, dyadic, dyadic, betas, st.sampled_from([1.0, 10.0, 50.0]))
def test_dpop_equals_dpo_unless_chosen_likelihood_fell(pc, pr, rc, rr, beta, lam):
    a, _ = call(P.dpop_loss, [pc], [pr], [rc], [rr], beta=beta, lambda_=lam)
    b, _ = call(P.dpo_loss, [pc], [pr], [rc], [rr], beta=beta)
    if pc >= rc:
        assert a[0] == pytest.approx(b[0], rel=1e-6, abs=1e-7)
    else:  # the penalty only makes the loss larger
        assert a[0] >= b[0] - 1e-6


@settings(max_examples=25, deadline=None)
@given(dyadic, dyadic, dyadic, dyadic, st.sampled_from([0.5, 1.0, 2.0]), st.integers(-16, 16))
def test_bco_delta_is_a_reward_shift(pc, pr, rc, rr, beta, k):
    d = k / 8.0
    a, _ = call(P.bco_pair_loss, [pc], [pr], [rc], [rr], beta=beta, delta=d)
    b, _ = call(P.bco_pair_loss, [pc], [pr], [rc + d / beta], [rr + d / beta], beta=beta)
    assert a[0] == pytest.approx(b[0], rel=1e-5, abs=1e-5)


@settings(max_examples=25, deadline=None)
@given(dyadic, dyadic, dyadic, dyadic, betas, st.sampled_from([1e-3, 0.1, 0.4]))
def test_bounds(pc, pr, rc, rr, beta, eps):
    for fn in (P.apo_zero_loss, P.apo_down_loss):
        v, _ = call(fn, [pc], [pr], [rc], [rr], beta=beta)
        assert 0.0 <= v[0] <= 2.0
    v, _ = call(P.exo_loss, [pc], [pr], [rc], [rr], beta=beta, label_smoothing=eps)
    assert v[0] >= -1e-6  # a KL divergence
    for fn in (P.dpo_loss, P.ipo_loss, P.hinge_loss, P.discopop_loss, P.nca_pair_loss, P.sppo_hard_loss):
        v, _ = call(fn, [pc], [pr], [rc], [rr], beta=beta)
        assert v[0] >= 0.0


# --- gradients --------------------------------------------------------------------------------

GRAD_CASES = {name: (name, {}) for name in P.LOSSES}
GRAD_CASES.update({
    "cdpo": ("dpo", {"label_smoothing": 0.2}),
    "robust": ("robust", {"label_smoothing": 0.2}),
    "aot": ("aot", {"label_smoothing": 0.1}),
    "dpo_forward_kl": ("dpo", {"f_divergence_type": "forward_kl"}),
    "dpo_js": ("dpo", {"f_divergence_type": "js_divergence"}),
    "dpo_alpha": ("dpo", {"f_divergence_type": "alpha_divergence", "f_alpha_divergence_coef": 0.3}),
    "hinge_alpha": ("hinge", {"f_divergence_type": "alpha_divergence", "f_alpha_divergence_coef": 2.0}),
    "ipo_lengths": ("ipo", {"chosen_lengths": [2.0, 3.0, 1.0], "rejected_lengths": [1.0, 4.0, 2.0]}),
    "bco_pair": ("bco_pair", {"delta": 0.3}),
    "slic_target": ("slic", {"delta": 0.5, "lambda_": 0.3}),
})


@pytest.mark.parametrize("case", sorted(GRAD_CASES))
def test_check_grads(case):
    name, hyper = GRAD_CASES[case]
    fn = P.LOSSES[name]
    with jax.enable_x64(True):
        kw = {k: jnp.asarray(v, jnp.float64) if isinstance(v, list) else v for k, v in hyper.items()}
        kw.update(_kw(name, 3))
        x = [jnp.array(v, jnp.float64) for v in ([-4.0, -7.5, -2.0], [-6.5, -3.0, -9.0],
                                                  [-5.2, -6.0, -3.3], [-5.0, -4.4, -8.1])]

        def f(pc, pr, rc, rr):
            if case == "slic_target":  # the regulariser's target is differentiated too
                return fn(policy_chosen_logps=pc, policy_rejected_logps=pr, target_logps=rc, **kw)[0]
            if name != "slic":  # SLiC has no beta
                kw["beta"] = 0.1 if name == "hinge" else 0.5  # hinge: stay off the kink
            return fn(policy_chosen_logps=pc, policy_rejected_logps=pr, ref_chosen_logps=rc,
                      ref_rejected_logps=rr, **kw)[0]

        assert f(*x).dtype == jnp.float64  # fp64 inputs keep their precision (cast is to >= fp32)
        check_grads(f, x, order=2, modes=["rev"], atol=1e-6, rtol=1e-6, eps=1e-5)


# --- jit / vmap / dtypes ----------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(P.LOSSES))
def test_jit_and_vmap(name):
    fn = functools.partial(P.LOSSES[name], **_kw(name, 4))
    key = jax.random.split(jax.random.PRNGKey(0), 4)
    xs = [-10.0 * jax.random.uniform(k, (3, 4)) for k in key]  # [N=3, B=4]

    def f(pc, pr, rc, rr):
        return fn(policy_chosen_logps=pc, policy_rejected_logps=pr, ref_chosen_logps=rc, ref_rejected_logps=rr)

    eager = [f(*(x[i] for x in xs)) for i in range(3)]
    jitted = jax.jit(f)(*(x[0] for x in xs))
    np.testing.assert_allclose(jitted[0], eager[0][0], rtol=1e-6, atol=1e-6)
    mapped_losses, mapped_metrics = jax.jit(jax.vmap(f))(*xs)
    assert mapped_losses.shape == (3, 4)
    for i in range(3):
        np.testing.assert_allclose(mapped_losses[i], eager[i][0], rtol=1e-6, atol=1e-6)
        for k, v in eager[i][1].items():
            np.testing.assert_allclose(mapped_metrics[k][i], v, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", sorted(P.LOSSES))
def test_low_precision_inputs_compute_in_fp32(name):
    x = [jnp.array(v, jnp.bfloat16) for v in ([-4.0, -7.5], [-6.5, -3.0], [-5.25, -6.0], [-5.0, -4.5])]
    losses, metrics = P.LOSSES[name](policy_chosen_logps=x[0], policy_rejected_logps=x[1], ref_chosen_logps=x[2],
                                     ref_rejected_logps=x[3], **_kw(name, 2))
    assert losses.dtype == jnp.float32 and losses.shape == (2,)
    assert all(v.dtype == jnp.float32 and v.shape == (2,) for v in metrics.values())
    assert set(metrics) == {"rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
                            "logps/chosen", "logps/rejected"}


# --- errors -----------------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(P.LOSSES))
def test_bad_shapes_raise(name):
    fn, kw = P.LOSSES[name], _kw(name, 3)
    good = jnp.zeros(3)
    with pytest.raises(ValueError, match=r"`ref_rejected_logps` has shape \(2,\)"):
        fn(policy_chosen_logps=good, policy_rejected_logps=good, ref_chosen_logps=good,
           ref_rejected_logps=jnp.zeros(2), **kw)
    with pytest.raises(ValueError, match=r"`policy_chosen_logps` must have shape \[B\], got shape \(3, 1\)"):
        fn(policy_chosen_logps=jnp.zeros((3, 1)), policy_rejected_logps=good, ref_chosen_logps=good,
           ref_rejected_logps=good, **kw)


def test_bad_hyperparameters_raise():
    z = jnp.zeros(2)
    a = dict(policy_chosen_logps=z, policy_rejected_logps=z, ref_chosen_logps=z, ref_rejected_logps=z)
    with pytest.raises(ValueError, match="f_divergence_type"):
        P.dpo_loss(**a, f_divergence_type="kl")
    with pytest.raises(ValueError, match=r"robust_dpo_loss: `label_smoothing` must lie in \[0.0, 0.5\), got 0.5"):
        P.robust_dpo_loss(**a, label_smoothing=0.5)
    with pytest.raises(ValueError, match="exo_loss: `label_smoothing`"):
        P.exo_loss(**a, label_smoothing=0.0)
    with pytest.raises(ValueError, match="ipo_loss: `beta` must be > 0"):
        P.ipo_loss(**a, beta=0.0)
    with pytest.raises(ValueError, match="sppo_hard_loss: `beta`"):
        P.sppo_hard_loss(**a, beta=-1.0)
    with pytest.raises(ValueError, match="discopop_loss: `tau`"):
        P.discopop_loss(**a, tau=0.0)
    with pytest.raises(ValueError, match=r"ipo_loss: pass both"):
        P.ipo_loss(**a, chosen_lengths=z)
    with pytest.raises(ValueError, match=r"bco_pair_loss: `delta` must be a scalar or have shape \(2,\), got "
                                         r"shape \(3,\)"):
        P.bco_pair_loss(**a, delta=jnp.zeros(3))
    with pytest.raises(ValueError, match=r"`chosen_lengths` has shape \(3,\)"):
        P.sigmoid_norm_loss(**a, chosen_lengths=jnp.ones(3), rejected_lengths=jnp.ones(2))
    with pytest.raises(ValueError, match=r"`target_logps` has shape \(3,\)"):
        P.slic_loss(policy_chosen_logps=z, policy_rejected_logps=z, target_logps=jnp.zeros(3))
