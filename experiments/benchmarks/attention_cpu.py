"""Attention on the CPU: jaxalign's native kernel vs XLA's attention, side by side.

  python experiments/benchmarks/attention_cpu.py
  python experiments/benchmarks/attention_cpu.py --smoke --results ''

One layer's attention at the DPO benchmark's shapes (4 heads of 64, fp32): the prefix-shared batch
(8 rows [prompt 64 | chosen 64 | rejected 64], segment mask) and the unshared one (16 causal rows
of 128). Contestants, all jitted, on the same q/k/v/mask:
- `XLA, full`: `dot_product_attention` with the kernel switched off (the whole T x T matrix);
- `XLA, causal blocks`: `causal_attention` with the kernel off (key blocks above the diagonal
  skipped);
- `native kernel`: `jaxalign.models.attention_cpu.attention` (what jaxalign runs here);
- `native kernel + rope`: the same with rope applied inside (Llama's training path), against
  `XLA, causal blocks + rope` (apply_rope, then causal_attention).
Each is timed forward only and forward + backward (gradients of q, k, v), alternately in one
process; medians. Useful FLOPs: 4 H d per visible (query, key) pair forward, x3 with backward.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from experiments.benchmarks import common as C  # noqa: E402


def main(argv=None):
    p = C.parser(__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=0)
    C.add_host_memory_flag(p)
    args = p.parse_args(argv)
    malloc_line = C.host_memory_setting(args)
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jaxalign.models import attention_cpu
    from jaxalign.models.layers import (
        apply_rope, causal_attention, dot_product_attention, prepare_inputs, rope_tables,
    )

    if not attention_cpu.available():
        raise SystemExit("the native attention kernel is unavailable here (see the warning)")
    steps = args.steps or (3 if args.smoke else 30)
    heads, d = (2, 16) if args.smoke else (4, 64)
    prompt, completion, pairs = (8, 8, 2) if args.smoke else (64, 64, 8)
    m = C.machine()
    layouts = {}
    t = prompt + 2 * completion
    seg = np.zeros((pairs, t), np.int32)
    seg[:, prompt:prompt + completion], seg[:, prompt + completion:] = 1, 2
    layouts[f"prefix-shared: {pairs} rows of {t}"] = (pairs, t, jnp.asarray(seg))
    layouts[f"unshared: {2 * pairs} rows of {prompt + completion}"] = (2 * pairs, prompt + completion, None)

    real_usable = attention_cpu.usable
    rows, numbers = [], {"median_ms": {}, "useful_gflop": {}, "max_abs_diff": {}}
    for name, (b, t, segment_ids) in layouts.items():
        _, _, positions, mask = prepare_inputs(jnp.zeros((b, t), jnp.int32), None, None, None,
                                               segment_ids=segment_ids)
        pairs_seen = int(np.asarray(mask).sum())
        useful = 4.0 * heads * d * pairs_seen
        keys = jax.random.split(jax.random.PRNGKey(0), 4)
        q, k, v, do = (jax.random.normal(kk, (b, t, heads, d)) for kk in keys)
        rope = rope_tables(positions, 1.0 / (10000.0 ** (np.arange(0, d, 2) / d)), jnp.float32)
        scale = d ** -0.5

        def xla(fn, with_rope=False):
            def f(q, k, v):
                attention_cpu.usable = lambda *a: False  # traced once, with the kernel off
                try:
                    if with_rope:
                        q, k = apply_rope(q, rope), apply_rope(k, rope)
                    return fn(q, k, v, mask, scale=scale, dtype=jnp.float32)
                finally:
                    attention_cpu.usable = real_usable
            return f

        fns = {"XLA, full": xla(dot_product_attention), "XLA, causal blocks": xla(causal_attention),
               "native kernel": lambda q, k, v: attention_cpu.attention(q, k, v, mask, scale=scale),
               "XLA, causal blocks + rope": xla(causal_attention, with_rope=True),
               "native kernel + rope": lambda q, k, v: attention_cpu.attention(
                   q, k, v, mask, scale=scale, rope=rope)}
        timed, outs = {}, {}
        for label, f in fns.items():
            fwd = jax.jit(f)
            both = jax.jit(jax.value_and_grad(lambda q, k, v, f=f: jnp.sum(f(q, k, v) * do), argnums=(0, 1, 2)))
            outs[label] = (np.asarray(fwd(q, k, v)), [np.asarray(g) for g in both(q, k, v)[1]])
            timed[f"{label} | forward"] = lambda fwd=fwd: jax.block_until_ready(fwd(q, k, v))
            timed[f"{label} | forward + backward"] = lambda both=both: jax.block_until_ready(both(q, k, v))
        times = C.alternate(timed, steps=steps, warmup=1)
        for pair_label, ref_label in (("native kernel", "XLA, full"),
                                      ("native kernel + rope", "XLA, causal blocks + rope")):
            (o1, g1), (o2, g2) = outs[pair_label], outs[ref_label]
            diff = max(float(np.abs(o1 - o2).max()), *(float(np.abs(a - c).max()) for a, c in zip(g1, g2)))
            numbers["max_abs_diff"][f"{name}: {pair_label} vs {ref_label}"] = diff
        for label in fns:
            f_ms = C.median(times[f"{label} | forward"]) * 1e3
            b_ms = C.median(times[f"{label} | forward + backward"]) * 1e3
            base = C.median(times["XLA, full | forward + backward"]) * 1e3
            rows.append([name, label, f_ms, b_ms, base / b_ms, 3 * useful / b_ms / 1e6])
            numbers["median_ms"][f"{name} | {label}"] = {"forward": f_ms, "forward_backward": b_ms}
        numbers["useful_gflop"][name] = useful / 1e9
    m["uptime_end"] = C.load_average()
    parts = [
        f"{heads} heads of {d}, fp32, on the CPU ({C.cpu_model()}); {steps} timed calls of each after "
        "one warm-up, all contestants interleaved in one process; medians. Useful GFLOP/s: 4 H d "
        "per visible (query, key) pair forward, x3 forward + backward, over the forward + backward "
        "time.",
        C.table(["batch", "contestant", "forward ms", "forward + backward ms",
                 "speedup vs XLA, full (fwd + bwd)", "useful GFLOP/s (fwd + bwd)"], rows),
        "Max |difference| of outputs and q/k/v gradients: "
        + "; ".join(f"{k}: {v:.2g}" for k, v in numbers["max_abs_diff"].items()) + ".",
        malloc_line,
        f"Load at end: `{m['uptime_end']}`.",
    ]
    return C.finish(args, "attention_cpu", "Attention on the CPU: native kernel vs XLA", argv, m,
                    parts, numbers)


if __name__ == "__main__":
    main()
