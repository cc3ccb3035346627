"""Sharded training on 8 host CPU devices: the sharded DPO step equals the single-device step
to 1e-5, and per-device parameter bytes shrink with the fsdp size. Runs in a subprocess because
the device count must be fixed before JAX initialises."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

from jaxalign import sharding

SCRIPT = textwrap.dedent(r'''
    import json, os
    import jax, jax.numpy as jnp, numpy as np
    from jaxalign import data as jdata, models, sharding
    from jaxalign.losses import dpo_loss
    from jaxalign.train.objectives import ObjectiveSpec, make_objective
    from jaxalign.train.optim import make_optimizer
    from jaxalign.train.step import init_state, make_train_step

    assert jax.device_count() == 8, jax.devices()
    tok = jdata.build_char_tokenizer()
    cfg = models.LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128,
                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                             head_dim=16)
    model = models.build_model(cfg)
    params = models.init_params(model, jax.random.PRNGKey(0))
    ds = jdata.tokenize_dataset(jdata.make_preference_dataset(16, seed=0), tok, kind="preference")
    batch = jdata.make_collate_fn("preference", pad_id=tok.pad_token_id, pad_to_multiple_of=8)(ds.examples)
    obj = make_objective(model, ObjectiveSpec(kind="preference", loss_fn=dpo_loss,
                                              loss_kwargs=(("beta", 0.1),), reference="model"))
    opt = make_optimizer(name="sgd", learning_rate_fn=0.5)  # Adam would amplify fp reduction-order noise in near-zero grads

    def train(mesh):
        boxed = models.abstract_params(model)
        sh = sharding.param_shardings(boxed, mesh) if mesh is not None else None
        p = jax.tree.map(jnp.copy, params)
        p = jax.tree.map(jax.device_put, p, sh) if sh is not None else p
        ref = jax.tree.map(jnp.copy, p)
        state = init_state({"params": p}, opt, jax.random.PRNGKey(1))
        if mesh is not None:
            state = sharding.place_on_mesh(state, mesh)
        state_sh = jax.tree.map(lambda x: x.sharding, state) if mesh is not None else None
        step = make_train_step(obj, opt, state_shardings=state_sh)
        b = sharding.shard_batch(batch, mesh) if mesh is not None else batch
        losses = []
        pbytes = sharding.per_device_bytes(p) if mesh is not None else None
        for _ in range(3):
            state, m = step(state, {"ref_params": ref}, b)
            losses.append(float(m["loss"]))
        out = jax.tree.map(lambda x: np.asarray(jax.device_get(x)), state["trainable"]["params"])
        return losses, out, pbytes

    single_losses, single_params, _ = train(None)
    single_bytes = sum(x.nbytes for x in jax.tree.leaves(params))
    report = {"single": single_losses, "single_bytes": single_bytes, "meshes": {}}
    for d, f, t in [(8, 1, 1), (2, 4, 1), (1, 8, 1), (2, 2, 2)]:
        mesh = sharding.make_mesh(data=d, fsdp=f, tensor=t)
        losses, p, pbytes = train(mesh)
        diff = max(float(np.abs(a - b).max()) for a, b in
                   zip(jax.tree.leaves(p), jax.tree.leaves(single_params)))
        report["meshes"][f"{d}x{f}x{t}"] = {"losses": losses, "param_diff": diff, "bytes": pbytes}
    print("REPORT" + json.dumps(report))
''')


def test_sharded_step_equals_single_device_and_fsdp_shrinks_memory():
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
           "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env,
                         timeout=900)
    assert out.returncode == 0, out.stderr[-4000:]
    report = json.loads(out.stdout.split("REPORT", 1)[1])
    for name, r in report["meshes"].items():
        for a, b in zip(r["losses"], report["single"]):
            assert abs(a - b) < 1e-5, (name, r["losses"], report["single"])
        assert r["param_diff"] < 1e-5, (name, r["param_diff"])
    total = report["single_bytes"]
    assert report["meshes"]["8x1x1"]["bytes"] == total  # pure data parallel: replicated
    assert report["meshes"]["2x4x1"]["bytes"] < total / 2.5
    assert report["meshes"]["1x8x1"]["bytes"] < report["meshes"]["2x4x1"]["bytes"]


def test_make_mesh_validates_sizes():
    with pytest.raises(ValueError, match="devices"):
        sharding.make_mesh(data=3, fsdp=5)
    with pytest.raises(ValueError, match="at most one"):
        sharding.make_mesh(data=-1, fsdp=-1)


def test_logical_to_spec_replicates_indivisible_dims():
    import jax
    from jax.sharding import PartitionSpec as P

    mesh = sharding.make_mesh(data=1, fsdp=1, tensor=-1)
    spec = sharding.logical_to_spec(("embed", "mlp"), (7, 9), mesh)
    assert spec == P(None, None)
    assert jax.device_count() >= 1
