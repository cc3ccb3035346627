import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from jaxalign import models
from jaxalign.losses.logps import token_logps
from jaxalign.sample import filter_logits, make_sampler


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    cfg = transformers.LlamaConfig(vocab_size=61, hidden_size=32, intermediate_size=48,
                                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                   max_position_embeddings=64, eos_token_id=3, pad_token_id=0)
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    d = tmp_path_factory.mktemp("s")
    hf.save_pretrained(d)
    model, params = models.from_pretrained(str(d))
    return hf, model, params


def _prompts():
    rng = np.random.RandomState(0)
    toks = rng.randint(4, 61, (3, 7)).astype(np.int32)
    mask = np.ones_like(toks)
    mask[1, :3] = 0
    mask[2, :5] = 0
    toks[mask == 0] = 0
    return toks, mask


def teacher_forced_logps(model, params, prompt, pmask, out):
    full = np.concatenate([prompt, np.asarray(out["tokens"])], 1)
    fmask = np.concatenate([pmask, np.asarray(out["mask"])], 1)
    logits = model.apply({"params": params}, full, attention_mask=fmask)
    p = prompt.shape[1]
    lp = token_logps(logits[:, p - 1:-1], full[:, p:], fmask[:, p:])
    return np.asarray(lp)


def test_sampled_logps_equal_teacher_forced(tiny):
    _, model, params = tiny
    prompt, pmask = _prompts()
    sampler = make_sampler(model, max_new_tokens=9, eos_ids=3, temperature=1.0)
    out = sampler({"params": params}, prompt, pmask, jax.random.PRNGKey(1))
    tf = teacher_forced_logps(model, params, prompt, pmask, out)
    m = np.asarray(out["mask"])
    np.testing.assert_allclose(np.asarray(out["logps"])[m], tf[m], atol=1e-5)
    assert (np.asarray(out["logps"])[~m] == 0).all()


def test_greedy_matches_transformers_generate(tiny):
    hf, model, params = tiny
    prompt, pmask = _prompts()
    sampler = make_sampler(model, max_new_tokens=6, eos_ids=3, greedy=True)
    out = sampler({"params": params}, prompt, pmask, jax.random.PRNGKey(0))
    with torch.no_grad():
        ref = hf.generate(torch.tensor(prompt, dtype=torch.long), attention_mask=torch.tensor(pmask),
                          max_new_tokens=6, do_sample=False, eos_token_id=3, pad_token_id=0)
    ref = ref[:, prompt.shape[1]:].numpy()
    got = np.asarray(out["tokens"])[:, :ref.shape[1]]
    np.testing.assert_array_equal(got, ref)


def test_eos_stops_rows_and_masks():
    # A 'model' whose logits always prefer token 3 (EOS) for row 0.
    logits = jnp.array([[0.0, 1.0, 5.0, 2.0]])
    assert np.isfinite(np.asarray(filter_logits(logits, top_k=2))).sum() == 4
    f = filter_logits(logits, top_k=2)
    assert (np.asarray(f[0]) > -1e30).tolist() == [False, False, True, True]
    probs = jax.nn.softmax(logits)[0]
    # top_p just above the top token's mass keeps exactly the top two
    f = filter_logits(logits, top_p=float(probs[2]) + 1e-3)
    assert (np.asarray(f[0]) > -1e30).tolist() == [False, False, True, True]
    f = filter_logits(logits, top_p=float(probs[2]) - 1e-3)
    assert (np.asarray(f[0]) > -1e30).tolist() == [False, False, True, False]


def test_stop_on_eos_per_row(tiny):
    _, model, params = tiny
    prompt, pmask = _prompts()
    sampler = make_sampler(model, max_new_tokens=12, eos_ids=(3, 5, 7, 9, 11), temperature=2.0,
                           top_k=20)
    out = sampler({"params": params}, prompt, pmask, jax.random.PRNGKey(3))
    toks, mask = np.asarray(out["tokens"]), np.asarray(out["mask"])
    for r in range(3):
        n = int(mask[r].sum())
        assert mask[r, :n].all() and not mask[r, n:].any()
        hits = np.isin(toks[r, :n], [3, 5, 7, 9, 11])
        if n < 12:
            assert hits[-1] and not hits[:-1].any()
        assert (toks[r, n:] == 0).all()


def test_bad_arguments(tiny):
    _, model, _ = tiny
    with pytest.raises(ValueError, match="max_new_tokens"):
        make_sampler(model, max_new_tokens=0, eos_ids=3)
    with pytest.raises(ValueError, match="temperature"):
        make_sampler(model, max_new_tokens=2, eos_ids=3, temperature=0.0)
