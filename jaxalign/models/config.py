"""Static model configurations, built once from a Hugging Face `config.json`.

The configs are frozen (hashable) dataclasses so that they can sit on flax modules and be closed
over by `jax.jit`. Nothing here does math.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

LLAMA_FAMILY = ("llama", "mistral", "qwen2", "qwen3")
SUPPORTED_MODEL_TYPES = LLAMA_FAMILY + ("gpt2",)


class ConfigError(ValueError):
    """A config.json that jaxalign cannot represent."""


@dataclasses.dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding settings: rope_type in {'default', 'linear', 'llama3'}."""

    theta: float = 10000.0
    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Decoder settings shared by Llama 2/3, Mistral, Qwen2 and Qwen3."""

    model_type: str = "llama"
    vocab_size: int = 32000
    hidden_size: int = 256
    intermediate_size: int = 688
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 4
    head_dim: int = 64
    rms_norm_eps: float = 1e-6
    rope: RopeConfig = RopeConfig()
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # q/k/v (and o for Llama) biases
    o_proj_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False  # Qwen3
    sliding_window: int | None = None
    hidden_act: str = "silu"
    bos_token_id: int | None = None
    eos_token_id: Any = None
    pad_token_id: int | None = None

    def __post_init__(self):
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.hidden_act not in ("silu", "swish"):
            raise ConfigError(f"hidden_act={self.hidden_act!r} is not supported (expected 'silu')")


@dataclasses.dataclass(frozen=True)
class GPT2Config:
    model_type: str = "gpt2"
    vocab_size: int = 50257
    n_positions: int = 1024
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    n_inner: int | None = None
    layer_norm_epsilon: float = 1e-5
    activation_function: str = "gelu_new"
    scale_attn_weights: bool = True
    scale_attn_by_inverse_layer_idx: bool = False
    tie_word_embeddings: bool = True
    bos_token_id: int | None = None
    eos_token_id: Any = None
    pad_token_id: int | None = None

    def __post_init__(self):
        if self.activation_function not in ("gelu_new", "gelu", "gelu_pytorch_tanh", "relu"):
            raise ConfigError(f"GPT-2 activation_function={self.activation_function!r} unsupported")
        if self.n_embd % self.n_head:
            raise ConfigError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")

    @property
    def hidden_size(self) -> int:
        return self.n_embd

    @property
    def num_hidden_layers(self) -> int:
        return self.n_layer


def _rope_from_hf(d: Mapping[str, Any]) -> RopeConfig:
    params = d.get("rope_parameters") or d.get("rope_scaling") or {}
    theta = float(params.get("rope_theta", d.get("rope_theta", 10000.0)))
    rope_type = params.get("rope_type", params.get("type", "default")) or "default"
    if rope_type not in ("default", "linear", "llama3"):
        raise ConfigError(
            f"rope type {rope_type!r} (config.json rope_parameters/rope_scaling) is not supported; "
            "expected one of 'default', 'linear', 'llama3'"
        )
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        raise ConfigError("partial_rotary_factor != 1.0 is not supported")
    return RopeConfig(
        theta=theta,
        rope_type=rope_type,
        factor=float(params.get("factor", 1.0)),
        low_freq_factor=float(params.get("low_freq_factor", 1.0)),
        high_freq_factor=float(params.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=int(
            params.get("original_max_position_embeddings", d.get("max_position_embeddings", 8192))
        ),
    )


def config_from_hf(d: Mapping[str, Any]) -> LlamaConfig | GPT2Config:
    """Builds a jaxalign config from a Hugging Face config.json dict."""
    model_type = d.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ConfigError(
            f"config.json: model_type={model_type!r} is not supported; expected one of "
            f"{list(SUPPORTED_MODEL_TYPES)}"
        )
    common = dict(
        bos_token_id=d.get("bos_token_id"),
        eos_token_id=tuple(d["eos_token_id"]) if isinstance(d.get("eos_token_id"), list) else d.get("eos_token_id"),
        pad_token_id=d.get("pad_token_id"),
    )
    if model_type == "gpt2":
        return GPT2Config(
            vocab_size=d["vocab_size"],
            n_positions=d.get("n_positions", 1024),
            n_embd=d["n_embd"],
            n_layer=d["n_layer"],
            n_head=d["n_head"],
            n_inner=d.get("n_inner"),
            layer_norm_epsilon=d.get("layer_norm_epsilon", 1e-5),
            activation_function=d.get("activation_function", "gelu_new"),
            scale_attn_weights=d.get("scale_attn_weights", True),
            scale_attn_by_inverse_layer_idx=d.get("scale_attn_by_inverse_layer_idx", False),
            tie_word_embeddings=d.get("tie_word_embeddings", True),
            **common,
        )
    missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                           "num_attention_heads") if k not in d]
    if missing:
        raise ConfigError(f"config.json for model_type={model_type!r} lacks {missing}")
    heads = d["num_attention_heads"]
    sliding = None
    if model_type == "mistral":
        sliding = d.get("sliding_window")
    elif model_type in ("qwen2", "qwen3") and d.get("use_sliding_window"):
        layer_types = d.get("layer_types") or []
        if any(t != "full_attention" for t in layer_types):
            raise ConfigError(f"{model_type}: per-layer sliding windows (layer_types) are not supported")
    bias = bool(d.get("attention_bias", False))
    return LlamaConfig(
        model_type=model_type,
        vocab_size=d["vocab_size"],
        hidden_size=d["hidden_size"],
        intermediate_size=d["intermediate_size"],
        num_hidden_layers=d["num_hidden_layers"],
        num_attention_heads=heads,
        num_key_value_heads=d.get("num_key_value_heads") or heads,
        head_dim=d.get("head_dim") or d["hidden_size"] // heads,
        rms_norm_eps=d.get("rms_norm_eps", 1e-6),
        rope=_rope_from_hf(d),
        max_position_embeddings=d.get("max_position_embeddings", 2048),
        tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
        attention_bias={"qwen2": True, "mistral": False}.get(model_type, bias),
        o_proj_bias=bias if model_type in ("llama", "qwen3") else False,
        mlp_bias=bool(d.get("mlp_bias", False)) if model_type == "llama" else False,
        qk_norm=model_type == "qwen3",
        sliding_window=sliding,
        hidden_act=d.get("hidden_act", "silu"),
        **common,
    )


def config_to_hf(cfg: LlamaConfig | GPT2Config) -> dict[str, Any]:
    """The inverse of `config_from_hf`: a dict that transformers' AutoConfig accepts."""
    common = {
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": list(cfg.eos_token_id) if isinstance(cfg.eos_token_id, tuple) else cfg.eos_token_id,
        "pad_token_id": cfg.pad_token_id,
        "tie_word_embeddings": cfg.tie_word_embeddings,
    }
    if isinstance(cfg, GPT2Config):
        return {
            "model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "vocab_size": cfg.vocab_size,
            "n_positions": cfg.n_positions, "n_embd": cfg.n_embd, "n_layer": cfg.n_layer,
            "n_head": cfg.n_head, "n_inner": cfg.n_inner, "layer_norm_epsilon": cfg.layer_norm_epsilon,
            "activation_function": cfg.activation_function, "scale_attn_weights": cfg.scale_attn_weights,
            "scale_attn_by_inverse_layer_idx": cfg.scale_attn_by_inverse_layer_idx, **common,
        }
    arch = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
            "qwen3": "Qwen3ForCausalLM"}[cfg.model_type]
    rope = {"rope_theta": cfg.rope.theta, "rope_type": cfg.rope.rope_type}
    if cfg.rope.rope_type == "linear":
        rope["factor"] = cfg.rope.factor
    elif cfg.rope.rope_type == "llama3":
        rope.update(factor=cfg.rope.factor, low_freq_factor=cfg.rope.low_freq_factor,
                    high_freq_factor=cfg.rope.high_freq_factor,
                    original_max_position_embeddings=cfg.rope.original_max_position_embeddings)
    d = {
        "model_type": cfg.model_type, "architectures": [arch], "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_hidden_layers, "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads, "head_dim": cfg.head_dim,
        "rms_norm_eps": cfg.rms_norm_eps, "rope_parameters": rope, "rope_theta": cfg.rope.theta,
        "max_position_embeddings": cfg.max_position_embeddings, "hidden_act": cfg.hidden_act, **common,
    }
    if cfg.model_type == "llama":
        d.update(attention_bias=cfg.attention_bias, mlp_bias=cfg.mlp_bias)
    if cfg.model_type == "mistral":
        d.update(sliding_window=cfg.sliding_window)
    if cfg.model_type == "qwen3":
        d.update(attention_bias=cfg.attention_bias)
    return d
