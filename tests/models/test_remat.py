"""remat=True: same values and gradients as without, and activations really are not kept (CPU)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from jaxalign.models import GPT2Config, LlamaConfig, build_model, init_params
from jaxalign.models.remat import recompute_in_backward
from jaxalign.peft import LoraSpec, init_lora
from jaxalign.quant import quantize_params

LLAMA = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
GPT2 = GPT2Config(vocab_size=97, n_embd=32, n_layer=2, n_head=4, n_positions=64)


def _batch():
    tokens = jax.random.randint(jax.random.PRNGKey(3), (2, 9), 0, 97)
    mask = jnp.ones((2, 9), jnp.int32).at[1, :3].set(0)  # left padding in row 1
    return tokens, mask


def _loss(model, variables, tokens, mask, **kw):
    logits = model.apply(variables, tokens, attention_mask=mask, **kw)
    return jnp.sum(jax.nn.log_softmax(logits.astype(jnp.float32)) * mask[..., None]) / 100.0


@pytest.mark.parametrize("config", [LLAMA, GPT2], ids=["llama", "gpt2"])
def test_full_finetune_values_and_grads_match(config):
    plain = build_model(config)
    remat = build_model(config, remat=True)
    params = init_params(plain, jax.random.PRNGKey(0))
    tokens, mask = _batch()
    np.testing.assert_array_equal(
        plain.apply({"params": params}, tokens, attention_mask=mask),
        remat.apply({"params": params}, tokens, attention_mask=mask))
    g0 = jax.grad(lambda p: _loss(plain, {"params": p}, tokens, mask))(params)
    g1 = jax.jit(jax.grad(lambda p: _loss(remat, {"params": p}, tokens, mask)))(params)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), g0, g1)


@pytest.mark.parametrize("nf4", [False, True], ids=["lora", "qlora"])
def test_lora_grads_match(nf4):
    spec = LoraSpec(rank=4, alpha=8.0, targets=r"(q_proj|v_proj|down_proj)$")
    plain = build_model(LLAMA).clone(lora=spec)
    remat = build_model(LLAMA, remat=True).clone(lora=spec)
    params = init_params(build_model(LLAMA), jax.random.PRNGKey(0))
    if nf4:
        params = quantize_params(params, block_size=32)
    lora = init_lora(params, spec, jax.random.PRNGKey(1))
    lora = jax.tree.map(lambda a: a + 0.05, lora)  # non-zero B so every factor gets a gradient
    tokens, mask = _batch()
    f = lambda m: jax.grad(lambda l: _loss(m, {"params": params, "lora": l}, tokens, mask))(lora)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), f(plain),
                 jax.jit(lambda: f(remat))())


def test_lora_dropout_under_remat_is_reproducible_and_differentiable():
    spec = LoraSpec(rank=4, alpha=8.0, targets=r"(q_proj|v_proj)$", dropout=0.5)
    model = build_model(LLAMA, remat=True).clone(lora=spec)
    params = init_params(build_model(LLAMA), jax.random.PRNGKey(0))
    lora = jax.tree.map(lambda a: a + 0.05, init_lora(params, spec, jax.random.PRNGKey(1)))
    tokens, mask = _batch()
    f = lambda l, key: _loss(model, {"params": params, "lora": l}, tokens, mask,
                             deterministic=False, rngs={"dropout": key})
    k = jax.random.PRNGKey(7)
    assert float(f(lora, k)) == float(f(lora, k))
    assert float(f(lora, k)) != float(f(lora, jax.random.PRNGKey(8)))
    check_grads(lambda l: f(l, k), (lora,), order=1, modes=["rev"], atol=5e-2, rtol=5e-2)


def test_recompute_in_backward_matches_plain_grad_with_rng_and_int_args():
    def fn(w, x, idx, key):
        keep = jax.random.bernoulli(key, 0.7, x.shape)
        return jnp.tanh(jnp.where(keep, x, 0.0) @ w["k"])[idx]

    w = {"k": jax.random.normal(jax.random.PRNGKey(0), (5, 3))}
    x = jax.random.normal(jax.random.PRNGKey(1), (4, 5))
    idx, key = jnp.array([2, 0]), jax.random.PRNGKey(2)
    loss = lambda f: (lambda w, x: jnp.sum(f(w, x, idx, key) ** 2))
    g_plain = jax.grad(loss(fn), argnums=(0, 1))(w, x)
    g_remat = jax.grad(loss(recompute_in_backward(fn)), argnums=(0, 1))(w, x)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), g_plain, g_remat)


def _temp(config, layers, remat):
    cfg = LlamaConfig(**{**config.__dict__, "num_hidden_layers": layers})
    model = build_model(cfg, remat=remat)
    params = jax.eval_shape(lambda: init_params(build_model(cfg), jax.random.PRNGKey(0)))
    tokens = jax.ShapeDtypeStruct((4, 256), jnp.int32)
    step = jax.jit(jax.grad(lambda p, t: jnp.mean(model.apply({"params": p}, t))))
    return step.lower(params, tokens).compile().memory_analysis().temp_size_in_bytes


def test_remat_keeps_fewer_activations_per_layer_on_this_backend():
    """jax.checkpoint's barriers are dropped by XLA:CPU before CSE; models/remat.py's tied
    recomputation must still cut the per-layer growth of compiled temp memory."""
    cfg = LlamaConfig(vocab_size=64, hidden_size=128, intermediate_size=384, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256)
    grow = {r: _temp(cfg, 4, r) - _temp(cfg, 2, r) for r in (False, True)}
    block_input = 4 * 256 * 128 * 4  # one fp32 [B, T, D] per layer is what remat must keep
    assert grow[True] < 0.25 * grow[False], grow
    assert grow[True] <= 2 * 2 * block_input * 1.5, grow
