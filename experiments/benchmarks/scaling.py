"""Sharded DPO training step on 1, 2, 4, 8 emulated host devices: loss equality and throughput.

  python experiments/benchmarks/scaling.py
  python experiments/benchmarks/scaling.py --smoke --results ''

For each device count N a fresh process starts with XLA_FLAGS=--xla_force_host_platform_device_count=N
and builds the jaxalign full-fine-tune DPO step (reference model) on
* a 'data' mesh (make_mesh(data=N): params replicated, batch split), and
* an 'fsdp' mesh (make_mesh(data=1, fsdp=N): params, grads and optimizer state sharded by logical
  axis through param_shardings(abstract_params(model), mesh), batch split),
and, in the same process, the unsharded step on one device. All three start from the same params,
see the same batches and run the same number of steps; the table reports the largest difference of
the per-step losses from the single-device run, and the median step time.

The emulated devices share this machine's cores, so throughput cannot grow with N here: the numbers
show the overhead of partitioning and collectives on one host, not multi-chip scaling.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from experiments.benchmarks import common as C  # noqa: E402

SCALING = C.Shapes(pairs=8, prompt=32, completion=32)  # global batch 8 pairs: divisible by 8 devices
SCALING_SMOKE = dataclasses.replace(C.SMOKE, pairs=2)
WARMUP = 2


def worker(argv):
    import argparse

    import jax
    import jax.numpy as jnp
    from jaxalign import sharding as jshard
    from jaxalign.losses import dpo_loss
    from jaxalign.models import LlamaConfig, abstract_params, build_model, init_params
    from jaxalign.train.objectives import ObjectiveSpec, make_objective
    from jaxalign.train.optim import make_optimizer, make_schedule
    from jaxalign.train.step import init_state, make_train_step

    from experiments.benchmarks.dpo_step import jax_batch

    p = argparse.ArgumentParser()
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--steps", type=int, default=6)
    a = p.parse_args(argv)
    s = SCALING_SMOKE if a.smoke else SCALING
    n_dev = jax.device_count()
    cfg = LlamaConfig(vocab_size=s.vocab, hidden_size=s.hidden, intermediate_size=s.intermediate,
                      num_hidden_layers=s.layers, num_attention_heads=s.heads,
                      num_key_value_heads=s.heads, head_dim=s.hidden // s.heads)
    model = build_model(cfg, dtype=jnp.float32)
    params0 = jax.device_get(init_params(model, jax.random.PRNGKey(0)))
    boxed = abstract_params(model)
    objective = make_objective(model, ObjectiveSpec(kind="preference", loss_fn=dpo_loss,
                                                    loss_kwargs=(("beta", 0.1),), reference="model"))
    # lr large enough that the params move and the later losses depend on the earlier updates
    optimizer = make_optimizer(name="adamw", learning_rate_fn=make_schedule(
        learning_rate=1e-3, total_steps=1000, schedule="constant"), clip_norm=1.0)
    batches = [jax_batch(s, seed=j) for j in range(2)]

    def runner(mesh):
        """A step closure over its own state; each call runs one step and records the loss."""
        if mesh is None:
            dev = jax.devices()[0]
            place = lambda t: jax.device_put(t, dev)
            params, ref, put_batch, state_sh = place(params0), place(params0), place, None
        else:
            sh = jshard.param_shardings(boxed, mesh)
            params = jax.tree.map(jax.device_put, params0, sh)
            ref = jax.tree.map(jax.device_put, params0, sh)
            put_batch = lambda b: jshard.shard_batch(b, mesh)
        state = init_state({"params": params}, optimizer, jax.random.PRNGKey(1))
        if mesh is not None:
            # scalars (step, rng, Adam's count) come out of init_state on one device: replicate them
            state = jshard.place_on_mesh(state, mesh)
            state_sh = jax.tree.map(lambda x: x.sharding, state)
        step = make_train_step(objective, optimizer, state_shardings=state_sh)
        frozen = {"ref_params": ref}
        dev_batches = [put_batch(b) for b in batches]
        h = {"state": state, "losses": []}

        def one():
            i = len(h["losses"])
            h["state"], metrics = step(h["state"], frozen, dev_batches[i % len(dev_batches)])
            jax.block_until_ready((h["state"], metrics))
            h["losses"].append(float(metrics["loss"]))

        return one, h

    meshes = {"single": None, "data": jshard.make_mesh(data=n_dev, fsdp=1),
              "fsdp": jshard.make_mesh(data=1, fsdp=n_dev)}
    runners = {k: runner(m) for k, m in meshes.items()}
    # step 0 compiles, step 1 may recompile (committed inputs); then all three interleaved
    times = C.alternate({k: r[0] for k, r in runners.items()}, steps=a.steps, warmup=WARMUP)
    out = {"devices": n_dev, "tokens_per_step": s.tokens_per_step}
    for k, (_, h) in runners.items():
        st = h["state"]
        per_dev = jshard.per_device_bytes(st["trainable"]) + jshard.per_device_bytes(st["opt_state"])
        out[k] = (h["losses"], times[k], per_dev)
    C.emit(out)


def main(argv=None):
    if (wargv := C.worker_argv(argv)) is not None:  # a subprocess started by run_worker
        return worker(wargv)
    p = C.parser(__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=0)
    p.add_argument("--devices", default="", help="comma-separated device counts (default 1,2,4,8)")
    args = p.parse_args(argv)
    counts = [int(c) for c in args.devices.split(",")] if args.devices else ([2] if args.smoke else [1, 2, 4, 8])
    steps = args.steps or (2 if args.smoke else 8)
    s = SCALING_SMOKE if args.smoke else SCALING
    m = C.machine()
    here = str(Path(__file__).resolve())
    results = {}
    for n in counts:
        wargs = ["--steps", str(steps)] + (["--smoke"] if args.smoke else [])
        results[n] = C.run_worker(here, wargs, devices=n)
    m["uptime_end"] = C.load_average()
    rows, numbers = [], {"per_count": results}
    max_diff = 0.0
    for n, r in results.items():
        l1, t1, b1 = r["single"]
        for kind in ("data", "fsdp"):
            lk, tk, bk = r[kind]
            diff = max(abs(x - y) for x, y in zip(lk, l1))
            max_diff = max(max_diff, diff)
            rows.append([n, kind, diff, C.median(tk) * 1e3, r["tokens_per_step"] / C.median(tk),
                         C.median(t1) * 1e3, bk / 2 ** 20, b1 / 2 ** 20])
    numbers["max_loss_diff"] = max_diff
    parts = [
        f"Model: vocab {s.vocab}, hidden {s.hidden}, {s.layers} layers, {s.heads} heads, intermediate "
        f"{s.intermediate}, fp32; global batch {s.pairs} pairs x {s.seq_len} tokens; DPO with reference "
        f"model; AdamW lr 1e-3 (params move, so later losses depend on earlier updates); {steps + WARMUP} "
        f"steps, the first {WARMUP} (compile) untimed; single-device, data and fsdp steps interleaved "
        "round by round in one fresh process per device count.",
        C.table(["devices", "mesh", "max |loss - single-device loss| over steps", "median step ms",
                 "tokens/s", "single-device step ms (same process, interleaved)", "params+opt MiB per device",
                 "single-device MiB"], rows),
        "Emulated host devices share the same CPU cores, so tokens/s does not grow with the device count "
        "here; fsdp's per-device params+optimizer bytes fall ~1/N (dimensions not divisible by N, and "
        "1-D norm scales, stay replicated).",
        f"Load at end: `{m['uptime_end']}`.",
    ]
    return C.finish(args, "scaling", "Sharded step on emulated host devices", argv, m, parts, numbers)


if __name__ == "__main__":
    main()
