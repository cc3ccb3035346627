"""LoRA adapter trees: init, presets, apply, merge/unmerge, parameter counts.

An adapter tree mirrors the base params tree but holds only the adapted Linear modules:

    {'layers_0': {'attn': {'q_proj': {'lora_a': [in, r], 'lora_b': [r, out]}}}}

The forward pass (`jaxalign.models.layers.Linear`) reads it from the 'lora' variable collection and
adds s * dropout(x) A B with s = alpha / r (or alpha / sqrt(r) with rsLoRA), so W + AB is never
materialised. Calling the same model without the 'lora' collection *is* the frozen reference.

References: Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models" (2021);
Kalajdzievski, "A Rank Stabilization Scaling Factor for Fine-Tuning with LoRA" (2023).
"""

from __future__ import annotations

import math
import re
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from jaxalign.models.layers import materialize_kernel
from jaxalign.peft.spec import LoraSpec

# Modules that never take an adapter: the LM head's Linear is built without a LoraSpec.
_NEVER_ADAPTED = re.compile(r"(^|/)lm_head$")

_LLAMA_ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
_LLAMA_MLP = ("gate_proj", "up_proj", "down_proj")
_PRESETS = {
    "llama": {
        "attention": r"(^|/)(" + "|".join(_LLAMA_ATTN) + r")$",
        "all_linear": r"(^|/)(" + "|".join(_LLAMA_ATTN + _LLAMA_MLP) + r")$",
    },
    "gpt2": {
        "attention": r"(^|/)attn/(c_attn|c_proj)$",
        "all_linear": r"(^|/)(attn/(c_attn|c_proj)|mlp/(c_fc|c_proj))$",
    },
}
_PRESET_ALIASES = {"attention": "attention", "attention_mlp": "all_linear", "all_linear": "all_linear"}
_FAMILY = {"llama": "llama", "mistral": "llama", "qwen2": "llama", "qwen3": "llama", "gpt2": "gpt2"}


def lora_targets(model_type, preset: str = "attention") -> str:
    """The `LoraSpec.targets` regex for a model family and preset.

    model_type: 'llama' | 'mistral' | 'qwen2' | 'qwen3' | 'gpt2', or a config with `.model_type`.
    preset: 'attention' (q/k/v/o; GPT-2 attn c_attn, c_proj) or 'attention_mlp' / 'all_linear'
      (plus gate/up/down; GPT-2 mlp c_fc, c_proj). The LM head is never targeted.
    """
    mt = getattr(model_type, "model_type", model_type)
    if mt not in _FAMILY:
        raise ValueError(f"lora_targets: model_type={mt!r} unknown; expected one of {sorted(_FAMILY)}")
    if preset not in _PRESET_ALIASES:
        raise ValueError(f"lora_targets: preset={preset!r} unknown; expected one of {sorted(_PRESET_ALIASES)}")
    return _PRESETS[_FAMILY[mt]][_PRESET_ALIASES[preset]]


# ----------------------------------------------------------------------------- tree helpers
def _nf4_type():
    try:
        from jaxalign.quant.nf4 import NF4Tensor
    except ImportError:
        return None
    return NF4Tensor


def _is_nf4(x) -> bool:
    t = _nf4_type()
    return t is not None and isinstance(x, t)


def _flat(tree) -> dict[tuple[str, ...], Any]:
    """flatten_dict over nested dicts only: NF4Tensor / boxed leaves stay whole."""
    return traverse_util.flatten_dict(nn.unbox(tree) if _has_boxes(tree) else tree)


def _has_boxes(tree) -> bool:
    return any(isinstance(x, nn.meta.AxisMetadata)
               for x in jax.tree.leaves(tree, is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata)))


def linear_modules(params) -> dict[str, tuple[int, int]]:
    """'/'-joined path of every Linear module (a 'kernel' leaf) -> (in, out) kernel shape.

    Works on arrays, ShapeDtypeStructs and NF4Tensor kernels (their logical shape)."""
    out = {}
    for path, leaf in _flat(params).items():
        if path[-1] == "kernel":
            shape = tuple(leaf.shape)
            if len(shape) != 2:
                raise ValueError(f"{'/'.join(path)}: kernel has shape {shape}, expected [in, out]")
            out["/".join(path[:-1])] = shape
    return out


