"""LoRA adapter trees: init statistics, presets, apply, merge/unmerge, counts, gradients, dropout."""

import math

import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import optax
import peft as hf_peft
import pytest
import torch
from hypothesis import given, settings
from jax.test_util import check_grads

from jaxalign import models
from jaxalign.peft import (
    LoraSpec, adapted_modules, count_params, init_lora, lora_apply_fn, lora_targets, merge_lora,
    print_trainable_parameters, select_modules, unmerge_lora,
)
from tests.peft.conftest import hf_model, make_batch, randomize_b

LLAMA = models.LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=16)
GPT2 = models.GPT2Config(vocab_size=97, n_positions=64, n_embd=32, n_layer=2, n_head=4)


@pytest.fixture(scope="module")
def llama():
    model = models.build_model(LLAMA)
    return model, jax.jit(lambda k: models.init_params(model, k))(jax.random.PRNGKey(0))


@pytest.fixture(scope="module")
def gpt2():
    model = models.build_model(GPT2)
    return model, jax.jit(lambda k: models.init_params(model, k))(jax.random.PRNGKey(1))


def _paths(adapters):
    return set(adapted_modules(adapters))


# ----------------------------------------------------------------------------- init
def test_init_shapes_ranks_and_dtype(llama):
    _, params = llama
    spec = LoraSpec(rank=8, alpha=16, targets=lora_targets("llama", "all_linear"),
                    rank_pattern=((r"layers_1/mlp/down_proj$", 2), (r"down_proj$", 4)))
    ad = init_lora(params, spec, jax.random.PRNGKey(0))
    assert _paths(ad) == {f"layers_{i}/{m}" for i in range(2) for m in (
        "attn/q_proj", "attn/k_proj", "attn/v_proj", "attn/o_proj",
        "mlp/gate_proj", "mlp/up_proj", "mlp/down_proj")}
    q = ad["layers_0"]["attn"]["q_proj"]
    assert q["lora_a"].shape == (64, 8) and q["lora_b"].shape == (8, 64)
    assert ad["layers_0"]["attn"]["k_proj"]["lora_b"].shape == (8, 32)  # GQA: 2 kv heads * 16
    assert ad["layers_1"]["mlp"]["down_proj"]["lora_a"].shape == (96, 2)  # first pattern wins
    assert ad["layers_0"]["mlp"]["down_proj"]["lora_a"].shape == (96, 4)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(ad))
    ad16 = init_lora(params, spec, jax.random.PRNGKey(0), dtype=jnp.bfloat16)
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(ad16))
    # deterministic in the key, distinct per module
    again = init_lora(params, spec, jax.random.PRNGKey(0))
    jax.tree.map(np.testing.assert_array_equal, ad, again)
    assert not np.allclose(q["lora_a"], ad["layers_1"]["attn"]["q_proj"]["lora_a"])


def test_init_matches_torch_kaiming_uniform_statistics(llama):
    _, params = llama
    r = 16
    ad = init_lora(params, LoraSpec(rank=r, targets=r"mlp/down_proj$"), jax.random.PRNGKey(3))
    fan_in = 96
    # PEFT: nn.init.kaiming_uniform_(lora_A.weight [r, in], a=sqrt(5)); bound = gain * sqrt(3 / fan_in)
    w = torch.empty(r, fan_in)
    torch.nn.init.kaiming_uniform_(w, a=math.sqrt(5))
    fan = torch.nn.init._calculate_fan_in_and_fan_out(w)[0]
    bound = torch.nn.init.calculate_gain("leaky_relu", math.sqrt(5)) * math.sqrt(3.0 / fan)
    assert fan == fan_in and bound == pytest.approx(1 / math.sqrt(fan_in))
    for i in range(2):
        mod = ad[f"layers_{i}"]["mlp"]["down_proj"]
        np.testing.assert_array_equal(mod["lora_b"], 0.0)
        a = np.asarray(mod["lora_a"]).ravel()
        assert np.abs(a).max() <= bound and np.abs(a).max() > 0.95 * bound
        # Kolmogorov-Smirnov distance to U(-bound, bound); 1.63/sqrt(n) is the 1% critical value.
        x = np.sort(a)
        cdf = (x + bound) / (2 * bound)
        n = x.size
        ks = max(np.max(np.arange(1, n + 1) / n - cdf), np.max(cdf - np.arange(n) / n))
        assert ks < 1.63 / math.sqrt(n), ks
        assert abs(a.var() - bound ** 2 / 3) < 0.1 * bound ** 2 / 3


