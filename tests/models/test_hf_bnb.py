"""Whole transformers + bitsandbytes 4-bit (NF4) checkpoints, in both directions.

Two facts about bitsandbytes 0.50 on CPU shape these tests:
* On CPUs with AVX512-BF16, `Linear4bit.forward` in eval mode repacks the weight for a fused
  kernel that rounds activations and absmax to bf16 (logits off by ~1e-2). The oracle here is
  bitsandbytes' exact path (dequantize_4bit, then an fp32 matmul), selected by clearing
  `support_avx512bf16_for_cpu` on every Linear4bit before the first forward.
* Its CPU dequantize kernel mis-scales weights whose in_features is not a multiple of the block
  size, so every linear input width here (64, 128, 256) is a multiple of 64.
"""

import json
import os
import shutil

import bitsandbytes as bnb
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import traverse_util
from safetensors.numpy import load_file, save_file

from jaxalign import models
from jaxalign.peft import LoraSpec, init_lora, lora_targets
from jaxalign.quant import NF4Tensor, dequantize_params, quantize_nf4, quantize_params
from tests.models.conftest import make_batch

transformers.logging.set_verbosity_error()

CONFIGS = {
    "llama_gqa": lambda: transformers.LlamaConfig(
        vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64),
    "qwen2_bias": lambda: transformers.Qwen2Config(  # q/k/v biases, GQA, untied head
        vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        tie_word_embeddings=False),
    "qwen3_tied": lambda: transformers.Qwen3Config(
        vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=64,
        tie_word_embeddings=True),
    "gpt2": lambda: transformers.GPT2Config(  # Conv1D modules; lm_head tied to wte
        vocab_size=97, n_positions=64, n_embd=64, n_layer=2, n_head=4),
}
QC = "quantization_config"
QS = "quant_state.bitsandbytes__nf4"


def read_json(path):
    with open(path) as f:
        return json.load(f)


def _is_nf4(x):
    return isinstance(x, NF4Tensor)


def exact_bnb(model):
    """Select bitsandbytes' exact CPU path (see the module docstring)."""
    for m in model.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            m.support_avx512bf16_for_cpu = False
    return model.eval()


def torch_logits(model, tokens, mask, positions):
    with torch.no_grad():
        return model(torch.tensor(tokens, dtype=torch.long), attention_mask=torch.tensor(mask),
                     position_ids=torch.tensor(positions, dtype=torch.long)).logits.float().numpy()


def assert_logits_close(jax_model, params, hf_model, tol=1e-4):
    tokens, mask, positions = make_batch("left")
    ref = torch_logits(hf_model, tokens, mask, positions)
    out = np.asarray(jax_model.apply({"params": params}, tokens, attention_mask=mask))
    valid = mask.astype(bool)
    err = np.abs(out - ref)[valid].max()
    assert err <= tol, err
    assert np.abs(ref[valid]).max() > 0.1  # the comparison is not between near-zero logits


def assert_same_leaves(a, b):
    """Same tree (NF4Tensor static fields included) and byte-identical leaves."""
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        x, y = np.asarray(x), np.asarray(y)
        assert x.dtype == y.dtype and x.shape == y.shape and x.tobytes() == y.tobytes()


def flat_nf4(config, params):
    """HF module name -> NF4Tensor kernel."""
    flat = traverse_util.flatten_dict(params)
    return {models.hf_module_name(config, p[:-1]): x for p, x in flat.items() if _is_nf4(x)}


def linear4bit_names(model):
    return {n for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}


@pytest.fixture(scope="session")
def fp_dirs(tmp_path_factory):
    """family -> directory of a tiny dense transformers model with perturbed weights."""
    out = {}
    for i, (name, make) in enumerate(CONFIGS.items()):
        torch.manual_seed(i)
        model = transformers.AutoModelForCausalLM.from_config(make())
        with torch.no_grad():  # random init leaves norms at 1 and biases at 0
            for p in model.parameters():
                p.add_(0.05 * torch.randn(p.shape))
        d = tmp_path_factory.mktemp(f"fp_{name}")
        model.save_pretrained(d)
        out[name] = str(d)
    return out


