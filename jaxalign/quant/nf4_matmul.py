"""x @ W for an NF4 base weight W, with QLoRA's memory behaviour under jit and autodiff.

`nf4_matmul(x, q) == x @ dequantize_nf4(q, x.dtype)` (bit for bit), with a custom VJP that
(a) saves only the quantized weight for the backward pass, never the dequantized kernel, and
(b) dequantizes again in the backward pass, tied to the incoming cotangent, as bitsandbytes'
`MatMul4Bit` does. Each dequantization data-depends on the activation it multiplies
(`dequantize_nf4(..., after=x)`), so the compiler cannot hoist every layer's dequantization to the
start of the program: one layer's dense kernel is alive at a time, forward and backward.

The NF4 weight is frozen: its cotangent is zero (float children) / float0 (integer children).
"""

from __future__ import annotations

import jax

from jaxalign.dependency import zero_cotangent
from jaxalign.quant.nf4 import NF4Tensor, dequantize_nf4


@jax.custom_vjp
def nf4_matmul(x: jax.Array, q: NF4Tensor) -> jax.Array:
    """x [..., in] @ dequantize_nf4(q) [in, out] -> [..., out], computed in x.dtype."""
    return x @ dequantize_nf4(q, x.dtype, after=x)


def _fwd(x, q):
    return nf4_matmul(x, q), q


def _bwd(q, g):
    w = dequantize_nf4(q, g.dtype, after=g)
    return g @ w.T, zero_cotangent(q)


nf4_matmul.defvjp(_fwd, _bwd)
