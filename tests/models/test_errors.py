"""Malformed checkpoints and unsupported architectures raise errors that name the key."""

import json
import os
import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from jaxalign import models


def _copy(src, dst):
    shutil.copytree(src, dst)
    return str(dst)


def test_unknown_model_type(hf_dirs, tmp_path):
    d = _copy(hf_dirs["llama_gqa"][0], tmp_path / "m")
    cfg = json.load(open(os.path.join(d, "config.json")))
    cfg["model_type"] = "mamba"
    json.dump(cfg, open(os.path.join(d, "config.json"), "w"))
    with pytest.raises(models.ConfigError, match="model_type='mamba'"):
        models.from_pretrained(d)


def test_missing_tensor_is_named(hf_dirs, tmp_path):
    d = _copy(hf_dirs["llama_gqa"][0], tmp_path / "m")
    st = load_file(os.path.join(d, "model.safetensors"))
    del st["model.layers.1.mlp.up_proj.weight"]
    save_file(st, os.path.join(d, "model.safetensors"))
    with pytest.raises(models.CheckpointError, match=r"missing tensor 'model\.layers\.1\.mlp\.up_proj\.weight'.*\(96, 64\)"):
        models.from_pretrained(d)


def test_wrong_shape_is_named(hf_dirs, tmp_path):
    d = _copy(hf_dirs["qwen2"][0], tmp_path / "m")
    st = load_file(os.path.join(d, "model.safetensors"))
    st["model.layers.0.self_attn.k_proj.bias"] = np.zeros((7,), np.float32)
    save_file(st, os.path.join(d, "model.safetensors"))
    with pytest.raises(models.CheckpointError, match=r"k_proj\.bias' has shape \(7,\), expected \(32,\)"):
        models.from_pretrained(d)


def test_unused_tensor_is_reported(hf_dirs, tmp_path):
    d = _copy(hf_dirs["llama_gqa"][0], tmp_path / "m")
    st = load_file(os.path.join(d, "model.safetensors"))
    st["model.layers.0.self_attn.extra.weight"] = np.zeros((2,), np.float32)
    save_file(st, os.path.join(d, "model.safetensors"))
    with pytest.raises(models.CheckpointError, match="extra.weight"):
        models.from_pretrained(d)


def test_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        models.from_pretrained(str(tmp_path))
    json.dump({"model_type": "llama", "vocab_size": 8, "hidden_size": 8, "intermediate_size": 8,
               "num_hidden_layers": 1, "num_attention_heads": 2}, open(tmp_path / "config.json", "w"))
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        models.from_pretrained(str(tmp_path))


def test_incomplete_config_and_unsupported_rope(tmp_path):
    with pytest.raises(models.ConfigError, match="hidden_size"):
        models.config_from_hf({"model_type": "llama", "vocab_size": 8})
    base = {"model_type": "llama", "vocab_size": 8, "hidden_size": 8, "intermediate_size": 8,
            "num_hidden_layers": 1, "num_attention_heads": 2}
    with pytest.raises(models.ConfigError, match="yarn"):
        models.config_from_hf({**base, "rope_parameters": {"rope_type": "yarn", "factor": 2.0}})
    with pytest.raises(models.ConfigError, match="num_key_value_heads"):
        models.config_from_hf({**base, "num_key_value_heads": 3})


def test_corrupt_safetensors_header(hf_dirs, tmp_path):
    d = _copy(hf_dirs["gpt2"][0], tmp_path / "m")
    with open(os.path.join(d, "model.safetensors"), "r+b") as f:
        f.seek(8)
        f.write(b"\xff\xfe garbage")
    with pytest.raises(ValueError, match="corrupt safetensors header"):
        models.from_pretrained(d)


def test_loading_streams_one_tensor_at_a_time(tmp_path):
    """Host memory peak while loading stays far below the checkpoint size (no second full copy)."""
    import tracemalloc

    import transformers

    cfg = transformers.LlamaConfig(vocab_size=4096, hidden_size=256, intermediate_size=512,
                                   num_hidden_layers=4, num_attention_heads=4)
    hf = transformers.AutoModelForCausalLM.from_config(cfg)
    hf.save_pretrained(tmp_path)
    total = sum(p.numel() * 4 for p in hf.parameters())
    del hf
    tracemalloc.start()
    _, params = models.from_pretrained(str(tmp_path))
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    largest = 4096 * 256 * 4
    assert peak < 2 * largest + (1 << 20) < total / 2, (peak, largest, total)