@pytest.fixture(scope="session")
def bnb_models(fp_dirs, tmp_path_factory):
    """(family, double_quant) -> (directory saved by transformers, its 4-bit torch model)."""
    cache = {}

    def get(family, double_quant=True):
        if (family, double_quant) not in cache:
            qc = transformers.BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=double_quant,
                bnb_4bit_compute_dtype=torch.float32)
            hf = transformers.AutoModelForCausalLM.from_pretrained(
                fp_dirs[family], quantization_config=qc, device_map="cpu", dtype=torch.float32)
            d = tmp_path_factory.mktemp(f"bnb_{family}_{int(double_quant)}")
            hf.save_pretrained(d)
            cache[family, double_quant] = (str(d), exact_bnb(hf))
        return cache[family, double_quant]

    return get


# ----------------------------------------------------------------------------- transformers -> jaxalign
@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("family", ["llama_gqa", "qwen2_bias", "gpt2"])
def test_transformers_4bit_checkpoint_loads(bnb_models, family, double_quant):
    path, hf = bnb_models(family, double_quant)
    assert read_json(os.path.join(path, "config.json"))[QC]["bnb_4bit_use_double_quant"] == double_quant
    model, params = models.from_pretrained(path)
    ours = flat_nf4(model.config, params)
    assert set(ours) == linear4bit_names(hf) and len(ours) == (8 if family == "gpt2" else 14)
    for name, q in ours.items():
        w = hf.get_submodule(name).weight
        qs = w.quant_state
        assert q.transposed and q.storage_shape == tuple(qs.shape) and q.block_size == qs.blocksize
        assert q.double_quant == double_quant and q.dtype == jnp.float32
        assert np.asarray(q.codes).tobytes() == w.data.numpy().tobytes(), name
        assert np.asarray(q.absmax).tobytes() == qs.absmax.numpy().tobytes(), name
        if double_quant:
            assert np.asarray(q.nested_absmax).tobytes() == qs.state2.absmax.numpy().tobytes()
            assert np.float32(q.offset) == np.float32(qs.offset.item())
    dense = [x for x in jax.tree.leaves(params, is_leaf=_is_nf4) if not _is_nf4(x)]
    assert all(x.dtype == jnp.float32 for x in dense)
    assert_logits_close(model, params, hf)


def test_dequantize_on_load(bnb_models):
    path, hf = bnb_models("qwen2_bias")
    _, kept = models.from_pretrained(path)
    model, dense = models.from_pretrained(path, quantized="dequantize")
    assert not any(_is_nf4(x) for x in jax.tree.leaves(dense, is_leaf=_is_nf4))
    assert_same_leaves(dense, dequantize_params(kept))
    _, dense16 = models.from_pretrained(path, dtype=jnp.bfloat16, quantized="dequantize")
    ref16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), dequantize_params(kept, jnp.bfloat16))
    assert_same_leaves(dense16, ref16)
    assert_logits_close(model, dense, hf)
    with pytest.raises(ValueError, match="quantized='lossy'"):
        models.from_pretrained(path, quantized="lossy")


