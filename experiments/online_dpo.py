"""Online DPO (Guo et al. 2024): each round the current policy samples two completions per prompt,
the reward picks the chosen one, and one DPO update follows; the reference is the initial policy.

  python -m jaxalign.rl --config experiments/online_dpo.py:tiny --config.init_from=runs/sft_demo/hf
  python -m jaxalign.rl --config experiments/online_dpo.py:tiny --config.loss.beta=0.05

Variants: tiny (2 samples per prompt), best_of_4 (best vs worst of 4 samples).
Pairs whose two rewards tie get weight 0.
"""

from jaxalign.rl.config import rl_config


def get_config(arg=None):
    variant = arg or "tiny"
    c = rl_config("online_dpo")
    c.output_dir = f"runs/online_dpo_{variant}"
    c.rl.rounds = 100
    c.rl.prompts_per_round = 64
    c.rl.group_size = 2
    c.optim.learning_rate = 1e-4
    c.optim.warmup_steps = 10
    if variant == "best_of_4":
        c.rl.group_size = 4
    elif variant != "tiny":
        raise ValueError(f"unknown online_dpo variant {variant!r}: tiny, best_of_4")
    return c
