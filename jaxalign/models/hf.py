"""Hugging Face checkpoints in and out: config.json + safetensors (single file or sharded).

`from_pretrained(dir, dtype=...)` builds the abstract param tree of the matching jaxalign model,
then streams each tensor from the memory-mapped safetensors file, checks its shape, casts it and
places it, one tensor at a time (never two full copies of the weights in memory).
`save_pretrained(model, params, dir)` streams the other way and writes a directory that
`transformers.AutoModelForCausalLM.from_pretrained` loads.

bitsandbytes 4-bit NF4 checkpoints (transformers' `BitsAndBytesConfig(load_in_4bit=True,
bnb_4bit_quant_type="nf4")`, any block size, double quantization on or off, Llama family and
GPT-2) load with their 4-bit kernels as NF4Tensor leaves, or dequantized with
`quantized="dequantize"`; params holding NF4Tensor kernels save as such a checkpoint (the
`quantization_config` lists every dense linear module, lm_head included, in
`llm_int8_skip_modules`). The per-module logic is in `jaxalign.quant.bnb_checkpoint`.
"""

from __future__ import annotations

import json
import os
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from jaxalign.models.config import GPT2Config, LlamaConfig, config_from_hf, config_to_hf
from jaxalign.models.gpt2 import GPT2LMHeadModel
from jaxalign.models.llama import LlamaForCausalLM
from jaxalign.models.safetensors_io import open_checkpoint, write_safetensors
from jaxalign.quant import bnb_checkpoint as bnb
from jaxalign.quant.nf4 import NF4Tensor, dequantize_nf4


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


def _place(value, sharding):
    """device_put an array or NF4Tensor; an NF4Tensor's 1-D buffers are replicated over the mesh
    of a NamedSharding (block-wise buffers do not follow the kernel's axes)."""
    if sharding is None:
        return jax.tree.map(jnp.asarray, value)
    if isinstance(value, NF4Tensor) and isinstance(sharding, jax.sharding.NamedSharding):
        sharding = jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec())
    return jax.device_put(value, sharding)


