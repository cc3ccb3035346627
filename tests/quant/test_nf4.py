"""NF4: closed-form values and byte equality with bitsandbytes 0.50 on CPU (the oracle)."""

import os
import subprocess
import sys
import textwrap

import bitsandbytes.functional as bnbF
import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
from bitsandbytes.backends.default.ops import _dequantize_4bit_compute
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxalign.quant import NF4_CODE, NF4Tensor, as_dense, dequantize_nf4, dynamic_map, quantize_nf4
from jaxalign.quant.nf4 import torch_cpu_mean

TORCH_DTYPE = {np.dtype(np.float32): torch.float32, np.dtype(np.float16): torch.float16,
               np.dtype(ml_dtypes.bfloat16): torch.bfloat16}


def to_torch(w):
    w = np.asarray(w)
    return torch.from_numpy(w.astype(np.float32)).to(TORCH_DTYPE[w.dtype])


def bnb_quantize(w, block_size, double_quant):
    return bnbF.quantize_4bit(to_torch(w), blocksize=block_size, quant_type="nf4",
                              compress_statistics=double_quant)


def bnb_dequantize(packed, state):
    with torch._dynamo.config.patch(disable=True):  # bnb's odd-shape fallback uses torch.compile
        out = bnbF.dequantize_4bit(packed, state, quant_type="nf4")
    return out.float().numpy().reshape(tuple(state.shape))  # 1-D comes back as [1, n]


def bits(x):
    x = np.asarray(x)
    return x.view({1: np.uint8, 2: np.uint16, 4: np.uint32}[x.dtype.itemsize])


def assert_same_bytes(q, packed, state):
    np.testing.assert_array_equal(np.asarray(q.codes), packed.numpy().reshape(-1))
    np.testing.assert_array_equal(bits(q.absmax), bits(state.absmax.numpy()))
    assert q.double_quant == state.nested
    if state.nested:
        np.testing.assert_array_equal(bits(q.nested_absmax), bits(state.state2.absmax.numpy()))
        assert bits(q.offset) == bits(state.offset.numpy())


def sample(kind, n, seed=0):
    rng = np.random.default_rng(seed)
    if kind == "normal":
        return rng.standard_normal(n).astype(np.float32)
    if kind == "uniform":
        return rng.uniform(-0.5, 2.0, n).astype(np.float32)
    if kind == "heavy":  # Student t with 1 dof: huge outliers
        return rng.standard_t(1, n).astype(np.float32)
    if kind == "zero_blocks":  # two whole zero blocks and an all-zero partial last block
        w = rng.standard_normal(n).astype(np.float32)
        w[:64], w[640:704], w[n - n % 64:] = 0.0, 0.0, 0.0
        return w
    if kind == "constant":  # absmax - offset == 0 everywhere: nested absmax 0
        return np.full(n, -0.75, np.float32)
    raise ValueError(kind)


def test_codebooks_match_bitsandbytes():
    assert bits(NF4_CODE).tolist() == bits(bnbF.get_4bit_type("nf4", device="cpu").numpy()).tolist()
    np.testing.assert_array_equal(bits(dynamic_map()),
                                  bits(bnbF.create_dynamic_map(signed=True).numpy()))


def test_closed_form_codes_packing_and_ties():
    # absmax 2: scaled [1, -0.5, 0, 0.25] -> codes [15, 2, 7, 10] (values 1, -0.525, 0, 0.246)
    q = quantize_nf4(jnp.array([2.0, -1.0, 0.0, 0.5]), block_size=32, double_quant=False)
    assert np.asarray(q.codes).tolist() == [0xF2, 0x7A]
    assert np.asarray(q.absmax).tolist() == [2.0]
    np.testing.assert_array_equal(np.asarray(dequantize_nf4(q)), 2.0 * NF4_CODE[[15, 2, 7, 10]])
    # A value exactly on a midpoint goes to the lower code; odd count pads the low nibble with 7.
    mids = ((NF4_CODE[:-1] + NF4_CODE[1:]) / np.float32(2)).astype(np.float32)
    w = np.concatenate([[1.0], mids, [mids[3]]]).astype(np.float32)  # 17 elements, absmax 1
    q = quantize_nf4(w, block_size=32, double_quant=False)
    nibbles = [15, *range(15), 3, 7]
    assert np.asarray(q.codes).tolist() == [16 * a + b for a, b in zip(nibbles[::2], nibbles[1::2])]
    packed, state = bnb_quantize(w, 32, False)
    assert_same_bytes(q, packed, state)


