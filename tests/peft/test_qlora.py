"""QLoRA: LoRA adapters over an NF4-quantized base (jaxalign.quant)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxalign import models
from jaxalign.peft import (
    LoraSpec, count_params, init_lora, linear_modules, lora_apply_fn, lora_targets, merge_lora,
    unmerge_lora,
)
from jaxalign.quant import NF4Tensor, dequantize_nf4, dequantize_params, quantize_params
from tests.peft.conftest import make_batch, randomize_b

CFG = models.LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16)


@pytest.fixture(scope="module")
def qlora():
    model = models.build_model(CFG)
    params = jax.jit(lambda k: models.init_params(model, k))(jax.random.PRNGKey(0))
    qparams = quantize_params(params)
    spec = LoraSpec(rank=4, alpha=8, targets=lora_targets("llama", "all_linear"), use_rslora=True)
    adapters = randomize_b(init_lora(qparams, spec, jax.random.PRNGKey(1)), 5, scale=0.5)
    return model, params, qparams, spec, adapters


def test_adapters_and_counts_over_nf4_kernels(qlora):
    _, params, qparams, spec, adapters = qlora
    assert isinstance(qparams["layers_0"]["attn"]["q_proj"]["kernel"], NF4Tensor)
    assert linear_modules(qparams) == linear_modules(params)  # logical [in, out] shapes
    dense_adapters = init_lora(params, spec, jax.random.PRNGKey(1))
    assert jax.tree.map(jnp.shape, adapters) == jax.tree.map(jnp.shape, dense_adapters)
    # NF4 kernels count their logical element count, as PEFT counts a 4-bit model
    assert count_params(qparams, adapters) == count_params(params, adapters)


def test_forward_and_grads_equal_the_dequantized_base(qlora):
    model, _, qparams, spec, adapters = qlora
    dense = dequantize_params(qparams, jnp.float32)
    f = lora_apply_fn(model, spec)
    tokens, mask, _ = make_batch("left", b=3, t=8)

    @jax.jit
    def run(base, a):
        def loss(a):
            logits = f(base, a, tokens, attention_mask=mask)
            return jnp.mean(jax.nn.log_softmax(logits)[..., 0]), logits
        return jax.value_and_grad(loss, has_aux=True)(a)

    (lq, logits_q), gq = run(qparams, adapters)
    (ld, logits_d), gd = run(dense, adapters)
    np.testing.assert_allclose(logits_q, logits_d, atol=1e-5)
    np.testing.assert_allclose(lq, ld, rtol=1e-5)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6), gq, gd)
    assert float(jnp.abs(gq["layers_0"]["mlp"]["down_proj"]["lora_a"]).max()) > 0


def test_merge_dequantizes(qlora):
    model, _, qparams, spec, adapters = qlora
    merged = merge_lora(qparams, adapters, spec)
    k = merged["layers_0"]["attn"]["q_proj"]["kernel"]
    assert not isinstance(k, NF4Tensor) and k.dtype == jnp.float32
    a, b = (adapters["layers_0"]["attn"]["q_proj"][n] for n in ("lora_a", "lora_b"))
    want = dequantize_nf4(qparams["layers_0"]["attn"]["q_proj"]["kernel"], jnp.float32) + 8 / 2 * a @ b
    np.testing.assert_allclose(k, want, atol=1e-5)
    f = jax.jit(lora_apply_fn(model, spec))
    tokens, mask, _ = make_batch("none", b=2, t=8)
    np.testing.assert_allclose(f(merged, None, tokens, attention_mask=mask),
                               f(qparams, adapters, tokens, attention_mask=mask), atol=2e-5)
    back = unmerge_lora(merged, adapters, spec)
    np.testing.assert_allclose(back["layers_0"]["attn"]["q_proj"]["kernel"],
                               dequantize_nf4(qparams["layers_0"]["attn"]["q_proj"]["kernel"], jnp.float32),
                               atol=1e-6)
