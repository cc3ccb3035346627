"""PPO with a value head on the policy's hidden states, GAE and a per-token KL penalty to the
reference (the RLHF recipe of Ouyang et al. 2022, as TRL's PPOTrainer), on the synthetic task.

  python -m jaxalign.rl --config experiments/ppo.py:tiny --config.init_from=runs/sft_demo/hf
  python -m jaxalign.rl --config experiments/ppo.py:tiny --config.loss.kl_coef=0.02

Variants: tiny (one completion per prompt, 4 PPO epochs over 4 minibatches per round).
"""

from jaxalign.rl.config import rl_config


def get_config(arg=None):
    variant = arg or "tiny"
    if variant != "tiny":
        raise ValueError(f"unknown ppo variant {variant!r}: tiny")
    c = rl_config("ppo")
    c.output_dir = f"runs/ppo_{variant}"
    c.rl.rounds = 60
    c.rl.prompts_per_round = 128
    c.rl.group_size = 1
    c.rl.epochs = 4
    c.train.batch_size = 32
    c.loss.kl_coef = 0.02
    c.loss.vf_coef = 0.1
    c.optim.learning_rate = 1e-4
    c.optim.warmup_steps = 10
    return c
