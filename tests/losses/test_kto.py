"""Tests for KTO, its KL reference point and unpaired APO-zero, against TRL's KTOTrainer."""

import collections
import math
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.test_util import check_grads
from trl.trainer.kto_trainer import KTOTrainer

from jaxalign.losses.kto import LOSSES, apo_zero_unpaired_loss, kto_kl_estimate, kto_loss


def sigmoid(x):
    return 1.0 / (1.0 + math.exp(-x))


# ---------------------------------------------------------------------------- TRL oracle


def trl_kto(policy, ref, labels, kl_policy, kl_ref, *, beta, desirable_weight, undesirable_weight, loss_type="kto"):
    """Runs TRL's `KTOTrainer._compute_loss` with a stand-in model whose summed completion
    log-probs are `policy`, precomputed reference log-probs `ref`, and KL completions whose log-probs
    are `kl_policy` / `kl_ref`. Returns (mean loss, logged metrics)."""
    n, width = len(policy), 3

    def model(**_):
        log_probs = torch.zeros(n, width - 1)
        log_probs[:, -1] = torch.tensor(policy, dtype=torch.float32)
        return types.SimpleNamespace(
            log_probs=log_probs, entropy=torch.zeros(n, width - 1), mean_logits=torch.zeros(n, width - 1)
        )

    calculate_kl = loss_type == "kto"
    fake = types.SimpleNamespace(
        model=types.SimpleNamespace(training=True),
        accelerator=types.SimpleNamespace(device=torch.device("cpu"), gather_for_metrics=lambda x: x),
        _compute_kl_logps=lambda model, batch: torch.tensor(kl_policy, dtype=torch.float32) if calculate_kl else None,
        precompute_ref_logps=True,
        calculate_KL=calculate_kl,
        loss_type=loss_type,
        beta=beta,
        desirable_weight=desirable_weight,
        undesirable_weight=undesirable_weight,
        aux_loss_enabled=False,
        _metrics={"train": collections.defaultdict(list)},
        _total_train_tokens=0,
        _tp_size=1,
    )
    batch = {
        "input_ids": torch.zeros(n, width, dtype=torch.long),
        "attention_mask": torch.ones(n, width, dtype=torch.long),
        "completion_mask": torch.ones(n, width, dtype=torch.long),
        "label": torch.tensor(labels, dtype=torch.bool),
        "ref_logps": torch.tensor(ref, dtype=torch.float32),
    }
    if calculate_kl:
        batch["ref_KL_logps"] = torch.tensor(kl_ref, dtype=torch.float32)
    loss = KTOTrainer._compute_loss(fake, model, batch, False)
    return loss.item(), {k: v[-1] for k, v in fake._metrics["train"].items()}