def test_qlora_on_a_4bit_checkpoint(bnb_models):
    path, _ = bnb_models("llama_gqa")
    spec = LoraSpec(rank=4, alpha=8, targets=lora_targets("llama", "all_linear"))
    model, params = models.from_pretrained(path, lora=spec)
    assert len(flat_nf4(model.config, params)) == 14  # the frozen base stays 4-bit
    adapters = init_lora(params, spec, jax.random.PRNGKey(0))
    tokens, mask, _ = make_batch("right")

    def loss(ad):
        logits = model.apply({"params": params, "lora": ad}, tokens, attention_mask=mask)
        return jnp.sum(jax.nn.log_softmax(logits)[..., 0] * mask)

    value, grads = jax.jit(jax.value_and_grad(loss))(adapters)
    base = model.apply({"params": params}, tokens, attention_mask=mask)
    assert np.isclose(value, jnp.sum(jax.nn.log_softmax(base)[..., 0] * mask), atol=1e-4)  # B = 0
    assert jax.tree.structure(grads) == jax.tree.structure(adapters)
    flat = traverse_util.flatten_dict(grads)
    assert len(flat) == 2 * 14
    for p, g in flat.items():
        assert np.isfinite(g).all()
        if p[-1] == "lora_b":  # lora_a gets no gradient while B = 0
            assert np.abs(g).max() > 0, p


def test_shardings_place_nf4_buffers_replicated(bnb_models):
    from jaxalign import sharding

    path, _ = bnb_models("llama_gqa")
    model, kept = models.from_pretrained(path)
    mesh = sharding.make_mesh(data=-1)
    shardings = sharding.param_shardings(models.abstract_params(model), mesh)
    _, placed = models.from_pretrained(path, shardings=shardings)
    assert_same_leaves(placed, kept)
    q = placed["layers_0"]["attn"]["q_proj"]["kernel"]
    for buf in (q.codes, q.absmax, q.nested_absmax, q.offset):
        assert buf.sharding == jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    emb = placed["embed_tokens"]["embedding"]
    assert emb.sharding == shardings["embed_tokens"]["embedding"]


# ----------------------------------------------------------------------------- jaxalign -> transformers
def random_params(model, seed):
    params = models.init_params(model, jax.random.PRNGKey(seed))
    keys = iter(jax.random.split(jax.random.PRNGKey(seed + 1), len(jax.tree.leaves(params))))
    return jax.tree.map(lambda x: x + 0.1 * jax.random.normal(next(keys), x.shape, x.dtype), params)


def jax_model(family):
    return models.build_model(models.config_from_hf(CONFIGS[family]().to_dict()))


@pytest.mark.parametrize("family", ["llama_gqa", "qwen2_bias", "qwen3_tied", "gpt2"])
def test_saved_4bit_directory_loads_in_transformers(family, tmp_path):
    model = jax_model(family)
    qparams = quantize_params(random_params(model, 0))
    models.save_pretrained(model, qparams, str(tmp_path), max_shard_size="8KB")
    index = read_json(tmp_path / "model.safetensors.index.json")["weight_map"]
    for name in flat_nf4(model.config, qparams):  # a module's six keys share one shard
        assert len({index[k] for k in index if k.startswith(name + ".weight")}) == 1
    qc = read_json(tmp_path / "config.json")[QC]
    assert qc["llm_int8_skip_modules"] == ["lm_head"] and qc["bnb_4bit_use_double_quant"]
    assert qc["quant_method"] == "bitsandbytes" and qc["bnb_4bit_compute_dtype"] == "float32"
    hf = exact_bnb(transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path)))
    assert linear4bit_names(hf) == set(flat_nf4(model.config, qparams))
    assert_logits_close(model, qparams, hf)
    _, back = models.from_pretrained(str(tmp_path))
    assert_same_leaves(back, qparams)


