"""Tiny random HF models (Llama with GQA, GPT-2) saved once per session, plus helpers shared by the
LoRA tests."""

import numpy as np
import pytest
import torch
import transformers

from tests.models.conftest import _randomize, make_batch  # noqa: F401

PEFT_FAMILIES = {
    "llama": lambda: transformers.LlamaConfig(
        vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64),
    "gpt2": lambda: transformers.GPT2Config(
        vocab_size=97, n_positions=64, n_embd=32, n_layer=2, n_head=4, bos_token_id=0,
        eos_token_id=0),
}


@pytest.fixture(scope="session")
def peft_dirs(tmp_path_factory):
    """family -> directory of a saved tiny HF model with perturbed weights."""
    out = {}
    for i, (name, make) in enumerate(PEFT_FAMILIES.items()):
        torch.manual_seed(100 + i)
        model = _randomize(transformers.AutoModelForCausalLM.from_config(make()), 100 + i).eval()
        d = tmp_path_factory.mktemp(f"peft_{name}")
        model.save_pretrained(d)
        out[name] = str(d)
    return out


def hf_model(path):
    return transformers.AutoModelForCausalLM.from_pretrained(path).eval()


def torch_logits(model, tokens, mask):
    positions = np.maximum(np.cumsum(mask, 1) - 1, 0)
    with torch.no_grad():
        return model(torch.tensor(tokens, dtype=torch.long), attention_mask=torch.tensor(mask),
                     position_ids=torch.tensor(positions, dtype=torch.long)).logits.float().numpy()


def randomize_b(adapters, seed, scale=0.3):
    """Replaces every lora_b (zeros after init) by random values so the adapter changes the output."""
    import jax

    rng = np.random.RandomState(seed)
    return jax.tree_util.tree_map_with_path(
        lambda p, x: (scale * rng.randn(*x.shape)).astype(np.float32)
        if p[-1].key == "lora_b" else x, adapters)
