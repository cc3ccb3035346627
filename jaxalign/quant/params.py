"""QLoRA base weights: swap Dense kernels in a params tree for NF4Tensors and back.

Paths are the '/'-joined keys of the tree, e.g. "layers_0/attn/q_proj/kernel". A kernel is
[in, out]; it is quantized with `transposed=True` so its bytes match bitsandbytes' [out, in] weight.
"""

from __future__ import annotations

import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxalign.quant.nf4 import NF4Tensor, _check_block_size, dequantize_nf4, quantize_nf4

# Every `kernel` leaf except those under an lm_head or an embedding module.
DEFAULT_TARGETS = r"^(?!.*(?:^|/)(?:lm_head|embed[^/]*)/).*(?:^|/)kernel$"


def _path_str(path: tuple[Any, ...]) -> str:
    parts = []
    for k in path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
        else:
            parts.append(str(k))
    return "/".join(parts)


def _is_nf4(x: Any) -> bool:
    return isinstance(x, NF4Tensor)


def quantize_params(params: Any, *, targets: str = DEFAULT_TARGETS, block_size: int = 64,
                    double_quant: bool = True) -> Any:
    """Replace each 2-D `kernel` leaf whose path matches `targets` (re.search) by an NF4Tensor.

    Already-quantized leaves are kept. Raises ValueError if `targets` selects a kernel that is not a
    2-D floating array, or selects nothing at all (a typo in the pattern).
    """
    _check_block_size(block_size)
    pattern = re.compile(targets)
    hits = []

    def visit(path, leaf):
        name = _path_str(path)
        if _is_nf4(leaf) or not name.split("/")[-1] == "kernel" or not pattern.search(name):
            return leaf
        shape, dtype = np.shape(leaf), getattr(leaf, "dtype", None)
        if len(shape) != 2 or dtype is None or not jnp.issubdtype(dtype, jnp.floating):
            raise ValueError(f"quantize_params: targets {targets!r} selects {name!r} with shape "
                             f"{shape} and dtype {dtype}; expected a 2-D floating [in, out] kernel")
        hits.append(name)
        return quantize_nf4(leaf, block_size=block_size, double_quant=double_quant,
                            transposed=True)

    out = jax.tree_util.tree_map_with_path(visit, params, is_leaf=_is_nf4)
    already = any(_is_nf4(x) for x in jax.tree_util.tree_leaves(params, is_leaf=_is_nf4))
    if not hits and not already:
        raise ValueError(f"quantize_params: targets {targets!r} matched no kernel leaf")
    return out


def dequantize_params(params: Any, dtype: Any = None) -> Any:
    """Replace every NF4Tensor by its dequantized array (`dtype`, default the original dtype)."""
    def visit(leaf):
        if _is_nf4(leaf):
            return dequantize_nf4(leaf, leaf.dtype if dtype is None else dtype)
        return leaf

    return jax.tree_util.tree_map(visit, params, is_leaf=_is_nf4)


def quantized_bits(q: NF4Tensor) -> int:
    """Storage bits of one NF4Tensor: codes, absmax, nested absmax and offset.

    The shared codebooks (16 NF4 values, 256 dynamic-map values) are constants and not counted.
    """
    return 8 * q.nbytes


def bits_per_parameter(params: Any) -> float:
    """Mean storage bits per quantized parameter over all NF4Tensor leaves (4.127 for QLoRA)."""
    leaves = [x for x in jax.tree_util.tree_leaves(params, is_leaf=_is_nf4) if _is_nf4(x)]
    if not leaves:
        raise ValueError("bits_per_parameter: params contain no NF4Tensor leaf")
    return sum(quantized_bits(q) for q in leaves) / sum(q.size for q in leaves)
