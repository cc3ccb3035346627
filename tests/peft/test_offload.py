"""Host-offloaded optimizer state: placement, step equivalence, fallback."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxalign import models
from jaxalign.peft import (
    LoraSpec, host_offload_available, init_lora, lora_apply_fn, memory_kinds, offload_shardings,
    offloaded_step, supported_memory_kinds,
)
from jaxalign.peft import offload as offload_mod
from tests.peft.conftest import make_batch

CFG = models.LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=8)


@pytest.fixture(scope="module")
def setup():
    model = models.build_model(CFG)
    params = jax.jit(lambda k: models.init_params(model, k))(jax.random.PRNGKey(0))
    spec = LoraSpec(rank=4, alpha=8, targets=r"(q_proj|v_proj)$")
    adapters = init_lora(params, spec, jax.random.PRNGKey(1))
    f = lora_apply_fn(model, spec)
    tokens, mask, _ = make_batch("none", b=2, t=6)
    opt = optax.adamw(1e-2)

    def update(adapters, state, tokens):
        def loss(a):
            logp = jax.nn.log_softmax(f(params, a, tokens[:, :-1]).astype(jnp.float32))
            return -jnp.take_along_axis(logp, tokens[:, 1:, None], -1).mean()

        value, grads = jax.value_and_grad(loss)(adapters)
        updates, state = opt.update(grads, state, adapters)
        return optax.apply_updates(adapters, updates), state, value

    return adapters, opt, update, tokens


def test_memory_kinds_of_this_backend():
    kinds = supported_memory_kinds()
    assert kinds == {m.kind for m in jax.devices()[0].addressable_memories()}
    assert "device" in kinds
    if jax.default_backend() == "cpu":  # jax >= 0.4.36 CPU exposes pinned and unpinned host memory
        assert {"pinned_host", "unpinned_host"} <= kinds
    assert host_offload_available() == ("pinned_host" in kinds)


def test_offload_shardings_for_state_and_abstract_shapes(setup):
    adapters, opt, _, _ = setup
    state = opt.init(adapters)
    for tree in (state, jax.eval_shape(opt.init, adapters)):
        sh = offload_shardings(tree)
        assert jax.tree.structure(jax.tree.map(lambda _: 0, sh)) == jax.tree.structure(
            jax.tree.map(lambda _: 0, tree))
        assert {s.memory_kind for s in jax.tree.leaves(sh)} == {"pinned_host"}
    placed = jax.device_put(state, offload_shardings(state))
    assert set(jax.tree.leaves(memory_kinds(placed))) == {"pinned_host"}
    jax.tree.map(np.testing.assert_array_equal, placed, state)
    with pytest.raises(ValueError, match="does not have the structure"):
        offload_shardings(state, shardings=jax.tree.leaves(offload_shardings(state))[:1])


def test_offloaded_step_equals_normal_step(setup):
    adapters, opt, update, tokens = setup
    host = offload_shardings(jax.eval_shape(opt.init, adapters))
    step = offloaded_step(update, host)
    normal = jax.jit(update)
    hlo = step.lower(adapters, jax.device_put(opt.init(adapters), host), tokens).as_text()
    assert hlo.count('mhlo.memory_kind = "pinned_host"') >= 2 * len(jax.tree.leaves(host))  # in and out
    a1, s1 = adapters, jax.device_put(opt.init(adapters), host)
    a2, s2 = adapters, opt.init(adapters)
    for _ in range(2):
        a1, s1, l1 = step(a1, s1, tokens)
        a2, s2, l2 = normal(a2, s2, tokens)
        assert set(jax.tree.leaves(memory_kinds(s1))) == {"pinned_host"}
        assert set(jax.tree.leaves(memory_kinds(a1))) == {"device"}
        np.testing.assert_allclose(l1, l2, rtol=1e-6)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7), a1, a2)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7), s1, s2)
    assert float(jnp.abs(a1["layers_0"]["attn"]["q_proj"]["lora_b"]).max()) > 0


def test_fallback_to_device_memory(setup, monkeypatch, capsys):
    adapters, opt, update, tokens = setup
    monkeypatch.setattr(offload_mod, "supported_memory_kinds", lambda device=None: {"device"})
    host = offload_shardings(opt.init(adapters))
    msg = capsys.readouterr().out
    assert "has no 'pinned_host' memory" in msg and "stays in device memory" in msg
    assert {s.memory_kind for s in jax.tree.leaves(host)} == {"device"}
    state = jax.device_put(opt.init(adapters), host)
    a, state, _ = offloaded_step(update, host)(adapters, state, tokens)
    assert set(jax.tree.leaves(memory_kinds(state))) == {"device"}
    a2, _, _ = jax.jit(update)(adapters, opt.init(adapters), tokens)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7), a, a2)
