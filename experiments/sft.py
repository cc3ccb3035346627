"""Supervised fine-tuning (masked NLL on completions).

  python -m jaxalign.train --config experiments/sft.py:tiny
  python -m jaxalign.train --config experiments/sft.py:demo --config.train.steps=300
  python -m jaxalign.train --config experiments/sft.py:lora

Variants: tiny (synthetic arithmetic, random tiny Llama), demo (the README demo's SFT stage: some
demonstrations are wrong), lora, qlora.
"""

from jaxalign.train.config import base_config
from jaxalign.train.loss_config import loss_config


def get_config(arg=None):
    c = base_config()
    variant = arg or "tiny"
    c.output_dir = f"runs/sft_{variant}"
    c.loss = loss_config("sft")
    c.data.source = "synthetic:sft"
    c.reference.mode = "none"
    c.optim.learning_rate = 3e-3
    c.train.steps = 200
    c.train.batch_size = 32
    if variant == "demo":
        # 30% of the demonstrations are wrong in one digit. Greedy decoding learns the majority
        # answer (2400 steps: past the sharp rise in greedy accuracy that 1200 steps sat on, for
        # every seed tried), while sampling imitates the demonstrators, mistakes included.
        c.model.init.update(hidden_size=128, intermediate_size=384, num_hidden_layers=4)
        c.data.num_examples = 8000
        c.data.synthetic.wrong_fraction = 0.3
        c.train.steps = 2400
        c.train.batch_size = 64
        c.train.log_every = 50
        c.optim.warmup_steps = 50
        c.train.eval_every = 0
        c.train.checkpoint_every = 800
        c.eval.task_accuracy = True
        c.eval.sampled_temperature = 1.0
    elif variant in ("lora", "qlora"):
        c.lora.enabled = True
        c.lora.rank = 16
        c.lora.alpha = 32.0
        c.quant.nf4 = variant == "qlora"
    elif variant != "tiny":
        raise ValueError(f"unknown sft variant {variant!r}: tiny, demo, lora, qlora")
    return c
