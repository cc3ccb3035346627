"""The shared round loop: minibatching, and a few rounds of every trainer raising the mean reward
of a tiny random policy on a toy reward (the first generated character is a digit)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxalign.losses import dpo_loss, hinge_loss
from jaxalign.rl import trainers
from jaxalign.rl.loop import minibatches, run_rounds, snapshot_policy
from jaxalign.rl.ppo import init_value_head, make_policy_value_fn
from jaxalign.rl.rewards import python_source
from jaxalign.rl.rollout import PromptStream, make_logps_fn
from jaxalign.sample import make_sampler
from jaxalign.train.optim import make_optimizer
from jaxalign.train.step import init_state, make_train_step


def test_minibatches_pad_with_weight_zero_rows():
    rows = {"x": np.arange(10), "weight": np.ones(10, np.float32), "n": np.float32(3)}
    mbs = minibatches(rows, 4, np.random.default_rng(0))
    assert [mb["x"].shape for mb in mbs] == [(4,)] * 3
    assert all(mb["n"] == 3 for mb in mbs)
    live = np.concatenate([mb["x"][mb["weight"] > 0] for mb in mbs])
    assert sorted(live.tolist()) == list(range(10))  # every row once with weight 1
    assert sum((mb["weight"] == 0).sum() for mb in mbs) == 2
    assert minibatches(rows, 0, np.random.default_rng(0))[0] is not rows  # all rows, one batch
    np.testing.assert_array_equal(minibatches(rows, 0, np.random.default_rng(0))[0]["x"], rows["x"])
    with pytest.raises(ValueError, match="no `weight` column"):
        minibatches({"x": np.arange(10)}, 4, np.random.default_rng(0))


def _first_is_digit(completions, **_):
    return [float(c[:1].isdigit()) for c in completions]


@pytest.fixture(scope="module")
def toy(tiny, tokenizer):
    model, params = tiny
    sampler = make_sampler(model, max_new_tokens=3, eos_ids=tokenizer.eos_token_id,
                           pad_id=tokenizer.pad_token_id)
    return model, params, sampler, make_logps_fn(model)


def _run(trainer, toy, tokenizer, prompts, *, rounds, ref_update_check=False, lr=1e-2,
         prompts_per_round=8):
    model, params, sampler, logps_fn = toy
    trainable = {"params": jax.tree.map(jnp.copy, params)}  # the update donates its state
    if trainer.name == "ppo":
        trainable["value"] = init_value_head(model.config.hidden_size)
    opt = make_optimizer(learning_rate_fn=lambda _: lr, clip_norm=1.0)
    state = init_state(trainable, opt, jax.random.PRNGKey(1))
    step = make_train_step(trainer.objective, opt)
    stream = PromptStream(prompts, pad_id=tokenizer.pad_token_id, batch_size=8, seed=0)
    pv = make_policy_value_fn(model) if trainer.name == "ppo" else None
    state, ref, hist = run_rounds(
        trainer, state=state, frozen={}, ref_variables={"params": params}, sample_fn=sampler,
        prompts=stream, prompts_per_round=prompts_per_round, tokenizer=tokenizer,
        sources=[python_source("digit", _first_is_digit)], train_step=step, logps_fn=logps_fn,
        policy_value_fn=pv, rounds=rounds)
    return state, ref, hist


TRAINERS = {
    "grpo": lambda m: trainers.grpo_trainer(m, group_size=4, loss_type="dapo", epsilon_high=0.28),
    "rloo": lambda m: trainers.rloo_trainer(m, group_size=4, beta=0.01),
    "ppo": lambda m: trainers.ppo_trainer(m, eos_id=2, group_size=4, epochs=2, batch_size=16,
                                          kl_coef=0.01),
    "online_dpo": lambda m: trainers.preference_trainer(m, loss_fn=dpo_loss, group_size=4,
                                                        loss_kwargs={"beta": 0.5}),
    "best_of_n": lambda m: trainers.best_of_n_trainer(m, group_size=4, min_reward=1.0,
                                                      batch_size=8, epochs=2),
}


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow)
                                  if n in ("ppo", "rloo", "best_of_n") else n
                                  for n in sorted(TRAINERS)])
def test_a_few_rounds_raise_the_mean_reward(name, toy, tokenizer, prompts):
    trainer = TRAINERS[name](toy[0])
    _, _, hist = _run(trainer, toy, tokenizer, prompts, rounds=12)
    rewards = [h["reward"] for h in hist]
    assert np.mean(rewards[-3:]) > np.mean(rewards[:3]) + 0.15, rewards
    assert all(np.isfinite(h["loss"]) for h in hist if "loss" in h)
    assert {"reward", "reward_std", "frac_reward_zero_std", "entropy",
            "completions/mean_length"} <= set(hist[-1])


@pytest.mark.slow
def test_iterative_dpo_and_rso_rounds(toy, tokenizer, prompts):
    model = toy[0]
    it = trainers.preference_trainer(model, loss_fn=dpo_loss, loss_kwargs={"beta": 0.5},
                                     group_size=4, drop_ties=True, batch_size=8,
                                     ref_update="round", name="iterative_dpo", rpo_alpha=0.5)
    state, ref, hist = _run(it, toy, tokenizer, prompts, rounds=6, prompts_per_round=32)
    rewards = [h["reward"] for h in hist]
    assert np.mean(rewards[-2:]) > np.mean(rewards[:2]) + 0.15, rewards
    # the reference is the policy after the last round (round k's policy judged round k+1)
    jax.tree.map(np.testing.assert_array_equal, ref, snapshot_policy(state["trainable"], {}))
    assert all(h["updates"] == np.ceil(h["pairs/count"] / 8) for h in hist)
    rso = trainers.preference_trainer(model, loss_fn=hinge_loss, loss_kwargs={"beta": 0.5},
                                      group_size=4, pair_selection="rso", drop_ties=True,
                                      rso_num_samples=4, rso_beta=0.5, batch_size=8, name="rso")
    _, ref, hist = _run(rso, toy, tokenizer, prompts, rounds=6, prompts_per_round=32)
    rewards = [h["reward"] for h in hist]
    assert np.mean(rewards[-2:]) > np.mean(rewards[:2]) + 0.15, rewards
    assert ref is not None and "rso/accepted_per_prompt" in hist[0]
