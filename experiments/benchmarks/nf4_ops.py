"""NF4 kernels: jaxalign (jaxalign.quant) vs bitsandbytes, side by side (CPU, or a GPU).

  python experiments/benchmarks/nf4_ops.py               # 4096 x 4096 weight, 2048 tokens
  python experiments/benchmarks/nf4_ops.py --smoke --results ''
  python experiments/benchmarks/nf4_ops.py --bf16        # bf16 weight / activations (e.g. on a GPU)

On a GPU (JAX's default backend) both libraries run there (torch tensors on CUDA, each torch call
followed by `torch.cuda.synchronize()`), with 30 timed calls per op by default. `--bf16`: the
weight is quantized from bf16, dequantized to bf16, and x is bf16, so every matmul runs in bf16 on
both sides (bitsandbytes' quant state then carries bf16). GPU runs write the section `nf4_ops_gpu`.

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
    C.add_precision_flag(p)
    C.add_host_memory_flag(p)
    args = p.parse_args(argv)
    malloc_line = C.host_memory_setting(args)
    import bitsandbytes.functional as F
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch
    from bitsandbytes import matmul_4bit

    from jaxalign.quant import dequantize_nf4, quantize_nf4
    from jaxalign.quant.nf4_matmul import nf4_matmul

    from jaxalign.quant import nf4_cpu

    prec = C.precision(args)
    native = jax.default_backend() == "cpu" and nf4_cpu.available()
    n, tokens = (256, 64) if args.smoke else (4096, 2048)
    steps = args.steps or (3 if args.smoke else (30 if prec.gpu else 10))
    m = C.machine(device=True)
    jdt, tdt, dev = prec.jax_dtype(), prec.torch_dtype(), prec.torch_device()
    cuda = dev.type == "cuda"
    rng = np.random.default_rng(0)
    w_np = (rng.standard_normal((n, n)) * 0.02).astype(np.float32)  # [out, in] like torch Linear
    x_np = rng.standard_normal((tokens, n)).astype(np.float32)
    # the same values on both sides: rounded to the run's dtype once, by torch
    w_t = torch.from_numpy(w_np).to(tdt).to(dev)
    x_t = torch.from_numpy(x_np).to(tdt).to(dev)
    w_j = jnp.asarray(w_np).astype(jdt)
    kernel_j = jnp.asarray(w_np.T).astype(jdt)  # flax [in, out] kernel; quantized transposed = bnb's bytes
    x_j = jnp.asarray(x_np).astype(jdt)

    def host(t):  # a torch tensor as a numpy array on the host (bf16 via fp32)
        return t.detach().float().cpu().numpy() if t.dtype == torch.bfloat16 else t.detach().cpu().numpy()

    def tsync(fn):  # a torch call whose time is the device's
        if not cuda:
            return fn

        def run():
            out = fn()
            torch.cuda.synchronize()
            return out

        return run

    def jq():
        return jax.block_until_ready(quantize_nf4(w_j, block_size=64, double_quant=True))

    @tsync
    def bq():
        return F.quantize_4bit(w_t, blocksize=64, quant_type="nf4", compress_statistics=True)

    q_j = jq()
    q_b, st_b = bq()
    same = {
        "codes": bool(np.array_equal(np.asarray(q_j.codes), host(q_b).reshape(-1))),
        "absmax (8-bit)": bool(np.array_equal(np.asarray(q_j.absmax), host(st_b.absmax))),
        "nested absmax": bool(np.array_equal(np.asarray(q_j.nested_absmax), host(st_b.state2.absmax))),
        "offset": bool(np.asarray(q_j.offset) == host(st_b.offset)),
    }

    def jdq():
        return jax.block_until_ready(dequantize_nf4(q_j, jdt))

    @tsync
    def bdq():
        return F.dequantize_4bit(q_b, st_b)

    dq_diff = float(np.max(np.abs(np.asarray(jdq()).astype(np.float32) - host(bdq()))))

    # The same dequantization written into a donated buffer: no fresh 64 MB output to fault in
    # page by page, so this is the kernel's own time (bitsandbytes' CPU dequantize has no `out=`).
    into = jax.jit(lambda q, buf: dequantize_nf4(q, jdt), donate_argnums=1, keep_unused=True)
    held = {"buf": jnp.zeros((n, n), jdt)}

    def jdq_into():
        held["buf"] = jax.block_until_ready(into(q_j, held["buf"]))
        return held["buf"]

    # Every call above ends in a sync (block_until_ready, torch.cuda.synchronize), so on a GPU its
    # time includes each library's launch-to-return latency. Here each library enqueues `burst`
    # dequantizations and syncs once, as a training loop would; and jaxalign runs `burst` of them
    # (of `burst` distinct arguments, so XLA cannot merge them) in one jitted call: one dispatch,
    # so per call that is close to the device's own time.
    burst = 2 if args.smoke else 10

    def jdq_burst():
        return jax.block_until_ready([dequantize_nf4(q_j, jdt) for _ in range(burst)])

    @tsync
    def bdq_burst():
        return [F.dequantize_4bit(q_b, st_b) for _ in range(burst)]

    in_one = jax.jit(lambda qs: [dequantize_nf4(q, jdt) for q in qs])
    copies = [jax.tree.map(jnp.copy, q_j) for _ in range(burst)]

    def jdq_one_jit():
        return jax.block_until_ready(in_one(copies))

    q_kernel = quantize_nf4(kernel_j, block_size=64, double_quant=True, transposed=True)
    dense = jax.jit(lambda x, k: x @ k)
    nf4_mm = jax.jit(nf4_matmul)  # what the models run: x @ dequantize_nf4(q), one jit
    dense(x_j, kernel_j).block_until_ready()
    mm_diff = float(jnp.max(jnp.abs((nf4_mm(x_j, q_kernel) - x_j @ dequantize_nf4(q_kernel, jdt))
                                    .astype(jnp.float32))))

    # the (de)quantizations take milliseconds: 5x the calls of the matmuls, for stable medians
    t_quant = C.alternate({"jaxalign": jq, "bitsandbytes": bq}, steps=5 * steps, warmup=1)
    t_deq = C.alternate({"jaxalign": jdq, "bitsandbytes": bdq, "jaxalign into": jdq_into},
                        steps=5 * steps, warmup=1)
    # The same two, each turn `block` consecutive calls: a dequantization is memory-bound and its
    # 64 MB output is twice the L3 here, so call-by-call alternation partly measures what the
    # competitor's call left behind: bitsandbytes' ordinary stores leave dirty lines in the L3
    # whose write-back the next call pays (nf4_dequant_processes.py measures it).
    block = 2 if args.smoke else 10
    t_deq_blocks = C.alternate({"jaxalign": jdq, "bitsandbytes": bdq}, steps=steps // 2 or 1,
                               warmup=1, block=block)
    t_burst = C.alternate({"jaxalign": jdq_burst, "bitsandbytes": bdq_burst,
                           "jaxalign in one jit": jdq_one_jit}, steps=steps // 2 or 1, warmup=1)
    t_burst = {k: [t / burst for t in v] for k, v in t_burst.items()}
    t_mm = C.alternate({
        "jaxalign dense x @ W": lambda: dense(x_j, kernel_j).block_until_ready(),
        "jaxalign nf4_matmul(x, Q) (dequantize in the same jit)": lambda: nf4_mm(x_j, q_kernel).block_until_ready(),
        "torch dense x @ W.T": tsync(lambda: x_t @ w_t.T),
        "bitsandbytes matmul_4bit": tsync(lambda: matmul_4bit(x_t, q_b.t(), quant_state=st_b)),
    }, steps=steps, warmup=1)
    m["uptime_end"] = C.load_average()

    med = lambda d: {k: C.median(v) for k, v in d.items()}
    mq, mdq, mmm, mdqb, mb = med(t_quant), med(t_deq), med(t_mm), med(t_deq_blocks), med(t_burst)
    dense_j = mmm["jaxalign dense x @ W"]
    flops = 2.0 * tokens * n * n
    numbers = {
        "quantize_s": mq, "dequantize_s": mdq, "matmul_s": mmm,
        "quantize_speedup_vs_bnb": mq["bitsandbytes"] / mq["jaxalign"],
        "dequantize_speedup_vs_bnb": mdq["bitsandbytes"] / mdq["jaxalign"],
        "dequantize_blocks_s": mdqb, "dequantize_block": block,
        "dequantize_speedup_vs_bnb_blocks": mdqb["bitsandbytes"] / mdqb["jaxalign"],
        "dequantize_burst_s": mb, "dequantize_burst": burst,
        "dequantize_speedup_vs_bnb_burst": mb["bitsandbytes"] / mb["jaxalign"],
        "nf4_matmul_over_dense": mmm["jaxalign nf4_matmul(x, Q) (dequantize in the same jit)"] / dense_j,
        "bytes_equal": same, "dequantize_max_abs_diff": dq_diff, "matmul_max_abs_diff": mm_diff,
    }
    dn = prec.name
    rows = [["quantize (block 64, double quant)", mq["jaxalign"] * 1e3, mq["bitsandbytes"] * 1e3,
             numbers["quantize_speedup_vs_bnb"]],
            [f"dequantize to {dn}", mdq["jaxalign"] * 1e3, mdq["bitsandbytes"] * 1e3,
             numbers["dequantize_speedup_vs_bnb"]],
            [f"dequantize to {dn}, {block} consecutive calls per turn",
             mdqb["jaxalign"] * 1e3, mdqb["bitsandbytes"] * 1e3,
             numbers["dequantize_speedup_vs_bnb_blocks"]],
            [f"dequantize into a donated {dn} buffer (jaxalign only: no fresh output pages)",
             mdq["jaxalign into"] * 1e3, None, None],
            [f"dequantize to {dn}, {burst} calls enqueued then one sync (per call)",
             mb["jaxalign"] * 1e3, mb["bitsandbytes"] * 1e3, numbers["dequantize_speedup_vs_bnb_burst"]],
            [f"dequantize to {dn}, {burst} in one jitted call (jaxalign only; per call)",
             mb["jaxalign in one jit"] * 1e3, None, None]]
    spec = C.spec_bf16_peak(C.gpu_name()) if prec.gpu and prec.bf16 else None
    mm_rows = [[k, v * 1e3, flops / v / 1e9, v / dense_j] + ([100 * flops / v / spec] if spec else [])
               for k, v in mmm.items()]
    where = f"on the GPU ({C.gpu_name()}), torch tensors on CUDA" if prec.gpu else "on the CPU"
    parts = [
        f"Weight {n} x {n} {dn} (N(0, 0.02)), x {tokens} x {n} {dn}, {where}; {5 * steps} timed calls "
        f"of each (de)quantization and {steps} of each matmul after one warm-up, contestants "
        "interleaved call by call in one process; medians. The row with consecutive calls "
        f"interleaves turns of {block} calls each ({(steps // 2 or 1) * block} calls of each), so that "
        "most calls follow the same library's call rather than the competitor's. The enqueued rows "
        f"time {burst} calls with one sync at the end ({steps // 2 or 1} rounds, interleaved), per "
        f"call; the one-jit row dequantizes {burst} copies of the weight in one jitted call.",
        C.table(["op", "jaxalign ms", "bitsandbytes ms", "bnb time / jaxalign time"], rows),
        (f"Each dequantization returns a fresh {n} x {n} {dn} output "
         f"({n * n * (2 if prec.bf16 else 4) / 2 ** 20:.0f} MB). With glibc's defaults both libraries "
         "get it as new pages and fault them in one by one on first write; with jaxalign's host-memory "
         "setting the previous call's freed output is reused. The donated-buffer row is jaxalign's "
         "dequantization without a fresh output at all (bitsandbytes' CPU dequantize_4bit has no "
         "working `out=`: NotImplementedError). jaxalign's CPU dequantization: "
         + ("the native kernel (jaxalign/quant/nf4_cpu.cc, AVX-512 permutes, non-temporal stores)."
            if native else "XLA's fused loop (the native kernel is unavailable here).")
         if not prec.gpu else "The donated-buffer row writes the dequantized weight into a donated "
         "buffer instead of a fresh one."),
        "Bytes identical to bitsandbytes: " + ", ".join(f"{k}: {'yes' if v else 'NO'}" for k, v in same.items())
        + f"; max |dequantize difference| = {dq_diff:.3g}.",
        C.table(["matmul", "median ms", "GFLOP/s", "time / jaxalign dense"]
                + ([f"% of datasheet bf16 peak ({spec / 1e12:.0f} TFLOP/s)"] if spec else []), mm_rows),
        f"NF4 matmul / dense (jaxalign, same jit): {numbers['nf4_matmul_over_dense']:.3f} (goal <= 1.15). "
        f"Max |NF4 jit matmul - eager reference| = {mm_diff:.3g}.",
        malloc_line,
        f"Load at end: `{m['uptime_end']}`.",
    ]
    numbers["native_dequantize"] = native
    numbers["precision"] = {"bf16": prec.bf16, "gpu": prec.gpu}
    return C.finish(args, C.section_name("nf4_ops", prec),
                    C.section_title("NF4 quantize / dequantize / matmul: jaxalign vs bitsandbytes", prec),
                    argv, m, parts, numbers)


if __name__ == "__main__":
    main()
