"""Hugging Face checkpoints in and out: config.json + safetensors (single file or sharded).

`from_pretrained(dir, dtype=...)` builds the abstract param tree of the matching jaxalign model,
then streams each tensor from the memory-mapped safetensors file, checks its shape, casts it and
places it, one tensor at a time (never two full copies of the weights in memory).
`save_pretrained(model, params, dir)` streams the other way and writes a directory that
`transformers.AutoModelForCausalLM.from_pretrained` loads.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from jaxalign.models.config import GPT2Config, LlamaConfig, config_from_hf, config_to_hf
from jaxalign.models.gpt2 import GPT2LMHeadModel
from jaxalign.models.llama import LlamaForCausalLM
from jaxalign.models.safetensors_io import open_checkpoint, write_safetensors


class CheckpointError(ValueError):
    """A checkpoint whose tensors do not match the model its config.json describes."""


def build_model(config: LlamaConfig | GPT2Config, *, dtype=jnp.float32, param_dtype=None,
                lora=None, remat: bool = False) -> nn.Module:
    """The flax module for a config. `dtype` is the compute dtype, `param_dtype` the storage one."""
    cls = GPT2LMHeadModel if isinstance(config, GPT2Config) else LlamaForCausalLM
    return cls(config, dtype=dtype, param_dtype=param_dtype or dtype, lora=lora, remat=remat)


def abstract_params(model: nn.Module):
    """Boxed (logically partitioned) ShapeDtypeStruct tree of the model's params; allocates nothing."""
    tokens = jax.ShapeDtypeStruct((1, 1), jnp.int32)
    return jax.eval_shape(lambda t: model.init(jax.random.PRNGKey(0), t), tokens)["params"]


def init_params(model: nn.Module, rng, *, boxed: bool = False):
    """Random params (plain arrays unless `boxed`)."""
    params = model.init(rng, jnp.zeros((1, 1), jnp.int32))["params"]
    return params if boxed else nn.unbox(params)


# ----------------------------------------------------------------------------- name mapping
def hf_module_name(config, path: tuple[str, ...]) -> str:
    """jaxalign module path (e.g. ('layers_0', 'attn', 'q_proj')) -> Hugging Face module name
    ('model.layers.0.self_attn.q_proj')."""
    gpt2 = isinstance(config, GPT2Config)
    out = []
    for i, p in enumerate(path):
        m = re.fullmatch(r"layers_(\d+)", p)
        if m:
            out.append(("h." if gpt2 else "layers.") + m.group(1))
        elif p == "attn" and not gpt2:
            out.append("self_attn")
        else:
            out.append(p)
    name = ".".join(out)
    if gpt2:
        return "transformer." + name
    return name if path[0] == "lm_head" else "model." + name


def hf_key(config, path: tuple[str, ...]) -> tuple[str, bool]:
    """Param path -> (HF tensor key, transpose?)."""
    *mod, leaf = path
    name = hf_module_name(config, tuple(mod))
    if leaf == "bias":
        return name + ".bias", False
    transpose = leaf == "kernel" and not isinstance(config, GPT2Config)
    return name + ".weight", transpose


def _expected_hf_shape(shape, transpose):
    return tuple(reversed(shape)) if transpose else tuple(shape)


# ----------------------------------------------------------------------------- loading
def load_config(path: str):
    cfg_path = os.path.join(path, "config.json")
    if not os.path.exists(cfg_path):
        raise FileNotFoundError(f"{path}: no config.json (expected a Hugging Face model directory)")
    with open(cfg_path) as f:
        raw = json.load(f)
    return config_from_hf(raw), raw


