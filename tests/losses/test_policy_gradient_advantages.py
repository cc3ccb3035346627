"""Tests for jaxalign.losses.advantages: GAE, whitening, GRPO group and RLOO advantages."""

import math

import hypothesis.extra.numpy as hnp
import jax
from jax.test_util import check_grads
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from trl.trainer.utils import nanstd

from jaxalign.losses.advantages import gae, group_advantages, rloo_advantages, whiten

SETTINGS = settings(max_examples=25, deadline=None)


# ---------------------------------------------------------------- references


def gae_python(rewards, values, mask, gamma, lam):
    """Plain-Python GAE over the valid tokens of each row (bootstrap 0 after the last one)."""
    b, t = rewards.shape
    adv = np.zeros((b, t))
    for i in range(b):
        idx = [j for j in range(t) if mask[i, j]]
        next_value, next_adv = 0.0, 0.0
        for j in reversed(idx):
            delta = rewards[i, j] + gamma * next_value - values[i, j]
            next_adv = delta + gamma * lam * next_adv
            next_value = values[i, j]
            adv[i, j] = next_adv
    returns = np.where(mask, adv + values, 0.0)
    return adv, returns


def gae_trl_loop(rewards, values, mask, gamma, lam):
    """TRL PPOTrainer's loop (trl/experimental/ppo/ppo_trainer.py), torch, right-padded masks.

    TRL zeroes values (masked_fill) and rewards past the end before the loop; we do the same.
    """
    rewards = torch.tensor(rewards, dtype=torch.float64) * torch.tensor(mask)
    values = torch.tensor(values, dtype=torch.float64) * torch.tensor(mask)
    lastgaelam = 0
    advantages_reversed = []
    gen_length = rewards.shape[1]
    for t in reversed(range(gen_length)):
        nextvalues = values[:, t + 1] if t < gen_length - 1 else 0.0
        delta = rewards[:, t] + gamma * nextvalues - values[:, t]
        lastgaelam = delta + gamma * lam * lastgaelam
        advantages_reversed.append(lastgaelam)
    advantages = torch.stack(advantages_reversed[::-1], axis=1)
    returns = advantages + values
    return advantages.numpy(), returns.numpy()


def trl_masked_whiten(values, mask, shift_mean=True):
    """TRL's masked_mean / masked_var / masked_whiten (trl/experimental/ppo/ppo_trainer.py)."""

    def masked_mean(values, mask):
        return (values * mask).sum() / mask.sum()

    mean = masked_mean(values, mask)
    variance = masked_mean((values - mean) ** 2, mask)
    mask_sum = mask.sum()
    variance = variance * (mask_sum / (mask_sum - 1))
    whitened = (values - mean) * torch.rsqrt(variance + 1e-8)
    if not shift_mean:
        whitened += mean
    return whitened


def trl_group_advantages(rewards, num_generations, scale_rewards):
    """TRL GRPOTrainer._generate_and_score_completions, "sum_then_normalize" branch."""
    rewards = torch.tensor(rewards, dtype=torch.float64)
    mean_grouped = torch.nanmean(rewards.view(-1, num_generations), dim=1)
    mean_grouped = mean_grouped.repeat_interleave(num_generations, dim=0)
    if scale_rewards in ["group", "none"]:
        if num_generations > 1:
            std = nanstd(rewards.view(-1, num_generations), dim=1)
            std = std.repeat_interleave(num_generations, dim=0)
        else:
            std = torch.zeros_like(rewards)
    else:
        std = nanstd(rewards).expand_as(rewards) if rewards.numel() > 1 else torch.zeros_like(rewards)
    advantages = rewards - mean_grouped
    if scale_rewards != "none":
        advantages = advantages / (std + 1e-4)
    return advantages.numpy()


def trl_rloo_advantages(rewards, num_generations, normalize):
    """TRL RLOOTrainer's leave-one-out baseline (no NaN rewards) and optional normalisation."""
    rewards = torch.tensor(rewards, dtype=torch.float64)
    grouped = rewards.view(-1, num_generations)
    counts = (~torch.isnan(grouped)).sum(dim=1, keepdim=True)
    grouped_sum = torch.nansum(grouped, dim=1, keepdim=True)
    baselines = ((grouped_sum - grouped) / (counts - 1)).view(-1)
    advantages = rewards - baselines
    if normalize:
        advantages = (advantages - torch.nanmean(advantages)) / (nanstd(advantages) + 1e-4)
    return advantages.numpy()


def right_padded_mask(lengths, t):
    return (np.arange(t)[None, :] < np.asarray(lengths)[:, None]).astype(np.float32)