@pytest.mark.parametrize("kind", ["normal", "uniform", "heavy", "zero_blocks", "constant"])
@pytest.mark.parametrize("double_quant", [False, True])
def test_bytes_and_values_match_bitsandbytes(kind, double_quant):
    w = sample(kind, 5001)  # odd count, partial last block
    q = quantize_nf4(w, block_size=64, double_quant=double_quant)
    packed, state = bnb_quantize(w, 64, double_quant)
    assert_same_bytes(q, packed, state)
    np.testing.assert_array_equal(bits(dequantize_nf4(q)), bits(bnb_dequantize(packed, state)))
    assert not np.isnan(np.asarray(dequantize_nf4(q))).any()


@pytest.mark.parametrize("block_size", [32, 64, 128, 256, 512, 1024, 2048, 4096])
def test_block_sizes_match_bitsandbytes(block_size):
    w = sample("heavy", 6000, seed=block_size)  # 6000 % block_size != 0 for every size
    q = quantize_nf4(w, block_size=block_size)
    packed, state = bnb_quantize(w, block_size, True)
    assert_same_bytes(q, packed, state)
    np.testing.assert_array_equal(bits(dequantize_nf4(q)), bits(bnb_dequantize(packed, state)))


@pytest.mark.parametrize("n", [1, 7, 65])
def test_tiny_and_odd_counts(n):
    w = sample("normal", n, seed=n)
    q = quantize_nf4(w, block_size=64)
    packed, state = bnb_quantize(w, 64, True)
    assert_same_bytes(q, packed, state)
    assert q.codes.shape == ((n + 1) // 2,)
    np.testing.assert_array_equal(bits(dequantize_nf4(q)), bits(bnb_dequantize(packed, state)))


def test_all_zero_blocks_have_no_nan():
    # 78 full zero blocks (absmax 0) and a zero partial block (bnb stores absmax 1e-38).
    w = np.zeros(5001, np.float32)
    q = quantize_nf4(w, block_size=64, double_quant=False)
    packed, state = bnb_quantize(w, 64, False)
    assert_same_bytes(q, packed, state)
    assert bits(q.absmax).tolist() == [0] * 78 + [bits(np.float32(1e-38))]
    np.testing.assert_array_equal(np.asarray(dequantize_nf4(q)), w)
    # With double quantization bnb's offset is then a subnormal that XLA flushes to zero, so only
    # the packed codes are compared with bitsandbytes here; values are ~0 and never NaN.
    q = quantize_nf4(w, block_size=64)
    packed, _ = bnb_quantize(w, 64, True)
    np.testing.assert_array_equal(np.asarray(q.codes), packed.numpy().reshape(-1))
    out = np.asarray(dequantize_nf4(q))
    assert not np.isnan(out).any() and np.abs(out).max() < 1e-30
    w = np.zeros(64 * 600, np.float32)  # whole blocks only: offset 0, everything byte-equal
    q = quantize_nf4(w, block_size=64)
    assert_same_bytes(q, *bnb_quantize(w, 64, True))
    np.testing.assert_array_equal(np.asarray(dequantize_nf4(q)), w)


@pytest.mark.parametrize("dtype,shape,dqs", [(jnp.bfloat16, (33, 65), (False, True)),
                                              (jnp.float16, (33, 65), (False, True)),
                                              (jnp.bfloat16, (96, 64), (True,))])
def test_half_precision_matches_bitsandbytes(dtype, shape, dqs):
    # (96, 64) goes through bnb's C dequantize kernel, odd widths through its torch fallback.
    w = np.asarray(jnp.asarray(sample("normal", shape[0] * shape[1]).reshape(shape), dtype))
    for double_quant in dqs:
        q = quantize_nf4(w, block_size=64, double_quant=double_quant)
        packed, state = bnb_quantize(w, 64, double_quant)
        assert_same_bytes(q, packed, state)
        assert q.dtype == jnp.dtype(dtype) and q.shape == shape
        ours = dequantize_nf4(q, dtype)
        assert ours.dtype == jnp.dtype(dtype)
        np.testing.assert_array_equal(np.asarray(ours, np.float32), bnb_dequantize(packed, state))


def test_transposed_kernel_matches_pytorch_weight_layout():
    kernel = sample("normal", 128 * 96, seed=3).reshape(128, 96)  # flax [in, out]
    q = quantize_nf4(kernel, transposed=True)
    packed, state = bnb_quantize(kernel.T.copy(), 64, True)  # torch Linear weight [out, in]
    assert_same_bytes(q, packed, state)
    assert q.shape == (128, 96) and q.storage_shape == (96, 128) and q.ndim == 2
    out = np.asarray(dequantize_nf4(q))
    assert out.shape == (128, 96)
    np.testing.assert_array_equal(out, bnb_dequantize(packed, state).T)
    cube = kernel.reshape(4, 32, 96)  # transposed=False: plain row-major, any rank
    plain = quantize_nf4(cube)
    packed, state = bnb_quantize(cube, 64, True)
    assert_same_bytes(plain, packed, state)
    # bnb's CPU C kernel mis-scales rows whose width (96) is a multiple of 16 but not of the block
    # size, so compare with bnb's reference torch implementation instead.
    absmax = bnbF.dequantize_blockwise(state.absmax, state.state2) + state.offset
    with torch._dynamo.config.patch(disable=True):
        ref = _dequantize_4bit_compute(packed.reshape(-1), absmax, state.code, 64, cube.shape,
                                       torch.float32)
    np.testing.assert_array_equal(np.asarray(dequantize_nf4(plain)), ref.numpy())


def test_nested_absmax_layout_and_size_accounting():
    w = sample("normal", 64 * 600)  # 600 blocks -> 3 nested blocks of 256
    q = quantize_nf4(w)
    assert q.codes.dtype == jnp.uint8 and q.codes.shape == (19200,)
    assert q.absmax.dtype == jnp.uint8 and q.absmax.shape == (600,)
    assert q.nested_absmax.dtype == jnp.float32 and q.nested_absmax.shape == (3,)
    assert q.offset.dtype == jnp.float32 and q.offset.shape == ()
    assert q.nbytes == 19200 + 600 + 3 * 4 + 4
    assert len(jax.tree_util.tree_leaves(q)) == 4
    q1 = quantize_nf4(w, double_quant=False)
    assert q1.absmax.dtype == jnp.float32 and q1.nbytes == 19200 + 600 * 4
    assert len(jax.tree_util.tree_leaves(q1)) == 2


def test_jit_and_pytree():
    w = sample("heavy", 1000).reshape(40, 25)
    eager = quantize_nf4(w, block_size=128, transposed=True)
    jitted = jax.jit(quantize_nf4, static_argnames=("block_size", "double_quant", "transposed"))(
        jnp.asarray(w), block_size=128, transposed=True)
    assert isinstance(jitted, NF4Tensor) and jitted.block_size == 128 and jitted.transposed
    for a, b in zip(jax.tree_util.tree_leaves(eager), jax.tree_util.tree_leaves(jitted)):
        np.testing.assert_array_equal(bits(a), bits(b))
    deq = jax.jit(dequantize_nf4, static_argnames="dtype")(jitted, dtype=jnp.bfloat16)
    np.testing.assert_array_equal(np.asarray(deq), np.asarray(dequantize_nf4(eager, jnp.bfloat16)))
    x = jnp.ones((3, 40))
    y = jax.jit(lambda q, x: x @ as_dense(q))(eager, x)
    np.testing.assert_allclose(np.asarray(y), np.asarray(x @ dequantize_nf4(eager)), rtol=1e-6)
    assert as_dense(x) is x


def test_torch_mean_emulation_is_bit_exact():
    # Sizes cover torch's scalar path (n < 8), 8-lane vectors with and without the 4 accumulators,
    # scalar tails and each level of its cascade (16, 256 and 4096 rows of 32 values).
    rng = np.random.default_rng(7)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # from 32768 items torch splits the sum across threads
    try:
        for n in [5, 9, 100, 517, 8269, 140001]:
            x = (np.abs(rng.standard_normal(n)) * rng.uniform(0.1, 10)).astype(np.float32)
            assert bits(jax.jit(torch_cpu_mean)(x)) == bits(torch.from_numpy(x).mean().numpy()), n
    finally:
        torch.set_num_threads(threads)


@settings(max_examples=30, deadline=None)
@given(hnp.arrays(np.float32, 200, elements=st.floats(-1e4, 1e4, width=32, allow_subnormal=False)))
def test_property_matches_bitsandbytes_and_error_bound(w):
    q = quantize_nf4(w, block_size=64)
    packed, state = bnb_quantize(w, 64, True)
    if abs(state.offset.item()) >= np.finfo(np.float32).tiny:
        assert_same_bytes(q, packed, state)
    else:  # all-zero input: bnb's offset is subnormal (5e-39), which XLA flushes; codes still agree
        np.testing.assert_array_equal(np.asarray(q.codes), packed.numpy().reshape(-1))
    # Round trip: error <= half the widest NF4 gap times the block scale (+ 8-bit absmax error).
    q1 = quantize_nf4(w, block_size=64, double_quant=False)
    scale = np.repeat(np.asarray(q1.absmax), 64)[:200]
    half_gap = np.max(np.diff(NF4_CODE)) / 2
    err = np.abs(np.asarray(dequantize_nf4(q1)) - w)
    assert np.all(err <= half_gap * scale * (1 + 1e-6) + 1e-30)


@pytest.mark.parametrize("block_size", [16, 48, 8192, 64.0, True, "64"])
def test_bad_block_size(block_size):
    with pytest.raises(ValueError, match="block_size"):
        quantize_nf4(jnp.ones(64), block_size=block_size)


def test_bad_inputs():
    with pytest.raises(TypeError, match="int32"):
        quantize_nf4(jnp.ones(64, jnp.int32))
    with pytest.raises(ValueError, match=r"non-empty.*\(0, 4\)"):
        quantize_nf4(jnp.ones((0, 4)))
    with pytest.raises(ValueError, match="2-D"):
        quantize_nf4(jnp.ones((2, 3, 4)), transposed=True)


SHARDED = textwrap.dedent("""
    import jax, numpy as np
    from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
    from jaxalign.quant import NF4Tensor, dequantize_nf4, quantize_nf4
    assert jax.device_count() == 8, jax.devices()
    kernel = np.random.default_rng(0).standard_normal((128, 512)).astype(np.float32)
    ref = quantize_nf4(kernel, transposed=True)
    for axis_type in (AxisType.Auto, AxisType.Explicit):
        mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(axis_type, axis_type))
        sharded = jax.device_put(kernel, NamedSharding(mesh, P("data", "model")))
        q = jax.jit(lambda w: quantize_nf4(w, transposed=True))(sharded)
        for a, b in zip(jax.tree_util.tree_leaves(ref), jax.tree_util.tree_leaves(q)):
            assert np.asarray(a).tobytes() == np.asarray(b).tobytes()
        rep = NamedSharding(mesh, P())
        spec = NF4Tensor(NamedSharding(mesh, P("model")), NamedSharding(mesh, P("model")), rep,
                         rep, shape=ref.shape, block_size=ref.block_size, dtype=ref.dtype,
                         transposed=True)
        qs = jax.device_put(ref, spec)
        assert len(qs.codes.sharding.device_set) == 8 and not qs.codes.sharding.is_fully_replicated
        out = jax.jit(dequantize_nf4)(qs)
        assert np.array_equal(np.asarray(out), np.asarray(dequantize_nf4(ref))), axis_type
    print("SHARDED_OK")
""")


def test_sharded_over_8_host_devices():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
               JAX_PLATFORMS="cpu")
    res = subprocess.run([sys.executable, "-c", SHARDED], env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0 and "SHARDED_OK" in res.stdout, res.stderr[-3000:]