def test_zero_b_gives_the_base_logits(llama):
    model, params = llama
    spec = LoraSpec(rank=4, targets=lora_targets("llama", "all_linear"))
    ad = init_lora(params, spec, jax.random.PRNGKey(0))
    f = jax.jit(lora_apply_fn(model, spec))
    tokens, mask, _ = make_batch("left", b=3, t=8)
    base = f(params, None, tokens, attention_mask=mask)  # no 'lora' collection: the reference
    # B = 0 adds exact zeros; only XLA's fusion choices may differ between the two programs
    np.testing.assert_allclose(f(params, ad, tokens, attention_mask=mask), base, rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------- targets
def test_presets_select_the_right_modules(llama, gpt2):
    _, lp = llama
    _, gp = gpt2
    sel = lambda p, t: set(select_modules(p, LoraSpec(targets=t)))  # noqa: E731
    assert sel(lp, lora_targets("llama", "attention")) == {
        f"layers_{i}/attn/{m}" for i in range(2) for m in ("q_proj", "k_proj", "v_proj", "o_proj")}
    assert sel(lp, lora_targets(LLAMA, "attention_mlp")) == sel(lp, lora_targets("qwen2", "all_linear"))
    assert len(sel(lp, lora_targets("mistral", "all_linear"))) == 14
    assert sel(gp, lora_targets("gpt2", "attention")) == {
        f"layers_{i}/attn/{m}" for i in range(2) for m in ("c_attn", "c_proj")}
    assert sel(gp, lora_targets(GPT2, "all_linear")) == {
        f"layers_{i}/{m}" for i in range(2)
        for m in ("attn/c_attn", "attn/c_proj", "mlp/c_fc", "mlp/c_proj")}
    assert not any("lm_head" in p for p in sel(lp, lora_targets("llama", "all_linear")))
    with pytest.raises(ValueError, match="preset='mlp_only' unknown"):
        lora_targets("llama", "mlp_only")
    with pytest.raises(ValueError, match="model_type='bert' unknown"):
        lora_targets("bert")


def test_bad_targets_raise_clear_errors(llama):
    _, params = llama
    with pytest.raises(ValueError, match=r"matches no module; available module paths: .*layers_0/attn/q_proj"):
        init_lora(params, LoraSpec(targets=r"query$"), jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match="not a valid regex"):
        LoraSpec(targets="(q_proj")
    with pytest.raises(ValueError, match="LM head takes no adapter"):
        init_lora(params, LoraSpec(targets=r"lm_head|q_proj"), jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match="expected both lora_a and lora_b"):
        merge_lora(params, {"layers_0": {"attn": {"q_proj": {"lora_a": jnp.zeros((64, 2))}}}}, LoraSpec())
    bad = {"layers_0": {"attn": {"q_proj": {"lora_a": jnp.zeros((64, 2)), "lora_b": jnp.zeros((2, 8))}}}}
    with pytest.raises(ValueError, match=r"'layers_0/attn/q_proj' adapter maps 64 -> 8 but the kernel is \(64, 64\)"):
        merge_lora(params, bad, LoraSpec())
    missing = {"layers_9": {"attn": {"q_proj": {"lora_a": jnp.zeros((64, 2)), "lora_b": jnp.zeros((2, 64))}}}}
    with pytest.raises(ValueError, match="'layers_9/attn/q_proj', which the params have no kernel"):
        merge_lora(params, missing, LoraSpec())


# ----------------------------------------------------------------------------- merge
def test_merge_by_hand_and_unmerge(llama):
    _, params = llama
    spec = LoraSpec(rank=4, alpha=6.0, targets=r"attn/(q_proj|v_proj)$", use_rslora=True,
                    rank_pattern=((r"layers_1/attn/v_proj", 2),), alpha_pattern=((r"v_proj", 3.0),))
    ad = randomize_b(init_lora(params, spec, jax.random.PRNGKey(0)), 0)
    merged = merge_lora(params, ad, spec)
    for path, r, alpha in (("layers_0/attn/q_proj", 4, 6.0), ("layers_1/attn/v_proj", 2, 3.0)):
        l, _, m = path.split("/")
        a, b = (np.asarray(ad[l]["attn"][m][k], np.float64) for k in ("lora_a", "lora_b"))
        want = np.asarray(params[l]["attn"][m]["kernel"], np.float64) + alpha / math.sqrt(r) * a @ b
        np.testing.assert_allclose(merged[l]["attn"][m]["kernel"], want, rtol=1e-5, atol=1e-6)
    assert merged["layers_0"]["attn"]["k_proj"]["kernel"] is params["layers_0"]["attn"]["k_proj"]["kernel"]
    back = unmerge_lora(merged, ad, spec)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=1e-6), back, params)


