"""RSO (Liu et al. 2023): candidates from the SFT policy are turned into samples of the optimal
policy pi* ∝ pi_sft exp(r / beta) by statistical rejection sampling; accepted samples are paired,
ranked by the reward, and trained with the hinge loss against the SFT reference.

  python -m jaxalign.rl --config experiments/rso.py:tiny --config.init_from=runs/sft_demo/hf
  python -m jaxalign.rl --config experiments/rso.py:tiny --config.rl.rso_beta=0.25
  python -m jaxalign.rl --config experiments/rso.py:dpo

Variants: tiny (hinge loss, as the paper), dpo (sigmoid DPO loss on the RSO pairs).
"""

from jaxalign.rl.config import rl_config
from jaxalign.train.loss_config import loss_config


def get_config(arg=None):
    variant = arg or "tiny"
    c = rl_config("rso")
    c.output_dir = f"runs/rso_{variant}"
    c.rl.rounds = 1
    c.rl.prompts_per_round = 1024
    c.rl.generation_batch = 128
    c.rl.group_size = 8
    c.rl.rso_beta = 0.5
    c.rl.rso_num_samples = 4
    c.rl.epochs = 2
    c.train.batch_size = 32
    c.train.checkpoint_every = 1
    c.optim.learning_rate = 1e-4
    c.optim.warmup_steps = 10
    if variant == "dpo":
        c.loss = loss_config("dpo", beta=0.1)
    elif variant != "tiny":
        raise ValueError(f"unknown rso variant {variant!r}: tiny, dpo")
    return c
