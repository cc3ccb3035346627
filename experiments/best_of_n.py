"""Best-of-N rejection-sampling fine-tuning (Llama 3 recipe; RAFT; ReST-EM): each round the policy
samples N completions per prompt, the highest-reward one is kept (here only if it is correct:
min_reward=1) and the policy is fine-tuned on the kept completions with the NLL.

  python -m jaxalign.rl --config experiments/best_of_n.py:tiny --config.init_from=runs/sft_demo/hf
  python -m jaxalign.rl --config experiments/best_of_n.py:tiny --config.rl.group_size=16

Variants: tiny.
"""

from jaxalign.rl.config import rl_config


def get_config(arg=None):
    variant = arg or "tiny"
    if variant != "tiny":
        raise ValueError(f"unknown best_of_n variant {variant!r}: tiny")
    c = rl_config("best_of_n")
    c.output_dir = f"runs/best_of_n_{variant}"
    c.reference.mode = "none"
    c.rl.rounds = 3
    c.rl.prompts_per_round = 512
    c.rl.generation_batch = 128
    c.rl.group_size = 8
    c.rl.min_reward = 1.0
    c.rl.epochs = 2
    c.train.batch_size = 32
    c.train.checkpoint_every = 1
    c.optim.learning_rate = 1e-4
    c.optim.warmup_steps = 10
    return c
