"""Decoders (Llama family, GPT-2) and Hugging Face checkpoint io."""

from jaxalign.models.config import (  # noqa: F401
    ConfigError, GPT2Config, LlamaConfig, RopeConfig, config_from_hf, config_to_hf,
)
from jaxalign.models.gpt2 import GPT2LMHeadModel, init_gpt2_cache  # noqa: F401
from jaxalign.models.hf import (  # noqa: F401
    CheckpointError, abstract_params, build_model, from_pretrained, hf_key, hf_module_name,
    init_params, load_config, save_pretrained,
)
from jaxalign.models.llama import LlamaForCausalLM, init_llama_cache  # noqa: F401


def init_cache(model, batch: int, max_length: int, dtype=None):
    """An empty KV cache for `model` with `max_length` slots."""
    import jax.numpy as jnp

    dtype = dtype or model.dtype or jnp.float32
    if isinstance(model, GPT2LMHeadModel):
        return init_gpt2_cache(model.config, batch, max_length, dtype)
    return init_llama_cache(model.config, batch, max_length, dtype)
