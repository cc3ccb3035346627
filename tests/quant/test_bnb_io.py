"""bitsandbytes-format state dicts: byte equality with `Linear4bit.state_dict()` and round trips."""

import re

import bitsandbytes as bnb
import bitsandbytes.functional as bnbF
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import safetensors.torch
import torch

from jaxalign.quant import bnb_state_to_nf4, dequantize_nf4, nf4_to_bnb_state, quantize_nf4

PREFIX = "model.layers.0.self_attn.q_proj"


def weight(out_features, in_features, seed=0):
    """A PyTorch Linear weight [out, in]; the flax kernel is its transpose.

    bnb's CPU dequantize kernel mis-scales rows whose width is a multiple of 16 but not of the block
    size, so weights compared through it have in_features a multiple of 64 (or odd).
    """
    return np.random.default_rng(seed).standard_normal((out_features, in_features)).astype(
        np.float32)


def bnb_linear_state(w, double_quant, dtype=torch.float32):
    """What bitsandbytes' Linear4bit saves for weight w, with `PREFIX.` in front, as numpy."""
    layer = bnb.nn.Linear4bit(w.shape[1], w.shape[0], bias=False, quant_type="nf4",
                              compress_statistics=double_quant)
    layer.weight = bnb.nn.Params4bit(torch.from_numpy(w).to(dtype), requires_grad=False,
                                     quant_type="nf4", compress_statistics=double_quant,
                                     blocksize=64)
    layer = layer.to("cpu")  # quantizes
    return {f"{PREFIX}.{k}": v.detach().numpy() for k, v in layer.state_dict().items()}


def bnb_dequantize_state(state, prefix=PREFIX):
    """bitsandbytes' own loader (as transformers uses it) on a state dict of torch tensors."""
    stats = {k: v for k, v in state.items() if k.startswith(f"{prefix}.weight.")}
    param = bnb.nn.Params4bit.from_prequantized(state[f"{prefix}.weight"], stats, device="cpu")
    with torch._dynamo.config.patch(disable=True):
        return bnbF.dequantize_4bit(param.data, param.quant_state, quant_type="nf4")


def assert_same_nf4(a, b):
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)  # static fields too
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        assert x.dtype == y.dtype and x.shape == y.shape
        assert np.asarray(x).tobytes() == np.asarray(y).tobytes()


@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("shape", [(48, 128), (5, 7)])
def test_state_is_byte_identical_to_linear4bit(shape, double_quant):
    w = weight(*shape)
    ours = nf4_to_bnb_state(PREFIX, quantize_nf4(w.T, double_quant=double_quant, transposed=True))
    theirs = bnb_linear_state(w, double_quant)
    assert sorted(ours) == sorted(theirs)
    for key, value in theirs.items():
        assert ours[key].dtype == value.dtype and ours[key].shape == value.shape, key
        assert ours[key].tobytes() == value.tobytes(), key
    qs = bytes(ours[f"{PREFIX}.weight.quant_state.bitsandbytes__nf4"]).decode()
    assert f'"shape": [{shape[0]}, {shape[1]}]' in qs and '"quant_type": "nf4"' in qs


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("double_quant", [False, True])
def test_bitsandbytes_loads_our_safetensors(tmp_path, dtype, double_quant):
    kernel = jnp.asarray(weight(64, 128).T, dtype)  # flax [in, out]
    q = quantize_nf4(kernel, double_quant=double_quant, transposed=True)
    path = tmp_path / "model.safetensors"
    safetensors.numpy.save_file(nf4_to_bnb_state(PREFIX, q), str(path))
    out = bnb_dequantize_state(safetensors.torch.load_file(str(path)))
    assert out.dtype == {jnp.float32: torch.float32, jnp.bfloat16: torch.bfloat16}[dtype]
    assert tuple(out.shape) == (64, 128)
    ours = np.asarray(dequantize_nf4(q, dtype), np.float32)
    np.testing.assert_array_equal(out.float().numpy(), ours.T)


@pytest.mark.parametrize("double_quant", [False, True])
def test_we_load_bitsandbytes_safetensors(tmp_path, double_quant):
    w = weight(64, 128, seed=1)
    path = tmp_path / "bnb.safetensors"
    state = bnb_linear_state(w, double_quant)
    safetensors.torch.save_file({k: torch.from_numpy(v) for k, v in state.items()}, str(path))
    q = bnb_state_to_nf4(safetensors.numpy.load_file(str(path)), PREFIX)
    assert q.shape == (128, 64) and q.transposed and q.block_size == 64 and q.dtype == jnp.float32
    assert q.double_quant == double_quant and q.nested_code is None
    assert_same_nf4(q, quantize_nf4(w.T, double_quant=double_quant, transposed=True))
    ref = bnb_dequantize_state({k: torch.from_numpy(v) for k, v in state.items()})
    np.testing.assert_array_equal(np.asarray(dequantize_nf4(q)), ref.numpy().T)


