import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from jaxalign.analysis import averaging as avg
from jaxalign.peft import LoraSpec, merge_lora


def _params(seed, dtype=jnp.float32):
    k = jax.random.split(jax.random.PRNGKey(seed), 5)
    return {
        "embed_tokens": {"embedding": jax.random.normal(k[0], (5, 4), dtype)},
        "layers_0": {"attn": {"q_proj": {"kernel": jax.random.normal(k[1], (4, 4), dtype)}},
                     "input_layernorm": {"scale": jax.random.normal(k[2], (4,), dtype)}},
        "layers_1": {"attn": {"q_proj": {"kernel": jax.random.normal(k[3], (4, 4), dtype)}}},
        "norm": {"scale": jax.random.normal(k[4], (4,), dtype)},
    }


def test_layer_index():
    assert avg.layer_index("layers_12/attn/q_proj/kernel") == 12
    assert avg.layer_index("params/layers_0/mlp") == 0
    assert avg.layer_index("embed_tokens/embedding") is None
    assert avg.layer_index("my_layers_3/x") is None


def test_layer_ratios_hand_values():
    np.testing.assert_allclose(avg.layer_ratios(5, low=0.0, high=1.0), [0, 0.25, 0.5, 0.75, 1])
    np.testing.assert_allclose(avg.layer_ratios(4, low=0.2, high=0.8, kind="step"), [0.2, 0.2, 0.8, 0.8])
    np.testing.assert_allclose(avg.layer_ratios(3, low=0.0, high=0.6, kind="constant"), [0.6] * 3)
    np.testing.assert_allclose(avg.layer_ratios(1, low=0.3, high=0.9), [0.3])
    with pytest.raises(ValueError, match="high"):
        avg.layer_ratios(3, low=0.0, high=1.5)
    with pytest.raises(ValueError, match="kind"):
        avg.layer_ratios(3, low=0.0, high=1.0, kind="cosine")


def test_ratio_tree_assigns_layers_embeddings_and_head():
    t = avg.ratio_tree(_params(0), [0.1, 0.9])
    assert t["layers_0"]["attn"]["q_proj"]["kernel"] == 0.1
    assert t["layers_0"]["input_layernorm"]["scale"] == 0.1
    assert t["layers_1"]["attn"]["q_proj"]["kernel"] == 0.9
    assert t["embed_tokens"]["embedding"] == 0.1  # embeddings follow the lowest layer
    assert t["norm"]["scale"] == 0.9  # final norm / head follow the top layer
    t = avg.ratio_tree(_params(0), [0.1, 0.9], embed_ratio=0.0, head_ratio=0.5)
    assert t["embed_tokens"]["embedding"] == 0.0 and t["norm"]["scale"] == 0.5
    with pytest.raises(ValueError, match="3 ratios for a model with 2 layers"):
        avg.ratio_tree(_params(0), [0.1, 0.5, 0.9])


def test_interpolate_endpoints_and_midpoint():
    a, b = _params(0), _params(1)
    for r, want in ((0.0, a), (1.0, b)):
        out = avg.interpolate(a, b, r)
        jax.tree.map(lambda x, y: np.testing.assert_array_equal(x, y), out, want)
        out = avg.interpolate(a, b, avg.ratio_tree(a, [r, r]))
        jax.tree.map(lambda x, y: np.testing.assert_array_equal(x, y), out, want)
    mid = avg.interpolate(a, b, avg.ratio_tree(a, [0.0, 1.0], embed_ratio=0.5, head_ratio=0.25))
    np.testing.assert_array_equal(mid["layers_0"]["attn"]["q_proj"]["kernel"],
                                  a["layers_0"]["attn"]["q_proj"]["kernel"])
    np.testing.assert_array_equal(mid["layers_1"]["attn"]["q_proj"]["kernel"],
                                  b["layers_1"]["attn"]["q_proj"]["kernel"])
    np.testing.assert_allclose(mid["embed_tokens"]["embedding"],
                               0.5 * (a["embed_tokens"]["embedding"] + b["embed_tokens"]["embedding"]),
                               rtol=1e-6)
    np.testing.assert_allclose(mid["norm"]["scale"], 0.75 * a["norm"]["scale"] + 0.25 * b["norm"]["scale"],
                               rtol=1e-6, atol=1e-7)


def test_interpolate_keeps_dtype_and_checks_structure():
    a, b = _params(0, jnp.bfloat16), _params(1, jnp.bfloat16)
    out = avg.interpolate(a, b, 0.5)
    assert out["layers_0"]["attn"]["q_proj"]["kernel"].dtype == jnp.bfloat16
    with pytest.raises(ValueError, match="structure"):
        avg.interpolate(a, {"norm": b["norm"]}, 0.5)


@settings(max_examples=10, deadline=None)
@given(r0=st.floats(0, 1), r1=st.floats(0, 1))
def test_scale_adapters_is_exact_interpolation_of_merged_weights(r0, r1):
    base = _params(0)
    k = jax.random.split(jax.random.PRNGKey(5), 4)
    adapters = {f"layers_{i}": {"attn": {"q_proj": {
        "lora_a": jax.random.normal(k[2 * i], (4, 2)), "lora_b": jax.random.normal(k[2 * i + 1], (2, 4))}}}
        for i in range(2)}
    spec = LoraSpec(rank=2, alpha=4.0, targets="q_proj$")
    merged_full = merge_lora(base, adapters, spec)
    got = merge_lora(base, avg.scale_adapters(adapters, [r0, r1]), spec)
    want = avg.interpolate(base, merged_full, avg.ratio_tree(base, [r0, r1]))
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-5), got, want)


def test_pareto_front_hand_case():
    pts = [[0.1, 0.9], [0.5, 0.5], [0.4, 0.4], [0.9, 0.1], [0.5, 0.5], [0.2, 0.95]]
    # (0.4, 0.4) is dominated by (0.5, 0.5); (0.1, 0.9) by (0.2, 0.95); duplicates both stay.
    np.testing.assert_array_equal(avg.pareto_front(pts), [5, 1, 4, 3])
    np.testing.assert_array_equal(avg.pareto_front([[1.0, 1.0]]), [0])
    with pytest.raises(ValueError, match=r"\[N, 2\]"):
        avg.pareto_front([1.0, 2.0])


def test_sweep_and_plot(tmp_path):
    a, b = _params(0), _params(1)
    seen = []

    def evaluate(p):  # capability = closeness to a, alignment = closeness to b
        da = sum(float(jnp.sum((x - y) ** 2)) for x, y in zip(jax.tree.leaves(p), jax.tree.leaves(a)))
        db = sum(float(jnp.sum((x - y) ** 2)) for x, y in zip(jax.tree.leaves(p), jax.tree.leaves(b)))
        seen.append(p)
        return {"capability": -da, "alignment": -db}

    schedules = {"sft": [0.0, 0.0], "aligned": [1.0, 1.0], "half": [0.5, 0.5], "lin": [0.0, 1.0]}
    res = avg.sweep(a, b, schedules, evaluate)
    assert res["sft"]["capability"] == 0.0 and res["aligned"]["alignment"] == 0.0
    path = avg.plot_pareto(res, tmp_path / "pareto.png", x="capability", y="alignment")
    assert (tmp_path / "pareto.png").stat().st_size > 1000 and path.endswith("pareto.png")
