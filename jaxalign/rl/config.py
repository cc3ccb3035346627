"""The config schema of online experiments: `jaxalign.train.config.base_config()` plus an `rl`
section, and a `loss` section holding the method's hyperparameters.

`rl` fields:
  trainer            grpo | rloo | ppo | online_dpo | iterative_dpo | rso | best_of_n
  rounds             generate -> score -> update rounds (replaces train.steps)
  prompts_per_round  prompts sampled per round; generation_batch prompts per sampler call (0 = all)
  group_size         completions per prompt (GRPO/RLOO group, DPO candidates, best-of-N's N)
  epochs             passes over a round's rows (TRL's num_iterations / num_ppo_epochs)
  max_new_tokens, temperature, top_k (0 = off), top_p (1 = off)    sampling
  rewards            {'exact_match': w, 'format': w}: built-in verifiable rewards and weights
  reward_model       path (a reward run's output_dir) and weight
  ref_update         never | round (the reference becomes the policy after each round)
  pair_selection     best_worst (one pair per group) | ranked (up to group_size // 2 disjoint
                     pairs per group: i-th best vs i-th worst) | rso;  rso_beta, rso_num_samples
  min_reward         best-of-N keeps a group's best completion only if its reward >= this
  eval_every         held-out task accuracy every this many rounds (0 = before/after only)
`train.batch_size` is rows per update (0 = all rows of the round); `train.checkpoint_every`
counts rounds; `train.rpo_alpha` adds the chosen completions' NLL to a pairwise loss (RPO), as in
offline preference runs. The learning-rate schedule spans an upper bound on the number of updates
(rounds * epochs * minibatches of the largest possible round: one pair per prompt, or
group_size // 2 with pair_selection=ranked).
"""

from __future__ import annotations

import ml_collections as mlc

from jaxalign.train.config import base_config
from jaxalign.train.loss_config import loss_config

TRAINERS = ("grpo", "rloo", "ppo", "online_dpo", "iterative_dpo", "rso", "best_of_n")


def _placeholder(kind):
    return mlc.config_dict.placeholder(kind)


def method_loss(trainer: str) -> mlc.ConfigDict:
    """The `loss` section of a trainer: the hyperparameters of its pure loss."""
    if trainer == "grpo":
        return mlc.ConfigDict(dict(name="grpo", beta=0.0, epsilon_low=0.2,
                                   epsilon_high=_placeholder(float), delta=_placeholder(float),
                                   loss_type="grpo", scale_rewards="group"))
    if trainer == "rloo":
        return mlc.ConfigDict(dict(name="rloo", beta=0.05, epsilon_low=0.2,
                                   epsilon_high=_placeholder(float), normalize_advantages=False))
    if trainer == "ppo":
        return mlc.ConfigDict(dict(name="ppo", epsilon=0.2, clip_range_value=0.2, vf_coef=0.1,
                                   kl_coef=0.05, kl_estimator="k1", gamma=1.0, lam=0.95,
                                   whiten_advantages=True, missing_eos_penalty=0.0))
    if trainer in ("online_dpo", "iterative_dpo"):
        return loss_config("dpo", beta=0.1)
    if trainer == "rso":
        return loss_config("hinge", beta=0.5)
    if trainer == "best_of_n":
        return mlc.ConfigDict(dict(name="sft"))
    raise ValueError(f"unknown trainer {trainer!r}; known: {TRAINERS}")


def rl_config(trainer: str) -> mlc.ConfigDict:
    """base_config() with the `rl` section and `loss` for `trainer`, on the synthetic task."""
    if trainer not in TRAINERS:
        raise ValueError(f"unknown trainer {trainer!r}; known: {TRAINERS}")
    c = base_config()
    del c.train["steps"]  # an online run counts rounds: rl.rounds
    c.output_dir = f"runs/{trainer}"
    c.data.source = "synthetic:prompt"
    c.data.num_examples = 4096
    c.loss = method_loss(trainer)
    c.reference.mode = "auto"  # auto | model | base | none
    c.optim.learning_rate = 1e-4
    c.optim.warmup_steps = 0
    c.optim.schedule = "constant"
    c.train.batch_size = 0
    c.train.log_every = 1
    c.train.checkpoint_every = 10
    c.eval.task_accuracy = True
    c.rl = mlc.ConfigDict(dict(
        trainer=trainer, rounds=50, prompts_per_round=16, generation_batch=0, group_size=8,
        epochs=1, max_new_tokens=6, temperature=1.0, top_k=0, top_p=1.0,
        rewards=mlc.ConfigDict(dict(exact_match=1.0, format=0.0)),
        reward_model=mlc.ConfigDict(dict(path="", weight=0.0)),
        ref_update="never", pair_selection="best_worst", rso_beta=0.5, rso_num_samples=2,
        min_reward=_placeholder(float), eval_every=0, log_kl=True))
    return c
