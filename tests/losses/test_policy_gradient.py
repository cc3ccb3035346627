"""Tests for jaxalign.losses.policy_gradient: PPO clip, aggregation, value loss, GRPO/RLOO/PPO.

The GRPO and RLOO objectives are checked against TRL itself: the installed
``GRPOTrainer._compute_loss`` / ``RLOOTrainer._compute_loss`` are called on a stand-in ``self``
whose log-prob function returns our per-token log-probs, so the comparison runs TRL's own code
(values, metrics and gradients). TRL's PPO trainer is not in the installed package (it moved to
trl.experimental upstream), so its loss lines are reproduced verbatim below.
"""

import math
import types
from collections import defaultdict

import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.test_util import check_grads
from trl.trainer.grpo_trainer import GRPOTrainer
from trl.trainer.rloo_trainer import RLOOTrainer

from jaxalign.losses.policy_gradient import (
    LOSSES,
    aggregate_token_losses,
    grpo_loss,
    ppo_clip_loss,
    ppo_loss,
    rloo_loss,
    value_loss,
)

# ---------------------------------------------------------------- TRL oracles


class _Accelerator:
    num_processes = 1

    @staticmethod
    def reduce(x, reduction="sum"):
        return x

    @staticmethod
    def gather(x):
        return x

    gather_for_metrics = gather


def _trl_self(per_token_logps, **attrs):
    """A stand-in ``self`` for TRL's ``_compute_loss``: one process, no accumulation, train mode."""

    def get_logps(model, *args, **kwargs):
        return per_token_logps, torch.zeros_like(per_token_logps), None

    fake = types.SimpleNamespace(
        _get_per_token_logps_and_entropies=get_logps,
        accelerator=_Accelerator(),
        model=types.SimpleNamespace(training=True),
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        current_gradient_accumulation_steps=1,
        aux_loss_enabled=False,
        _entropy_bonus_enabled=False,
        top_entropy_quantile=1.0,
        off_policy_mask_threshold=None,
        importance_sampling_level="token",
        use_vllm=False,
        vllm_importance_sampling_correction=False,
    )
    for key, value in attrs.items():
        setattr(fake, key, value)
    return fake


def trl_grpo(logps, old_logps, ref_logps, advantages, mask, *, beta, epsilon_low, epsilon_high,
             delta, loss_type, max_completion_length, num_items_in_batch):
    """Runs TRL's GRPOTrainer._compute_loss; returns (loss, metrics, d loss / d logps)."""
    per_token_logps = torch.tensor(logps, dtype=torch.float64, requires_grad=True)
    b, t = mask.shape
    fake = _trl_self(
        per_token_logps, beta=beta, epsilon_low=epsilon_low, epsilon_high=epsilon_high,
        loss_type=loss_type, max_completion_length=max_completion_length,
        args=types.SimpleNamespace(delta=delta, use_bias_correction_kl=False, steps_per_generation=1),
    )
    inputs = {
        "prompt_ids": torch.zeros((b, 1), dtype=torch.long),
        "prompt_mask": torch.ones((b, 1), dtype=torch.long),
        "completion_ids": torch.zeros((b, t), dtype=torch.long),
        "completion_mask": torch.tensor(mask, dtype=torch.long),
        "advantages": torch.tensor(advantages, dtype=torch.float64),
        "old_per_token_logps": torch.tensor(old_logps, dtype=torch.float64),
        "ref_per_token_logps": torch.tensor(ref_logps, dtype=torch.float64),
        "num_items_in_batch": torch.tensor(float(num_items_in_batch)),
    }
    loss = GRPOTrainer._compute_loss(fake, None, inputs)
    loss.backward()
    metrics = {k: v[-1] for k, v in fake._metrics["train"].items()}
    return loss.item(), metrics, per_token_logps.grad.numpy()


