"""What a finished run leaves behind for other tools: a Hugging Face directory and a PEFT adapter.

One function serves the offline runner (`jaxalign.train.run`) and the online one (`jaxalign.rl.run`).
"""

from __future__ import annotations

import os
from typing import Any

import jax.numpy as jnp

from jaxalign.models import save_pretrained


def export_run(out_dir: str, *, model, variables: dict[str, Any], tokenizer, spec=None,
               hf_dir: bool = True, peft: bool = False) -> dict[str, str]:
    """Writes `out_dir/hf` (and `out_dir/adapter`) for the trained `variables`.

    hf: the full model as `transformers.AutoModelForCausalLM` reads it, with the tokenizer. LoRA
      adapters are merged into the base first (NF4 base kernels are dequantized to fp32 before the
      merge, since `W + s A B` is not NF4).
    adapter: with a LoRA `spec` and `peft=True`, the adapter alone in PEFT's format.
    Returns the written paths: {'hf_dir': ..., 'peft_dir': ...} (only those written).
    """
    lora = spec is not None and "lora" in variables
    export: dict[str, str] = {}
    if hf_dir:
        export["hf_dir"] = os.path.join(out_dir, "hf")
        params = variables["params"]
        if lora:
            from jaxalign.peft import merge_lora
            from jaxalign.quant import dequantize_params

            params = merge_lora(dequantize_params(params, jnp.float32), variables["lora"], spec)
        save_pretrained(model.clone(lora=None), params, export["hf_dir"])
        tokenizer.save_pretrained(export["hf_dir"])
    if lora and peft:
        from jaxalign.peft import save_peft_adapter

        export["peft_dir"] = os.path.join(out_dir, "adapter")
        save_peft_adapter(variables["lora"], spec, model.config, export["peft_dir"])
    return export
