"""NF4 block-wise 4-bit quantization with double quantization, byte-compatible with bitsandbytes.

QLoRA (Dettmers et al., 2023, https://arxiv.org/abs/2305.14314), as bitsandbytes 0.50 implements it
on CPU (`bitsandbytes.functional.quantize_4bit(..., quant_type="nf4")`):

* The tensor is flattened row-major and cut into blocks of `block_size` elements; the last block may
  be partial. absmax_b = max |w| over block b (fp32).
* Full blocks are scaled as w * fl(1 / absmax_b), a partial last block as w / max(absmax_b, 1e-38)
  (that clamped value is also what is stored for it); an all-zero block scales to 0.
* Code = the nearest NF4 value by midpoints, a tie going to the lower code (torch.bucketize).
* Two codes per byte, element 2i in the high nibble; an odd count is padded with code 7 (0.0).
* Double quantization (`compress_statistics=True`): offset = mean(absmax) (summed exactly as torch's
  CPU `sum` does), then absmax - offset is quantized to 8 bits in blocks of 256 with the signed
  dynamic map; bitsandbytes' CPU kernel rounds through a 65536-entry table, reproduced here.
  Storage: 4 + 8/64 + 32/(64*256) = 4.127 bits per parameter at block 64.

`NF4Tensor` stores the bytes in PyTorch's [out, in] weight layout. A flax Dense kernel is [in, out]
= W.T, so `quantize_nf4(kernel, transposed=True)` quantizes kernel.T and dequantizes to [in, out].
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxalign.dependency import zero_from
from jaxalign.fusion import computed_once

Array = jax.Array

# bitsandbytes' NF4 codebook (index 0..15). Hard-coded: regenerating it from normal quantiles
# differs in the 7th digit.
NF4_CODE = np.array(
    [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
     -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
     0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
     0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0],
    dtype=np.float32,
)
_NF4_BOUNDS = ((NF4_CODE[:-1] + NF4_CODE[1:]) / np.float32(2)).astype(np.float32)
NESTED_BLOCK_SIZE = 256  # bitsandbytes' block size for the quantized absmax
_TINY_BITS = 0x006CE3EE  # float32(1e-38), a subnormal; built by bitcast so no flush-to-zero
_LUT_SIZE = 65536
_TORCH_SUM_LANES = 8  # torch's CPU float sum accumulates 8-lane vectors (checked against torch)


def _fma32(a, b, c) -> np.float32:
    """fl32(a * b + c) with one rounding; exact in float64 for the small operands used here."""
    return np.float32(np.float64(a) * np.float64(b) + np.float64(c))


@functools.cache
def dynamic_map() -> np.ndarray:
    """bitsandbytes' `create_dynamic_map(signed=True)`: 256 sorted fp32 values in [-0.993, 1].

    Reproduces torch's fp32 linspace (start + step * i, fused multiply-add) and fp32 products.
    """
    values = []
    for i in range(7):
        steps = 2**i + 1
        lo, hi = np.float32(0.1), np.float32(1.0)
        step = np.float32((hi - lo) / np.float32(steps - 1))
        bounds = np.array(
            [_fma32(step, k, lo) if k < steps // 2 else _fma32(-step, steps - k - 1, hi)
             for k in range(steps)], np.float32)
        means = ((bounds[:-1] + bounds[1:]) / np.float32(2)).astype(np.float32)
        scale = np.float32(10.0 ** (i - 6))
        values += list(scale * means) + list(-scale * means)
    values += [np.float32(0.0), np.float32(1.0)]
    return np.sort(np.array(values, np.float32))


@functools.cache
def _dynamic_lut(code_bytes: bytes) -> np.ndarray:
    """bitsandbytes' CPU 8-bit table: bin i (value -1 + 2i/65535) -> index of the nearest code."""
    code = np.frombuffer(code_bytes, np.float32)
    mid = (np.float32(0.5) * (code[:-1] + code[1:])).astype(np.float32)
    grid = (np.float32(-1.0) + np.arange(_LUT_SIZE, dtype=np.float32) * np.float32(2)
            / np.float32(_LUT_SIZE - 1)).astype(np.float32)
    return np.searchsorted(mid, grid, side="left").astype(np.uint8)