def test_merged_logits_equal_adapter_logits(gpt2):
    model, params = gpt2
    spec = LoraSpec(rank=4, alpha=8, targets=lora_targets("gpt2", "all_linear"))
    ad = randomize_b(init_lora(params, spec, jax.random.PRNGKey(2)), 1)
    f = jax.jit(lora_apply_fn(model, spec))
    tokens, mask, _ = make_batch("right", b=3, t=8)
    with_adapter = f(params, ad, tokens, attention_mask=mask)
    merged = f(merge_lora(params, ad, spec), None, tokens, attention_mask=mask)
    base = f(params, None, tokens, attention_mask=mask)
    assert float(jnp.abs(with_adapter - base).max()) > 1e-2  # the adapter does something
    np.testing.assert_allclose(merged, with_adapter, atol=2e-5)


@settings(max_examples=15, deadline=None)
@given(din=st.integers(1, 6), dout=st.integers(1, 6), r=st.integers(1, 4),
       alpha=st.floats(0.5, 32.0), rslora=st.booleans(), seed=st.integers(0, 2**16))
def test_merge_is_the_adapter_forward(din, dout, r, alpha, rslora, seed):
    """x W' == x W + s (x A) B for any shapes, ranks and scales (property test)."""
    rng = np.random.RandomState(seed)
    w, a, b, x = (rng.randn(*s).astype(np.float32) for s in ((din, dout), (din, r), (r, dout), (3, din)))
    spec = LoraSpec(rank=r, alpha=alpha, targets="m$", use_rslora=rslora)
    merged = merge_lora({"m": {"kernel": w}}, {"m": {"lora_a": a, "lora_b": b}}, spec)["m"]["kernel"]
    s = alpha / math.sqrt(r) if rslora else alpha / r
    np.testing.assert_allclose(x @ np.asarray(merged), x @ w + s * (x @ a) @ b, rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------- counts
@pytest.mark.parametrize("family,targets,small", [("llama", ["q_proj", "v_proj", "down_proj"], "down_proj"),
                                                  ("gpt2", ["c_attn", "c_proj"], "c_attn")])
def test_count_params_matches_peft(peft_dirs, capsys, family, targets, small):
    path = peft_dirs[family]
    _, params = models.from_pretrained(path)
    pm = hf_peft.get_peft_model(hf_model(path), hf_peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=targets, rank_pattern={small: 2},
        fan_in_fan_out=family == "gpt2"))
    trainable, total = pm.get_nb_trainable_parameters()
    capsys.readouterr()
    pm.print_trainable_parameters()
    peft_line = capsys.readouterr().out.strip()
    spec = LoraSpec(rank=4, alpha=8, targets=r"(^|/)(" + "|".join(targets) + r")$",
                    rank_pattern=((small + "$", 2),))
    ad = init_lora(params, spec, jax.random.PRNGKey(0))
    c = count_params(params, ad)
    assert (c["trainable"], c["all"]) == (trainable, total)
    assert print_trainable_parameters(params, ad) == peft_line
    assert capsys.readouterr().out.strip() == peft_line


