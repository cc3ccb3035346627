"""Fused masked attention for XLA:CPU: a native kernel (`attention_cpu.cc`) with its own backward,
called through `jax.ffi` by `jaxalign.models.layers.dot_product_attention` on the CPU.

Why: at the shapes of small-model training on a CPU, XLA computes attention as batched matmuls
that barely use a second core, surrounded by head-major transposes of q, k, v and the output, and
materialises the [B, H, T, S] probabilities for the backward pass. The kernel reads q/k/v in the
models' [B, T, heads, D] layout, runs one task per (batch row, kv head) on every core (workers
from XLA's own intra-op thread pool, which threads of its own would compete with), recomputes
the probabilities in the backward pass from the saved log-sum-exp, and skips every key tile the
mask hides from a whole block of queries (the causal upper triangle, padding, and the other
continuation of a prefix-shared pair).

`usable(q, k, v, dtype)` says whether the kernel takes a call: fp32 q/k/v and compute dtype,
head_dim a multiple of 16, JAX's default backend the CPU with one device (a sharded program keeps
XLA's attention, which the SPMD partitioner can split), and the kernel built (`jaxalign.native`; `JAXALIGN_NATIVE=0` turns it off,
as does a missing compiler, with one warning). The kernel has a reverse-mode derivative only
(`jax.custom_vjp`): forward-mode or second derivatives need `JAXALIGN_NATIVE=0`.
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxalign import native

TARGET = "jaxalign_attention"
SOURCE = Path(__file__).with_name("attention_cpu.cc")
FLAGS = native.BASE_FLAGS + ("-ffp-contract=fast",)


def build(compiler: str | None = None, *, out: Path | None = None, extra_flags=()) -> Path:
    """Compiles attention_cpu.cc (`jaxalign.native.build`); returns the library's path."""
    return native.build(SOURCE, FLAGS + tuple(extra_flags), compiler, out=out)


def register(path: Path, target: str = TARGET) -> None:
    """Registers a built library's forward and backward handlers as `target + '_fwd' / '_bwd'`."""
    lib = ctypes.cdll.LoadLibrary(str(path))
    jax.ffi.register_ffi_target(target + "_fwd", jax.ffi.pycapsule(lib.JaxalignAttentionForward),
                                platform="cpu")
    jax.ffi.register_ffi_target(target + "_bwd", jax.ffi.pycapsule(lib.JaxalignAttentionBackward),
                                platform="cpu")


@functools.cache
def available() -> bool:
    """Whether the kernel is built and registered (once per process)."""
    return native.load(lambda: register(build()), what="the native CPU attention kernel",
                       fallback="attention uses XLA's matmuls")


def usable(q, k, v, dtype=jnp.float32) -> bool:
    """Whether `attention` can take these operands, computing in `dtype`, here (module doc)."""
    return (all(jnp.dtype(x) == jnp.float32 for x in (q.dtype, k.dtype, v.dtype, dtype))
            and q.shape[-1] % 16 == 0 and q.shape[2] % k.shape[2] == 0
            and jax.default_backend() == "cpu" and jax.device_count() == 1 and available())


def _forward(q, k, v, mask, cos, sin, scale, target):
    b, t, h, _ = q.shape
    call = jax.ffi.ffi_call(target + "_fwd", (jax.ShapeDtypeStruct(q.shape, jnp.float32),
                                              jax.ShapeDtypeStruct((b, h, t), jnp.float32)),
                            vmap_method="sequential")
    return call(q, k, v, mask, cos, sin, scale=np.float32(scale), threads=np.int64(native.threads()))


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7))
def _attention(q, k, v, mask, cos, sin, scale, target):
    return _forward(q, k, v, mask, cos, sin, scale, target)[0]


def _attention_fwd(q, k, v, mask, cos, sin, scale, target):
    out, lse = _forward(q, k, v, mask, cos, sin, scale, target)
    return out, (q, k, v, mask, cos, sin, out, lse)


def _attention_bwd(scale, target, res, dout):
    q, k, v, mask, cos, sin, out, lse = res
    call = jax.ffi.ffi_call(target + "_bwd", tuple(jax.ShapeDtypeStruct(x.shape, jnp.float32)
                                                   for x in (q, k, v)),
                            vmap_method="sequential")
    dq, dk, dv = call(q, k, v, mask, cos, sin, out, lse, dout.astype(jnp.float32),
                      scale=np.float32(scale), threads=np.int64(native.threads()))
    return dq, dk, dv, None, None, None  # the mask and the rope tables get no gradient


_attention.defvjp(_attention_fwd, _attention_bwd)


def attention(q, k, v, mask, *, scale: float, rope=None, target: str = TARGET):
    """softmax(scale * q k^T, masked) v by the native kernel, differentiable in q, k, v.

    q [B, T, H, D], k/v [B, S, KVH, D] fp32 (H a multiple of KVH, D of 16), mask bool
    [B, 1, T, S] or [B, T, S] -> [B, T, H, D]. A query row without a visible key gives zeros.
    rope: optional (cos, sin) from `jaxalign.models.layers.rope_tables` ([B, T, 1, D], self-attention
    only: S = T): q and k are then rotated inside the kernel (`apply_rope` on both first, fused),
    and their gradients are returned for the unrotated inputs.
    Needs `available()`; `usable` checks the rest.
    """
    if target == TARGET and not available():
        raise RuntimeError("the native CPU attention kernel is unavailable (see the warning)")
    if mask.ndim == 4:
        mask = mask[:, 0]
    if rope is None:
        cos = sin = jnp.zeros((0,), jnp.float32)
    else:
        b, t, _, d = q.shape
        if k.shape[1] != t:
            raise ValueError(f"attention: rope inside the kernel needs self-attention (S = T), got "
                             f"T={t}, S={k.shape[1]}")
        cos, sin = (jnp.reshape(x, (b, t, d)).astype(jnp.float32) for x in rope)
    return _attention(q, k, v, mask.astype(jnp.uint8), cos, sin, float(scale), target)