def trl_rloo(logps, old_logps, advantages, mask, *, epsilon_low, epsilon_high):
    """Runs TRL's RLOOTrainer._compute_loss; returns (loss, metrics, d loss / d logps)."""
    per_token_logps = torch.tensor(logps, dtype=torch.float64, requires_grad=True)
    b, t = mask.shape
    fake = _trl_self(per_token_logps, epsilon_low=epsilon_low, epsilon_high=epsilon_high)
    completion_mask = torch.tensor(mask, dtype=torch.long)
    inputs = {
        "prompt_ids": torch.zeros((b, 1), dtype=torch.long),
        "prompt_mask": torch.ones((b, 1), dtype=torch.long),
        "completion_ids": torch.zeros((b, t), dtype=torch.long),
        "completion_mask": completion_mask,
        "advantages": torch.tensor(advantages, dtype=torch.float64),
        # TRL's _generate_and_score_completions stores the masked sum.
        "old_logps": (torch.tensor(old_logps, dtype=torch.float64) * completion_mask).sum(1),
    }
    loss = RLOOTrainer._compute_loss(fake, None, inputs)
    loss.backward()
    metrics = {k: v[-1] for k, v in fake._metrics["train"].items()}
    return loss.item(), metrics, per_token_logps.grad.numpy()


def trl_ppo(new_logprobs, mb_logprobs, mb_advantage, vpred, mb_values, mb_return, mask, *,
            cliprange, cliprange_value, vf_coef):
    """TRL PPOTrainer's loss lines (trl/experimental/ppo/ppo_trainer.py), one mask for both terms."""
    t = lambda x: torch.tensor(x, dtype=torch.float64)  # noqa: E731
    mask = t(mask)

    def masked_mean(values, mask):
        return (values * mask).sum() / mask.sum()

    new_logprobs, mb_logprobs, mb_advantage = t(new_logprobs), t(mb_logprobs), t(mb_advantage)
    vpred, mb_values, mb_return = t(vpred), t(mb_values), t(mb_return)
    vpredclipped = torch.clamp(vpred, mb_values - cliprange_value, mb_values + cliprange_value)
    vf_losses1 = torch.square(vpred - mb_return)
    vf_losses2 = torch.square(vpredclipped - mb_return)
    vf_loss_max = torch.max(vf_losses1, vf_losses2)
    vf_loss = 0.5 * masked_mean(vf_loss_max, mask)
    vf_clipfrac = masked_mean((vf_losses2 > vf_losses1).float(), mask)
    logprobs_diff = new_logprobs - mb_logprobs
    ratio = torch.exp(logprobs_diff)
    pg_losses = -mb_advantage * ratio
    pg_losses2 = -mb_advantage * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    pg_loss_max = torch.max(pg_losses, pg_losses2)
    pg_loss = masked_mean(pg_loss_max, mask)
    loss = pg_loss + vf_coef * vf_loss
    pg_clipfrac = masked_mean((pg_losses2 > pg_losses).float(), mask)
    return loss.item(), {"loss/policy": pg_loss.item(), "loss/value": vf_loss.item(),
                         "policy/clipfrac": pg_clipfrac.item(), "val/clipfrac": vf_clipfrac.item()}


def random_batch(seed, b=4, t=6, lengths=None, spread=0.3):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, t + 1, size=b) if lengths is None else np.asarray(lengths)
    mask = (np.arange(t)[None] < lengths[:, None]).astype(np.int64)
    old = rng.normal(-1.5, 0.5, size=(b, t))
    logps = old + rng.normal(0.0, spread, size=(b, t))
    ref = old + rng.normal(0.0, spread, size=(b, t))
    advantages = rng.normal(size=b)
    return logps, old, ref, advantages, mask


def jax_grpo(logps, old, ref, advantages, mask, **kw):
    f32 = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731

    def fn(lp):
        return grpo_loss(logps=lp, old_logps=f32(old), ref_logps=f32(ref),
                         advantages=f32(advantages), mask=mask, **kw)

    (loss, metrics), grad = jax.jit(jax.value_and_grad(fn, has_aux=True))(f32(logps))
    return float(loss), {k: float(v) for k, v in metrics.items()}, np.asarray(grad)


# ---------------------------------------------------------------- ppo_clip_loss


def _clip_case(ratios, advantages):
    logps = jnp.log(jnp.array([ratios], jnp.float32))
    return dict(logps=logps, old_logps=jnp.zeros_like(logps),
                advantages=jnp.array([advantages], jnp.float32), mask=jnp.ones_like(logps))


