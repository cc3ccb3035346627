"""LoRA / QLoRA through the runner: the reference is the base without the adapter, only the
adapters train, a QLoRA DPO step lowers the loss, exports (merged HF dir + PEFT adapter) load."""

import math

import jax
import jax.numpy as jnp
import pytest

from jaxalign import data as jdata
from jaxalign.losses import dpo_loss
from jaxalign.models import LlamaConfig, build_model, init_params
from jaxalign.peft import LoraSpec, init_lora, lora_targets
from jaxalign.quant import NF4Tensor, bits_per_parameter, quantize_params
from jaxalign.train.objectives import ObjectiveSpec, make_objective
from jaxalign.train.optim import make_optimizer
from jaxalign.train.run import run
from jaxalign.train.step import init_state, make_train_step


@pytest.mark.parametrize("variant", ["lora", "qlora"])
def test_lora_and_qlora_runs(tiny_config, tmp_path, variant):
    res = run(tiny_config(f"experiments/dpo.py:{variant}", train__steps=3,
                          model__init__hidden_size=64, output_dir=str(tmp_path / variant)))
    assert res["reference"] == "base"
    # B = 0 at init: policy == base == reference, so the first DPO loss is ln 2
    assert res["history"][0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert set(res["state"]["trainable"]) == {"lora"}
    leaves = jax.tree.leaves(res["variables"]["params"], is_leaf=lambda x: isinstance(x, NF4Tensor))
    n_nf4 = sum(isinstance(x, NF4Tensor) for x in leaves)
    assert (n_nf4 > 0) == (variant == "qlora")
    assert set(res["export"]) >= {"hf_dir", "peft_dir"}


def _tiny_pref_batch(tokenizer, n=8):
    ds = jdata.make_preference_dataset(n, seed=0)
    tok = jdata.tokenize_dataset(ds, tokenizer, kind="preference")
    return jdata.make_collate_fn("preference", pad_id=tokenizer.pad_token_id)(tok.examples)


def test_qlora_dpo_step_lowers_loss_and_stores_4127_bits():
    tokenizer = jdata.build_char_tokenizer()
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    spec = LoraSpec(rank=8, alpha=16.0, targets=lora_targets("llama", "all_linear"))
    model = build_model(cfg, lora=spec)
    params = init_params(model, jax.random.PRNGKey(0))
    qparams = quantize_params(params, block_size=64, double_quant=True)
    bits = bits_per_parameter(qparams)
    print(f"NF4 base storage of the tiny model: {bits:.4f} bits/parameter")
    # tiny kernels pay for a partly filled 256-block of nested absmax and the fp32 offset
    assert 4.126 < bits < 4.14
    big = quantize_params({"layer": {"kernel": jnp.ones((1024, 4096), jnp.float32)}})
    big_bits = bits_per_parameter(big)
    print(f"NF4 storage of a 1024x4096 kernel: {big_bits:.5f} bits/parameter")
    assert big_bits <= 4.127
    adapters = init_lora(qparams, spec, jax.random.PRNGKey(1))
    # a non-zero B so that policy != reference
    adapters = jax.tree.map(lambda x: x + 0.01, adapters)
    obj = make_objective(model, ObjectiveSpec(kind="preference", loss_fn=dpo_loss,
                                              loss_kwargs=(("beta", 0.1),), reference="base"))
    opt = make_optimizer(name="adamw", learning_rate_fn=1e-2)
    state = init_state({"lora": adapters}, opt, jax.random.PRNGKey(2))
    frozen = {"params": qparams}
    batch = {k: jnp.asarray(v) for k, v in _tiny_pref_batch(tokenizer).items()}
    step = make_train_step(obj, opt)
    loss0, _ = obj(state["trainable"], frozen, batch, jax.random.PRNGKey(0), deterministic=True)
    base_before = jax.tree.leaves(frozen)
    for _ in range(3):
        state, metrics = step(state, frozen, batch)
    loss1, _ = obj(state["trainable"], frozen, batch, jax.random.PRNGKey(0), deterministic=True)
    assert float(loss1) < float(loss0)
    # the NF4 base is untouched (frozen by construction)
    for a, b in zip(base_before, jax.tree.leaves(frozen)):
        assert a is b