def _or_tiny(x: Array) -> Array:
    """max(x, float32(1e-38)) for x >= 0, selected bitwise: XLA on CPU flushes subnormal results."""
    bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
    bits = jnp.where(x == 0, jnp.uint32(_TINY_BITS), bits)
    return jax.lax.bitcast_convert_type(bits, jnp.float32)


# ---------------------------------------------------------------- torch's CPU fp32 sum, emulated
def _fold(x: Array) -> Array:
    """Left-to-right fp32 sum over axis 0, starting from 0 (no reassociation)."""
    acc = jnp.zeros(x.shape[1:], jnp.float32)
    if x.shape[0] <= 32:
        for i in range(x.shape[0]):
            acc = acc + x[i]
        return acc
    return jax.lax.scan(lambda a, r: (a + r, None), acc, x)[0]


def _multi_row_sum(rows: Array) -> Array:
    """ATen SumKernel.cpp `multi_row_sum`: 4-level cascade over rows [S, 4, W] -> [4, W]."""
    s = rows.shape[0]
    step = 1 << max(4, max(1, math.ceil(math.log2(max(s, 1)))) // 4)

    def chunk_sums(x):  # [m, ...] -> fold of each complete group of `step`, and the leftovers
        g = x.shape[0] // step
        full = x[: g * step].reshape(g, step, *x.shape[1:]).swapaxes(0, 1)
        return _fold(full), x[g * step:]

    c1, tail0 = chunk_sums(rows)
    c2, left1 = chunk_sums(c1)
    c3, left2 = chunk_sums(c2)
    return ((_fold(tail0) + _fold(left1)) + _fold(left2)) + _fold(c3)


def _row_sum(x: Array) -> Array:
    """ATen `row_sum` over x [size, W] with 4 accumulators -> [W]."""
    s = x.shape[0] // 4
    part = (_multi_row_sum(x[: 4 * s].reshape(s, 4, -1)) if s
            else jnp.zeros((4, x.shape[1]), jnp.float32))
    acc = part[0]
    for i in range(4 * s, x.shape[0]):
        acc = acc + x[i]
    return ((acc + part[1]) + part[2]) + part[3]


def torch_cpu_mean(x: Array) -> Array:
    """`torch.mean` of a 1-D fp32 tensor on CPU, bit for bit (single-threaded, i.e. < 32768 items).

    bitsandbytes' double-quantization offset is `absmax.mean()`; torch sums with 8-lane vectors,
    4 interleaved accumulators and a cascade, then divides by n.
    """
    x = x.astype(jnp.float32)
    n, lanes = x.shape[0], _TORCH_SUM_LANES
    if n >= lanes:
        nv = n // lanes
        vec = _row_sum(x[: nv * lanes].reshape(nv, lanes))
        total = _fold(x[nv * lanes:])
        for k in range(lanes):
            total = total + vec[k]
    else:
        total = _row_sum(x.reshape(n, 1))[0]
    # A barrier keeps XLA from rewriting the division by a constant into a reciprocal product.
    return total / jax.lax.optimization_barrier(jnp.float32(n))


# ---------------------------------------------------------------- block-wise kernels
def _blocks(flat: Array, block_size: int) -> Array:
    """[n] -> [ceil(n / block_size), block_size], zero padded."""
    nb = -(-flat.shape[0] // block_size)
    return jnp.pad(flat, (0, nb * block_size - flat.shape[0])).reshape(nb, block_size)


def _quantize_4bit(flat: Array, block_size: int) -> tuple[Array, Array]:
    """fp32 [n] -> (packed codes uint8 [ceil(n/2)], absmax fp32 [nblocks])."""
    n = flat.shape[0]
    x = _blocks(flat, block_size)
    absmax = jnp.max(jnp.abs(x), axis=1)
    zero = absmax == 0
    denom = jnp.where(zero, 1.0, absmax)
    scaled = x * (1.0 / denom)[:, None]
    if n % block_size:  # bnb divides the partial last block and stores max(absmax, 1e-38)
        scaled = scaled.at[-1].set(x[-1] / denom[-1])
        absmax = jnp.concatenate([absmax[:-1], _or_tiny(absmax[-1:])])
    scaled = jnp.clip(jnp.where(zero[:, None], 0.0, scaled), -1.0, 1.0).reshape(-1)
    scaled = scaled[: 2 * (-(-n // 2))]  # positions past n hold 0.0 -> code 7, like bnb's padding
    idx = jnp.sum(scaled[:, None] > jnp.asarray(_NF4_BOUNDS), axis=1).astype(jnp.uint8)
    return (idx[0::2] << 4) | idx[1::2], absmax


def _quantize_8bit(flat: Array, code: np.ndarray, block_size: int) -> tuple[Array, Array]:
    """bitsandbytes' CPU `quantize_blockwise`: fp32 [n] -> (codes uint8 [n], absmax fp32 [nb])."""
    n = flat.shape[0]
    x = _blocks(flat, block_size)
    absmax = jnp.max(jnp.where(jnp.isnan(x), 0.0, jnp.abs(x)), axis=1)
    v = x * (1.0 / absmax)[:, None]
    v = jnp.where(jnp.isnan(v), -1.0, jnp.clip(v, -1.0, 1.0))
    t = (v + 1.0) * 0.5
    t = (t * 65536.0 - t) + 0.5  # fl(t * 65535) via an exact product: immune to FMA contraction
    lut = jnp.asarray(_dynamic_lut(np.asarray(code, np.float32).tobytes()))
    q = jnp.where((absmax == 0)[:, None], jnp.uint8(0), lut[t.astype(jnp.int32)])
    return q.reshape(-1)[:n], absmax


def _no_contract(x: Array) -> Array:
    """x, hidden from LLVM's multiply-add contraction by a (NaN-preserving) select.

    Inside a fused XLA kernel `x * y + z` may become one FMA (one rounding); bitsandbytes rounds
    the product, then the sum.
    """
    return jnp.where(jnp.isnan(x), jnp.float32(jnp.nan), x)


def _dequantize_blocks(values: Array, scale: Array, n: int, block_size: int) -> Array:
    return (_blocks(values, block_size) * scale[:, None]).reshape(-1)[:n]


# ---------------------------------------------------------------- the pytree
@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["codes", "absmax", "nested_absmax", "offset"],
    meta_fields=["shape", "block_size", "dtype", "transposed", "nested_block_size", "nested_code"],
)
@dataclasses.dataclass(frozen=True)
class NF4Tensor:
    """An NF4-quantized array: a pytree whose leaves are the quantized buffers.

    Children: `codes` uint8 [ceil(n/2)] (two codes per byte, first in the high nibble); `absmax`
    fp32 [nblocks], or with double quantization uint8 [nblocks] codes of absmax - offset;
    `nested_absmax` fp32 [ceil(nblocks/256)] or None; `offset` fp32 [] or None.
    Static: `shape` (what `dequantize_nf4` returns), `block_size`, `dtype` of the original,
    `transposed` (bytes hold the [out, in] transpose of a 2-D [in, out] kernel), the nested block
    size and `nested_code` (the 256 fp32 dynamic-map bytes, None for bitsandbytes' default map).
    """

    codes: Any
    absmax: Any
    nested_absmax: Any
    offset: Any
    shape: tuple[int, ...]
    block_size: int
    dtype: Any
    transposed: bool = False
    nested_block_size: int = NESTED_BLOCK_SIZE
    nested_code: bytes | None = None

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def storage_shape(self) -> tuple[int, ...]:
        """Shape of the quantized (row-major) tensor: bitsandbytes' `quant_state.shape`."""
        return tuple(reversed(self.shape)) if self.transposed else tuple(self.shape)

    @property
    def double_quant(self) -> bool:
        return self.nested_absmax is not None

    @property
    def code_map(self) -> np.ndarray:
        """The 8-bit map of the quantized absmax (bitsandbytes' `nested_quant_map`)."""
        if self.nested_code is None:
            return dynamic_map()
        return np.frombuffer(self.nested_code, np.float32).copy()

    @property
    def nbytes(self) -> int:
        """Bytes held by the array children (codebooks are shared constants, not counted)."""
        return sum(int(np.prod(a.shape)) * np.dtype(a.dtype).itemsize
                   for a in (self.codes, self.absmax, self.nested_absmax, self.offset)
                   if a is not None)


def _check_block_size(block_size: Any, name: str = "block_size") -> None:
    ok = isinstance(block_size, (int, np.integer)) and not isinstance(block_size, bool)
    if not (ok and 32 <= block_size <= 4096 and block_size & (block_size - 1) == 0):
        raise ValueError(f"{name} must be a power of two in [32, 4096], got {block_size!r}")


def _gather_explicit(x: Any) -> Any:
    """Replicate an array sharded over Explicit mesh axes (None passes through).

    Explicit sharding type-checks every reshape, and block-wise quantization regroups the flattened
    tensor freely; arrays on Auto meshes are left to XLA's sharding propagation.
    """
    typeof = getattr(jax, "typeof", None)
    if x is None or typeof is None:
        return x
    sharding = typeof(x).sharding
    if any(axis is not None for axis in getattr(sharding, "spec", ())):
        whole = jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec())
        return jax.sharding.reshard(x, whole)
    return x


@functools.partial(jax.jit, static_argnames=("block_size", "double_quant", "transposed"))
def _quantize(w: Array, block_size: int, double_quant: bool, transposed: bool):
    w = _gather_explicit(w)
    src = w.T if transposed else w
    codes, absmax = _quantize_4bit(src.reshape(-1).astype(jnp.float32), block_size)
    if not double_quant:
        return codes, absmax, None, None
    offset = torch_cpu_mean(absmax)
    qabs, nested = _quantize_8bit(absmax - offset, dynamic_map(), NESTED_BLOCK_SIZE)
    return codes, qabs, nested, offset


def quantize_nf4(w: Any, *, block_size: int = 64, double_quant: bool = True,
                 transposed: bool = False) -> NF4Tensor:
    """Quantize a floating array to NF4 exactly as bitsandbytes' CPU `quantize_4bit` does.

    Args:
      w: floating array of any shape (fp32, bf16, fp16; others are cast to fp32 first), n > 0.
      block_size: elements per absmax block, a power of two in [32, 4096].
      double_quant: quantize the absmax vector too (bitsandbytes' `compress_statistics=True`).
      transposed: w is a 2-D [in, out] kernel; quantize w.T ([out, in], PyTorch's Linear layout).
    Returns:
      NF4Tensor whose `dequantize_nf4` has w's shape. Jit-able (all arguments but `w` static).

    Bytes equal bitsandbytes' for finite inputs, except: blocks made only of subnormals (XLA flushes
    them); the double-quantization offset of an all-zero tensor with a partial block (bnb's is the
    subnormal 5e-39); and, beyond 32768 blocks, offsets from a multi-threaded torch sum.
    """
    _check_block_size(block_size)
    dtype = getattr(w, "dtype", None)
    if dtype is None:
        w = jnp.asarray(w)
        dtype = w.dtype
    if not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(f"quantize_nf4 needs a floating array w, got dtype {dtype}")
    dtype = jax.dtypes.canonicalize_dtype(dtype)  # float64 -> float32 unless x64 is enabled
    shape = tuple(int(d) for d in np.shape(w))
    if math.prod(shape) == 0:
        raise ValueError(f"quantize_nf4 needs a non-empty array w, got shape {shape}")
    if transposed and len(shape) != 2:
        raise ValueError(f"transposed=True needs a 2-D [in, out] kernel, got shape {shape}")
    codes, absmax, nested, offset = _quantize(jnp.asarray(w), block_size, bool(double_quant),
                                              bool(transposed))
    return NF4Tensor(codes, absmax, nested, offset, shape=shape, block_size=block_size,
                     dtype=jnp.dtype(dtype), transposed=bool(transposed))


def dequantize_absmax(q: NF4Tensor) -> Array:
    """fp32 [nblocks] block scales; with double quantization code[q] * nested + offset."""
    if not q.double_quant:
        return q.absmax.astype(jnp.float32)
    code = jnp.asarray(q.code_map)
    nb = q.absmax.shape[0]
    scale = _dequantize_blocks(code[q.absmax.astype(jnp.int32)], q.nested_absmax, nb,
                               q.nested_block_size)
    return _no_contract(scale) + q.offset


def dequantize_nf4(q: NF4Tensor, dtype: Any = jnp.float32, *, after: Array | None = None) -> Array:
    """NF4Tensor -> array of `q.shape`: NF4_CODE[code] * absmax[block] in fp32, then cast to dtype.

    Matches bitsandbytes' `dequantize_4bit` (fp32 product, round-to-nearest-even cast). Jit-able.
    The codebook lookup is a 4-level select tree (elementwise), so XLA fuses the whole
    dequantization into one loop with no [n] fp32 intermediate; on the CPU a native kernel
    (`jaxalign.quant.nf4_cpu`, same arithmetic) takes its place where it could be built.

    after: optional array. The result then data-depends on one element of it (its values are
      unchanged: a +0.0 derived from that element's sign bit is added to the block scales, and
      a 0 byte from it is OR-ed into the codes and the 8-bit absmax), so a compiler cannot hoist
      any part of the dequantization before `after` exists. `nf4_matmul` passes the layer
      input, which keeps one layer's dequantized kernel alive at a time.
    """
    if not isinstance(q, NF4Tensor):
        raise TypeError(f"dequantize_nf4 needs an NF4Tensor, got {type(q).__name__}")
    if after is None:
        return _dequantize(q, jnp.dtype(dtype))
    return _dequantize_after(q, after, jnp.dtype(dtype))


def _lookup_nf4(nib: Array) -> Array:
    """NF4_CODE[nib] for uint8 codes in 0..15, as a select tree on the four bits (fp32)."""
    level = [jnp.float32(v) for v in NF4_CODE]
    for bit in range(4):
        on = (nib & (1 << bit)) != 0
        level = [jnp.where(on, level[2 * k + 1], level[2 * k]) for k in range(len(level) // 2)]
    return level[0]


def _dequantize_impl(q: NF4Tensor, dtype: Any, zero: Array | None) -> Array:
    q = jax.tree_util.tree_map(_gather_explicit, q)
    n, bs = q.size, q.block_size
    if zero is not None:
        # The integer children too wait for `after`: a 0 byte from `zero` is OR-ed into them, so
        # that no part of the dequantization (the codebook lookups need only the codes) can be
        # computed early and kept. Without it, XLA:GPU may materialise each code byte's two fp32
        # lookups ahead of time for every layer, depending on the GPU it compiles for: 240 GB
        # (H100) and 298 GB (H200) instead of 39.6 GB for the 65B QLoRA step.
        zb = zero.astype(jnp.uint8)
        q = dataclasses.replace(q, codes=q.codes | zb, absmax=(
            q.absmax | zb if jnp.issubdtype(q.absmax.dtype, jnp.integer) else q.absmax))

    def fused_loop(codes):
        # the [nblocks] scales once, not re-derived (double quant: a lookup, a product, a sum) for
        # each of the block's elements inside the fused dequantization loop; `zero` goes in with
        # them so that they too wait for `after`
        if zero is None:
            scale = computed_once(dequantize_absmax, q)
        else:
            scale = computed_once(lambda qq, z: dequantize_absmax(qq) + z, q, zero)
        codes = _blocks(codes, bs // 2)  # [nblocks, bs/2]: a block is bs/2 whole bytes (bs even)
        hi = _lookup_nf4(codes >> 4) * scale[:, None]
        lo = _lookup_nf4(codes & 15) * scale[:, None]
        return jnp.stack([hi, lo], axis=-1).reshape(-1)[:n]  # element 2i is the high nibble

    from jaxalign.quant import nf4_cpu  # the native CPU kernel, where it could be built

    # standalone dequantization only: inside nf4_matmul (`zero` given) XLA fuses the loop with the
    # transpose and the matmul's operand, which a custom call's output buffer would add to
    if zero is None and jax.default_backend() == "cpu" and nf4_cpu.available():
        out = jax.lax.platform_dependent(q.codes, cpu=lambda _: nf4_cpu.dequantize(q),
                                         default=fused_loop)
    else:
        out = fused_loop(q.codes)
    out = out.reshape(q.storage_shape)
    return (out.T if q.transposed else out).astype(dtype)


@functools.partial(jax.jit, static_argnames="dtype")
def _dequantize(q: NF4Tensor, dtype: Any) -> Array:
    return _dequantize_impl(q, dtype, None)


@functools.partial(jax.jit, static_argnames="dtype")
def _dequantize_after(q: NF4Tensor, after: Array, dtype: Any) -> Array:
    return _dequantize_impl(q, dtype, zero_from(after))


def as_dense(w: Any, dtype: Any = None) -> Any:
    """w itself, or dequantized (to `dtype`, default its original dtype) when it is an NF4Tensor."""
    if isinstance(w, NF4Tensor):
        return dequantize_nf4(w, w.dtype if dtype is None else dtype)
    return w