def test_ppo_clip_hand_computed_asymmetric():
    # eps_low = 0.2, eps_high = 0.28: the unclipped interval is [0.8, 1.28].
    ratios = [1.1, 1.5, 0.5, 0.5, 1.5, 0.9, 1.28]
    advs = [1.0, 1.0, 1.0, -1.0, -1.0, -2.0, 1.0]
    # A > 0: -min(r, clip(r)) A:  1.1 -> -1.1;  1.5 -> -1.28 (clipped high);  0.5 -> -0.5 (the
    #        unclipped term is smaller, no clip);  1.28 -> -1.28 (boundary, not clipped)
    # A < 0: -min(r A, clip(r) A) = max(r, clip(r)) |A|:  0.5 -> 0.8 (clipped low);
    #        1.5 -> 1.5 (unbounded without delta);  0.9 -> 1.8
    expected = [-1.1, -1.28, -0.5, 0.8, 1.5, 1.8, -1.28]
    losses, m = jax.jit(lambda c: ppo_clip_loss(**c, epsilon_low=0.2, epsilon_high=0.28))(
        _clip_case(ratios, advs))
    np.testing.assert_allclose(losses[0], expected, rtol=1e-6)
    np.testing.assert_array_equal(m["clip_ratio/high"][0], [0, 1, 0, 0, 0, 0, 0])
    np.testing.assert_array_equal(m["clip_ratio/low"][0], [0, 0, 0, 1, 0, 0, 0])
    np.testing.assert_array_equal(m["clip_ratio/region"][0], [0, 1, 0, 1, 0, 0, 0])
    np.testing.assert_allclose(m["ratio"][0], ratios, rtol=1e-6)


def test_ppo_clip_dual_clip_delta_bounds_negative_advantage_loss():
    case = _clip_case([1.5, 3.0, 0.5, 3.0], [-1.0, -1.0, -1.0, 1.0])
    losses, m = ppo_clip_loss(**case, epsilon_low=0.2, delta=2.0)
    # A < 0: max(min(r, 2), clip(r)) |A|: 1.5 -> 1.5, 3.0 -> 2.0, 0.5 -> 0.8; A > 0: r clipped at 1.2
    np.testing.assert_allclose(losses[0], [1.5, 2.0, 0.8, -1.2], rtol=1e-6)
    np.testing.assert_array_equal(m["clip_ratio/high"][0], [0, 0, 0, 1])


def test_ppo_clip_gradient_is_zero_where_clipped():
    case = _clip_case([1.1, 1.5, 0.5, 0.5, 0.9], [2.0, 1.0, 1.0, -1.0, -3.0])
    grad = jax.grad(lambda lp: jnp.sum(ppo_clip_loss(**{**case, "logps": lp}, epsilon_low=0.2)[0]))(
        case["logps"])
    # d(-r A)/d logp = -r A where the unclipped term is active, 0 where the clip is active
    np.testing.assert_allclose(grad[0], [-2.2, 0.0, -0.5, 0.0, 2.7], rtol=1e-6)


def test_ppo_clip_sequence_advantages_broadcast_and_old_logps_default():
    logps, old, _, adv, mask = random_batch(0)
    seq, _ = ppo_clip_loss(logps=logps, old_logps=old, advantages=adv, mask=mask)
    tok, _ = ppo_clip_loss(logps=logps, old_logps=old, advantages=np.repeat(adv[:, None], 6, 1),
                           mask=mask)
    np.testing.assert_allclose(seq, tok, rtol=1e-6)
    # old_logps=None: ratio 1, loss -A, gradient -A (the vanilla policy gradient)
    fn = lambda lp: ppo_clip_loss(logps=lp, advantages=adv, mask=mask)[0]  # noqa: E731
    np.testing.assert_allclose(fn(logps), -adv[:, None] * mask, rtol=1e-6)
    grad = jax.grad(lambda lp: jnp.sum(fn(lp)))(jnp.asarray(logps, jnp.float32))
    np.testing.assert_allclose(grad, -adv[:, None] * mask, rtol=1e-6)


