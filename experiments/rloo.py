"""RLOO (Ahmadian et al. 2024): REINFORCE with a leave-one-out baseline, the KL to the reference in
the reward (TRL's RLOOTrainer), on the synthetic arithmetic task.

  python -m jaxalign.rl --config experiments/rloo.py:tiny --config.init_from=runs/sft_demo/hf
  python -m jaxalign.rl --config experiments/rloo.py:tiny --config.loss.beta=0.0 \
      --config.reference.mode=none

Variants: tiny.
"""

from jaxalign.rl.config import rl_config


def get_config(arg=None):
    variant = arg or "tiny"
    if variant != "tiny":
        raise ValueError(f"unknown rloo variant {variant!r}: tiny")
    c = rl_config("rloo")
    c.output_dir = f"runs/rloo_{variant}"
    c.rl.rounds = 60
    c.rl.prompts_per_round = 32
    c.rl.group_size = 8
    c.loss.beta = 0.01
    c.loss.normalize_advantages = True
    c.optim.learning_rate = 1e-4
    c.optim.warmup_steps = 10
    return c