def adapted_modules(adapters) -> dict[str, tuple[Any, Any]]:
    """'/'-joined module path -> (lora_a, lora_b) for every module in an adapter tree.

    Raises ValueError naming the module when a factor is missing or the shapes disagree."""
    flat = _flat(adapters)
    mods: dict[str, dict[str, Any]] = {}
    for path, leaf in flat.items():
        if path[-1] not in ("lora_a", "lora_b"):
            raise ValueError(f"adapters: unexpected leaf {'/'.join(path)!r}; expected only "
                             "'<module>/lora_a' [in, r] and '<module>/lora_b' [r, out]")
        mods.setdefault("/".join(path[:-1]), {})[path[-1]] = leaf
    out = {}
    for mod, d in mods.items():
        if set(d) != {"lora_a", "lora_b"}:
            raise ValueError(f"adapters: module {mod!r} has {sorted(d)}, expected both lora_a and lora_b")
        a, b = d["lora_a"], d["lora_b"]
        if len(a.shape) != 2 or len(b.shape) != 2 or a.shape[1] != b.shape[0]:
            raise ValueError(f"adapters: module {mod!r} has lora_a {tuple(a.shape)} and lora_b "
                             f"{tuple(b.shape)}, expected [in, r] and [r, out]")
        out[mod] = (a, b)
    return out


def select_modules(params, spec: LoraSpec) -> dict[str, tuple[int, int]]:
    """Linear modules whose path matches `spec.targets` -> (in, out). Raises ValueError when the
    regex matches nothing (listing the available paths) or matches the LM head."""
    available = linear_modules(params)
    chosen = {p: s for p, s in available.items() if spec.matches(p)}
    bad = [p for p in chosen if _NEVER_ADAPTED.search(p)]
    if bad:
        raise ValueError(f"LoraSpec.targets={spec.targets!r} matches {bad}: the LM head takes no "
                         "adapter; restrict the regex (e.g. lora_targets(model_type, 'all_linear'))")
    if not chosen:
        names = sorted(p for p in available if not _NEVER_ADAPTED.search(p))
        raise ValueError(f"LoraSpec.targets={spec.targets!r} matches no module; available module "
                         f"paths: {names}")
    return chosen


# ----------------------------------------------------------------------------- init
def init_lora(params, spec: LoraSpec, rng, *, dtype=jnp.float32):
    """A fresh adapter tree for the modules of `params` selected by `spec.targets`.

    A [in, r] ~ kaiming_uniform(a=sqrt(5)) of torch's [r, in] weight, i.e. U(-b, b) with
    b = gain * sqrt(3 / fan_in), gain = sqrt(2 / (1 + a^2)) = sqrt(1/3), fan_in = in, so b = 1/sqrt(in)
    (PEFT's default `init_lora_weights=True`); B [r, out] = 0, so the adapted model starts equal to
    the base. Per-module rank `spec.rank_for(path)`. Returns the nested adapter dict.
    """
    chosen = select_modules(params, spec)
    flat = {}
    for i, path in enumerate(sorted(chosen)):
        fan_in, fan_out = chosen[path]
        r = spec.rank_for(path)
        if r <= 0:
            raise ValueError(f"LoraSpec.rank_pattern gives rank {r} for {path!r}; expected a positive int")
        bound = math.sqrt(1.0 / 3.0) * math.sqrt(3.0 / fan_in)  # = 1 / sqrt(fan_in)
        key = jax.random.fold_in(rng, i)
        mod = tuple(path.split("/"))
        flat[mod + ("lora_a",)] = jax.random.uniform(key, (fan_in, r), jnp.float32, -bound, bound).astype(dtype)
        flat[mod + ("lora_b",)] = jnp.zeros((r, fan_out), dtype)
    return traverse_util.unflatten_dict(flat)


