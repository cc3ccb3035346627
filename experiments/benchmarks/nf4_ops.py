"""NF4 kernels on CPU: jaxalign (jaxalign.quant) vs bitsandbytes, side by side.

  python experiments/benchmarks/nf4_ops.py               # 4096 x 4096 weight, 2048 tokens
  python experiments/benchmarks/nf4_ops.py --smoke --results ''

1. quantize a 4096 x 4096 fp32 weight to NF4 (block 64, double quantization):
   `jaxalign.quant.quantize_nf4` vs `bitsandbytes.functional.quantize_4bit(quant_type='nf4',
   compress_statistics=True)`; the bytes are compared (they should be identical).
2. dequantize it back to fp32: `dequantize_nf4` vs `bitsandbytes.functional.dequantize_4bit`.
3. an NF4-weight matmul at 2048 tokens inside one `jax.jit` (dequantize feeding the dot, as the
   QLoRA forward does) vs the dense fp32 matmul of the same shape; bitsandbytes' `matmul_4bit` and
   torch's dense matmul for reference.
Goals: jaxalign faster than bitsandbytes for (1) and (2); NF4 matmul <= 1.15 x the dense time.
Every pair is timed alternately in one process; medians.
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
    args = p.parse_args(argv)
    import bitsandbytes.functional as F
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch
    from bitsandbytes import matmul_4bit

    from jaxalign.quant import dequantize_nf4, quantize_nf4
    from jaxalign.quant.nf4_matmul import nf4_matmul

    n, tokens = (256, 64) if args.smoke else (4096, 2048)
    steps = args.steps or (3 if args.smoke else 10)
    m = C.machine()
    rng = np.random.default_rng(0)
    w_np = (rng.standard_normal((n, n)) * 0.02).astype(np.float32)  # [out, in] like torch Linear
    x_np = rng.standard_normal((tokens, n)).astype(np.float32)
    w_t, x_t = torch.from_numpy(w_np), torch.from_numpy(x_np)
    w_j = jnp.asarray(w_np)
    kernel_j = jnp.asarray(w_np.T)  # flax [in, out] kernel; quantized transposed = bnb's bytes
    x_j = jnp.asarray(x_np)

    def jq():
        return jax.block_until_ready(quantize_nf4(w_j, block_size=64, double_quant=True))

    def bq():
        return F.quantize_4bit(w_t, blocksize=64, quant_type="nf4", compress_statistics=True)

    q_j = jq()
    q_b, st_b = bq()
    same = {
        "codes": bool(np.array_equal(np.asarray(q_j.codes), q_b.numpy().reshape(-1))),
        "absmax (8-bit)": bool(np.array_equal(np.asarray(q_j.absmax), st_b.absmax.numpy())),
        "nested absmax": bool(np.array_equal(np.asarray(q_j.nested_absmax), st_b.state2.absmax.numpy())),
        "offset": bool(np.asarray(q_j.offset) == st_b.offset.numpy()),
    }

    def jdq():
        return jax.block_until_ready(dequantize_nf4(q_j, jnp.float32))

    def bdq():
        return F.dequantize_4bit(q_b, st_b)

    dq_diff = float(np.max(np.abs(np.asarray(jdq()) - bdq().numpy())))

    # The same dequantization written into a donated buffer: no fresh 64 MB output to fault in
    # page by page, so this is the kernel's own time (bitsandbytes' CPU dequantize has no `out=`).
    into = jax.jit(lambda q, buf: dequantize_nf4(q, jnp.float32), donate_argnums=1, keep_unused=True)
    held = {"buf": jnp.zeros((n, n), jnp.float32)}

    def jdq_into():
        held["buf"] = jax.block_until_ready(into(q_j, held["buf"]))
        return held["buf"]

    q_kernel = quantize_nf4(kernel_j, block_size=64, double_quant=True, transposed=True)
    dense = jax.jit(lambda x, k: x @ k)
    nf4_mm = jax.jit(nf4_matmul)  # what the models run: x @ dequantize_nf4(q), one jit
    dense(x_j, kernel_j).block_until_ready()
    mm_diff = float(jnp.max(jnp.abs(nf4_mm(x_j, q_kernel) - x_j @ dequantize_nf4(q_kernel, jnp.float32))))

    t_quant = C.alternate({"jaxalign": jq, "bitsandbytes": bq}, steps=steps, warmup=1)
    t_deq = C.alternate({"jaxalign": jdq, "bitsandbytes": bdq, "jaxalign into": jdq_into},
                        steps=steps, warmup=1)
    t_mm = C.alternate({
        "jaxalign dense x @ W": lambda: dense(x_j, kernel_j).block_until_ready(),
        "jaxalign nf4_matmul(x, Q) (dequantize in the same jit)": lambda: nf4_mm(x_j, q_kernel).block_until_ready(),
        "torch dense x @ W.T": lambda: x_t @ w_t.T,
        "bitsandbytes matmul_4bit": lambda: matmul_4bit(x_t, q_b.t(), quant_state=st_b),
    }, steps=steps, warmup=1)
    m["uptime_end"] = C.load_average()

    med = lambda d: {k: C.median(v) for k, v in d.items()}
    mq, mdq, mmm = med(t_quant), med(t_deq), med(t_mm)
    dense_j = mmm["jaxalign dense x @ W"]
    flops = 2.0 * tokens * n * n
    numbers = {
        "quantize_s": mq, "dequantize_s": mdq, "matmul_s": mmm,
        "quantize_speedup_vs_bnb": mq["bitsandbytes"] / mq["jaxalign"],
        "dequantize_speedup_vs_bnb": mdq["bitsandbytes"] / mdq["jaxalign"],
        "nf4_matmul_over_dense": mmm["jaxalign nf4_matmul(x, Q) (dequantize in the same jit)"] / dense_j,
        "bytes_equal": same, "dequantize_max_abs_diff": dq_diff, "matmul_max_abs_diff": mm_diff,
    }
    rows = [["quantize (block 64, double quant)", mq["jaxalign"] * 1e3, mq["bitsandbytes"] * 1e3,
             numbers["quantize_speedup_vs_bnb"]],
            ["dequantize to fp32", mdq["jaxalign"] * 1e3, mdq["bitsandbytes"] * 1e3,
             numbers["dequantize_speedup_vs_bnb"]],
            ["dequantize into a donated fp32 buffer (jaxalign only: no fresh output pages)",
             mdq["jaxalign into"] * 1e3, None, None]]
    mm_rows = [[k, v * 1e3, flops / v / 1e9, v / dense_j] for k, v in mmm.items()]
    parts = [
        f"Weight {n} x {n} fp32 (N(0, 0.02)), x {tokens} x {n} fp32; {steps} timed calls each after one "
        "warm-up, pairs interleaved in one process; median.",
        C.table(["op", "jaxalign ms", "bitsandbytes ms", "bnb time / jaxalign time"], rows),
        "A fresh 4096 x 4096 fp32 output is 64 MB of new pages that both libraries fault in one by "
        "one on first write; the donated-buffer row is jaxalign's dequantization kernel without that "
        "cost (bitsandbytes' CPU dequantize_4bit has no working `out=`: NotImplementedError).",
        "Bytes identical to bitsandbytes: " + ", ".join(f"{k}: {'yes' if v else 'NO'}" for k, v in same.items())
        + f"; max |dequantize difference| = {dq_diff:.3g}.",
        C.table(["matmul", "median ms", "GFLOP/s", "time / jaxalign dense"], mm_rows),
        f"NF4 matmul / dense (jaxalign, same jit): {numbers['nf4_matmul_over_dense']:.3f} (goal <= 1.15). "
        f"Max |NF4 jit matmul - eager reference| = {mm_diff:.3g}.",
        f"Load at end: `{m['uptime_end']}`.",
    ]
    return C.finish(args, "nf4_ops", "NF4 quantize / dequantize / matmul: jaxalign vs bitsandbytes",
                    argv, m, parts, numbers)


if __name__ == "__main__":
    main()
