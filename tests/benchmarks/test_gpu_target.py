"""gpu_target: GPU descriptions for compiling without a GPU, and the error when JAX cannot."""

import os

import jax
import jax.numpy as jnp
import pytest

from experiments.benchmarks import gpu_target, memory_on_paper


def test_targets_are_described():
    assert {"h100", "h200"} <= set(gpu_target.names())
    assert gpu_target.describe("h100") == "NVIDIA H100 80GB HBM3 (sm_90, 132 SMs; gpu_targets/h100.txtpb)"
    assert gpu_target.describe("h200").startswith("NVIDIA H200 (sm_90, 132 SMs")
    with pytest.raises(ValueError, match="no GPU target 'a100x'.*known: h100, h200"):
        gpu_target.spec("a100x")


def test_prepare_sets_the_environment(monkeypatch):
    monkeypatch.delenv("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", raising=False)
    monkeypatch.setenv("JAXALIGN_NATIVE", "1")
    gpu_target.prepare()
    assert os.environ["JAX_SKIP_CUDA_CONSTRAINTS_CHECK"] == "1" and os.environ["JAXALIGN_NATIVE"] == "0"


def test_device_compiles_for_the_gpu_or_names_the_missing_plugin():
    if not gpu_target._plugin_installed():
        with pytest.raises(RuntimeError, match=r'pip install "jax\[cuda12\]==' + jax.__version__):
            gpu_target.device("h100")
        return
    try:
        dev = gpu_target.device("h100")  # with the plugin: a compile-only sm_90 device
    except RuntimeError as e:  # unless it could not start (no GPU and no prepare() before JAX's)
        assert os.environ.get("JAX_SKIP_CUDA_CONSTRAINTS_CHECK") != "1"
        assert "call gpu_target.prepare()" in str(e)
        return
    with gpu_target.compiling_for(dev):
        compiled = jax.jit(lambda x: jnp.tanh(x) @ x).lower(
            jax.ShapeDtypeStruct((256, 256), jnp.float32)).compile()
    (placed,) = compiled.input_shardings[0][0].device_set
    assert placed.device_kind == "NVIDIA H100 80GB HBM3"
    assert compiled.memory_analysis().output_size_in_bytes == 256 * 256 * 4


def test_memory_on_paper_gpu_target_needs_quick(capsys):
    with pytest.raises(SystemExit):
        memory_on_paper.main(["--gpu-target", "h100", "--results", ""])
    assert "add --quick" in capsys.readouterr().err
