"""The native NF4 CPU kernel: built and used here, bit for bit the NF4 product for every block size,
odd and partial sizes, both quantization modes, threaded and scalar builds; without a compiler (or
with JAXALIGN_NATIVE=0) dequantize_nf4 falls back to XLA's loop with one warning."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxalign.quant import dequantize_nf4, nf4_cpu, quantize_nf4
from jaxalign.quant.nf4 import NF4_CODE, dequantize_absmax
from tests.native_fallback import CASES, last_line


def _numpy_dequantize(q):
    """NF4_CODE[nibble] * scale[block] in numpy fp32 (the same single rounding), storage order."""
    codes = np.asarray(q.codes)
    nib = np.stack([codes >> 4, codes & 15], -1).reshape(-1)[:q.size]
    scale = np.asarray(dequantize_absmax(q))
    return NF4_CODE[nib] * np.repeat(scale, q.block_size)[:q.size]


def test_kernel_is_built_and_registered_here():
    assert nf4_cpu.available(), "the CI machine has a C++ compiler: the native kernel must build"


@pytest.mark.parametrize("shape,block,double", [
    ((37, 129), 64, True),      # odd size: the last byte holds one code; partial last block
    ((3, 5), 32, False),        # smaller than one block
    ((1000, 523), 128, True),   # > 2^18 elements per thread: two threads, uneven split
    ((64, 4096 + 32), 4096, True),
    ((700, 800), 64, False),
])
def test_native_equals_the_nf4_product(shape, block, double):
    w = np.random.default_rng(sum(shape)).standard_normal(shape).astype(np.float32)
    q = quantize_nf4(jnp.asarray(w), block_size=block, double_quant=double)
    want = _numpy_dequantize(q).reshape(shape)
    np.testing.assert_array_equal(np.asarray(dequantize_nf4(q)), want)
    np.testing.assert_array_equal(np.asarray(jax.jit(dequantize_nf4)(q)), want)
    bf = np.asarray(dequantize_nf4(q, jnp.bfloat16)).astype(np.float32)
    np.testing.assert_array_equal(bf, np.asarray(jnp.asarray(want).astype(jnp.bfloat16)).astype(np.float32))
    # a transposed kernel: the same bytes, dequantized to [in, out]
    qt = quantize_nf4(jnp.asarray(w.T), block_size=block, double_quant=double, transposed=True)
    np.testing.assert_array_equal(np.asarray(dequantize_nf4(qt)), want.T)


def test_scalar_build_equals_the_avx512_build(tmp_path):
    """The portable loop (what a CPU without AVX-512 runs) gives the same values."""
    path = nf4_cpu.build(out=tmp_path / "scalar.so", extra_flags=("-mno-avx512f",))
    nf4_cpu.register(path, target="jaxalign_nf4_dequantize_scalar_test")
    w = np.random.default_rng(1).standard_normal((300, 301)).astype(np.float32)
    for double in (True, False):
        q = quantize_nf4(jnp.asarray(w), block_size=64, double_quant=double)
        got = nf4_cpu.dequantize(q, target="jaxalign_nf4_dequantize_scalar_test")
        np.testing.assert_array_equal(np.asarray(got), _numpy_dequantize(q))


SCRIPT = """
import warnings, numpy as np, jax.numpy as jnp
from jaxalign.quant import dequantize_nf4, nf4_cpu, quantize_nf4
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    ok = nf4_cpu.available()
w = np.random.default_rng(0).standard_normal((33, 65)).astype(np.float32)
q = quantize_nf4(jnp.asarray(w), block_size=64)
d = np.asarray(dequantize_nf4(q))
print(ok, len(caught), np.abs(d - w).max() < 0.5, [str(c.message)[:200] for c in caught])
"""


@pytest.mark.parametrize("env,warned", CASES)
def test_fallback_without_the_kernel(tmp_path, env, warned):
    line = last_line(SCRIPT, tmp_path, env)
    assert line.startswith(f"False {warned} True"), line
    if warned:
        assert "no-such-compiler" in line and "XLA's loop" in line
