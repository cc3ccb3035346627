"""bitsandbytes-format state dicts for NF4 weights (what `Linear4bit` / transformers save).

For a module prefix `p` (e.g. "model.layers.0.self_attn.q_proj") bitsandbytes writes:

  p.weight                                uint8 [ceil(n/2), 1]  packed codes, high nibble first
  p.weight.absmax                         fp32 [nblocks], or uint8 [nblocks] with double quant
  p.weight.quant_map                      fp32 [16]   the NF4 codebook
  p.weight.nested_absmax                  fp32 [ceil(nblocks/256)]        (double quant only)
  p.weight.nested_quant_map               fp32 [256]  signed dynamic map   (double quant only)
  p.weight.quant_state.bitsandbytes__nf4  uint8 [k]   UTF-8 JSON: quant_type, blocksize, dtype,
                                          shape [out, in], nested_blocksize, nested_dtype,
                                          nested_offset (`QuantState.as_dict(packed=True)`)

Arrays are numpy, ready for `safetensors.numpy.save_file`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np

from jaxalign.quant.nf4 import NF4_CODE, NESTED_BLOCK_SIZE, NF4Tensor, _check_block_size
from jaxalign.quant.nf4 import dynamic_map

QUANT_STATE_KEY = "quant_state.bitsandbytes__nf4"


def _key(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def nf4_to_bnb_state(prefix: str, q: NF4Tensor) -> dict[str, np.ndarray]:
    """The state-dict entries bitsandbytes writes for a 4-bit NF4 `Linear4bit` weight at `prefix`.

    `quant_state.shape` is `q.storage_shape` ([out, in] for a transposed flax kernel).
    """
    if not isinstance(q, NF4Tensor):
        raise TypeError(f"nf4_to_bnb_state needs an NF4Tensor, got {type(q).__name__}")
    w = _key(prefix, "weight")
    meta: dict[str, Any] = {
        "quant_type": "nf4",
        "blocksize": int(q.block_size),
        "dtype": np.dtype(q.dtype).name,
        "shape": [int(d) for d in q.storage_shape],
    }
    state = {
        w: np.asarray(q.codes, np.uint8).reshape(-1, 1),
        f"{w}.absmax": np.asarray(q.absmax),
        f"{w}.quant_map": NF4_CODE.copy(),
    }
    if q.double_quant:
        state[f"{w}.nested_absmax"] = np.asarray(q.nested_absmax, np.float32)
        state[f"{w}.nested_quant_map"] = np.asarray(q.code_map, np.float32)
        meta.update(nested_blocksize=int(q.nested_block_size), nested_dtype="float32",
                    nested_offset=float(np.asarray(q.offset, np.float32)))
    packed = json.dumps(meta).encode("utf-8")
    state[f"{w}.{QUANT_STATE_KEY}"] = np.frombuffer(packed, np.uint8).copy()
    return state


def _get(state: Mapping[str, Any], key: str, prefix: str) -> np.ndarray:
    if key not in state:
        near = sorted(k for k in state if k.startswith(_key(prefix, "weight")))
        raise ValueError(f"bitsandbytes state is missing key {key!r} (keys under this prefix: "
                         f"{near})")
    return np.asarray(state[key])


def _check(cond: bool, key: str, what: str, got: Any) -> None:
    if not cond:
        raise ValueError(f"bitsandbytes state key {key!r}: expected {what}, got {got}")


def bnb_state_to_nf4(state: Mapping[str, Any], prefix: str, *,
                     transposed: bool | None = None) -> NF4Tensor:
    """Read the NF4 weight at `prefix` from a bitsandbytes-format state dict (numpy/torch arrays).

    transposed: return a tensor that dequantizes to the transpose of bitsandbytes' [out, in]
      weight, i.e. a flax [in, out] kernel. Default: True for 2-D weights, False otherwise.
    """
    w = _key(prefix, "weight")
    qs_key = f"{w}.{QUANT_STATE_KEY}"
    raw = _get(state, qs_key, prefix)
    try:
        meta = json.loads(bytes(raw.astype(np.uint8).reshape(-1)).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"bitsandbytes state key {qs_key!r} is not packed JSON: {e}") from None
    for field in ("quant_type", "blocksize", "dtype", "shape"):
        _check(field in meta, qs_key, f"a {field!r} field", sorted(meta))
    _check(meta["quant_type"] == "nf4", qs_key, "quant_type 'nf4'", repr(meta["quant_type"]))
    block_size = meta["blocksize"]
    _check_block_size(block_size, name=f"{qs_key} blocksize")
    storage_shape = tuple(int(d) for d in meta["shape"])
    try:
        dtype = jnp.dtype(meta["dtype"])
    except TypeError:
        raise ValueError(f"bitsandbytes state key {qs_key!r}: unknown dtype "
                         f"{meta['dtype']!r}") from None
    n = math.prod(storage_shape)
    nblocks = -(-n // block_size)
    if transposed is None:
        transposed = len(storage_shape) == 2
    if transposed and len(storage_shape) != 2:
        raise ValueError(f"transposed=True needs a 2-D weight, {qs_key!r} has shape "
                         f"{storage_shape}")

    codes = _get(state, w, prefix)
    if codes.dtype != np.uint8:  # bitsandbytes' quant_storage may be another dtype: same bytes
        codes = np.ascontiguousarray(codes).view(np.uint8)
    codes = codes.reshape(-1)
    _check(codes.size == -(-n // 2), w, f"{-(-n // 2)} packed bytes for shape {storage_shape}",
           codes.size)
    qmap = _get(state, f"{w}.quant_map", prefix)
    _check(np.array_equal(qmap.astype(np.float32).reshape(-1), NF4_CODE), f"{w}.quant_map",
           "the NF4 codebook", qmap)
    absmax = _get(state, f"{w}.absmax", prefix).reshape(-1)
    _check(absmax.size == nblocks, f"{w}.absmax", f"{nblocks} blocks", absmax.size)

    nested = offset = nested_code = None
    nested_bs = NESTED_BLOCK_SIZE
    if "nested_offset" in meta or f"{w}.nested_absmax" in state:
        nested = _get(state, f"{w}.nested_absmax", prefix).astype(np.float32).reshape(-1)
        nmap = _get(state, f"{w}.nested_quant_map", prefix).astype(np.float32).reshape(-1)
        _check(nmap.size == 256, f"{w}.nested_quant_map", "256 values", nmap.size)
        _check("nested_offset" in meta, qs_key, "a 'nested_offset' field", sorted(meta))
        nested_bs = int(meta.get("nested_blocksize", NESTED_BLOCK_SIZE))
        _check(nested_bs > 0, qs_key, "a positive nested_blocksize", nested_bs)
        _check(nested.size == -(-nblocks // nested_bs), f"{w}.nested_absmax",
               f"{-(-nblocks // nested_bs)} blocks", nested.size)
        _check(absmax.dtype == np.uint8, f"{w}.absmax", "uint8 codes with double quant",
               absmax.dtype)
        offset = jnp.asarray(np.float32(meta["nested_offset"]))
        if not np.array_equal(nmap.view(np.uint32), dynamic_map().view(np.uint32)):
            nested_code = nmap.tobytes()
        nested = jnp.asarray(nested)
        absmax = jnp.asarray(absmax)
    else:
        absmax = jnp.asarray(absmax.astype(np.float32))
    shape = tuple(reversed(storage_shape)) if transposed else storage_shape
    return NF4Tensor(jnp.asarray(codes), absmax, nested, offset, shape=shape,
                     block_size=int(block_size), dtype=dtype,
                     transposed=bool(transposed), nested_block_size=nested_bs,
                     nested_code=nested_code)
