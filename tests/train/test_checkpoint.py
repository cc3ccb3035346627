"""Tests for jaxalign.train.checkpoint: bitwise round trips, periodic saving, keep-N, dtype/sharding
targets, and resuming after a process is SIGKILLed in the middle of a save."""

from __future__ import annotations

import functools
import json
import os
import signal
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxalign.train.checkpoint import Checkpointer

TMP_SUFFIX = ".orbax-checkpoint-tmp"
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _bits(x) -> np.ndarray:
    """Raw bytes of an array, so equality is bitwise (bf16 included, NaN payloads included)."""
    a = np.ascontiguousarray(np.asarray(x))
    return a.view(np.uint8)


def _assert_trees_bitwise_equal(got, want):
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want)):
        where = jax.tree_util.keystr(path)
        assert g.dtype == w.dtype, where
        assert g.shape == w.shape, where
        np.testing.assert_array_equal(_bits(g), _bits(w), err_msg=where)


@functools.partial(jax.jit, static_argnums=0)  # one compile instead of dozens of eager ops
def _train_state(seed: int = 0):
    """A small state like the train loop's: mixed-dtype params, AdamW state after one update,
    PRNG key data and a step counter."""
    k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
    params = {
        "embed": jax.random.normal(k1, (7, 4), jnp.bfloat16),
        "layers_0": {
            "kernel": jax.random.normal(k2, (4, 4), jnp.float32),
            "bias": jnp.full((4,), -0.0, jnp.float32),  # negative zero must survive bitwise
        },
    }
    opt = optax.adamw(1e-3)
    opt_state = opt.init(params)
    grads = jax.tree.map(lambda p: jnp.ones_like(p) * 0.1, params)
    updates, opt_state = opt.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    return {
        "params": params,
        "opt_state": opt_state,
        "rng": jax.random.key_data(k3),
        "step": jnp.asarray(1, jnp.int32),
    }


def _meta(step: int):
    return {
        "data": {"epoch": 2, "index": 17 + step},
        "config": {"loss": {"name": "dpo", "beta": 0.1}, "lora": None, "targets": ["q", "v"]},
        "metrics": [{"step": step, "loss": 0.693, "kl": float("nan")}],
    }


def test_roundtrip_bitwise_bf16_and_adamw_state(tmp_path):
    state = _train_state()
    assert any(leaf.dtype == jnp.bfloat16 for leaf in jax.tree.leaves(state))
    # The AdamW moments are non-trivial after one update.
    assert float(jnp.abs(state["opt_state"][0].nu["layers_0"]["kernel"]).sum()) > 0
    with Checkpointer(tmp_path / "ckpt", save_every=10, keep=3) as ckpt:
        assert ckpt.save(10, state_tree=state, meta=_meta(10))
        ckpt.wait()
        assert ckpt.latest_step() == 10

        abstract = jax.eval_shape(_train_state, 0)
        restored, meta = ckpt.restore(target=abstract)
        _assert_trees_bitwise_equal(restored, state)
        # optax's namedtuple state types come back (the structure comes from the target).
        assert type(restored["opt_state"][0]) is type(state["opt_state"][0])
        assert meta["data"] == {"epoch": 2, "index": 27}
        assert meta["config"] == _meta(10)["config"]
        assert np.isnan(meta["metrics"][0]["kl"])

        # A concrete target works too; the restored key data rebuilds the same key stream.
        restored2, _ = ckpt.restore(10, target=state)
        _assert_trees_bitwise_equal(restored2, state)
        key = jax.random.wrap_key_data(restored2["rng"])
        np.testing.assert_array_equal(
            jax.random.uniform(key, (3,)),
            jax.random.uniform(jax.random.wrap_key_data(state["rng"]), (3,)),
        )
        for leaf, want in zip(jax.tree.leaves(restored2), jax.tree.leaves(state)):
            assert leaf.sharding == want.sharding


def test_restore_from_new_process_object(tmp_path):
    state = _train_state(1)
    with Checkpointer(tmp_path, save_every=1, keep=1, async_save=False) as ckpt:
        ckpt.save(5, state_tree=state, meta={"data": {"epoch": 0, "index": 5}})
    # A fresh Checkpointer (as after a restart) finds and restores it.
    with Checkpointer(tmp_path, save_every=1, keep=1) as ckpt:
        assert ckpt.latest_step() == 5
        restored, meta = ckpt.restore(target=jax.eval_shape(lambda: state))
    _assert_trees_bitwise_equal(restored, state)
    assert meta == {"data": {"epoch": 0, "index": 5}}


