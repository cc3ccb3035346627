import numpy as np
import pytest
import torch
import transformers

# Tiny configs, several per family. Each builds in well under a second.
FAMILIES = {
    "llama_gqa": lambda: transformers.LlamaConfig(
        vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64),
    "llama3_tied_bias": lambda: transformers.LlamaConfig(
        vocab_size=97, hidden_size=64, intermediate_size=80, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=1, tie_word_embeddings=True,
        attention_bias=True, mlp_bias=True, max_position_embeddings=64,
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                         "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 16}),
    "llama_linear_rope_headdim": lambda: transformers.LlamaConfig(
        vocab_size=97, hidden_size=48, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=2, head_dim=32, max_position_embeddings=64,
        rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0}),
    "mistral_sliding": lambda: transformers.MistralConfig(
        vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, sliding_window=4, max_position_embeddings=64),
    "qwen2": lambda: transformers.Qwen2Config(
        vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        tie_word_embeddings=False),
    "qwen3_tied": lambda: transformers.Qwen3Config(
        vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=64,
        tie_word_embeddings=True),
    "gpt2": lambda: transformers.GPT2Config(
        vocab_size=97, n_positions=64, n_embd=64, n_layer=2, n_head=4),
    "gpt2_inner_scaled": lambda: transformers.GPT2Config(
        vocab_size=97, n_positions=64, n_embd=48, n_layer=2, n_head=3, n_inner=80,
        scale_attn_by_inverse_layer_idx=True, activation_function="gelu"),
}


def _randomize(model, seed):
    # Random init leaves norms at 1 and biases at 0; perturb everything so each tensor matters.
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model


@pytest.fixture(scope="session")
def hf_dirs(tmp_path_factory):
    """family -> (directory with a saved tiny HF model, the torch model)."""
    out = {}
    for i, (name, make) in enumerate(FAMILIES.items()):
        torch.manual_seed(i)
        model = _randomize(transformers.AutoModelForCausalLM.from_config(make()), i).eval()
        d = tmp_path_factory.mktemp(name)
        model.save_pretrained(d)
        out[name] = (str(d), model)
    return out


def make_batch(padding: str, b=3, t=12, vocab=97, seed=0):
    rng = np.random.RandomState(seed)
    tokens = rng.randint(0, vocab, (b, t)).astype(np.int32)
    mask = np.ones((b, t), np.int32)
    if padding == "left":
        mask[1, :4] = 0
        mask[2, :1] = 0
    elif padding == "right":
        mask[1, -4:] = 0
        mask[2, -7:] = 0
    positions = np.maximum(np.cumsum(mask, 1) - 1, 0).astype(np.int32)
    return tokens, mask, positions
