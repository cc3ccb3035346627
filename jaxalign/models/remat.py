"""Activation rematerialisation that every XLA backend honours.

`jax.checkpoint` keeps the forward pass from being saved by wrapping the recomputation in
optimization barriers; XLA:CPU removes those barriers before common-subexpression elimination, so
the "recomputed" forward is merged with the original one and every layer's activations stay alive
(measured: the compiled temp of a remat'd Llama step grows by ~23 activation-sized buffers per
layer on CPU). Here the backward pass recomputes the block from its saved inputs *after adding a
+0.0 derived from the incoming cotangent* to the block input, so the recomputation is a different
value (no CSE) that cannot be scheduled before that layer's backward starts.

`remat_call(module_def, variables, *args)` runs one flax block this way; the models use it for
`remat=True` in training (no KV cache).
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax

from jaxalign.dependency import zero_cotangent, zero_from


def recompute_in_backward(fn: Callable[..., jax.Array]) -> Callable[..., jax.Array]:
    """fn(params, x, *rest) -> y [array], differentiable in params and x, whose VJP saves only its
    inputs and recomputes fn in the backward pass, tied to the cotangent (see module docstring).

    rest: further arguments (masks, positions, RNG keys; any pytree, may hold integers).
    """

    @jax.custom_vjp
    def f(params, x, *rest):
        return fn(params, x, *rest)

    def fwd(params, x, *rest):
        return fn(params, x, *rest), (params, x, rest)

    def bwd(res, g):
        params, x, rest = res
        x_tied = x + zero_from(g).astype(x.dtype)
        _, vjp = jax.vjp(lambda p, xx: fn(p, xx, *rest), params, x_tied)
        d_params, d_x = vjp(g)
        d_rest = zero_cotangent(rest)
        return (d_params, d_x, *d_rest)

    f.defvjp(fwd, bwd)
    return f


def remat_call(parent: nn.Module, block: nn.Module, name: str, x: jax.Array, *arrays: Any,
               static: tuple = (), rng: jax.Array | None = None) -> jax.Array:
    """Runs the child block `name` of `parent` as `block(x, *arrays, *static)` with
    `recompute_in_backward`; returns the block's first output.

    block: an unbound definition with the child's attributes; its variables are read from the
      parent's scope (every collection holding `name`, e.g. 'params' and 'lora').
    arrays: array arguments (pytrees; integer ones get no gradient); static: trailing Python
      arguments (None caches, flags), closed over. rng: the 'dropout' key, or None.
    """
    variables = {col: tree[name] for col, tree in parent.variables.items() if name in tree}

    def run(vs, xx, rest, key):
        rngs = {} if key is None else {"dropout": key}
        out = block.apply(vs, xx, *rest, *static, rngs=rngs)
        return out[0] if isinstance(out, tuple) else out

    return recompute_in_backward(run)(variables, x, arrays, rng)


def dropout_rng(module: nn.Module, lora: Any, deterministic: bool) -> jax.Array | None:
    """A fresh 'dropout' key from `module` when LoRA dropout is active, else None."""
    if deterministic or lora is None or not getattr(lora, "dropout", 0.0):
        return None
    return module.make_rng("dropout")