@st.composite
def gae_case(draw, right_padded=False):
    b = draw(st.integers(1, 3))
    t = draw(st.integers(1, 6))
    floats = st.floats(-3, 3, width=32)
    rewards = draw(hnp.arrays(np.float32, (b, t), elements=floats))
    values = draw(hnp.arrays(np.float32, (b, t), elements=floats))
    if right_padded:
        mask = right_padded_mask(draw(st.lists(st.integers(0, t), min_size=b, max_size=b)), t)
    else:
        mask = draw(hnp.arrays(np.float32, (b, t), elements=st.sampled_from([0.0, 1.0])))
    gamma = draw(st.sampled_from([1.0, 0.99, 0.5]))
    lam = draw(st.sampled_from([1.0, 0.95, 0.0]))
    return rewards, values, mask, gamma, lam


# ---------------------------------------------------------------- GAE


def test_gae_hand_computed_2x3():
    rewards = jnp.array([[1.0, 0.0, 2.0], [0.0, 1.0, 0.0]])
    values = jnp.array([[0.5, 1.0, 1.5], [1.0, 2.0, 0.0]])
    mask = jnp.array([[1, 1, 1], [1, 1, 0]])
    # gamma = 0.9, lam = 0.5, gamma * lam = 0.45.
    # Row 0: d2 = 2 - 1.5 = 0.5;  d1 = 0 + 0.9 * 1.5 - 1 = 0.35;  d0 = 1 + 0.9 * 1 - 0.5 = 1.4
    #        A2 = 0.5, A1 = 0.35 + 0.45 * 0.5 = 0.575, A0 = 1.4 + 0.45 * 0.575 = 1.65875
    # Row 1 (last token masked, bootstrap 0): d1 = 1 - 2 = -1;  d0 = 0 + 0.9 * 2 - 1 = 0.8
    #        A1 = -1, A0 = 0.8 - 0.45 = 0.35
    adv, ret = jax.jit(lambda r, v, m: gae(rewards=r, values=v, mask=m, gamma=0.9, lam=0.5))(
        rewards, values, mask)
    np.testing.assert_allclose(adv, [[1.65875, 0.575, 0.5], [0.35, -1.0, 0.0]], rtol=1e-6)
    np.testing.assert_allclose(ret, [[2.15875, 1.575, 2.0], [1.35, 1.0, 0.0]], rtol=1e-6)
    assert adv.dtype == jnp.float32


def test_gae_skips_a_masked_hole():
    # valid tokens 0 and 2; token 1 (e.g. tool output) is skipped: V[next of 0] = V[2] = 1.0
    # gamma = 0.5, lam = 1: A2 = 2 - 1 = 1;  d0 = 1 + 0.5 * 1.0 - 0.5 = 1;  A0 = 1 + 0.5 * 1 = 1.5
    adv, ret = gae(rewards=np.array([[1.0, 5.0, 2.0]]), values=np.array([[0.5, 9.0, 1.0]]),
                   mask=np.array([[1, 0, 1]]), gamma=0.5, lam=1.0)
    np.testing.assert_allclose(adv, [[1.5, 0.0, 1.0]], rtol=1e-6)
    np.testing.assert_allclose(ret, [[2.0, 0.0, 2.0]], rtol=1e-6)


def test_gae_lambda_one_gamma_one_is_reward_to_go_minus_value():
    rewards = np.array([[1.0, 2.0, 3.0, 4.0]])
    values = np.array([[0.1, 0.2, 0.3, 0.4]])
    mask = np.array([[1, 1, 1, 0]])
    adv, ret = gae(rewards=rewards, values=values, mask=mask, gamma=1.0, lam=1.0)
    np.testing.assert_allclose(ret, [[6.0, 5.0, 3.0, 0.0]], rtol=1e-6)
    np.testing.assert_allclose(adv, [[5.9, 4.8, 2.7, 0.0]], rtol=1e-6)