def from_pretrained(path: str, *, dtype=jnp.float32, compute_dtype=None, lora=None,
                    remat: bool = False, shardings=None):
    """Loads a Hugging Face directory. Returns (model, params).

    dtype: storage dtype of the params (fp32 or bf16); compute_dtype defaults to dtype.
    shardings: optional pytree of `jax.sharding.Sharding` matching the params, to place each
      tensor directly on its devices as it is read.
    """
    config, raw = load_config(path)
    if raw.get("quantization_config"):
        raise CheckpointError(f"{path}: quantized checkpoints load with jaxalign.quant (found "
                              f"quantization_config={raw['quantization_config'].get('quant_method')})")
    model = build_model(config, dtype=compute_dtype or dtype, param_dtype=dtype, lora=lora, remat=remat)
    abstract = traverse_util.flatten_dict(nn.unbox(abstract_params(model)))
    flat_shardings = traverse_util.flatten_dict(shardings) if shardings is not None else {}
    files = {k: (f, k) for k, f in open_checkpoint(path).items()}
    if isinstance(config, GPT2Config) and not any(k.startswith("transformer.") for k in files):
        files = {"transformer." + k: v for k, v in files.items()}  # bare GPT-2 checkpoints
    used = set()
    flat = {}
    for p, leaf in abstract.items():
        key, transpose = hf_key(config, p)
        want = _expected_hf_shape(leaf.shape, transpose)
        if key not in files:
            raise CheckpointError(
                f"{path}: missing tensor {key!r} (needed for {'/'.join(p)} with shape {want})")
        src, real_key = files[key]
        if src.shape(real_key) != want:
            raise CheckpointError(
                f"{path}: tensor {key!r} has shape {src.shape(real_key)}, expected {want}")
        arr = src.get(real_key)
        if transpose:
            arr = arr.T
        arr = np.asarray(arr, dtype=np.dtype(dtype))  # one tensor materialised at a time
        sharding = flat_shardings.get(p)
        flat[p] = jax.device_put(arr, sharding) if sharding is not None else jnp.asarray(arr)
        del arr
        used.add(key)
    ignorable = re.compile(r"(\.attn\.(masked_)?bias$|rotary_emb\.inv_freq$|^lm_head\.weight$)")
    unused = sorted(k for k in files if k not in used and not ignorable.search(k))
    if unused:
        raise CheckpointError(f"{path}: tensors not used by the {config.model_type} model: {unused[:8]}"
                              + (" ..." if len(unused) > 8 else ""))
    return model, traverse_util.unflatten_dict(flat)


# ----------------------------------------------------------------------------- saving
def _parse_size(s) -> int:
    if isinstance(s, int):
        return s
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([KMG]?B)", str(s).upper())
    if not m:
        raise ValueError(f"max_shard_size={s!r}: expected e.g. '5GB' or an int")
    return int(float(m.group(1)) * {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9}[m.group(2)])


def save_pretrained(model: nn.Module, params, path: str, *, dtype=None, max_shard_size="5GB"):
    """Writes config.json + model.safetensors (sharded with an index past `max_shard_size`).

    dtype: storage dtype of the written tensors (default: each param's own dtype).
    """
    config = model.config
    os.makedirs(path, exist_ok=True)
    flat = traverse_util.flatten_dict(nn.unbox(params))
    entries = []
    for p, leaf in flat.items():
        if not hasattr(leaf, "shape") or not hasattr(leaf, "dtype") or type(leaf).__name__ == "NF4Tensor":
            raise TypeError(f"save_pretrained: {'/'.join(p)} is a {type(leaf).__name__}; dequantize "
                            "NF4 params first or use jaxalign.quant's bitsandbytes writer")
        key, transpose = hf_key(config, p)
        out_dtype = np.dtype(dtype) if dtype is not None else np.dtype(leaf.dtype)
        entries.append((key, _expected_hf_shape(leaf.shape, transpose), out_dtype, p, transpose))
    limit = _parse_size(max_shard_size)
    shards, cur, size = [], [], 0
    for e in entries:
        nbytes = int(np.prod(e[1])) * e[2].itemsize
        if cur and size + nbytes > limit:
            shards.append(cur)
            cur, size = [], 0
        cur.append(e)
        size += nbytes
    shards.append(cur)
    by_key = {e[0]: e for e in entries}

    def fetch(key):
        _, _, out_dtype, p, transpose = by_key[key]
        arr = np.asarray(jax.device_get(flat[p]))
        return (arr.T if transpose else arr).astype(out_dtype)

    meta = {"format": "pt"}
    if len(shards) == 1:
        write_safetensors(os.path.join(path, "model.safetensors"), [e[:3] for e in shards[0]], fetch, meta)
    else:
        weight_map = {}
        for i, shard in enumerate(shards):
            fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            write_safetensors(os.path.join(path, fname), [e[:3] for e in shard], fetch, meta)
            weight_map.update({e[0]: fname for e in shard})
        total = sum(int(np.prod(e[1])) * e[2].itemsize for e in entries)
        with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    hf_cfg = config_to_hf(config)
    written = {np.dtype(e[2]) for e in entries}
    hf_cfg["dtype"] = "bfloat16" if any(d.name == "bfloat16" for d in written) else "float32"
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(hf_cfg, f, indent=2)
