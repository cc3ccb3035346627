"""Whole transformers + bitsandbytes 4-bit (NF4) checkpoints: the config and per-module logic.

A directory written by transformers with `BitsAndBytesConfig(load_in_4bit=True,
bnb_4bit_quant_type="nf4")` has a `quantization_config` in config.json and, for every quantized
linear module `m` (all but the modules in `llm_int8_skip_modules`, lm_head by default), the
bitsandbytes keys of `jaxalign.quant.bnb_io` instead of a dense `m.weight`:

  m.weight [ceil(n/2), 1] uint8, m.weight.absmax, m.weight.quant_map,
  m.weight.nested_absmax, m.weight.nested_quant_map (double quant only),
  m.weight.quant_state.bitsandbytes__nf4  (JSON with quant_type, blocksize, dtype, shape [out, in])

Each module carries its own quant_state, so block size and double quantization may differ between
modules (transformers reads each one). GPT-2's Conv1D modules are replaced by `Linear4bit` and
quantized from the transposed weight, so they are stored [out, in] like every other module: a
jaxalign [in, out] kernel is always an NF4Tensor with `transposed=True`.

`jaxalign.models.from_pretrained` / `save_pretrained` call these functions for the kernels; the
rest of a checkpoint (embeddings, norms, biases, lm_head) stays dense.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from typing import Any

import jax.numpy as jnp

from jaxalign.quant.bnb_io import QUANT_STATE_KEY, bnb_state_to_nf4, nf4_to_bnb_state
from jaxalign.quant.nf4 import NF4Tensor

QUANT_METHOD = "bitsandbytes"
FP4_STATE_KEY = "quant_state.bitsandbytes__fp4"
# Keys next to `m.weight` that mark module `m` as 4-bit (fp4 only to reject it by name).
SIDE_SUFFIXES = ("absmax", "quant_map", "nested_absmax", "nested_quant_map", QUANT_STATE_KEY,
                 FP4_STATE_KEY)
_REQUIRED = ("absmax", "quant_map", QUANT_STATE_KEY)
_NESTED = ("nested_absmax", "nested_quant_map")


class BnbCheckpointError(ValueError):
    """A bitsandbytes checkpoint (config or tensors) that jaxalign cannot load; names the field or
    tensor. `jaxalign.models.from_pretrained` re-raises it as a CheckpointError with the path."""


def _flag(qc: dict, name: str) -> bool:
    return bool(qc.get(name, qc.get("_" + name, False)))


def is_bnb_nf4(quantization_config: Any) -> bool:
    """Validates config.json's `quantization_config`: True for bitsandbytes 4-bit NF4, False when
    there is none. Raises BnbCheckpointError (naming the field) for any other quantization."""
    qc = quantization_config
    if not qc:
        return False
    if not isinstance(qc, dict):
        raise BnbCheckpointError(f"quantization_config must be an object, got {type(qc).__name__}")
    method = qc.get("quant_method")
    if method != QUANT_METHOD:
        raise BnbCheckpointError(f"quantization_config.quant_method={method!r} is not supported "
                                 f"(only {QUANT_METHOD!r} 4-bit NF4 checkpoints load)")
    if _flag(qc, "load_in_8bit"):
        raise BnbCheckpointError("quantization_config.load_in_8bit=true: 8-bit (LLM.int8) "
                                 "checkpoints are not supported, only 4-bit NF4")
    if not _flag(qc, "load_in_4bit"):
        raise BnbCheckpointError("quantization_config.load_in_4bit is not true: only bitsandbytes "
                                 "4-bit NF4 checkpoints are supported")
    quant_type = qc.get("bnb_4bit_quant_type", "fp4")  # transformers' default is fp4
    if quant_type != "nf4":
        raise BnbCheckpointError(f"quantization_config.bnb_4bit_quant_type={quant_type!r} is not "
                                 "supported (only 'nf4')")
    return True


def side_keys(weight_key: str, keys: Collection[str]) -> list[str]:
    """The bitsandbytes keys present next to `weight_key` ("m.weight"); [] for a dense weight."""
    return [f"{weight_key}.{s}" for s in SIDE_SUFFIXES if f"{weight_key}.{s}" in keys]


def load_nf4_kernel(weight_key: str, kernel_shape: Sequence[int], keys: Collection[str],
                    get: Callable[[str], Any], *, param: str = "kernel") -> NF4Tensor:
    """The NF4Tensor of the [in, out] kernel stored as 4-bit module `weight_key` ("m.weight").

    keys: every tensor key of the checkpoint; get(key) -> array (read only for this module's keys).
    param: the kernel's jaxalign path, for error messages.
    Returns an NF4Tensor with `shape == kernel_shape` and `transposed=True` (bytes [out, in]).
    Raises BnbCheckpointError naming the tensor for fp4, incomplete key sets, and shape mismatch.
    """
    fp4 = f"{weight_key}.{FP4_STATE_KEY}"
    if fp4 in keys:
        raise BnbCheckpointError(f"tensor {fp4!r}: fp4 4-bit weights are not supported (only nf4)")
    present = side_keys(weight_key, keys)
    needed = [weight_key] + [f"{weight_key}.{s}" for s in _REQUIRED]
    if any(k.endswith(_NESTED) for k in present):
        needed += [f"{weight_key}.{s}" for s in _NESTED]
    missing = [k for k in needed if k not in keys]
    if missing:
        raise BnbCheckpointError(
            f"module {weight_key.removesuffix('.weight')!r} has bitsandbytes keys {present} but "
            f"lacks {missing} (a 4-bit weight needs all of them)")
    prefix = weight_key.removesuffix(".weight")
    try:
        q = bnb_state_to_nf4({k: get(k) for k in needed}, prefix, transposed=True)
    except ValueError as e:
        raise BnbCheckpointError(str(e)) from None
    want = tuple(int(d) for d in kernel_shape)
    if q.shape != want:
        qs_key = f"{weight_key}.{QUANT_STATE_KEY}"
        raise BnbCheckpointError(
            f"tensor {qs_key!r}: quant_state shape {list(q.storage_shape)} does not match "
            f"{param} [in, out] = {list(want)} (expected [out, in] = {list(reversed(want))})")
    return q


def nf4_kernel_state(weight_key: str, q: NF4Tensor, *, param: str = "kernel") -> dict:
    """The bitsandbytes keys (numpy arrays) of an [in, out] NF4 kernel saved as `weight_key`."""
    if not isinstance(q, NF4Tensor):
        raise TypeError(f"{param}: expected an NF4Tensor, got {type(q).__name__}")
    if len(q.shape) != 2 or not q.transposed:
        raise ValueError(
            f"{param}: an NF4 kernel saved for bitsandbytes must be 2-D and quantized with "
            f"transposed=True (bytes in [out, in] order, as quantize_params does); got shape "
            f"{q.shape}, transposed={q.transposed}")
    return nf4_to_bnb_state(weight_key.removesuffix(".weight"), q)


def bnb_quantization_config(kernels: Sequence[NF4Tensor], *, compute_dtype: Any,
                            skip_modules: Sequence[str]) -> dict:
    """The config.json `quantization_config` transformers writes for a 4-bit NF4 model.

    kernels: the NF4 leaves being saved (double quantization is reported as used when all use it;
      loading reads each module's own quant_state either way).
    compute_dtype: bitsandbytes' `bnb_4bit_compute_dtype` (the dtype of the 4-bit matmuls).
    skip_modules: every linear module stored dense. When this list is given transformers does not
      add its defaults, so it must include lm_head (tied or not): a module missing from it is
      built as Linear4bit and fails to load from a dense weight.
    """
    if not kernels:
        raise ValueError("bnb_quantization_config needs at least one NF4 kernel")
    return {
        "_load_in_4bit": True,
        "_load_in_8bit": False,
        "bnb_4bit_compute_dtype": jnp.dtype(compute_dtype).name,
        "bnb_4bit_quant_storage": "uint8",
        "bnb_4bit_quant_type": "nf4",
        "bnb_4bit_use_double_quant": all(q.double_quant for q in kernels),
        "llm_int8_enable_fp32_cpu_offload": False,
        "llm_int8_has_fp16_weight": False,
        "llm_int8_skip_modules": list(skip_modules),
        "llm_int8_threshold": 6.0,
        "load_in_4bit": True,
        "load_in_8bit": False,
        "quant_method": QUANT_METHOD,
    }