@pytest.mark.parametrize("case", ["mlp_only", "with_lm_head", "mixed_settings"])
def test_partial_and_mixed_quantization_through_transformers(case, tmp_path):
    model = jax_model("llama_gqa")
    params = random_params(model, 1)
    if case == "mlp_only":
        qparams = quantize_params(params, targets=r"/mlp/.*kernel$")
    elif case == "with_lm_head":
        qparams = quantize_params(params, targets=r"kernel$", block_size=32, double_quant=False)
    else:  # per-module block size and double quantization
        qparams = quantize_params(params, targets=r"/attn/.*kernel$", block_size=32)
        qparams = quantize_params(qparams, targets=r"/mlp/.*kernel$", double_quant=False)
    models.save_pretrained(model, qparams, str(tmp_path))
    qc = read_json(tmp_path / "config.json")[QC]
    quantized = set(flat_nf4(model.config, qparams))
    attn = sorted(f"model.layers.{i}.self_attn.{m}_proj" for i in range(2) for m in "qkvo")
    expected_skip = {"mlp_only": ["lm_head"] + attn, "with_lm_head": [],
                     "mixed_settings": ["lm_head"]}[case]
    assert qc["llm_int8_skip_modules"] == expected_skip
    assert qc["bnb_4bit_use_double_quant"] == (case == "mlp_only")
    hf = exact_bnb(transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path)))
    assert linear4bit_names(hf) == quantized
    assert ("lm_head" in quantized) == (case == "with_lm_head")
    assert_logits_close(model, qparams, hf)
    _, back = models.from_pretrained(str(tmp_path))
    assert_same_leaves(back, qparams)


def test_bf16_round_trip(tmp_path):
    model = models.build_model(models.config_from_hf(CONFIGS["qwen2_bias"]().to_dict()),
                               dtype=jnp.bfloat16)
    params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), random_params(model, 2))
    qparams = quantize_params(params)
    assert all(q.dtype == jnp.bfloat16 for q in flat_nf4(model.config, qparams).values())
    models.save_pretrained(model, qparams, str(tmp_path))
    cfg = read_json(tmp_path / "config.json")
    assert cfg["dtype"] == "bfloat16" and cfg[QC]["bnb_4bit_compute_dtype"] == "bfloat16"
    model2, back = models.from_pretrained(str(tmp_path), dtype=jnp.bfloat16)
    assert_same_leaves(back, qparams)
    hf = exact_bnb(transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path)))
    assert hf.get_submodule("model.layers.0.mlp.up_proj").weight.quant_state.dtype == torch.bfloat16
    assert hf.get_submodule("model.layers.0.mlp.up_proj").compute_dtype == torch.bfloat16
    tokens, mask, positions = make_batch("left")
    ref = torch_logits(hf, tokens, mask, positions)
    out = np.asarray(model2.apply({"params": back}, tokens, attention_mask=mask), np.float32)
    assert np.abs(out - ref)[mask.astype(bool)].max() < 0.1  # bf16 has ~3 significant digits


# ----------------------------------------------------------------------------- errors
def _copy(bnb_models, tmp_path, family="llama_gqa"):
    d = str(tmp_path / "m")
    shutil.copytree(bnb_models(family)[0], d)
    return d


def _edit_config(d, **changes):
    cfg = read_json(os.path.join(d, "config.json"))
    for k, v in changes.items():
        if v is None:
            cfg.pop(k, None)
        elif k == QC:
            cfg[QC].update(v)
        else:
            cfg[k] = v
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(cfg, f)


def _edit_tensors(d, fn):
    p = os.path.join(d, "model.safetensors")
    st = load_file(p)
    fn(st)
    save_file(st, p)


@pytest.mark.parametrize("change, match", [
    ({"bnb_4bit_quant_type": "fp4"}, r"quantization_config\.bnb_4bit_quant_type='fp4'"),
    ({"load_in_8bit": True, "_load_in_8bit": True, "load_in_4bit": False, "_load_in_4bit": False},
     r"quantization_config\.load_in_8bit=true: 8-bit"),
    ({"load_in_4bit": False, "_load_in_4bit": False}, r"quantization_config\.load_in_4bit"),
    ({"quant_method": "gptq"}, r"quantization_config\.quant_method='gptq'"),
])
def test_unsupported_quantization_config(bnb_models, tmp_path, change, match):
    d = _copy(bnb_models, tmp_path)
    _edit_config(d, quantization_config=change)
    with pytest.raises(models.CheckpointError, match=match):
        models.from_pretrained(d)


