"""NF4 dequantization, jaxalign vs bitsandbytes, across fresh processes: alone vs alternating.

  python experiments/benchmarks/nf4_dequant_processes.py                 # 8 processes, 4096 x 4096
  python experiments/benchmarks/nf4_dequant_processes.py --processes 14
  python experiments/benchmarks/nf4_dequant_processes.py --smoke --results ''

Dequantizing a 4096 x 4096 NF4 weight (block 64, double quantization) to fp32 is memory-bound: its
64 MB output is twice this machine's L3. A call's time then depends on what the previous call left
in the caches and on the cores (dirty lines, spinning OpenMP workers), and the physical pages a
process gets change that from one process to the next. Each fresh process here (jaxalign's
host-memory setting applied first, as in `nf4_ops.py`) times, in this order:
  1. both libraries alternating call by call (the `nf4_ops.py` protocol),
  2. jaxalign alone, `--calls` calls in a row,
  3. bitsandbytes alone, `--calls` calls in a row,
  4. jaxalign 0.2 s after a bitsandbytes call whose output is kept alive,
  5. both libraries alternating call by call, the caches flushed before every call (untimed: a
     read of a buffer three times the L3's size, so each call starts with clean caches whoever
     ran last),
and reports medians. The table has one row per process and counts how often jaxalign was faster.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from experiments.benchmarks import common as C  # noqa: E402


def worker(argv) -> None:
    """One fresh process: prints RESULT {"alternating": {...}, "alone": {...}} (median seconds)."""
    import argparse
    import time

    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int, required=True)
    p.add_argument("--calls", type=int, required=True)
    p.add_argument("--flush-mb", type=int, required=True)
    a = p.parse_args(argv)
    from jaxalign import host_memory

    host_memory.reuse_freed_memory()
    import bitsandbytes.functional as F
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch

    from jaxalign.quant import dequantize_nf4, nf4_cpu, quantize_nf4

    w = (np.random.default_rng(0).standard_normal((a.n, a.n)) * 0.02).astype(np.float32)
    q = quantize_nf4(jnp.asarray(w), block_size=64, double_quant=True)
    qb, st = F.quantize_4bit(torch.from_numpy(w), blocksize=64, quant_type="nf4", compress_statistics=True)
    fns = {"jaxalign": lambda: jax.block_until_ready(dequantize_nf4(q, jnp.float32)),
           "bitsandbytes": lambda: F.dequantize_4bit(qb, st)}
    if not np.array_equal(np.asarray(fns["jaxalign"]()), fns["bitsandbytes"]().numpy()):
        raise AssertionError("jaxalign and bitsandbytes dequantize the same bytes differently")
    med = lambda d: {k: C.median(v) for k, v in d.items()}
    out = {"alternating": med(C.alternate(fns, steps=a.calls, warmup=2)),
           "alone": {k: C.median(C.alternate({k: f}, steps=a.calls, warmup=2)[k]) for k, f in fns.items()},
           "native": nf4_cpu.available()}
    # jaxalign right after a bitsandbytes call whose output is still alive, with a pause between:
    # rules out OpenMP workers still spinning and the reuse of bitsandbytes' freed output memory
    times = []
    for _ in range(max(3, a.calls // 3)):
        alive = fns["bitsandbytes"]()
        time.sleep(0.2)
        t0 = time.perf_counter()
        fns["jaxalign"]()
        times.append(time.perf_counter() - t0)
        del alive  # freed only after the timed call
    out["jaxalign_after_bnb_paused"] = C.median(times)
    scratch = np.ones(a.flush_mb * 2 ** 20 // 4, np.float32)
    out["alternating_flushed"] = med(C.alternate(fns, steps=a.calls, warmup=2, before=scratch.sum))
    C.emit(out)


def main(argv=None):
    if (wargv := C.worker_argv(argv)) is not None:  # a subprocess started by run_worker
        return worker(wargv)
    p = C.parser(__doc__.splitlines()[0])
    p.add_argument("--processes", type=int, default=0, help="fresh processes (default 8; smoke 1)")
    p.add_argument("--calls", type=int, default=0, help="timed calls per library and protocol (default 50)")
    args = p.parse_args(argv)
    n = 256 if args.smoke else 4096
    procs = args.processes or (1 if args.smoke else 8)
    calls = args.calls or (3 if args.smoke else 50)
    flush_mb = 1 if args.smoke else 96  # three times the 32 MB L3 of the machines these ran on
    if procs < 1 or calls < 1:
        raise ValueError(f"--processes and --calls must be >= 1, got {procs} and {calls}")
    m = C.machine()
    here = str(Path(__file__).resolve())
    runs = []
    for i in range(procs):
        C.progress(f"process {i + 1}/{procs}")
        runs.append(C.run_worker(here, ["--n", str(n), "--calls", str(calls), "--flush-mb", str(flush_mb)]))
    m["uptime_end"] = C.load_average()
    ratio = lambda d: d["bitsandbytes"] / d["jaxalign"]
    rows = [[i + 1, r["alternating"]["jaxalign"] * 1e3, r["alternating"]["bitsandbytes"] * 1e3,
             ratio(r["alternating"]), r["alone"]["jaxalign"] * 1e3, r["alone"]["bitsandbytes"] * 1e3,
             ratio(r["alone"]), r["jaxalign_after_bnb_paused"] * 1e3,
             r["alternating_flushed"]["jaxalign"] * 1e3, r["alternating_flushed"]["bitsandbytes"] * 1e3,
             ratio(r["alternating_flushed"])] for i, r in enumerate(runs)]
    wins = {k: sum(ratio(r[k]) > 1 for r in runs) for k in ("alternating", "alone", "alternating_flushed")}
    numbers = {"n": n, "calls": calls, "flush_mb": flush_mb, "runs": runs, "jaxalign_faster": wins,
               "native_dequantize": all(r["native"] for r in runs)}
    parts = [
        f"Weight {n} x {n} fp32 -> NF4 (block 64, double quantization) -> fp32, on the CPU; {procs} fresh "
        f"processes, each: {calls} calls of each library alternating call by call, then {calls} calls "
        "of jaxalign alone, then of bitsandbytes alone; medians. Last column: jaxalign calls each made "
        "0.2 s after a bitsandbytes call whose output is kept alive (a third of the calls). Flushed: "
        f"both alternating call by call again, each call preceded (untimed) by a read of a {flush_mb} MB "
        "buffer, so that no call inherits the other library's dirty cache lines. The outputs are "
        "checked equal.",
        C.table(["process", "alternating: jaxalign ms", "bitsandbytes ms", "bnb / jaxalign",
                 "alone: jaxalign ms", "bitsandbytes ms", "bnb / jaxalign",
                 "jaxalign ms, 0.2 s after a bnb call", "flushed: jaxalign ms", "bitsandbytes ms",
                 "bnb / jaxalign"], rows),
        f"jaxalign faster: alternating in {wins['alternating']} of {procs} processes, alone in "
        f"{wins['alone']} of {procs}, alternating with flushed caches in {wins['alternating_flushed']} "
        f"of {procs}.",
        "Host memory: `jaxalign.host_memory.reuse_freed_memory()` in every process. jaxalign's CPU "
        "dequantization: " + ("the native kernel (jaxalign/quant/nf4_cpu.cc)." if numbers["native_dequantize"]
                              else "XLA's fused loop (the native kernel is unavailable here)."),
        f"Load at end: `{m['uptime_end']}`.",
    ]
    return C.finish(args, "nf4_dequant_processes",
                    "NF4 dequantization across processes: alone vs alternating", argv, m, parts, numbers)


if __name__ == "__main__":
    main()
