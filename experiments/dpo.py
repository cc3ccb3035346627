"""Direct Preference Optimization (Rafailov et al., 2023) on (chosen, rejected) pairs.

  python -m jaxalign.train --config experiments/dpo.py:tiny --config.loss.beta=0.05
  python -m jaxalign.train --config experiments/dpo.py:lora
  python -m jaxalign.train --config experiments/dpo.py:qlora
  python -m jaxalign.train --config experiments/dpo.py:precomputed
  python -m jaxalign.train --config experiments/dpo.py:demo --config.init_from=runs/sft_demo/hf

Variants: tiny (full fine-tune, frozen reference model), lora (reference = base without the
adapter), qlora (NF4 base + LoRA), precomputed (reference log-probs computed once and cached),
demo (the README demo's alignment stage).
"""

from jaxalign.train.config import base_config
from jaxalign.train.loss_config import loss_config


def get_config(arg=None):
    c = base_config()
    variant = arg or "tiny"
    c.output_dir = f"runs/dpo_{variant}"
    c.loss = loss_config("dpo", beta=0.1)
    c.data.source = "synthetic:preference"
    c.optim.learning_rate = 1e-3
    c.train.steps = 100
    if variant == "lora":
        c.lora.enabled = True
        c.lora.rank = 16
        c.lora.alpha = 32.0
        c.optim.learning_rate = 3e-3
    elif variant == "qlora":
        c.lora.enabled = True
        c.lora.rank = 16
        c.lora.alpha = 32.0
        c.quant.nf4 = True
        c.optim.learning_rate = 3e-3
        c.model.init.hidden_size = 128  # NF4 blocks of 64 need kernels with >= 64 elements
    elif variant == "precomputed":
        c.reference.mode = "precomputed"
    elif variant == "demo":
        # Starts from the SFT stage's export (--config.init_from), whose samples repeat the
        # demonstrators' mistakes; DPO moves probability from wrong answers to right ones. Pairs
        # differ in one digit, where plain DPO lowers the chosen likelihood too (likelihood
        # displacement) and held-out accuracy falls; the chosen-NLL term of RPO/IRPO (TRL's
        # rpo_alpha) prevents that.
        c.data.num_examples = 2048
        c.train.steps = 400
        c.train.batch_size = 32
        c.train.log_every = 50
        c.train.rpo_alpha = 1.0
        c.train.eval_every = 0
        c.train.checkpoint_every = 200
        c.eval.task_accuracy = True
        c.eval.sampled_temperature = 1.0
    elif variant != "tiny":
        raise ValueError(f"unknown dpo variant {variant!r}: tiny, lora, qlora, precomputed, demo")
    return c