# ----------------------------------------------------------------------------- training
def test_gradients_flow_to_adapters_only(llama):
    model, params = llama
    spec = LoraSpec(rank=4, alpha=8, targets=lora_targets("llama", "attention"))
    ad = init_lora(params, spec, jax.random.PRNGKey(0))
    f = lora_apply_fn(model, spec)
    tokens, mask, _ = make_batch("none", b=2, t=8)

    def loss(adapters):
        logits = f(params, adapters, tokens[:, :-1], attention_mask=mask[:, :-1])
        logp = jax.nn.log_softmax(logits.astype(jnp.float32))
        return -jnp.take_along_axis(logp, tokens[:, 1:, None], -1).mean()

    opt = optax.adam(1e-2)
    base_before = jax.tree.map(np.array, params)

    @jax.jit
    def step(adapters, state):
        value, grads = jax.value_and_grad(loss)(adapters)
        updates, state = opt.update(grads, state, adapters)
        return optax.apply_updates(adapters, updates), state, value, grads

    state = opt.init(ad)
    new, state, l0, g = step(ad, state)
    assert jax.tree.structure(g) == jax.tree.structure(ad)
    for path, (ga, gb) in adapted_modules(g).items():
        np.testing.assert_array_equal(ga, 0.0)  # B = 0 at init, so dL/dA = 0
        assert float(jnp.abs(gb).max()) > 0, path
    new, state, l1, _ = step(new, state)
    _, _, l2, _ = step(new, state)
    assert float(l2) < float(l0)
    jax.tree.map(np.testing.assert_array_equal, params, base_before)  # the base never moves
    assert float(jnp.abs(new["layers_0"]["attn"]["q_proj"]["lora_b"]).max()) > 0


def test_check_grads_wrt_adapters(gpt2):
    model, params = gpt2
    spec = LoraSpec(rank=2, alpha=4, targets=r"layers_1/attn/c_proj$", use_rslora=True)
    ad = randomize_b(init_lora(params, spec, jax.random.PRNGKey(0)), 3, scale=0.1)
    f = lora_apply_fn(model, spec)
    tokens, _, _ = make_batch("none", b=1, t=4)
    w = jax.random.normal(jax.random.PRNGKey(1), (1, 4, 97))
    objective = jax.jit(lambda a: jnp.sum(f(params, a, tokens) * w))
    check_grads(objective, (ad,), order=1, modes=["rev"], atol=2e-2, rtol=2e-2, eps=1e-2)


def test_dropout_only_when_not_deterministic(llama):
    model, params = llama
    spec = LoraSpec(rank=4, alpha=8, targets=lora_targets("llama", "attention"), dropout=0.5)
    zero = init_lora(params, spec, jax.random.PRNGKey(0))
    ad = randomize_b(zero, 4)
    f = jax.jit(lora_apply_fn(model, spec), static_argnames="deterministic")
    tokens, mask, _ = make_batch("none", b=2, t=8)
    k1, k2 = {"dropout": jax.random.PRNGKey(1)}, {"dropout": jax.random.PRNGKey(2)}
    det1 = f(params, ad, tokens, deterministic=True, rngs=k1)
    det2 = f(params, ad, tokens, deterministic=True, rngs=k2)
    np.testing.assert_array_equal(det1, det2)
    tr1 = f(params, ad, tokens, deterministic=False, rngs=k1)
    tr1b = f(params, ad, tokens, deterministic=False, rngs=k1)
    tr2 = f(params, ad, tokens, deterministic=False, rngs=k2)
    np.testing.assert_array_equal(tr1, tr1b)
    assert float(jnp.abs(tr1 - tr2).max()) > 1e-3 and float(jnp.abs(tr1 - det1).max()) > 1e-3
    # dropout acts on the adapter's input only: with B = 0 training mode equals the base model
    np.testing.assert_allclose(f(params, zero, tokens, deterministic=False, rngs=k1),
                               f(params, zero, tokens, deterministic=True, rngs=k1), atol=1e-6)
