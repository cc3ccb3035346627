"""The alignment-tax study on the synthetic arithmetic task (jaxalign/analysis/study.py runs it all).

  python -m jaxalign.analysis.study --out runs/tax            # every arm + averaging sweep + plots
  python -m jaxalign.train --config experiments/alignment_tax.py:sft
  python -m jaxalign.train --config experiments/alignment_tax.py:dpo --config.init_from=runs/tax_sft/hf
  python -m jaxalign.train --config experiments/alignment_tax.py:aux_sft --config.init_from=...
  python -m jaxalign.train --config experiments/alignment_tax.py:nspo --config.init_from=...

What is measured (held-out prompts only, greedy exact match, jaxalign/analysis/tax.py):
- capability = accuracy on 2-digit *subtraction*, a skill the SFT stage taught and the alignment
  data never shows (`tax.capability_*`);
- alignment = the mean log-probability margin log pi(correct) - log pi(wrong) on held-out 2-digit
  *addition* pairs (correct answer vs an answer wrong in one digit), the task the preference data
  aligns (`preference/pref_margin`; its change is the mean DPO implicit-reward margin / beta).
  Also recorded: the policy's own preference accuracy on those pairs and greedy accuracy on addition
  (`alignment/accuracy`), which DPO can *lower* (likelihood displacement, see
  notebooks/learning_dynamics.ipynb).
The alignment tax is the drop in capability; the alignment gain the rise in the margin.

Variants:
  sft      a tiny 4-layer Llama learns '+' and '-' from correct demonstrations
  dpo      DPO on '+' pairs from the SFT model (full fine-tuning, frozen reference)
  aux_sft  dpo + lambda_sft * NLL on correct '+'/'-' demonstrations (`aux_sft`, lambda 0.1)
  nspo     dpo with updates projected onto the null space of the subtraction gradients (`nspo`,
           per-matrix rank 8, projecting the optimizer's updates)
  lora     dpo with a LoRA adapter (rank 8); append ',nspo' / ',aux_sft' to combine
Modifiers after a comma combine: 'dpo,aux_sft,nspo'.
"""

import ml_collections as mlc

from jaxalign.train.config import base_config
from jaxalign.train.loss_config import loss_config

CAPABILITY = dict(digits=2, operators="-")
ALIGNMENT = dict(digits=2, operators="+")


def _common(c):
    c.tax.capability_source = "synthetic:sft"
    c.tax.capability_synthetic = mlc.ConfigDict(CAPABILITY)
    c.tax.alignment_source = "synthetic:sft"
    c.tax.alignment_synthetic = mlc.ConfigDict(ALIGNMENT)
    c.tax.preference_source = "synthetic:preference"
    c.tax.alignment_metric = "preference/pref_margin"
    c.tax.num_examples = 256
    c.train.eval_every = 0
    c.train.tensorboard = False
    c.train.checkpoint_every = 1000
    c.export.peft = False


def get_config(arg=None):
    name, *mods = (arg or "dpo").split(",")
    c = base_config()
    _common(c)
    c.output_dir = "runs/tax_" + "_".join([name] + mods)
    if name == "sft":
        c.loss = loss_config("sft")
        c.reference.mode = "none"
        c.data.source = "synthetic:sft"
        c.data.synthetic = mlc.ConfigDict(dict(digits=2, operators="+-", wrong_fraction=0.0))
        c.model.init.num_hidden_layers = 4  # enough layers for layer-wise averaging schedules
        c.data.num_examples = 8192
        c.optim.learning_rate = 3e-3
        c.optim.warmup_steps = 50
        c.train.steps = 1500
        c.train.batch_size = 64
        if mods:
            raise ValueError(f"the sft variant takes no modifiers, got {mods}")
        return c
    if name not in ("dpo", "aux_sft", "nspo", "lora"):
        raise ValueError(f"unknown alignment_tax variant {name!r}: sft, dpo, aux_sft, nspo, lora")
    c.loss = loss_config("dpo", beta=0.1)
    c.data.source = "synthetic:preference"
    c.data.synthetic = mlc.ConfigDict(ALIGNMENT)
    c.data.num_examples = 4096
    c.optim.learning_rate = 1e-4
    c.optim.warmup_steps = 10
    c.train.steps = 300
    c.train.batch_size = 32
    # The auxiliary SFT stream (used when lambda_sft > 0): correct demonstrations of both skills.
    c.aux_sft.source = "synthetic:sft"
    c.aux_sft.synthetic = mlc.ConfigDict(dict(digits=2, operators="+-", wrong_fraction=0.0))
    c.aux_sft.num_examples = 4096
    c.aux_sft.batch_size = 32
    c.nspo.source = "synthetic:sft"
    c.nspo.synthetic = mlc.ConfigDict(dict(CAPABILITY, wrong_fraction=0.0))
    c.nspo.num_batches = 8
    c.nspo.batch_size = 32
    c.nspo.rank = 8
    for m in ([name] if name != "dpo" else []) + mods:
        if m == "aux_sft":
            c.aux_sft.lambda_sft = 0.1
        elif m == "nspo":
            c.nspo.enabled = True
        elif m == "lora":
            c.lora.enabled = True
            c.lora.rank = 8
            c.lora.alpha = 16.0
            c.optim.learning_rate = 3e-3
        else:
            raise ValueError(f"unknown modifier {m!r}: aux_sft, nspo, lora")
    return c
