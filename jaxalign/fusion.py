"""`computed_once(fn, *args)`: fn(*args) as its own XLA computation, not fused into its consumers.

XLA fuses elementwise producers into every consumer. For cheap producers that is right; for
per-element work such as transcendentals or table lookups whose result is read many times it
recomputes the work in each consumer: the rope cos/sin of every layer's q/k rotation (forward
and backward), or the double-quantized NF4 block scale of every weight element. XLA:CPU also drops
`jax.lax.optimization_barrier` before fusion, so the barrier does not help there. A conditional
is a fusion boundary on every backend: `computed_once` runs `fn` as both branches of a
`lax.cond` whose predicate is read from the data (so it is not folded away). Both branches are
the same function, so the predicate never changes the result; values, gradients and vmap are
those of `fn(*args)`.

Only the CPU gets the conditional (`jax.lax.platform_dependent`): XLA's GPU backend reads a
conditional's predicate on the host, a device-to-host wait per call, so GPUs and TPUs run
`fn(*args)` inline and leave fusion to their compilers.
"""

from __future__ import annotations

from typing import Any, Callable

import jax


def _array_leaves(args) -> list:
    return [x for x in jax.tree.leaves(args) if hasattr(x, "ravel") and getattr(x, "size", 0)]


def computed_once(fn: Callable[..., Any], *args: Any) -> Any:
    """fn(*args), materialised once. args: pytrees of arrays; the predicate reads the first
    element of the first non-empty array leaf (fn runs inline when there is none)."""
    if not _array_leaves(args):
        return fn(*args)

    def separate(*a):
        first = _array_leaves(a)[0].ravel()[0]
        return jax.lax.cond(first == first, fn, fn, *a)

    return jax.lax.platform_dependent(*args, cpu=separate, default=fn)