def test_periodic_saving_and_keep_n(tmp_path):
    tree = {"w": jnp.zeros((2,), jnp.float32)}
    saved = []
    with Checkpointer(tmp_path, save_every=3, keep=2) as ckpt:
        for step in range(1, 11):
            if ckpt.save(step, state_tree={"w": tree["w"] + step}, meta={"step": step}):
                saved.append(step)
        assert saved == [3, 6, 9]  # the first step seen (1) is not saved: only multiples of 3
        ckpt.wait()
        assert ckpt.all_steps() == [6, 9]
        # force saves an off-interval step (end of training); keep=2 drops step 6.
        assert ckpt.save(10, state_tree={"w": tree["w"] + 10}, meta={"step": 10}, force=True)
        # An existing step is never overwritten.
        assert not ckpt.save(9, state_tree={"w": tree["w"] - 1}, meta={"step": -1}, force=True)
        ckpt.wait()
        assert ckpt.all_steps() == [9, 10]
        assert ckpt.latest_step() == 10
        for step in (9, 10):
            restored, meta = ckpt.restore(step, target=tree)
            np.testing.assert_array_equal(restored["w"], np.full((2,), step, np.float32))
            assert meta == {"step": step}
    assert sorted(os.listdir(tmp_path)) == ["10", "9"]


def test_async_save_survives_deleting_the_saved_buffers(tmp_path):
    # The train step donates its state; the checkpoint must not read device buffers after save().
    big = jnp.arange(300_000, dtype=jnp.float32)
    want = np.asarray(big)
    with Checkpointer(tmp_path, save_every=1, keep=1, async_save=True) as ckpt:
        ckpt.save(1, state_tree={"x": big}, meta={})
        big.delete()
        ckpt.wait()
        restored, _ = ckpt.restore(1, target={"x": jax.ShapeDtypeStruct((300_000,), jnp.float32)})
    np.testing.assert_array_equal(restored["x"], want)


def test_restore_casts_to_target_dtype(tmp_path):
    x = jnp.linspace(-3.0, 3.0, 11, dtype=jnp.float32)
    with Checkpointer(tmp_path, save_every=1, keep=1) as ckpt:
        ckpt.save(0, state_tree={"x": x}, meta={})
        ckpt.wait()
        restored, _ = ckpt.restore(0, target={"x": jax.ShapeDtypeStruct((11,), jnp.bfloat16)})
    assert restored["x"].dtype == jnp.bfloat16
    np.testing.assert_array_equal(_bits(restored["x"]), _bits(x.astype(jnp.bfloat16)))


def test_unfinalised_step_directories_are_ignored(tmp_path):
    with Checkpointer(tmp_path, save_every=1, keep=5) as ckpt:
        ckpt.save(3, state_tree={"w": jnp.ones((2,))}, meta={"step": 3})
    # What an interrupted save leaves behind: a temporary directory never renamed to its step.
    for name in (f"7{TMP_SUFFIX}-1700000000", f"8{TMP_SUFFIX}"):
        partial = tmp_path / name / "state"
        partial.mkdir(parents=True)
        (partial / "manifest.ocdbt").write_bytes(b"\x00garbage")
    with Checkpointer(tmp_path, save_every=1, keep=5) as ckpt:
        assert ckpt.latest_step() == 3
        assert ckpt.all_steps() == [3]
        restored, meta = ckpt.restore(target={"w": jnp.zeros((2,))})
        np.testing.assert_array_equal(restored["w"], np.ones((2,)))
        assert meta == {"step": 3}
        with pytest.raises(ValueError, match=r"`step` 7 has no complete checkpoint.*\[3\]"):
            ckpt.restore(7, target={"w": jnp.zeros((2,))})
    # Opening the directory cleaned the leftovers.
    assert sorted(os.listdir(tmp_path)) == ["3"]


_CRASH_CHILD = textwrap.dedent(
    """
    import os, signal, sys
    import jax.numpy as jnp
    from jaxalign.train.checkpoint import Checkpointer

    directory = sys.argv[1]
    ckpt = Checkpointer(directory, save_every=1, keep=5, async_save=True)
    ckpt.save(1, state_tree={"w": jnp.full((64, 64), 1.0)}, meta={"data": {"index": 1}})
    ckpt.wait()

    # Die by SIGKILL at the commit point of the next save: every file of step 2 is written to the
    # temporary directory, but the rename that publishes it never happens.
    real_rename = os.rename
    def rename(src, dst, *args, **kwargs):
        if ".orbax-checkpoint-tmp" in os.fspath(src):
            sys.stdout.write("committing\\n"); sys.stdout.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        return real_rename(src, dst, *args, **kwargs)
    os.rename = rename

    ckpt.save(2, state_tree={"w": jnp.full((64, 64), 2.0)}, meta={"data": {"index": 2}})
    ckpt.wait()
    print("finished without being killed")
    """
)