def _data(seed, n=8, extreme=False):
    rng = np.random.default_rng(seed)
    policy = -rng.uniform(1, 60, n).astype(np.float32)
    ref = -rng.uniform(1, 60, n).astype(np.float32)
    if extreme:
        ref = (policy + rng.choice([-1e4, 1e4, 0.0, 3e3], n)).astype(np.float32)
    labels = np.array([True, False] * (n // 2))
    rng.shuffle(labels)
    kl_policy = -rng.uniform(1, 60, n).astype(np.float32)
    kl_ref = (kl_policy - rng.normal(0.5, 2.0, n)).astype(np.float32)
    return policy, ref, labels, kl_policy, kl_ref


def _masked_mean(metrics, key, mask_key):
    return float(np.sum(metrics[key]) / np.sum(metrics[mask_key]))


# ---------------------------------------------------------------------------- closed forms


def test_kto_closed_form():
    beta, z0 = 0.5, 1.0
    losses, metrics = kto_loss(
        policy_logps=jnp.array([-3.0, -3.0]),
        ref_logps=jnp.array([-5.0, -5.0]),  # r = 2
        labels=jnp.array([True, False]),
        kl=z0,
        beta=beta,
        desirable_weight=1.5,
        undesirable_weight=0.5,
    )
    np.testing.assert_allclose(losses, [1.5 * (1 - sigmoid(0.5)), 0.5 * (1 - sigmoid(-0.5))], rtol=1e-6)
    np.testing.assert_allclose(metrics["rewards/chosen"], [1.0, 0.0])
    np.testing.assert_allclose(metrics["rewards/rejected"], [0.0, 1.0])
    np.testing.assert_allclose(metrics["logps/chosen"], [-3.0, 0.0])
    np.testing.assert_allclose(metrics["logps/rejected"], [0.0, -3.0])
    np.testing.assert_allclose(metrics["mask/chosen"], [1.0, 0.0])
    np.testing.assert_allclose(metrics["mask/rejected"], [0.0, 1.0])
    np.testing.assert_allclose(metrics["kl"], [1.0, 1.0])
    assert losses.dtype == jnp.float32


def test_apo_zero_unpaired_closed_form():
    losses, metrics = apo_zero_unpaired_loss(
        policy_logps=jnp.array([-3.0, -3.0]), ref_logps=jnp.array([-5.0, -5.0]), labels=jnp.array([1, 0]), beta=0.5
    )
    np.testing.assert_allclose(losses, [1 - sigmoid(1.0), sigmoid(1.0)], rtol=1e-6)
    assert "kl" not in metrics


def test_kl_estimate():
    z0 = kto_kl_estimate(jnp.array([-1.0, -2.0, -3.0]), jnp.array([-2.0, -2.5, -3.0]))
    np.testing.assert_allclose(z0, 0.5, rtol=1e-6)
    assert z0.shape == () and z0.dtype == jnp.float32
    np.testing.assert_allclose(kto_kl_estimate(jnp.array([-5.0, -5.0]), jnp.array([-1.0, -2.0])), 0.0)
    grad = jax.grad(lambda p: kto_kl_estimate(p, jnp.array([-2.0, -2.5, -3.0])))(jnp.array([-1.0, -2.0, -3.0]))
    np.testing.assert_array_equal(grad, 0.0)
    with pytest.raises(ValueError, match=r"`ref_kl_logps` has shape \(2,\)"):
        kto_kl_estimate(jnp.zeros(3), jnp.zeros(2))


# ---------------------------------------------------------------------------- TRL agreement


@pytest.mark.parametrize("extreme", [False, True])
def test_kto_matches_trl(extreme):
    policy, ref, labels, kl_policy, kl_ref = _data(0, extreme=extreme)
    hp = dict(beta=0.1, desirable_weight=1.33, undesirable_weight=0.8)
    z0 = kto_kl_estimate(kl_policy, kl_ref)
    losses, metrics = kto_loss(policy_logps=policy, ref_logps=ref, labels=labels, kl=z0, **hp)
    assert np.all(np.isfinite(losses))
    trl_mean, trl_metrics = trl_kto(policy, ref, labels, kl_policy, kl_ref, **hp)
    np.testing.assert_allclose(np.mean(losses), trl_mean, rtol=1e-5)
    np.testing.assert_allclose(z0, trl_metrics["kl"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(metrics["kl"], trl_metrics["kl"], rtol=1e-5, atol=1e-6)
    for side in ("chosen", "rejected"):
        for kind in ("rewards", "logps"):
            np.testing.assert_allclose(
                _masked_mean(metrics, f"{kind}/{side}", f"mask/{side}"), trl_metrics[f"{kind}/{side}"], rtol=1e-5
            )
    margin = _masked_mean(metrics, "rewards/chosen", "mask/chosen") - _masked_mean(
        metrics, "rewards/rejected", "mask/rejected"
    )
    np.testing.assert_allclose(margin, trl_metrics["rewards/margins"], rtol=1e-4)
    # Per row: one-row batches, same KL completions.
    for i in range(len(policy)):
        row_mean, _ = trl_kto(policy[i : i + 1], ref[i : i + 1], labels[i : i + 1], kl_policy, kl_ref, **hp)
        np.testing.assert_allclose(losses[i], row_mean, rtol=1e-5, atol=1e-7)


def test_kto_negative_kl_is_clamped_like_trl():
    policy, ref, labels, kl_policy, _ = _data(1)
    kl_ref = kl_policy + 3.0  # mean(pi - ref) = -3 -> z0 = 0
    z0 = kto_kl_estimate(kl_policy, kl_ref)
    assert float(z0) == 0.0
    losses, _ = kto_loss(policy_logps=policy, ref_logps=ref, labels=labels, kl=z0, beta=0.2)
    trl_mean, trl_metrics = trl_kto(
        policy, ref, labels, kl_policy, kl_ref, beta=0.2, desirable_weight=1.0, undesirable_weight=1.0
    )
    assert trl_metrics["kl"] == 0.0
    np.testing.assert_allclose(np.mean(losses), trl_mean, rtol=1e-5)


@pytest.mark.parametrize("extreme", [False, True])
def test_apo_zero_unpaired_matches_trl(extreme):
    policy, ref, labels, _, _ = _data(2, extreme=extreme)
    hp = dict(beta=0.3, desirable_weight=1.0, undesirable_weight=1.7)
    losses, metrics = apo_zero_unpaired_loss(policy_logps=policy, ref_logps=ref, labels=labels, **hp)
    assert np.all(np.isfinite(losses))
    trl_mean, trl_metrics = trl_kto(policy, ref, labels, None, None, loss_type="apo_zero_unpaired", **hp)
    np.testing.assert_allclose(np.mean(losses), trl_mean, rtol=1e-5)
    np.testing.assert_allclose(
        _masked_mean(metrics, "rewards/rejected", "mask/rejected"), trl_metrics["rewards/rejected"], rtol=1e-5
    )
    for i in range(len(policy)):
        row_mean, _ = trl_kto(
            policy[i : i + 1], ref[i : i + 1], labels[i : i + 1], None, None, loss_type="apo_zero_unpaired", **hp
        )
        np.testing.assert_allclose(losses[i], row_mean, rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------------------- jax checks

ARRAYS = dict(
    policy_logps=jnp.array([-3.0, -7.5, -2.0, -11.0]),
    ref_logps=jnp.array([-4.0, -6.0, -9.0, -10.5]),
    labels=jnp.array([True, False, False, True]),
)
CALLS = {"kto": (kto_loss, {"kl": jnp.float32(0.4), "beta": 0.7}), "apo_zero_unpaired": (apo_zero_unpaired_loss, {"beta": 0.7})}


def test_registry_names():
    assert LOSSES == {"kto": kto_loss, "apo_zero_unpaired": apo_zero_unpaired_loss}


@pytest.mark.parametrize("name", sorted(CALLS))
def test_grads(name):
    fn, extra = CALLS[name]

    def f(policy, ref):
        return fn(policy_logps=policy, ref_logps=ref, labels=ARRAYS["labels"], **extra)[0]

    check_grads(f, (ARRAYS["policy_logps"], ARRAYS["ref_logps"]), order=1, modes=("fwd", "rev"))


def test_kto_no_gradient_through_kl():
    grad = jax.grad(lambda kl: kto_loss(**ARRAYS, kl=kl)[0].sum())(jnp.float32(0.3))
    assert float(grad) == 0.0


@pytest.mark.parametrize("name", sorted(CALLS))
def test_jit_and_vmap(name):
    fn, extra = CALLS[name]
    eager, eager_metrics = fn(**ARRAYS, **extra)
    jitted, jit_metrics = jax.jit(lambda kw: fn(**kw, **extra))(ARRAYS)
    np.testing.assert_allclose(jitted, eager, rtol=1e-6)
    assert set(jit_metrics) == set(eager_metrics) and all(v.shape == (4,) for v in eager_metrics.values())
    stacked = jax.tree.map(lambda x: jnp.stack([x, x[::-1]]), ARRAYS)
    vmapped, _ = jax.vmap(lambda kw: fn(**kw, **extra))(stacked)
    np.testing.assert_allclose(vmapped[0], eager, rtol=1e-6)
    np.testing.assert_allclose(vmapped[1], eager[::-1], rtol=1e-6)


def test_kto_per_row_kl_and_extremes():
    losses, metrics = kto_loss(**ARRAYS, kl=jnp.array([0.0, 1.0, 2.0, 3.0]), beta=0.5)
    np.testing.assert_allclose(metrics["kl"], [0.0, 1.0, 2.0, 3.0])
    np.testing.assert_allclose(losses[3], 1 - sigmoid(0.5 * (-0.5 - 3.0)), rtol=1e-6)
    big = dict(
        policy_logps=jnp.array([0.0, 0.0, -1e4, -1e4]),
        ref_logps=jnp.array([-1e4, -1e4, 0.0, 0.0]),
        labels=jnp.array([True, False, True, False]),
    )
    losses, metrics = kto_loss(**big, kl=1e4, beta=1.0)
    np.testing.assert_allclose(losses, [0.5, 0.5, 1.0, 0.0], atol=1e-6)
    grads = jax.grad(lambda p: kto_loss(**{**big, "policy_logps": p}, kl=1e4)[0].sum())(big["policy_logps"])
    assert np.all(np.isfinite(grads)) and all(np.all(np.isfinite(v)) for v in metrics.values())


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match=r"`ref_logps` has shape \(3,\)"):
        kto_loss(**{**ARRAYS, "ref_logps": jnp.zeros(3)}, kl=0.0)
    with pytest.raises(ValueError, match=r"`labels` has shape \(2,\)"):
        apo_zero_unpaired_loss(**{**ARRAYS, "labels": jnp.array([True, False])})
    with pytest.raises(ValueError, match=r"`kl` must be a scalar or have shape \(4,\), got shape \(2,\)"):
        kto_loss(**ARRAYS, kl=jnp.zeros(2))
    with pytest.raises(ValueError, match=r"`labels` must be bool.*float32"):
        kto_loss(**{**ARRAYS, "labels": jnp.array([1.0, 0.0, 0.0, 1.0])}, kl=0.0)
    with pytest.raises(ValueError, match=r"`policy_logps` must have shape \[B\], got shape \(4, 1\)"):
        kto_loss(**{**ARRAYS, "policy_logps": jnp.zeros((4, 1))}, kl=0.0)


# ---------------------------------------------------------------------------- properties

logps = st.lists(st.floats(-100.0, 0.0, width=32), min_size=4, max_size=4)
_kto = jax.jit(lambda kw: kto_loss(**kw, beta=0.3)[0])
_apo = jax.jit(lambda kw: apo_zero_unpaired_loss(**kw, beta=0.3)[0])


@settings(max_examples=40, deadline=None)
@given(policy=logps, ref=logps, z0=st.floats(0.0, 20.0, width=32))
def test_kto_properties(policy, ref, z0):
    policy, ref = jnp.array(policy), jnp.array(ref)
    desirable = _kto(dict(policy_logps=policy, ref_logps=ref, labels=jnp.ones(4, bool), kl=z0))
    assert np.all((np.asarray(desirable) >= 0) & (np.asarray(desirable) <= 1))
    # Reflecting the reward about z0 turns a desirable row into an undesirable one with equal loss.
    mirrored = _kto(dict(policy_logps=2 * z0 - (policy - ref), ref_logps=jnp.zeros(4), labels=jnp.zeros(4, bool), kl=z0))
    np.testing.assert_allclose(desirable, mirrored, rtol=1e-4, atol=1e-5)
    # Only r = policy - ref matters.
    shifted = _kto(dict(policy_logps=policy + 7.0, ref_logps=ref + 7.0, labels=jnp.ones(4, bool), kl=z0))
    np.testing.assert_allclose(shifted, desirable, rtol=1e-4, atol=1e-5)


@settings(max_examples=40, deadline=None)
@given(policy=logps, ref=logps)
def test_apo_zero_unpaired_properties(policy, ref):
    kw = dict(policy_logps=jnp.array(policy), ref_logps=jnp.array(ref))
    good = _apo(dict(**kw, labels=jnp.ones(4, bool)))
    bad = _apo(dict(**kw, labels=jnp.zeros(4, bool)))
    np.testing.assert_allclose(good + bad, 1.0, rtol=1e-6)  # sigmoid(-x) + sigmoid(x) = 1
    # With z0 = 0, KTO's desirable loss is APO-zero's.
    kto_good = _kto(dict(**kw, labels=jnp.ones(4, bool), kl=0.0))
    np.testing.assert_allclose(kto_good, good, rtol=1e-6)