@settings(max_examples=40, deadline=None)
@given(hnp.arrays(np.float32, (3, 4), elements=st.floats(-2, 2, width=32)),
       hnp.arrays(np.float32, (3, 4), elements=st.floats(-3, 3, width=32)),
       st.sampled_from([(0.2, 0.2), (0.2, 0.28), (0.1, 0.5)]))
def test_ppo_clip_is_pessimistic_bound(log_ratio, advantages, eps):
    eps_low, eps_high = eps
    losses, _ = ppo_clip_loss(logps=log_ratio, old_logps=np.zeros_like(log_ratio),
                              advantages=advantages, mask=np.ones_like(log_ratio),
                              epsilon_low=eps_low, epsilon_high=eps_high)
    ratio = np.exp(log_ratio.astype(np.float64))
    unclipped = -ratio * advantages
    clipped = -np.clip(ratio, 1 - eps_low, 1 + eps_high) * advantages
    losses = np.asarray(losses)
    tol = 1e-5 * (1 + np.abs(unclipped))
    assert np.all(losses >= unclipped - tol) and np.all(losses >= clipped - tol)
    np.testing.assert_allclose(losses, np.maximum(unclipped, clipped), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- aggregation


def test_aggregation_modes_hand_computed():
    losses = jnp.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    mask = jnp.array([[1, 1, 0], [1, 0, 0]])  # masked sum 7 over 3 tokens
    agg = lambda **kw: float(aggregate_token_losses(losses, mask, **kw))  # noqa: E731
    assert math.isclose(agg(mode="grpo"), (1.5 + 4.0) / 2, rel_tol=1e-6)
    assert math.isclose(agg(mode="bnpo"), 7 / 3, rel_tol=1e-6)
    assert math.isclose(agg(mode="dr_grpo", max_completion_length=4), 7 / 8, rel_tol=1e-6)
    assert math.isclose(agg(mode="dr_grpo"), 7 / 6, rel_tol=1e-6)
    assert math.isclose(agg(mode="dapo", num_items_in_batch=10), 0.7, rel_tol=1e-6)
    assert math.isclose(agg(mode="dapo"), 7 / 3, rel_tol=1e-6)


def test_aggregation_fully_masked_rows_and_garbage():
    losses = jnp.array([[1.0, jnp.nan], [jnp.inf, -jnp.inf]])
    mask = jnp.array([[1, 0], [0, 0]])
    expected = {"grpo": 0.5, "bnpo": 1.0, "dr_grpo": 0.25, "dapo": 1.0}
    for mode, value in expected.items():
        assert float(aggregate_token_losses(losses, mask, mode=mode)) == value
        assert float(aggregate_token_losses(losses, jnp.zeros_like(mask), mode=mode)) == 0.0


def test_aggregation_validation():
    with pytest.raises(ValueError, match="`mode` must be one of"):
        aggregate_token_losses(jnp.zeros((2, 3)), jnp.ones((2, 3)), mode="mean")
    with pytest.raises(ValueError, match="`mask` has shape"):
        aggregate_token_losses(jnp.zeros((2, 3)), jnp.ones((2, 4)), mode="grpo")
    with pytest.raises(ValueError, match="`max_completion_length` must be > 0"):
        aggregate_token_losses(jnp.zeros((2, 3)), jnp.ones((2, 3)), mode="dr_grpo",
                               max_completion_length=0)


# ---------------------------------------------------------------- value loss


def test_value_loss_hand_computed():
    values = jnp.array([[1.5, 0.9, 0.0]])
    old = jnp.array([[1.0, 1.0, 0.0]])
    returns = jnp.array([[2.0, 0.0, 5.0]])
    mask = jnp.array([[1, 1, 0]])
    # token 0: v_clip = 1.2, (1.5-2)^2 = 0.25 < (1.2-2)^2 = 0.64 -> 0.32, clipped term active
    # token 1: v within [0.8, 1.2], 0.5 * 0.81 = 0.405
    losses, m = value_loss(values=values, old_values=old, returns=returns, mask=mask)
    np.testing.assert_allclose(losses, [[0.32, 0.405, 0.0]], rtol=1e-6)
    np.testing.assert_array_equal(m["vf_clipfrac"], [[1.0, 0.0, 0.0]])
    unclipped, _ = value_loss(values=values, old_values=old, returns=returns, mask=mask,
                              clip_range_value=None)
    np.testing.assert_allclose(unclipped, [[0.125, 0.405, 0.0]], rtol=1e-6)


# ---------------------------------------------------------------- GRPO vs TRL


GRPO_CASES = [
    dict(loss_type="grpo", beta=0.0, epsilon_low=0.2, epsilon_high=0.2, delta=None),
    dict(loss_type="grpo", beta=0.04, epsilon_low=0.2, epsilon_high=0.28, delta=None),
    dict(loss_type="bnpo", beta=0.1, epsilon_low=0.1, epsilon_high=0.1, delta=None),
    dict(loss_type="dr_grpo", beta=0.04, epsilon_low=0.2, epsilon_high=0.28, delta=None),
    dict(loss_type="dapo", beta=0.0, epsilon_low=0.2, epsilon_high=0.28, delta=1.5),
    dict(loss_type="dapo", beta=0.04, epsilon_low=0.2, epsilon_high=0.2, delta=1.3),
]


@pytest.mark.parametrize("case", GRPO_CASES, ids=lambda c: f"{c['loss_type']}-b{c['beta']}")
@pytest.mark.parametrize("seed", [0, 1])
def test_grpo_loss_matches_trl_compute_loss(case, seed):
    logps, old, ref, adv, mask = random_batch(seed, spread=0.4)
    n_items = int(mask.sum()) + 5  # a "global" count that differs from the local one
    kw = dict(max_completion_length=8, num_items_in_batch=n_items, **case)
    trl_loss, trl_metrics, trl_grad = trl_grpo(logps, old, ref, adv, mask, **kw)
    loss, metrics, grad = jax_grpo(logps, old, ref, adv, mask, **kw)
    assert math.isclose(loss, trl_loss, rel_tol=1e-5, abs_tol=1e-6)
    np.testing.assert_allclose(grad, trl_grad, rtol=1e-4, atol=1e-6)
    for name in ("clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean",
                 "clip_ratio/low_min", "clip_ratio/high_max"):
        assert math.isclose(metrics[name], trl_metrics[name], abs_tol=1e-6), name
    if case["beta"] != 0.0:
        assert math.isclose(metrics["kl"], trl_metrics["kl"], rel_tol=1e-4, abs_tol=1e-7)
    # this batch really exercises the clip in both directions
    if seed == 0 and case["epsilon_low"] == 0.1:
        assert trl_metrics["clip_ratio/low_mean"] > 0 and trl_metrics["clip_ratio/high_mean"] > 0


def test_grpo_loss_matches_trl_with_a_fully_masked_row():
    logps, old, ref, adv, mask = random_batch(3, lengths=[3, 0, 6, 1])
    kw = dict(loss_type="grpo", beta=0.04, epsilon_low=0.2, epsilon_high=0.2, delta=None,
              max_completion_length=6, num_items_in_batch=int(mask.sum()))
    trl_loss, trl_metrics, trl_grad = trl_grpo(logps, old, ref, adv, mask, **kw)
    loss, metrics, grad = jax_grpo(logps, old, ref, adv, mask, **kw)
    assert math.isclose(loss, trl_loss, rel_tol=1e-5)
    np.testing.assert_allclose(grad, trl_grad, rtol=1e-4, atol=1e-6)
    assert math.isclose(metrics["clip_ratio/low_min"], trl_metrics["clip_ratio/low_min"], abs_tol=1e-7)


def test_grpo_clip_min_max_metrics_skip_fully_masked_rows():
    # ratios per token; eps = 0.2. Row 0: A < 0, low-clipped tokens 2 of 3 valid -> 2/3.
    # Row 1: fully masked. Row 2: A < 0, 1 of 2 valid low-clipped -> 1/2; A > 0 in row 3:
    # 1 of 4 high-clipped -> 1/4. low_min = min(2/3, 1/2, 0) over non-empty rows = 0 (row 3).
    ratios = np.array([[0.5, 0.7, 1.0, 0.1], [0.1, 0.1, 0.1, 0.1],
                       [0.5, 0.9, 0.1, 0.1], [1.5, 1.0, 1.1, 0.9]])
    mask = np.array([[1, 1, 1, 0], [0, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 1]])
    adv = np.array([-1.0, -1.0, -1.0, 2.0])
    logps, old = np.log(ratios), np.zeros_like(ratios)
    kw = dict(loss_type="grpo", beta=0.0, epsilon_low=0.2, epsilon_high=0.2, delta=None,
              max_completion_length=4, num_items_in_batch=int(mask.sum()))
    _, metrics, _ = jax_grpo(logps, old, old, adv, mask, **kw)
    _, trl_metrics, _ = trl_grpo(logps, old, old, adv, mask, **kw)
    assert metrics["clip_ratio/low_min"] == 0.0 and metrics["clip_ratio/high_max"] == 0.25
    assert math.isclose(metrics["clip_ratio/low_mean"], 3 / 9, rel_tol=1e-6)
    # without row 3 the minimum over non-empty rows is row 2's 1/2 (the masked row is skipped)
    keep = [0, 1, 2]
    _, metrics, _ = jax_grpo(logps[keep], old[keep], old[keep], adv[keep], mask[keep], **kw)
    _, trl_metrics3, _ = trl_grpo(logps[keep], old[keep], old[keep], adv[keep], mask[keep], **kw)
    assert math.isclose(metrics["clip_ratio/low_min"], 0.5, rel_tol=1e-6)
    for name in ("clip_ratio/low_min", "clip_ratio/high_max"):
        assert math.isclose(trl_metrics[name], (0.0 if name.endswith("min") else 0.25))
        assert math.isclose(trl_metrics3[name], metrics[name], abs_tol=1e-7), name


def test_grpo_loss_masked_garbage_gives_finite_loss_and_grads():
    logps, old, ref, adv, mask = random_batch(4, lengths=[2, 0, 6, 3])
    kw = dict(advantages=adv, mask=mask, beta=0.1, epsilon_high=0.28, loss_type="bnpo")
    clean = grpo_loss(logps=logps, old_logps=old, ref_logps=ref, **kw)[0]
    pad = mask == 0
    dirty = lambda x, v: np.where(pad, v, x)  # noqa: E731
    fn = lambda lp: grpo_loss(logps=lp, old_logps=dirty(old, np.inf), ref_logps=dirty(ref, np.nan),  # noqa: E731
                              **kw)[0]
    loss, grad = jax.value_and_grad(fn)(jnp.asarray(dirty(logps, -np.inf), jnp.float32))
    assert float(loss) == pytest.approx(float(clean), rel=1e-6)
    assert np.all(np.isfinite(grad)) and np.all(np.asarray(grad)[pad] == 0)
    none, metrics = grpo_loss(logps=logps, old_logps=old, ref_logps=ref, advantages=adv,
                              mask=np.zeros_like(mask), beta=0.1)
    assert float(none) == 0.0 and all(np.isfinite(float(v)) for v in metrics.values())


def test_grpo_loss_check_grads_and_vmap():
    logps, old, ref, adv, mask = random_batch(5, spread=0.05)  # ratios far from the clip edges
    with jax.enable_x64(True):
        for loss_type in ("grpo", "dr_grpo"):
            fn = lambda lp, rp: grpo_loss(logps=lp, old_logps=old, ref_logps=rp, advantages=adv,  # noqa: E731
                                          mask=mask, beta=0.05, loss_type=loss_type)[0]
            check_grads(fn, (logps, ref), order=2, modes=["rev"])
    stack = lambda x: np.stack([x, x[::-1]])  # noqa: E731
    batched = jax.vmap(lambda lp, o, r, a, m: grpo_loss(logps=lp, old_logps=o, ref_logps=r,
                                                        advantages=a, mask=m, beta=0.05)[0])
    out = batched(*(stack(x) for x in (logps, old, ref, adv, mask)))
    single = grpo_loss(logps=logps[::-1], old_logps=old[::-1], ref_logps=ref[::-1],
                       advantages=adv[::-1], mask=mask[::-1], beta=0.05)[0]
    np.testing.assert_allclose(out[1], single, rtol=1e-6)


def test_grpo_loss_validation():
    logps, old, ref, adv, mask = random_batch(6)
    with pytest.raises(ValueError, match="`ref_logps` is required"):
        grpo_loss(logps=logps, advantages=adv, mask=mask, beta=0.1)
    with pytest.raises(ValueError, match=r"`advantages` must have shape \[B\]=\(4,\)"):
        grpo_loss(logps=logps, advantages=adv[:3], mask=mask)
    with pytest.raises(ValueError, match="`old_logps` has shape"):
        grpo_loss(logps=logps, old_logps=old[:, :3], advantages=adv, mask=mask)
    with pytest.raises(ValueError, match="`logps` must have 2 dimensions"):
        grpo_loss(logps=logps[0], advantages=adv, mask=mask[0])
    with pytest.raises(ValueError, match="`ref_logps` has shape"):
        grpo_loss(logps=logps, ref_logps=ref[:2], advantages=adv, mask=mask, beta=0.1)
    with pytest.raises(ValueError, match="`loss_type` must be one of"):
        grpo_loss(logps=logps, advantages=adv, mask=mask, loss_type="sapo")
    with pytest.raises(ValueError, match="`epsilon_high` must be >= 0"):
        grpo_loss(logps=logps, advantages=adv, mask=mask, epsilon_high=-0.1)


# ---------------------------------------------------------------- RLOO and PPO vs TRL


@pytest.mark.parametrize("eps", [(0.2, 0.2), (0.05, 0.3)])
def test_rloo_loss_matches_trl_compute_loss(eps):
    logps, old, _, adv, mask = random_batch(7, b=6, spread=0.2)
    trl_loss, trl_metrics, trl_grad = trl_rloo(logps, old, adv, mask, epsilon_low=eps[0],
                                               epsilon_high=eps[1])
    fn = lambda lp: rloo_loss(logps=lp, old_logps=old, advantages=adv, mask=mask,  # noqa: E731
                              epsilon_low=eps[0], epsilon_high=eps[1])
    (loss, metrics), grad = jax.value_and_grad(fn, has_aux=True)(jnp.asarray(logps, jnp.float32))
    assert math.isclose(float(loss), trl_loss, rel_tol=1e-5, abs_tol=1e-6)
    np.testing.assert_allclose(grad, trl_grad, rtol=1e-4, atol=1e-6)
    for name in ("clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean"):
        assert math.isclose(float(metrics[name]), trl_metrics[name], abs_tol=1e-7), name
    if eps == (0.05, 0.3):
        assert 0 < trl_metrics["clip_ratio/region_mean"] < 1


@pytest.mark.parametrize("seed", [0, 1])
def test_ppo_loss_matches_trl_ppo_trainer(seed):
    logps, old, _, _, mask = random_batch(seed, spread=0.3)
    rng = np.random.default_rng(100 + seed)
    adv = rng.normal(size=mask.shape)
    old_values = rng.normal(size=mask.shape)
    values = old_values + rng.normal(0.0, 0.3, size=mask.shape)
    returns = rng.normal(size=mask.shape)
    trl_loss, trl_metrics = trl_ppo(logps, old, adv, values, old_values, returns, mask,
                                    cliprange=0.2, cliprange_value=0.2, vf_coef=0.1)
    loss, metrics = jax.jit(lambda *a: ppo_loss(
        logps=a[0], old_logps=a[1], advantages=a[2], values=a[3], old_values=a[4], returns=a[5],
        mask=a[6], epsilon=0.2, clip_range_value=0.2, vf_coef=0.1))(
            *(jnp.asarray(x, jnp.float32) for x in (logps, old, adv, values, old_values, returns)),
            mask)
    assert math.isclose(float(loss), trl_loss, rel_tol=1e-5, abs_tol=1e-6)
    for name, value in trl_metrics.items():
        assert math.isclose(float(metrics[name]), value, rel_tol=1e-5, abs_tol=1e-6), name
    log_ratio = (logps - old)[mask == 1]
    assert math.isclose(float(metrics["policy/approxkl"]), 0.5 * np.mean(log_ratio ** 2), rel_tol=1e-4)


def test_registry():
    assert LOSSES["grpo"] is grpo_loss and LOSSES["ppo_clip"] is ppo_clip_loss
    assert LOSSES["rloo"] is rloo_loss and LOSSES["ppo"] is ppo_loss
    assert LOSSES["value"] is value_loss