def test_round_trip_both_layouts():
    kernel = weight(40, 24, seed=2)
    for q in (quantize_nf4(kernel, transposed=True), quantize_nf4(kernel.reshape(-1), block_size=32,
                                                                 double_quant=False)):
        back = bnb_state_to_nf4(nf4_to_bnb_state("", q), "")
        assert_same_nf4(back, q)
    state = nf4_to_bnb_state("", q)
    assert "weight" in state and "weight.absmax" in state and "weight.nested_absmax" not in state


def test_custom_nested_map_is_kept():
    # A file's own nested map is used when it differs from the default (older bitsandbytes wrote
    # code[0] = -1.0); here the entry used by block 0 is changed so the difference shows.
    w = weight(32, 256, seed=3)
    state = bnb_linear_state(w, True)
    nested_map = state[f"{PREFIX}.weight.nested_quant_map"]
    used = int(state[f"{PREFIX}.weight.absmax"][0])
    nested_map[0], nested_map[used] = -1.0, nested_map[used] * np.float32(1.25)
    q = bnb_state_to_nf4(state, PREFIX)
    assert q.nested_code is not None and q.code_map[0] == -1.0
    ref = bnb_dequantize_state({k: torch.from_numpy(v) for k, v in state.items()})
    np.testing.assert_array_equal(np.asarray(dequantize_nf4(q)), ref.numpy().T)
    default = bnb_state_to_nf4(bnb_linear_state(w, True), PREFIX)
    assert not np.array_equal(np.asarray(dequantize_nf4(default)), ref.numpy().T)
    np.testing.assert_array_equal(nf4_to_bnb_state(PREFIX, q)[f"{PREFIX}.weight.nested_quant_map"],
                                  nested_map)


def test_non_uint8_quant_storage():
    w = weight(16, 64, seed=4)
    packed, qs = bnbF.quantize_4bit(torch.from_numpy(w), blocksize=64, quant_type="nf4",
                                    compress_statistics=True, quant_storage=torch.float32)
    assert packed.dtype == torch.float32
    state = {f"{PREFIX}.weight.{k}": v.numpy() for k, v in qs.as_dict(packed=True).items()}
    state[f"{PREFIX}.weight"] = packed.numpy()
    assert_same_nf4(bnb_state_to_nf4(state, PREFIX), quantize_nf4(w.T, transposed=True))


SUFFIXES = ["weight", "weight.absmax", "weight.quant_map", "weight.nested_absmax",
            "weight.nested_quant_map", "weight.quant_state.bitsandbytes__nf4"]


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_missing_key_is_named(suffix):
    state = nf4_to_bnb_state(PREFIX, quantize_nf4(weight(8, 64).T, transposed=True))
    del state[f"{PREFIX}.{suffix}"]
    with pytest.raises(ValueError, match=re.escape(repr(f"{PREFIX}.{suffix}"))):
        bnb_state_to_nf4(state, PREFIX)


def test_bad_states_raise():
    q = quantize_nf4(weight(8, 64).T, transposed=True)
    key = f"{PREFIX}.weight.quant_state.bitsandbytes__nf4"

    state = nf4_to_bnb_state(PREFIX, q)
    state[key] = np.frombuffer(bytes(state[key]).replace(b'"nf4"', b'"fp4"'), np.uint8)
    with pytest.raises(ValueError, match="quant_type 'nf4'"):
        bnb_state_to_nf4(state, PREFIX)

    state = nf4_to_bnb_state(PREFIX, q)
    state[f"{PREFIX}.weight.absmax"] = state[f"{PREFIX}.weight.absmax"][:-1]
    with pytest.raises(ValueError, match=r"weight\.absmax.*8 blocks, got 7"):
        bnb_state_to_nf4(state, PREFIX)

    state = nf4_to_bnb_state(PREFIX, q)
    state[f"{PREFIX}.weight.quant_map"] = bnbF.get_4bit_type("fp4", device="cpu").numpy()
    with pytest.raises(ValueError, match="NF4 codebook"):
        bnb_state_to_nf4(state, PREFIX)

    state = nf4_to_bnb_state(PREFIX, q)
    state[key] = np.frombuffer(b"not json", np.uint8)
    with pytest.raises(ValueError, match="packed JSON"):
        bnb_state_to_nf4(state, PREFIX)

    with pytest.raises(TypeError, match="NF4Tensor"):
        nf4_to_bnb_state(PREFIX, np.zeros(4))
