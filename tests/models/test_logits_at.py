"""`logits_at`: the final norm and LM head on chosen positions only equal the full logits there."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxalign import models
from tests.models.conftest import make_batch


@pytest.mark.parametrize("family", ["llama_gqa", "qwen3_tied", "gpt2"])
def test_logits_at_positions_and_slices(hf_dirs, family):
    model, params = models.from_pretrained(hf_dirs[family][0])
    tokens, mask, _ = make_batch("right")
    v = {"params": params}
    full = np.asarray(model.apply(v, tokens, attention_mask=mask))
    at = np.array([[0, 3, 11], [2, 2, 5], [7, 0, 1]], np.int32)  # any order, repeats allowed
    got = np.asarray(model.apply(v, tokens, attention_mask=mask, logits_at=at))
    np.testing.assert_allclose(got, np.take_along_axis(full, at[:, :, None], axis=1), atol=1e-5, rtol=1e-5)
    got = np.asarray(model.apply(v, tokens, attention_mask=mask, logits_at=slice(None, -1)))
    np.testing.assert_allclose(got, full[:, :-1], atol=1e-5, rtol=1e-5)
    hidden = np.asarray(model.apply(v, tokens, attention_mask=mask, return_hidden=True))
    got = np.asarray(model.apply(v, tokens, attention_mask=mask, return_hidden=True, logits_at=at))
    np.testing.assert_allclose(got, np.take_along_axis(hidden, at[:, :, None], axis=1), atol=1e-5, rtol=1e-5)


def test_logits_at_gradient_matches_full(hf_dirs):
    model, params = models.from_pretrained(hf_dirs["llama_gqa"][0])
    tokens, mask, _ = make_batch("right")
    at = jnp.array([[4, 5, 6], [1, 2, 3], [8, 9, 10]], jnp.int32)

    def f_at(p):
        return jnp.sum(jnp.sin(model.apply({"params": p}, tokens, attention_mask=mask, logits_at=at)))

    def f_full(p):
        logits = model.apply({"params": p}, tokens, attention_mask=mask)
        return jnp.sum(jnp.sin(jnp.take_along_axis(logits, at[:, :, None], axis=1)))

    ga, gf = jax.grad(f_at)(params), jax.grad(f_full)(params)
    for a, b in zip(jax.tree.leaves(ga), jax.tree.leaves(gf)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=1e-4)


def test_logits_at_bad_input_is_named(hf_dirs):
    model, params = models.from_pretrained(hf_dirs["llama_gqa"][0])
    tokens, mask, _ = make_batch("right")
    with pytest.raises(ValueError, match=r"logits_at: expected int positions \[B=3, K\]"):
        model.apply({"params": params}, tokens, attention_mask=mask, logits_at=np.zeros((2, 4), np.int32))
    with pytest.raises(ValueError, match="logits_at"):
        model.apply({"params": params}, tokens, attention_mask=mask, logits_at=np.zeros((3, 4), np.float32))
