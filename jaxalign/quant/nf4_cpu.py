"""A native NF4 dequantization kernel for XLA:CPU, built on first use and called through jax.ffi.

XLA:CPU compiles `dequantize_nf4` into one fused loop, but a 16-way select per code and the
interleaving of high and low nibbles leave it well below memory speed (RESULTS.md, nf4_ops).
`nf4_cpu.cc` is the same arithmetic written for the CPU: a 16-lane permute looks the codes up,
double-quantized block scales are decoded in the kernel, non-temporal stores write large outputs
whose pages are already mapped, whole blocks go to each core.

`available()` compiles the kernel with the C++ compiler (`$CXX`, else `c++`) for this machine
(`-march=native`) into a per-user cache (`$JAXALIGN_CACHE_DIR` or `~/.cache/jaxalign`), keyed by
the source, the compiler flags, jaxlib's version and the CPU's feature flags, and registers it
with XLA. It returns False, after one warning that says why, when there is no compiler or the
build fails; `JAXALIGN_NATIVE=0` turns the kernel off. `dequantize_nf4` then uses it for the CPU
platform only (`jax.lax.platform_dependent`): GPUs and TPUs keep the XLA loop.
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxalign import native

TARGET = "jaxalign_nf4_dequantize"
SOURCE = Path(__file__).with_name("nf4_cpu.cc")
# -ffp-contract=off: the scale's product and sum are rounded separately, as bitsandbytes does
FLAGS = native.BASE_FLAGS + ("-ffp-contract=off",)
threads = native.threads


def library_path(compiler: str) -> Path:
    """Where the kernel built by `compiler` for this machine is cached."""
    return native.library_path(SOURCE, FLAGS, compiler)


def build(compiler: str | None = None, *, out: Path | None = None, extra_flags=()) -> Path:
    """Compiles nf4_cpu.cc into a shared library (`jaxalign.native.build`) and returns its path.
    Raises RuntimeError with the compiler's message when it fails."""
    return native.build(SOURCE, FLAGS + tuple(extra_flags), compiler, out=out)


def register(path: Path, target: str = TARGET) -> None:
    """Loads a built kernel library and registers its handlers with XLA:CPU as `target` (fp32
    block scales given) and `target + '_double'` (double quantization decoded in the kernel)."""
    lib = ctypes.cdll.LoadLibrary(str(path))
    jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(lib.JaxalignNf4Dequantize), platform="cpu")
    jax.ffi.register_ffi_target(target + "_double", jax.ffi.pycapsule(lib.JaxalignNf4DequantizeDouble),
                                platform="cpu")


@functools.cache
def available() -> bool:
    """Whether the native kernel is built and registered (once per process; see module doc)."""
    return native.load(lambda: register(build()), what="the native NF4 CPU kernel",
                       fallback="dequantize_nf4 uses XLA's loop on the CPU")


def dequantize_flat(codes, scale, *, size: int, block_size: int, target: str = TARGET):
    """fp32 [size]: NF4_CODE[nibble] * scale[block], element 2i from the high nibble of codes[i].
    codes uint8 [ceil(size / 2)], scale fp32 [ceil(size / block_size)]. CPU only (needs
    `available()`)."""
    call = jax.ffi.ffi_call(target, jax.ShapeDtypeStruct((size,), jnp.float32),
                            vmap_method="sequential")
    return call(codes, scale.astype(jnp.float32), block_size=np.int64(block_size),
                threads=np.int64(threads()))


def dequantize(q, *, target: str = TARGET):
    """fp32 [q.size] in storage order: the NF4Tensor `q` dequantized by the native kernel, block
    scales included (with double quantization they are decoded block by block in the kernel, not
    materialised first). CPU only (needs `available()`)."""
    if not q.double_quant or jnp.dtype(q.absmax.dtype) != jnp.uint8:
        from jaxalign.quant.nf4 import dequantize_absmax

        return dequantize_flat(q.codes, dequantize_absmax(q), size=q.size, block_size=q.block_size,
                               target=target)
    call = jax.ffi.ffi_call(target + "_double", jax.ShapeDtypeStruct((q.size,), jnp.float32),
                            vmap_method="sequential")
    return call(q.codes, q.absmax, jnp.asarray(q.code_map, jnp.float32),
                q.nested_absmax.astype(jnp.float32), jnp.reshape(q.offset, (1,)).astype(jnp.float32),
                block_size=np.int64(q.block_size), nested_block_size=np.int64(q.nested_block_size),
                threads=np.int64(threads()))