# ----------------------------------------------------------------------------- apply
def lora_apply_fn(model: nn.Module, spec: LoraSpec) -> Callable:
    """Returns f(params, adapters, tokens, **kw) -> model output with the adapters applied.

    `adapters=None` gives the reference (base) model: the same module applied without the 'lora'
    collection, so no second copy of the weights exists. kw are the model's call keywords
    (attention_mask, positions, deterministic, rngs={'dropout': key}, ...). Differentiate with
    respect to `adapters` only (e.g. `jax.grad(lambda a: loss(f(base, a, tokens)))`): the base is a
    constant and stays frozen by construction.
    """
    lora_model = model.clone(lora=spec)

    def apply(params, adapters, tokens, *, rngs=None, **kw):
        variables = {"params": params}
        if adapters is not None:
            variables["lora"] = adapters
        return lora_model.apply(variables, tokens, rngs=rngs, **kw)

    return apply


# ----------------------------------------------------------------------------- merge
def _delta(path: str, a, b, spec: LoraSpec):
    """s * A @ B [in, out] in fp32."""
    s = spec.scale(path, a.shape[1])
    return s * (jnp.asarray(a, jnp.float32) @ jnp.asarray(b, jnp.float32))


def _merge(params, adapters, spec: LoraSpec, sign: float, dtype, name: str):
    flat = dict(_flat(params))
    kernels = linear_modules(params)
    for path, (a, b) in adapted_modules(adapters).items():
        key = tuple(path.split("/")) + ("kernel",)
        if path not in kernels:
            raise ValueError(f"{name}: adapter for {path!r}, which the params have no kernel for; "
                             f"available: {sorted(kernels)}")
        if (a.shape[0], b.shape[1]) != kernels[path]:
            raise ValueError(f"{name}: {path!r} adapter maps {a.shape[0]} -> {b.shape[1]} but the kernel "
                             f"is {kernels[path]}")
        w = flat[key]
        out_dtype = dtype or (jnp.float32 if _is_nf4(w) else w.dtype)
        w32 = materialize_kernel(w, jnp.float32)
        flat[key] = (w32 + sign * _delta(path, a, b, spec)).astype(out_dtype)
    return traverse_util.unflatten_dict(flat)


def merge_lora(params, adapters, spec: LoraSpec, *, dtype=None):
    """W' = W + s * A @ B for every adapted module (for export; training never materialises it).

    Computed in fp32, cast to `dtype` (default: the kernel's own dtype). NF4Tensor kernels are
    dequantised first and come back dense (`dtype`, default fp32): a merged QLoRA model is a dense
    model. Untouched leaves are returned as they are (no copy).
    """
    return _merge(params, adapters, spec, 1.0, dtype, "merge_lora")


def unmerge_lora(merged, adapters, spec: LoraSpec, *, dtype=None):
    """The inverse of `merge_lora`: W = W' - s * A @ B (up to rounding; always dense)."""
    return _merge(merged, adapters, spec, -1.0, dtype, "unmerge_lora")


# ----------------------------------------------------------------------------- counting
def _numel(leaf) -> int:
    return int(np.prod(leaf.shape, dtype=np.int64))


def count_params(base, adapters) -> dict[str, float]:
    """{'trainable': adapter elements, 'all': base + adapter elements, 'trainable%': 100 t / all}.

    NF4Tensor kernels count their logical element count (in * out), as PEFT counts a 4-bit model.
    """
    nf4 = _nf4_type()
    leaves = jax.tree.leaves(nn.unbox(base) if _has_boxes(base) else base,
                             is_leaf=lambda x: nf4 is not None and isinstance(x, nf4))
    n_base = sum(_numel(x) for x in leaves)
    n_train = sum(_numel(x) for x in jax.tree.leaves(adapters))
    total = n_base + n_train
    return {"trainable": n_train, "all": total, "trainable%": 100.0 * n_train / total if total else 0.0}


def print_trainable_parameters(base, adapters) -> str:
    """Prints and returns PEFT's line: 'trainable params: X || all params: Y || trainable%: Z'."""
    c = count_params(base, adapters)
    line = (f"trainable params: {c['trainable']:,d} || all params: {c['all']:,d} || "
            f"trainable%: {c['trainable%']:.4f}")
    print(line)
    return line
