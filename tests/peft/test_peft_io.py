"""PEFT adapter directories: jaxalign <-> peft 0.21 parity (Llama and GPT-2 Conv1D), rsLoRA,
rank/alpha patterns, subsets, and clear errors for bad files."""

import json
import os

import jax
import numpy as np
import peft as hf_peft
import pytest
import torch
from safetensors.numpy import load_file, save_file

from jaxalign import models
from jaxalign.peft import (
    LoraSpec, adapted_modules, init_lora, linear_modules, load_peft_adapter, lora_apply_fn, lora_targets,
    save_peft_adapter, select_modules,
)
from tests.peft.conftest import hf_model, make_batch, randomize_b, torch_logits

CASES = {  # HF target leaf names, a module given rank 2, a pattern given alpha 3
    "llama": (["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
              "model.layers.1.self_attn.q_proj", "v_proj"),
    "gpt2": (["c_attn", "c_proj", "c_fc"], "transformer.h.1.attn.c_attn", "mlp.c_proj"),
}


def _hf_to_path(config):
    """HF module name -> jaxalign path for every Linear of the model."""
    abstract = models.abstract_params(models.build_model(config))
    return {models.hf_module_name(config, tuple(p.split("/"))): p for p in linear_modules(abstract)}


def _peft_scalings(pm, config):
    """jaxalign path -> PEFT's scaling for every LoRA layer of a PeftModel."""
    to_path = _hf_to_path(config)
    return {to_path[name.removeprefix("base_model.model.")]: mod.scaling["default"]
            for name, mod in pm.named_modules() if hasattr(mod, "lora_A") and "default" in mod.scaling}


def _parity(model, params, adapters, spec, ref_model):
    """Max |jaxalign - PEFT| logits over real tokens of a left-padded batch."""
    tokens, mask, _ = make_batch("left", b=3, t=10)
    ref = torch_logits(ref_model, tokens, mask)
    out = np.asarray(jax.jit(lora_apply_fn(model, spec))(params, adapters, tokens, attention_mask=mask))
    return float(np.abs(out - ref)[mask.astype(bool)].max())


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_peft_created_adapter_gives_peft_logits(peft_dirs, tmp_path, family):
    path = peft_dirs[family]
    targets, small, alpha_key = CASES[family]
    torch.manual_seed(0)
    pm = hf_peft.get_peft_model(hf_model(path), hf_peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=targets, rank_pattern={small: 2}, alpha_pattern={alpha_key: 3},
        use_rslora=True, lora_dropout=0.1, fan_in_fan_out=family == "gpt2", task_type="CAUSAL_LM"))
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.3)
    pm.save_pretrained(tmp_path / "adapter")
    pm.eval()

    model, params = models.from_pretrained(path)
    adapters, spec = load_peft_adapter(str(tmp_path / "adapter"), model.config)
    assert spec.use_rslora and spec.dropout == pytest.approx(0.1) and spec.rank == 4
    scalings = _peft_scalings(pm, model.config)
    mods = adapted_modules(adapters)
    assert set(mods) == set(scalings) == set(select_modules(params, spec))
    for p, (a, _) in mods.items():
        assert spec.scale(p, a.shape[1]) == pytest.approx(scalings[p]), p
    assert {p: a.shape[1] for p, (a, _) in mods.items() if a.shape[1] != 4} == {
        "layers_1/attn/q_proj" if family == "llama" else "layers_1/attn/c_attn": 2}
    err = _parity(model, params, adapters, spec, pm)
    assert err <= 1e-4, err


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_jaxalign_adapter_loads_in_peft(peft_dirs, tmp_path, family):
    path = peft_dirs[family]
    targets, small, alpha_key = CASES[family]
    model, params = models.from_pretrained(path)
    small_path = {"llama": "layers_1/attn/q_proj", "gpt2": "layers_1/attn/c_attn"}[family]
    spec = LoraSpec(rank=4, alpha=8.0, targets=lora_targets(family, "all_linear"), use_rslora=True,
                    rank_pattern=((small_path + "$", 2),),
                    alpha_pattern=(({"llama": r"v_proj$", "gpt2": r"mlp/c_proj$"}[family], 3.0),))
    adapters = randomize_b(init_lora(params, spec, jax.random.PRNGKey(0)), 7)
    out_dir = tmp_path / "ours"
    save_peft_adapter(adapters, spec, model.config, str(out_dir), base_model_name_or_path=path)

    # the same adapter as PEFT itself writes it: same keys, shapes and config fields
    ref_dir = tmp_path / "peft"
    hf_alpha = {n: 3.0 for n in _hf_to_path(model.config) if n.endswith(alpha_key)}
    hf_peft.get_peft_model(hf_model(path), hf_peft.LoraConfig(
        r=4, lora_alpha=8.0, target_modules=targets, rank_pattern={small: 2}, alpha_pattern=hf_alpha,
        use_rslora=True, fan_in_fan_out=family == "gpt2", task_type="CAUSAL_LM")).save_pretrained(ref_dir)
    ours, theirs = (load_file(str(d / "adapter_model.safetensors")) for d in (out_dir, ref_dir))
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}
    cfg, ref_cfg = (json.load(open(d / "adapter_config.json")) for d in (out_dir, ref_dir))
    for field in ("peft_type", "task_type", "r", "lora_alpha", "lora_dropout", "use_rslora", "bias",
                  "fan_in_fan_out", "rank_pattern", "alpha_pattern", "use_dora"):
        assert cfg[field] == ref_cfg[field], field
    assert sorted(cfg["target_modules"]) == sorted(ref_cfg["target_modules"]) == sorted(targets)
    assert cfg["base_model_name_or_path"] == path

    pm = hf_peft.PeftModel.from_pretrained(hf_model(path), str(out_dir)).eval()
    scalings = _peft_scalings(pm, model.config)
    for p, (a, _) in adapted_modules(adapters).items():
        assert scalings[p] == pytest.approx(spec.scale(p, a.shape[1])), p
    err = _parity(model, params, adapters, spec, pm)
    assert err <= 1e-4, err

    # and back: identical factors, identical per-module scales
    back, spec2 = load_peft_adapter(str(out_dir), model.config)
    jax.tree.map(np.testing.assert_array_equal, back, adapters)
    for p, (a, _) in adapted_modules(back).items():
        assert spec2.scale(p, a.shape[1]) == pytest.approx(spec.scale(p, a.shape[1])), p
    assert set(select_modules(params, spec2)) == set(select_modules(params, spec))