def test_fp4_tensor_is_named(bnb_models, tmp_path):
    d = _copy(bnb_models, tmp_path)
    key = "model.layers.0.self_attn.k_proj.weight.quant_state.bitsandbytes__"
    _edit_tensors(d, lambda st: st.__setitem__(key + "fp4", st.pop(key + "nf4")))
    with pytest.raises(models.CheckpointError, match=f"tensor '{key}fp4': fp4"):
        models.from_pretrained(d)


@pytest.mark.parametrize("suffix", ["weight", "weight.absmax", "weight.quant_map", f"weight.{QS}",
                                    "weight.nested_absmax", "weight.nested_quant_map"])
def test_incomplete_module_is_named(bnb_models, tmp_path, suffix):
    d = _copy(bnb_models, tmp_path)
    name = "model.layers.1.mlp.up_proj"
    _edit_tensors(d, lambda st: st.pop(f"{name}.{suffix}"))
    match = rf"module '{name}' has bitsandbytes keys .* but lacks \['{name}\.{suffix}'\]"
    with pytest.raises(models.CheckpointError, match=match):
        models.from_pretrained(d)


def test_quant_state_shape_mismatch_names_both_shapes(bnb_models, tmp_path):
    d = _copy(bnb_models, tmp_path)
    key = f"model.layers.0.mlp.down_proj.weight.{QS}"

    def transpose_shape(st):  # same element count, so only the shape check can catch it
        meta = json.loads(bytes(st[key]))
        meta["shape"] = meta["shape"][::-1]
        st[key] = np.frombuffer(json.dumps(meta).encode(), np.uint8).copy()

    _edit_tensors(d, transpose_shape)
    match = (rf"'{key}': quant_state shape \[128, 64\] does not match layers_0/mlp/down_proj/kernel "
             r"\[in, out\] = \[128, 64\] \(expected \[out, in\] = \[64, 128\]\)")
    with pytest.raises(models.CheckpointError, match=match):
        models.from_pretrained(d)


def test_bnb_keys_without_quantization_config(bnb_models, tmp_path):
    d = _copy(bnb_models, tmp_path)
    _edit_config(d, quantization_config=None)
    match = (r"tensor 'model\.layers\.0\.self_attn\.k_proj\.weight\.absmax' is a bitsandbytes 4-bit "
             r"key but config\.json has no bitsandbytes quantization_config")
    with pytest.raises(models.CheckpointError, match=match):
        models.from_pretrained(d)


def test_unused_tensors_still_reported(bnb_models, tmp_path):
    d = _copy(bnb_models, tmp_path)
    stray = "model.layers.0.mlp.extra.weight.absmax"
    _edit_tensors(d, lambda st: st.__setitem__(stray, np.zeros(4, np.uint8)))
    match = r"not used by the llama model: \['model\.layers\.0\.mlp\.extra\.weight\.absmax'\]"
    with pytest.raises(models.CheckpointError, match=match):
        models.from_pretrained(d)


def test_saving_unsupported_nf4_leaves(tmp_path):
    model = jax_model("llama_gqa")
    params = models.init_params(model, jax.random.PRNGKey(0))
    bad = jax.tree.map(lambda x: x, params)
    k = bad["layers_0"]["mlp"]["up_proj"]["kernel"]
    bad["layers_0"]["mlp"]["up_proj"]["kernel"] = quantize_nf4(k)  # transposed=False: [in, out] bytes
    with pytest.raises(ValueError, match=r"layers_0/mlp/up_proj/kernel: .*transposed=True"):
        models.save_pretrained(model, bad, str(tmp_path))
    bad = jax.tree.map(lambda x: x, params)
    bad["embed_tokens"]["embedding"] = quantize_nf4(bad["embed_tokens"]["embedding"])
    with pytest.raises(TypeError, match="embed_tokens/embedding is an NF4Tensor"):
        models.save_pretrained(model, bad, str(tmp_path))
