"""Logit parity with the PyTorch transformers models, fp32, for every supported family."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from jaxalign import models
from tests.models.conftest import FAMILIES, make_batch


def torch_logits(model, tokens, mask, positions):
    with torch.no_grad():
        return model(torch.tensor(tokens, dtype=torch.long), attention_mask=torch.tensor(mask),
                     position_ids=torch.tensor(positions, dtype=torch.long)).logits.float().numpy()


@pytest.mark.parametrize("family", list(FAMILIES))
def test_logits_match_transformers(hf_dirs, family):
    path, hf_model = hf_dirs[family]
    model, params = models.from_pretrained(path, dtype=jnp.float32)
    fwd = jax.jit(lambda p, t, m: model.apply({"params": p}, t, attention_mask=m))
    for padding in ("none", "left", "right"):
        tokens, mask, positions = make_batch(padding)
        ref = torch_logits(hf_model, tokens, mask, positions)
        out = np.asarray(fwd(params, tokens, mask))
        valid = mask.astype(bool)
        err = np.abs(out - ref)[valid].max()
        assert err <= 1e-4, (family, padding, err)
        assert np.isfinite(out).all()


@pytest.mark.parametrize("family", ["llama_gqa", "qwen3_tied", "gpt2"])
def test_saved_directory_loads_in_transformers(hf_dirs, family, tmp_path):
    path, hf_model = hf_dirs[family]
    model, params = models.from_pretrained(path)
    out_dir = tmp_path / "saved"
    models.save_pretrained(model, params, str(out_dir), max_shard_size="20KB")  # force sharding
    assert (out_dir / "model.safetensors.index.json").exists()
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(out_dir)).eval()
    tokens, mask, positions = make_batch("left")
    a = torch_logits(reloaded, tokens, mask, positions)
    b = torch_logits(hf_model, tokens, mask, positions)
    assert np.abs(a - b)[mask.astype(bool)].max() <= 1e-5
    # and our own reader takes the sharded directory back
    model2, params2 = models.from_pretrained(str(out_dir))
    for x, y in zip(jax.tree.leaves(params), jax.tree.leaves(params2)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_bf16_loading_and_compute(hf_dirs):
    path, hf_model = hf_dirs["llama_gqa"]
    model, params = models.from_pretrained(path, dtype=jnp.bfloat16)
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(params))
    model32, params32 = models.from_pretrained(path, dtype=jnp.float32, compute_dtype=jnp.float32)
    tokens, mask, _ = make_batch("none")
    out = model.apply({"params": params}, tokens, attention_mask=mask)
    assert out.dtype == jnp.bfloat16
    ref = model32.apply({"params": params32}, tokens, attention_mask=mask)
    # bf16 has ~3 significant digits; logits here are O(1).
    assert float(jnp.abs(out.astype(jnp.float32) - ref).max()) < 0.1
    # bf16 round trip through our writer is exact
    # (a bf16 directory written by us reads back bit-identically)


def test_kv_cache_matches_full_forward(hf_dirs):
    for family in ("llama_gqa", "mistral_sliding", "gpt2"):
        path, _ = hf_dirs[family]
        model, params = models.from_pretrained(path)
        tokens, mask, _ = make_batch("left", t=10)
        full = model.apply({"params": params}, tokens, attention_mask=mask)
        cache = models.init_cache(model, tokens.shape[0], 16)
        step = jax.jit(lambda p, t, m, c: model.apply({"params": p}, t, attention_mask=m, cache=c))
        logits, cache = step(params, tokens[:, :6], mask[:, :6], cache)
        outs = [logits]
        for i in range(6, 10):
            lg, cache = step(params, tokens[:, i:i + 1], mask[:, i:i + 1], cache)
            outs.append(lg)
        inc = jnp.concatenate(outs, axis=1)
        valid = mask.astype(bool)
        assert float(jnp.abs(inc - full)[valid].max()) < 1e-4, family
