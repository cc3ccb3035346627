"""Iterative DPO (Xiong et al. 2024; Dong et al. 2024): in rounds, the current policy samples
`group_size` completions for a batch of prompts, the best and worst by reward form a pair (ties are
dropped), and DPO trains on the round's pairs with the round's starting policy as the reference;
round k's policy makes round k+1's pairs.

  python -m jaxalign.rl --config experiments/iterative_dpo.py:tiny --config.init_from=runs/sft_demo/hf
  python -m jaxalign.rl --config experiments/iterative_dpo.py:tiny --config.rl.rounds=5

Variants: tiny (reference updated every round; with the chosen completions' NLL added, rpo_alpha=1,
as Iterative RPO, Pang et al. 2024, which plain DPO needs on verifiable tasks), dpo (rpo_alpha=0),
fixed_ref (reference stays the initial policy).
"""

from jaxalign.rl.config import rl_config


def get_config(arg=None):
    variant = arg or "tiny"
    c = rl_config("iterative_dpo")
    c.output_dir = f"runs/iterative_dpo_{variant}"
    c.rl.rounds = 8
    c.rl.prompts_per_round = 512
    c.rl.generation_batch = 128
    c.rl.group_size = 8
    c.rl.epochs = 2
    c.rl.ref_update = "round"
    c.train.batch_size = 32
    c.train.checkpoint_every = 1
    c.train.rpo_alpha = 1.0
    c.optim.learning_rate = 2e-4
    c.optim.warmup_steps = 10
    if variant == "fixed_ref":
        c.rl.ref_update = "never"
    elif variant == "dpo":
        c.train.rpo_alpha = 0.0
    elif variant != "tiny":
        raise ValueError(f"unknown iterative_dpo variant {variant!r}: tiny, dpo, fixed_ref")
    return c
