"""Any pairwise preference loss by its registry name, with its hyperparameters in config.loss.

  python -m jaxalign.train --config experiments/preference.py:ipo --config.loss.beta=0.5
  python -m jaxalign.train --config experiments/preference.py:simpo --config.loss.gamma=0.5
  python -m jaxalign.train --config experiments/preference.py:orpo
  python -m jaxalign.train --config experiments/preference.py:kto
  python -m jaxalign.train --config experiments/preference.py:bradley_terry   (a reward model)

The argument is any name in `jaxalign.losses.REGISTRY` that trains offline (not the
policy-gradient ones, which live in experiments/grpo.py etc.). Append ',lora' or ',qlora' for the
parameter-efficient variants: experiments/preference.py:ipo,lora
"""

from jaxalign.train.config import base_config
from jaxalign.train.loss_config import loss_config

ONLINE = {"grpo", "rloo", "ppo", "ppo_clip", "value"}


def get_config(arg=None):
    name, *mods = (arg or "dpo").split(",")
    if name in ONLINE:
        raise ValueError(f"{name!r} is an online loss: use its own experiment file")
    c = base_config()
    c.output_dir = f"runs/{name}" + "".join(f"_{m}" for m in mods)
    c.loss = loss_config(name)
    if name in ("kto", "apo_zero_unpaired"):
        c.data.source = "synthetic:kto"
    elif name in ("sft", "nll"):
        c.data.source = "synthetic:sft"
    else:
        c.data.source = "synthetic:preference"
    if name == "bradley_terry":
        c.export.hf_dir = False
    for m in mods:
        if m not in ("lora", "qlora"):
            raise ValueError(f"unknown modifier {m!r} (lora, qlora)")
        c.lora.enabled = True
        c.lora.rank = 16
        c.lora.alpha = 32.0
        c.quant.nf4 = m == "qlora"
        if m == "qlora":
            c.model.init.hidden_size = 128
    return c
