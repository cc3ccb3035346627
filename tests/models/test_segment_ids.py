"""Packed continuations of a shared prefix (`segment_ids`) give each token the logits it has in its
own unpacked sequence: every family, sliding windows included, and the default positions."""

import jax.numpy as jnp
import numpy as np
import pytest

from jaxalign import models
from jaxalign.data.prefix_sharing import share_prefix
from jaxalign.models.layers import prepare_inputs


def _pair_batch():
    """Two pairs, right-padded to 12: row 0 shares 5 prompt tokens, row 1 shares 7 (its
    completions start alike), ragged completion lengths; the mistral window (4) is shorter
    than the prefix, so the window must count unpacked positions, not packed slots."""
    rng = np.random.default_rng(0)
    rows = []
    for n_prompt, n_c, n_r in ((5, 4, 6), (7, 2, 3)):
        prompt = rng.integers(3, 97, n_prompt)
        c = np.concatenate([prompt, rng.integers(3, 97, n_c)])
        r = np.concatenate([prompt, rng.integers(3, 97, n_r)])
        rows.append((c, r, n_prompt))
    rows[1][1][:8] = rows[1][0][:8]  # row 1: the completions share their first token
    batch = {}
    for j, side in enumerate(("chosen", "rejected")):
        toks = np.zeros((2, 12), np.int32)
        am = np.zeros((2, 12), bool)
        lm = np.zeros((2, 12), bool)
        for i, row in enumerate(rows):
            seq = row[j]
            toks[i, :len(seq)], am[i, :len(seq)] = seq, True
            lm[i, row[2]:len(seq)] = True
        batch.update({f"{side}_tokens": toks, f"{side}_attention_mask": am, f"{side}_loss_mask": lm})
    return batch


@pytest.mark.parametrize("family", ["llama_gqa", "mistral_sliding", "qwen3_tied", "gpt2"])
def test_packed_logits_equal_unpacked(hf_dirs, family):
    model, params = models.from_pretrained(hf_dirs[family][0])
    batch = _pair_batch()
    packed = share_prefix(batch)
    assert packed["packed_tokens"].shape[1] < 2 * batch["chosen_tokens"].shape[1]
    logits = np.asarray(model.apply({"params": params}, jnp.asarray(packed["packed_tokens"]),
                                    attention_mask=jnp.asarray(packed["packed_attention_mask"]),
                                    segment_ids=jnp.asarray(packed["packed_segment_ids"])))
    for side in ("chosen", "rejected"):
        full = np.asarray(model.apply({"params": params}, jnp.asarray(batch[f"{side}_tokens"]),
                                      attention_mask=jnp.asarray(batch[f"{side}_attention_mask"])))
        for i in range(2):
            lm = batch[f"{side}_loss_mask"][i]
            t = np.flatnonzero(lm)  # loss tokens; their logits come from t - 1
            m = packed[f"{side}_label_mask"][i]
            at = packed[f"{side}_logits_at"][i][m]
            np.testing.assert_array_equal(packed[f"{side}_labels"][i][m], batch[f"{side}_tokens"][i][t])
            np.testing.assert_allclose(logits[i, at], full[i, t - 1], atol=2e-5, rtol=1e-5)


def test_default_positions_count_the_unpacked_sequence():
    packed = share_prefix(_pair_batch())
    seg = jnp.asarray(packed["packed_segment_ids"])
    valid = jnp.asarray(packed["packed_attention_mask"])
    _, _, pos, _ = prepare_inputs(jnp.asarray(packed["packed_tokens"]), valid, None, None,
                                  segment_ids=seg)
    pos, valid, seg = np.asarray(pos), np.asarray(valid), np.asarray(seg)
    for i in range(2):
        n = int((valid[i] & (seg[i] == 0)).sum())
        for s in (1, 2):
            got = pos[i][valid[i] & (seg[i] == s)]
            np.testing.assert_array_equal(got, n + np.arange(len(got)))
        np.testing.assert_array_equal(pos[i][valid[i] & (seg[i] == 0)], np.arange(n))


def test_segment_ids_with_a_cache_or_wrong_shape_are_refused():
    tokens = jnp.zeros((1, 4), jnp.int32)
    cache = {"index": jnp.zeros((), jnp.int32), "valid": jnp.zeros((1, 8), bool)}
    with pytest.raises(ValueError, match="KV cache"):
        prepare_inputs(tokens, None, None, cache, segment_ids=jnp.zeros((1, 4), jnp.int32))
    with pytest.raises(ValueError, match="expected shape"):
        prepare_inputs(tokens, None, None, None, segment_ids=jnp.zeros((1, 5), jnp.int32))
