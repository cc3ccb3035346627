"""GRPO (Shao et al. 2024) on the synthetic arithmetic task, from an SFT model, with the
exact-answer reward.

  python -m jaxalign.train --config experiments/sft.py:demo --config.output_dir=runs/sft_demo
  python -m jaxalign.rl --config experiments/grpo.py:tiny --config.init_from=runs/sft_demo/hf
  python -m jaxalign.rl --config experiments/grpo.py:dapo --config.init_from=runs/sft_demo/hf
  python -m jaxalign.rl --config experiments/grpo.py:dr_grpo --config.init_from=runs/sft_demo/hf
  python -m jaxalign.rl --config experiments/grpo.py:kl --config.loss.beta=0.04
  python -m jaxalign.rl --config experiments/grpo.py:lora --config.init_from=runs/sft_demo/hf

Variants: tiny (TRL's defaults: group-normalised advantages, "grpo" aggregation, symmetric clip),
dapo (clip-higher eps_high=0.28, token-level "dapo" aggregation), dr_grpo (no std scaling,
"dr_grpo" aggregation), kl (k3 KL to the SFT reference, beta=0.04), lora (LoRA adapters; the
reference is the base without them). Without --config.init_from the policy is a random tiny Llama.
"""

from jaxalign.rl.config import rl_config


def get_config(arg=None):
    variant = arg or "tiny"
    c = rl_config("grpo")
    c.output_dir = f"runs/grpo_{variant}"
    c.rl.rounds = 200
    c.rl.prompts_per_round = 64
    c.rl.group_size = 8
    c.optim.learning_rate = 2e-4  # see experiments/benchmarks/rl_gains.py
    c.optim.warmup_steps = 10
    c.reference.mode = "none"  # beta = 0: no reference needed (kl is then not logged)
    if variant == "dapo":
        c.loss.epsilon_high = 0.28
        c.loss.loss_type = "dapo"
    elif variant == "dr_grpo":
        c.loss.scale_rewards = "none"
        c.loss.loss_type = "dr_grpo"
    elif variant == "kl":
        c.reference.mode = "auto"
        c.loss.beta = 0.04
    elif variant == "lora":
        c.lora.enabled = True
        c.lora.rank = 16
        c.lora.alpha = 32.0
        c.optim.learning_rate = 1e-3
    elif variant != "tiny":
        raise ValueError(f"unknown grpo variant {variant!r}: tiny, dapo, dr_grpo, kl, lora")
    return c
