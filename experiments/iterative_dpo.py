"""Iterative DPO (Xiong et al. 2024; Dong et al. 2024): in rounds, the current policy samples
`group_size` completions for a batch of prompts, the best and worst by reward form a pair (ties are
dropped; with the 0/1 exact-answer reward: a correct and an incorrect sample), and DPO trains on
the round's pairs with the round's starting policy as the reference; round k's policy makes round
k+1's pairs.

  python -m jaxalign.rl --config experiments/iterative_dpo.py:tiny --config.init_from=runs/sft_demo/hf
  python -m jaxalign.rl --config experiments/iterative_dpo.py:tiny --config.rl.rounds=5

Variants: tiny (16 rounds of 512 prompts x 8 samples, 4 epochs over each round's ~300 pairs in
minibatches of 32, reference updated every round; with the chosen completions' NLL added,
rpo_alpha=1, as Iterative RPO, Pang et al. 2024, which plain DPO needs on verifiable tasks),
dpo (rpo_alpha=0), fixed_ref (reference stays the initial policy), ranked (up to 4 disjoint
(i-th best, i-th worst) pairs per prompt instead of one).

Tuning on the rl_gains SFT model (experiments/benchmarks/rl_gains.py; held-out greedy accuracy,
SFT 0.230; rounds x epochs): the number of updates on fresh pairs is what matters. 8 x 2: 0.298;
8 x 4: 0.376; 8 x 8: 0.488 (seed 1: 0.496); 16 x 2: 0.346; 12 x 4: 0.490; 16 x 4: 0.542 (seed 1:
0.576); ranked pairs 8 x 4: 0.472, 16 x 4: 0.532; rpo_alpha 0.5 / 2 at 8 x 4: 0.442 / 0.438,
0.5 at 16 x 4: 0.514; beta 0.5 / 0.02 at 8 x 2: 0.240 / 0.326, 0.05 at 8 x 4: 0.390; learning
rate 5e-4 at 8 x 2: 0.304; 16 samples per prompt at 8 x 2: 0.352.
"""

from jaxalign.rl.config import rl_config


def get_config(arg=None):
    variant = arg or "tiny"
    c = rl_config("iterative_dpo")
    c.output_dir = f"runs/iterative_dpo_{variant}"
    c.rl.rounds = 16
    c.rl.prompts_per_round = 512
    c.rl.generation_batch = 128
    c.rl.group_size = 8
    c.rl.epochs = 4
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
    elif variant == "ranked":
        c.rl.pair_selection = "ranked"
    elif variant != "tiny":
        raise ValueError(f"unknown iterative_dpo variant {variant!r}: tiny, dpo, fixed_ref, ranked")
    return c