def test_resume_after_sigkill_mid_save(tmp_path):
    directory = tmp_path / "ckpt"
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO_ROOT)
    proc = subprocess.run(
        [sys.executable, "-c", _CRASH_CHILD, str(directory)],
        capture_output=True, text=True, timeout=120, env=env,
    )
    assert proc.returncode == -signal.SIGKILL, (proc.returncode, proc.stdout, proc.stderr[-2000:])
    assert "committing" in proc.stdout
    leftovers = [n for n in os.listdir(directory) if n.startswith("2" + TMP_SUFFIX)]
    assert leftovers, os.listdir(directory)  # the crash really happened mid-save of step 2
    assert "2" not in os.listdir(directory)

    target = {"w": jax.ShapeDtypeStruct((64, 64), jnp.float32)}
    with Checkpointer(directory, save_every=1, keep=5) as ckpt:
        assert ckpt.latest_step() == 1
        restored, meta = ckpt.restore(target=target)
        np.testing.assert_array_equal(restored["w"], np.ones((64, 64), np.float32))
        assert meta == {"data": {"index": 1}}
        # The resumed run can save step 2 again despite the leftover of the killed attempt.
        assert ckpt.save(2, state_tree={"w": jnp.full((64, 64), 3.0)}, meta={"data": {"index": 2}})
        ckpt.wait()
        assert ckpt.all_steps() == [1, 2]
        restored, _ = ckpt.restore(target=target)
        np.testing.assert_array_equal(restored["w"], np.full((64, 64), 3.0, np.float32))
    assert sorted(os.listdir(directory)) == ["1", "2"]


_SHARDING_CHILD = textwrap.dedent(
    """
    import os, sys, json
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from jaxalign.train.checkpoint import Checkpointer

    mesh = Mesh(np.array(jax.devices()), ("x",))
    rows = NamedSharding(mesh, P("x", None))
    cols = NamedSharding(mesh, P(None, "x"))
    repl = NamedSharding(mesh, P())
    w = jax.device_put(jnp.arange(32, dtype=jnp.float32).reshape(4, 8), rows)
    with Checkpointer(sys.argv[1], save_every=1, keep=1) as ckpt:
        ckpt.save(0, state_tree={"w": w, "b": w[0]}, meta={})
        ckpt.wait()
        target = {"w": jax.ShapeDtypeStruct((4, 8), jnp.float32, sharding=cols),
                  "b": jax.ShapeDtypeStruct((8,), jnp.bfloat16, sharding=repl)}
        out, _ = ckpt.restore(target=target)
    print(json.dumps({
        "devices": len(jax.devices()),
        "w_sharding_ok": out["w"].sharding == cols,
        "b_sharding_ok": out["b"].sharding == repl,
        "b_dtype": str(out["b"].dtype),
        "w_equal": bool(np.array_equal(np.asarray(out["w"]), np.asarray(w))),
        "b_equal": bool(np.array_equal(np.asarray(out["b"], np.float32), np.arange(8.0))),
    }))
    """
)


def test_restore_into_target_shardings(tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO_ROOT)
    proc = subprocess.run(
        [sys.executable, "-c", _SHARDING_CHILD, str(tmp_path)],
        capture_output=True, text=True, timeout=120, env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result == {
        "devices": 2, "w_sharding_ok": True, "b_sharding_ok": True, "b_dtype": "bfloat16",
        "w_equal": True, "b_equal": True,
    }


def test_typed_prng_keys_are_rejected(tmp_path):
    with Checkpointer(tmp_path, save_every=1, keep=1) as ckpt:
        with pytest.raises(ValueError, match=r"\['opt'\]\['key'\].*key_data"):
            ckpt.save(0, state_tree={"opt": {"key": jax.random.key(0)}}, meta={})
        assert ckpt.latest_step() is None


def test_bad_arguments_raise_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="save_every"):
        Checkpointer(tmp_path, save_every=0, keep=1)
    with pytest.raises(ValueError, match="keep"):
        Checkpointer(tmp_path, save_every=1, keep=0)
    with Checkpointer(tmp_path, save_every=1, keep=2) as ckpt:
        with pytest.raises(ValueError, match="no complete checkpoint"):
            ckpt.restore(target={"w": jnp.zeros(2)})
        with pytest.raises(ValueError, match="`meta` must be JSON serialisable"):
            ckpt.save(0, state_tree={"w": jnp.zeros(2)}, meta={"f": object()})
        with pytest.raises(ValueError, match="`meta` must be a dict"):
            ckpt.save(0, state_tree={"w": jnp.zeros(2)}, meta=[1, 2])
        with pytest.raises(ValueError, match="`step`"):
            ckpt.save(-1, state_tree={"w": jnp.zeros(2)}, meta={})
        # numpy / jax scalars inside meta are converted.
        ckpt.save(0, state_tree={"w": jnp.zeros(2)},
                  meta={"loss": jnp.float32(0.5), "n": np.int64(3), "v": np.arange(2)})
        ckpt.wait()
        with pytest.raises(ValueError, match=r"cannot restore step 0 .*shape"):
            ckpt.restore(0, target={"w": jnp.zeros(3)})
        _, meta = ckpt.restore(0, target={"w": jnp.zeros(2)})
        assert meta == {"loss": 0.5, "n": 3, "v": [0, 1]}