@SETTINGS
@given(gae_case())
def test_gae_matches_python_reference_for_any_mask(case):
    rewards, values, mask, gamma, lam = case
    adv, ret = gae(rewards=rewards, values=values, mask=mask, gamma=gamma, lam=lam)
    ref_adv, ref_ret = gae_python(rewards.astype(np.float64), values.astype(np.float64),
                                  mask, gamma, lam)
    np.testing.assert_allclose(adv, ref_adv, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(ret, ref_ret, rtol=1e-5, atol=1e-4)


@SETTINGS
@given(gae_case(right_padded=True))
def test_gae_matches_trl_ppo_loop_for_right_padded_masks(case):
    rewards, values, mask, gamma, lam = case
    adv, ret = gae(rewards=rewards, values=values, mask=mask, gamma=gamma, lam=lam)
    trl_adv, trl_ret = gae_trl_loop(rewards, values, mask, gamma, lam)
    # TRL leaves values past the end in the loop outputs; compare on valid tokens.
    np.testing.assert_allclose(adv, trl_adv * mask, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(ret, trl_ret * mask, rtol=1e-5, atol=1e-4)


def test_gae_left_padding_equals_shifted_right_padding():
    rng = np.random.default_rng(0)
    rewards, values = rng.normal(size=(2, 5)), rng.normal(size=(2, 5))
    right = right_padded_mask([3, 5], 5)
    adv_r, ret_r = gae(rewards=rewards, values=values, mask=right, gamma=0.9, lam=0.8)
    shift = np.array([2, 0])
    roll = lambda x: np.stack([np.roll(x[i], shift[i]) for i in range(2)])  # noqa: E731
    adv_l, ret_l = gae(rewards=roll(rewards), values=roll(values), mask=roll(right),
                       gamma=0.9, lam=0.8)
    np.testing.assert_allclose(adv_l, roll(np.asarray(adv_r)), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(ret_l, roll(np.asarray(ret_r)), rtol=1e-6, atol=1e-6)


def test_gae_masked_garbage_and_fully_masked_rows_are_zero():
    rewards = np.array([[1.0, np.nan], [np.inf, -np.inf]], np.float32)
    values = np.array([[0.5, np.nan], [np.nan, 3.0]], np.float32)
    mask = np.array([[1, 0], [0, 0]])
    adv, ret = gae(rewards=rewards, values=values, mask=mask, gamma=1.0, lam=1.0)
    np.testing.assert_array_equal(adv, [[0.5, 0.0], [0.0, 0.0]])
    np.testing.assert_array_equal(ret, [[1.0, 0.0], [0.0, 0.0]])


def test_gae_jit_vmap_and_gradients():
    rng = np.random.default_rng(1)
    rewards = rng.normal(size=(3, 2, 4)).astype(np.float32)
    values = rng.normal(size=(3, 2, 4)).astype(np.float32)
    mask = (rng.random((3, 2, 4)) > 0.3).astype(np.float32)
    fn = lambda r, v, m: gae(rewards=r, values=v, mask=m, gamma=0.95, lam=0.9)  # noqa: E731
    adv_v, _ = jax.jit(jax.vmap(fn))(rewards, values, mask)
    for i in range(3):
        np.testing.assert_allclose(adv_v[i], fn(rewards[i], values[i], mask[i])[0], rtol=1e-6)
    with jax.enable_x64(True):
        r64, v64 = rewards[0].astype(np.float64), values[0].astype(np.float64)
        loss = lambda r, v: jnp.sum(fn(r, v, mask[0])[0] ** 2)  # noqa: E731
        check_grads(loss, (r64, v64), order=2, modes=["rev"])


def test_gae_rejects_bad_shapes():
    with pytest.raises(ValueError, match="`values`"):
        gae(rewards=np.zeros((2, 3)), values=np.zeros((2, 4)), mask=np.ones((2, 3)))
    with pytest.raises(ValueError, match="`rewards` must have 2 dimensions"):
        gae(rewards=np.zeros(3), values=np.zeros(3), mask=np.ones(3))


# ---------------------------------------------------------------- whiten


@pytest.mark.parametrize("shift_mean", [True, False])
def test_whiten_matches_trl_masked_whiten(shift_mean):
    rng = np.random.default_rng(2)
    x = rng.normal(2.0, 3.0, size=(3, 5))
    mask = right_padded_mask([5, 2, 4], 5)
    out = whiten(x.astype(np.float32), mask, shift_mean=shift_mean)
    ref = trl_masked_whiten(torch.tensor(x), torch.tensor(mask, dtype=torch.float64), shift_mean)
    np.testing.assert_allclose(out, ref.numpy() * mask, rtol=1e-5, atol=1e-5)
    if shift_mean:
        valid = np.asarray(out)[mask == 1]
        assert abs(valid.mean()) < 1e-5
        assert abs(valid.std(ddof=1) - 1.0) < 1e-4


def test_whiten_degenerate_masks_are_finite():
    x = np.array([[1.0, np.nan, 3.0]], np.float32)
    np.testing.assert_array_equal(whiten(x, np.zeros((1, 3))), np.zeros((1, 3)))
    np.testing.assert_array_equal(whiten(x, np.array([[1, 0, 0]])), np.zeros((1, 3)))
    with pytest.raises(ValueError, match="`mask`"):
        whiten(x, np.ones((1, 2)))


# ---------------------------------------------------------------- group advantages


def test_group_advantages_hand_computed():
    rewards = jnp.array([1.0, 2.0, 3.0, 5.0, 5.0, 5.0])
    # group 0: mean 2, unbiased std sqrt(((-1)^2 + 0 + 1^2) / 2) = 1; group 1: mean 5, std 0.
    adv, metrics = group_advantages(rewards=rewards, group_size=3, scale="group")
    np.testing.assert_allclose(adv, [-1 / 1.0001, 0, 1 / 1.0001, 0, 0, 0], rtol=1e-6)
    np.testing.assert_allclose(metrics["reward_mean/group"], [2.0, 5.0])
    np.testing.assert_allclose(metrics["reward_std/group"], [1.0, 0.0])
    assert float(metrics["frac_reward_zero_std"]) == 0.5

    adv, _ = group_advantages(rewards=rewards, group_size=3, scale="none")
    np.testing.assert_allclose(adv, [-1, 0, 1, 0, 0, 0])

    # batch: mean 3.5, squared deviations 6.25 + 2.25 + 0.25 + 3 * 2.25 = 15.5, var 15.5 / 5 = 3.1
    adv, _ = group_advantages(rewards=rewards, group_size=3, scale="batch", eps=0.0)
    np.testing.assert_allclose(adv, np.array([-1, 0, 1, 0, 0, 0]) / math.sqrt(3.1), rtol=1e-6)


@SETTINGS
@given(st.sampled_from([(1, 4), (2, 3), (3, 2), (4, 1)]), st.sampled_from(["group", "batch", "none"]),
       st.data())
def test_group_advantages_match_trl(layout, scale, data):
    num_prompts, group_size = layout
    rewards = data.draw(hnp.arrays(np.float32, (num_prompts * group_size,),
                                   elements=st.sampled_from([0.0, 0.5, 1.0, 2.0, -1.0])))
    adv, metrics = jax.jit(group_advantages, static_argnames=("group_size", "scale"))(
        rewards=rewards, group_size=group_size, scale=scale)
    np.testing.assert_allclose(adv, trl_group_advantages(rewards, group_size, scale),
                               rtol=1e-5, atol=1e-5)
    zero_std = [len(set(g)) == 1 for g in rewards.reshape(num_prompts, group_size).tolist()]
    assert math.isclose(float(metrics["frac_reward_zero_std"]), np.mean(zero_std), abs_tol=1e-7)


def test_group_advantages_validation():
    with pytest.raises(ValueError, match="multiple of `group_size`=4"):
        group_advantages(rewards=jnp.zeros(6), group_size=4)
    with pytest.raises(ValueError, match="`group_size` must be a positive int"):
        group_advantages(rewards=jnp.zeros(6), group_size=0)
    with pytest.raises(ValueError, match=r"`rewards` must have shape \[B\], got shape \(2, 3\)"):
        group_advantages(rewards=jnp.zeros((2, 3)), group_size=3)
    with pytest.raises(ValueError, match="`scale`"):
        group_advantages(rewards=jnp.zeros(6), group_size=3, scale="std")


# ---------------------------------------------------------------- RLOO


def test_rloo_advantages_hand_computed():
    r = jnp.array([1.0, 2.0, 3.0, 6.0])
    np.testing.assert_allclose(rloo_advantages(rewards=r, group_size=2), [-1, 1, -3, 3])
    # group of 4: baselines (12 - r_i) / 3 = 11/3, 10/3, 3, 2
    np.testing.assert_allclose(rloo_advantages(rewards=r, group_size=4),
                               [-8 / 3, -4 / 3, 0.0, 4.0], rtol=1e-6)


@SETTINGS
@given(st.sampled_from([(1, 2), (2, 4), (3, 3)]), st.booleans(), st.data())
def test_rloo_advantages_match_trl_and_scaled_centering(layout, normalize, data):
    num_prompts, k = layout
    rewards = data.draw(hnp.arrays(np.float32, (num_prompts * k,), elements=st.floats(-5, 5, width=32)))
    adv = rloo_advantages(rewards=rewards, group_size=k, normalize=normalize)
    np.testing.assert_allclose(adv, trl_rloo_advantages(rewards, k, normalize), rtol=1e-4, atol=1e-4)
    if not normalize:
        # r_i - mean_{j != i} r_j = k / (k - 1) * (r_i - mean_j r_j)
        g = rewards.astype(np.float64).reshape(num_prompts, k)
        expected = (k / (k - 1) * (g - g.mean(axis=1, keepdims=True))).reshape(-1)
        np.testing.assert_allclose(adv, expected, rtol=1e-4, atol=1e-4)


def test_rloo_advantages_validation():
    with pytest.raises(ValueError, match="`group_size` must be >= 2"):
        rloo_advantages(rewards=jnp.zeros(4), group_size=1)
    with pytest.raises(ValueError, match="multiple of `group_size`=3"):
        rloo_advantages(rewards=jnp.zeros(4), group_size=3)