def from_pretrained(path: str, *, dtype=jnp.float32, compute_dtype=None, lora=None,
                    remat: bool = False, shardings=None, quantized: str = "keep"):
    """Loads a Hugging Face directory. Returns (model, params).

    dtype: storage dtype of the params (fp32 or bf16); compute_dtype defaults to dtype.
    shardings: optional pytree of `jax.sharding.Sharding` matching the params, to place each
      tensor directly on its devices as it is read (NF4 kernels: replicated over its mesh).
    quantized: what to do with the 4-bit kernels of a bitsandbytes NF4 checkpoint. "keep" (default):
      NF4Tensor leaves ([in, out], `transposed=True`, the bytes and dtype of the file), ready for
      QLoRA; "dequantize": dense kernels of `dtype`, equal to `dequantize_params` of the kept ones.
    """
    if quantized not in ("keep", "dequantize"):
        raise ValueError(f"from_pretrained: quantized={quantized!r}, expected 'keep' or 'dequantize'")
    config, raw = load_config(path)
    try:
        is_bnb = bnb.is_bnb_nf4(raw.get("quantization_config"))
    except bnb.BnbCheckpointError as e:
        raise CheckpointError(f"{path}/config.json: {e}") from None
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
        side = bnb.side_keys(key, files) if p[-1] == "kernel" else []
        if side:  # a 4-bit module: [out, in] storage for every family, GPT-2's Conv1D included
            if not is_bnb:
                raise CheckpointError(f"{path}: tensor {side[0]!r} is a bitsandbytes 4-bit key but "
                                      "config.json has no bitsandbytes quantization_config")
            try:
                q = bnb.load_nf4_kernel(key, leaf.shape, files, lambda k: files[k][0].get(files[k][1]),
                                        param="/".join(p))
            except bnb.BnbCheckpointError as e:
                raise CheckpointError(f"{path}: {e}") from None
            value = q if quantized == "keep" else dequantize_nf4(q, dtype)
            flat[p] = _place(value, flat_shardings.get(p))
            used.update([key, *side])
            continue
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

    dtype: storage dtype of the written dense tensors (default: each param's own dtype).
    NF4Tensor kernels (from `quantize_params`, or `from_pretrained` of a 4-bit checkpoint) are
    written as bitsandbytes 4-bit modules, byte for byte, with a `quantization_config` so that
    `transformers.AutoModelForCausalLM.from_pretrained(path)` builds them as `Linear4bit`; block
    size and double quantization may differ between kernels. A module's keys share one shard.
    """
    config = model.config
    os.makedirs(path, exist_ok=True)
    flat = traverse_util.flatten_dict(nn.unbox(params))  # NF4Tensor leaves stay whole
    groups = []  # one list of (key, shape, dtype) per param leaf; a group never spans two shards
    sources = {}  # key -> (param path, transpose, dtype); dtype None for a 4-bit module's keys
    nf4, dense_linear, dense_dtypes = [], [], set()
    for p, leaf in flat.items():
        key, transpose = hf_key(config, p)
        name = "/".join(p)
        if isinstance(leaf, NF4Tensor):
            if p[-1] != "kernel":
                raise TypeError(f"save_pretrained: {name} is an NF4Tensor; only Dense kernels can be "
                                "saved as bitsandbytes 4-bit weights")
            state = bnb.nf4_kernel_state(key, leaf, param=name)  # shapes only; re-read when written
            groups.append([(k, tuple(v.shape), np.dtype(v.dtype)) for k, v in state.items()])
            sources.update({k: (p, False, None) for k in state})
            nf4.append(leaf)
            del state
            continue
        if not hasattr(leaf, "shape") or not hasattr(leaf, "dtype"):
            raise TypeError(f"save_pretrained: {name} is a {type(leaf).__name__}, not an array")
        if p[-1] == "kernel":
            dense_linear.append(hf_module_name(config, p[:-1]))
        out_dtype = np.dtype(dtype) if dtype is not None else np.dtype(leaf.dtype)
        dense_dtypes.add(out_dtype)
        groups.append([(key, _expected_hf_shape(leaf.shape, transpose), out_dtype)])
        sources[key] = (p, transpose, out_dtype)

    def nbytes(spec):
        return int(np.prod(spec[1], dtype=np.int64)) * spec[2].itemsize

    limit = _parse_size(max_shard_size)
    shards, cur, size = [], [], 0
    for group in groups:
        gbytes = sum(nbytes(e) for e in group)
        if cur and size + gbytes > limit:
            shards.append(cur)
            cur, size = [], 0
        cur.extend(group)
        size += gbytes
    shards.append(cur)
    cache = {}  # the bitsandbytes state of the 4-bit module being written (one at a time)

    def fetch(key):
        p, transpose, out_dtype = sources[key]
        if out_dtype is None:
            if p not in cache:
                cache.clear()
                cache[p] = bnb.nf4_kernel_state(hf_key(config, p)[0], flat[p], param="/".join(p))
            return cache[p][key]
        arr = np.asarray(jax.device_get(flat[p]))
        return (arr.T if transpose else arr).astype(out_dtype)

    meta = {"format": "pt"}
    if len(shards) == 1:
        write_safetensors(os.path.join(path, "model.safetensors"), shards[0], fetch, meta)
    else:
        weight_map = {}
        for i, shard in enumerate(shards):
            fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            write_safetensors(os.path.join(path, fname), shard, fetch, meta)
            weight_map.update({e[0]: fname for e in shard})
        total = sum(nbytes(e) for shard in shards for e in shard)
        with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    hf_cfg = config_to_hf(config)
    hf_cfg["dtype"] = "bfloat16" if any(d.name == "bfloat16" for d in dense_dtypes) else "float32"
    if nf4:
        # transformers builds every linear module not listed here as Linear4bit; lm_head is listed
        # even when tied (a given list replaces transformers' defaults) unless it is 4-bit itself.
        nf4_modules = {hf_module_name(config, p[:-1])
                       for p, x in flat.items() if isinstance(x, NF4Tensor)}
        skip = (["lm_head"] if "lm_head" not in nf4_modules else []) + sorted(
            m for m in dense_linear if m != "lm_head")
        hf_cfg["quantization_config"] = bnb.bnb_quantization_config(
            nf4, compute_dtype=model.dtype or nf4[0].dtype, skip_modules=skip)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(hf_cfg, f, indent=2)