def test_subset_adapter_round_trips_through_a_target_regex(peft_dirs, tmp_path):
    path = peft_dirs["llama"]
    model, params = models.from_pretrained(path)
    spec = LoraSpec(rank=3, alpha=5.0, targets=r"layers_0/attn/q_proj$|layers_1/mlp/down_proj$",
                    rank_pattern=((r"down_proj", 1),))
    adapters = randomize_b(init_lora(params, spec, jax.random.PRNGKey(1)), 2)
    save_peft_adapter(adapters, spec, model.config, str(tmp_path))
    cfg = json.load(open(tmp_path / "adapter_config.json"))
    assert isinstance(cfg["target_modules"], str)  # leaf names would also adapt layer 1 q_proj
    assert cfg["rank_pattern"] == {"model.layers.1.mlp.down_proj": 1}
    pm = hf_peft.PeftModel.from_pretrained(hf_model(path), str(tmp_path)).eval()
    assert set(_peft_scalings(pm, model.config)) == {"layers_0/attn/q_proj", "layers_1/mlp/down_proj"}
    assert _parity(model, params, adapters, spec, pm) <= 1e-4
    back, spec2 = load_peft_adapter(str(tmp_path), model.config)
    jax.tree.map(np.testing.assert_array_equal, back, adapters)
    assert set(select_modules(params, spec2)) == {"layers_0/attn/q_proj", "layers_1/mlp/down_proj"}


# ----------------------------------------------------------------------------- errors
@pytest.fixture()
def saved(peft_dirs, tmp_path):
    path = peft_dirs["llama"]
    model, params = models.from_pretrained(path)
    spec = LoraSpec(rank=2, alpha=4.0, targets=r"attn/(q_proj|v_proj)$")
    save_peft_adapter(init_lora(params, spec, jax.random.PRNGKey(0)), spec, model.config, str(tmp_path))
    return model, params, spec, tmp_path


def _rewrite(d, fn):
    f = os.path.join(d, "adapter_model.safetensors")
    tensors = fn(load_file(f))
    save_file(tensors, f, metadata={"format": "pt"})
    return f


def test_adapter_for_a_missing_module(saved):
    model, _, _, d = saved
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    bad = key.replace("layers.0", "layers.7")
    f = _rewrite(d, lambda t: {(bad if k == key else k): v for k, v in t.items()})
    with pytest.raises(ValueError, match=rf"{f}: tensor '{bad}' adapts module 'model.layers.7.self_attn.q_proj', "
                                         "which the llama model does not have"):
        load_peft_adapter(str(d), model.config)


def test_adapter_with_a_wrong_shape(saved):
    model, _, _, d = saved
    key = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"
    _rewrite(d, lambda t: {**t, key: np.zeros((16, 3), np.float32)})
    with pytest.raises(ValueError, match=rf"tensor '{key}' has shape \(16, 3\), expected \(16, 2\)"):
        load_peft_adapter(str(d), model.config)


def test_adapter_missing_a_factor_or_unsupported(saved):
    model, params, spec, d = saved
    key = "base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight"
    _rewrite(d, lambda t: {k: v for k, v in t.items() if k != key})
    with pytest.raises(ValueError, match=f"module 'model.layers.0.self_attn.v_proj' has no '{key}'"):
        load_peft_adapter(str(d), model.config)
    cfg_path = d / "adapter_config.json"
    cfg = json.load(open(cfg_path))
    json.dump({**cfg, "use_dora": True}, open(cfg_path, "w"))
    with pytest.raises(ValueError, match="use_dora=True: DoRA adapters are not supported"):
        load_peft_adapter(str(d), model.config)
    os.remove(cfg_path)
    with pytest.raises(FileNotFoundError, match="no adapter_config.json"):
        load_peft_adapter(str(d), model.config)
    bad = {"layers_5": {"attn": {"q_proj": {"lora_a": np.zeros((32, 2)), "lora_b": np.zeros((2, 32))}}}}
    with pytest.raises(ValueError, match="adapter for 'layers_5/attn/q_proj', which the llama model does not have"):
        save_peft_adapter(bad, spec, model.config, str(d / "x"))
