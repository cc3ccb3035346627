"""A data dependency with no value: how jaxalign orders work that XLA would otherwise hoist.

XLA:CPU strips optimization barriers before scheduling and CSE, so "compute this only after that"
is expressed as data: `zero_from(x)` is an fp32 +0.0 computed from one element of `x`. Adding it to
an input makes everything downstream depend on `x` without changing any value (the +0.0 comes from
the sign bit, so it is finite even when x holds NaN or inf, and XLA does not fold float x * 0;
like any arithmetic op on XLA:CPU the addition flushes subnormals, and -0.0 becomes +0.0).
Used by `jaxalign.quant.nf4_matmul` (dequantize one layer at a time) and `jaxalign.models.remat`
(recompute a block only in its own backward step), whose custom VJPs also share `zero_cotangent`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def zero_from(x: jax.Array) -> jax.Array:
    """fp32 scalar +0.0 that data-depends on x[0, ..., 0]."""
    first = x[(0,) * x.ndim].astype(jnp.float32)
    sign = jax.lax.shift_right_logical(jax.lax.bitcast_convert_type(first, jnp.uint32),
                                       jnp.uint32(31))
    return sign.astype(jnp.float32) * jnp.float32(0.0)


def zero_cotangent(tree):
    """The zero cotangent of a pytree of arrays: zeros for float leaves, float0 for integer ones
    (what a custom VJP returns for inputs it does not differentiate)."""
    def zero(a):
        a = jnp.asarray(a)
        if jnp.issubdtype(a.dtype, jnp.inexact):
            return jnp.zeros_like(a)
        return jnp.zeros(a.shape, jax.dtypes.float0)

    return jax.tree.map(zero, tree)
