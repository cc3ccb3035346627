#!/usr/bin/env bash
# The benchmarks' GPU run (issue 8, goal 6): dpo_step (tiny and medium shapes), lora_step, nf4_ops
# in bf16 and memory_on_paper --quick, one after another on the device machine.
#
# Run from the repository root with OUT set (the device tool sets it) and the wheels in .whl/
# (trl, datasets, dill, multiprocess, bitsandbytes, ml_collections: what the GPU image lacks):
#
#   bash experiments/benchmarks/gpu_run.sh          # carry: [".whl"]
#
# Writes at most 8 files into $OUT: log.txt (everything), RESULTS_gpu.md (the GPU sections, in
# RESULTS.md's format: copy a BEGIN/END block into RESULTS.md to merge it) and one JSON per part.
# Each part runs under `timeout` with its own cap, never past the run's deadline (GPU_RUN_BUDGET
# seconds from the start, default 390), keeping back enough for the parts after it; a part that
# fails or times out is reported and the next one runs.
#
# Environment knobs (for rehearsing on a CPU machine; the GPU run needs none of them):
#   PY=python3  WHEELS=.whl  SITE=/tmp/site  GPU_RUN_BUDGET=390  GPU_RUN_SMOKE=1 (--smoke shapes)
#   GPU_RUN_SKIP_INSTALL=1 (packages already importable)  GPU_RUN_LORA_MEDIUM=auto|0|1
#   GPU_RUN_DUMP=1 (XLA's dump of the memory part's compiled steps into $OUT/xla_dump.tgz)
set -u -o pipefail

: "${OUT:?set OUT to the folder the results go to}"
PY=${PY:-python3}
WHEELS=${WHEELS:-.whl}
SITE=${SITE:-/tmp/site}
BUDGET=${GPU_RUN_BUDGET:-390}
SMOKE=${GPU_RUN_SMOKE:-0}
LORA_MEDIUM=${GPU_RUN_LORA_MEDIUM:-auto}
START=$(date +%s)
LOG="$OUT/log.txt"
RES="$OUT/RESULTS_gpu.md"
mkdir -p "$OUT"
: > "$LOG"

export PYTHONUNBUFFERED=1 TQDM_DISABLE=1 TOKENIZERS_PARALLELISM=false
export XLA_PYTHON_CLIENT_PREALLOCATE=false   # JAX and torch share the GPU in one process
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1
export HF_HOME=${HF_HOME:-/tmp/hf_home} MPLBACKEND=Agg
# XLA flags on the H200 (2026-11-26, RESULTS.md's GPU sections): with XLA's default flags each
# jaxalign step took 78-86 s to compile in run 1 (Triton GEMM autotuning) and the step parts ran
# out of time; --xla_gpu_autotune_level=0 (run 2) compiled in 5-12 s but left JAX's bf16 GEMM at
# 1% of the peak. The default below (run 3: cuBLAS GEMMs instead of Triton's) compiled the steps in
# 5-18 s with JAX's GEMM at 72-76% of the datasheet peak. GPU_XLA_FLAGS overrides it ('' for XLA's
# defaults); the GEMM probe below falls back to the defaults when XLA rejects a flag.
export XLA_FLAGS="${XLA_FLAGS:-} ${GPU_XLA_FLAGS---xla_gpu_enable_triton_gemm=false}"
PARTS=${GPU_RUN_PARTS:-all}   # or a space-separated list of part names

say() { echo "=== [$(date -u +%H:%M:%S) +$(($(date +%s) - START))s] $*" | tee -a "$LOG"; }

# ---------------------------------------------------------------------------- install
if [ "${GPU_RUN_SKIP_INSTALL:-0}" != 1 ]; then
  say "install wheels from $WHEELS into $SITE"
  ls -la "$WHEELS" 2>&1 | tee -a "$LOG"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
      "$WHEELS"/*.whl 2>&1 | tee -a "$LOG" || { say "FAILED: wheel install"; }
  export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi

# ---------------------------------------------------------------------------- environment
say "environment"
{ nvidia-smi -L 2>&1 || echo "(no nvidia-smi)"; } | tee -a "$LOG"
timeout 120 "$PY" - <<'EOF' 2>&1 | grep --line-buffered -v "kernels-community" | tee -a "$LOG" || say "FAILED: environment check"
import importlib.metadata as md, platform, sys
print("python", platform.python_version(), sys.executable)
for p in ("jax", "jaxlib", "jax-cuda13-plugin", "flax", "optax", "torch", "transformers", "trl", "peft",
          "accelerate", "datasets", "bitsandbytes", "pyarrow", "huggingface-hub", "numpy", "triton"):
    try:
        print(f"  {p} {md.version(p)}")
    except md.PackageNotFoundError:
        print(f"  {p} absent")
import jax
print("jax.default_backend():", jax.default_backend(), "jax.devices():", jax.devices(),
      "device_kind:", jax.devices()[0].device_kind)
import torch
print("torch.cuda.is_available():", torch.cuda.is_available(),
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "", "CUDA", torch.version.cuda)
import bitsandbytes, trl, datasets
print("bitsandbytes", bitsandbytes.__version__, "from", bitsandbytes.__file__, "| trl from", trl.__file__)
try:
    from bitsandbytes.cextension import lib
    print("bitsandbytes native library:", getattr(lib, "_name", None) or lib)
except Exception as e:  # noqa: BLE001
    print("bitsandbytes native library: not loaded:", type(e).__name__, e)
EOF

# the GEMM rate under these XLA flags, first (a flag XLA does not know stops JAX from starting:
# then XLA's defaults are used for the rest of the run)
gemm_probe() {
  timeout 90 "$PY" - <<'EOF' 2>&1 | tee -a "$LOG"
import os, time
import jax, jax.numpy as jnp
from experiments.benchmarks import common as C
print("XLA_FLAGS:", repr(os.environ.get("XLA_FLAGS", "")))
n = 8192 if jax.default_backend() == "gpu" else 1024  # small on a rehearsal machine
t0 = time.perf_counter()
run, flops = C.jax_matmul(n, jnp.bfloat16)  # compiles and runs it once
print(f"JAX bf16 {n}^3 matmul: compiled and ran once in {time.perf_counter() - t0:.1f} s")
t = C.median(C.alternate({"gemm": run}, steps=10, warmup=0)["gemm"])
print(f"JAX bf16 {n}^3 matmul: median {t * 1e3:.2f} ms, {flops / t / 1e12:.1f} TFLOP/s")
EOF
}
say "GEMM probe"
if ! gemm_probe; then
  say "FAILED: GEMM probe with XLA_FLAGS='$XLA_FLAGS'; using XLA's defaults from here on"
  export XLA_FLAGS=""
  gemm_probe || say "FAILED: GEMM probe with XLA's defaults"
fi

# ---------------------------------------------------------------------------- parts
if [ ! -s "$RES" ]; then
  printf '%s\n\n%s\n%s\n' "# Benchmark results: GPU run" \
    "Sections written by experiments/benchmarks/gpu_run.sh on the device machine; the CPU sections are in" \
    "RESULTS.md. Each BEGIN/END block can be copied into RESULTS.md as it is." > "$RES"
fi
# STEPS: the step benchmarks' arguments; SMK: --smoke for a rehearsal (an empty array otherwise,
# spelled ${SMK[@]+"${SMK[@]}"} below so that `set -u` accepts it on any bash)
STEPS=(--bf16 --steps 10 --warmup 2 --system-malloc)   # host malloc settings: moot on a GPU
SMK=()
if [ "$SMOKE" = 1 ]; then SMK=(--smoke); STEPS=(--bf16 --smoke); fi

# part NAME CAP_S RESERVE_S CMD...: runs CMD under timeout min(CAP_S, time left - RESERVE_S),
# where RESERVE_S is kept back for the parts after it; skipped when less than 20 s are left.
part() {
  local name=$1 cap=$2 reserve=$3; shift 3
  if [ "$PARTS" != all ] && [[ " $PARTS " != *" $name "* ]]; then say "SKIPPED $name (GPU_RUN_PARTS)"; return 0; fi
  local left=$((BUDGET - ($(date +%s) - START) - reserve))
  local t=$(( cap < left ? cap : left ))
  if [ "$t" -lt 20 ]; then say "SKIPPED $name: ${left}s left after the reserve"; return 0; fi
  say "START $name (timeout ${t}s): $*"
  local t0=$(date +%s)
  timeout --kill-after=10 "$t" "$@" 2>&1 | grep --line-buffered -v "kernels-community" | tee -a "$LOG"
  local rc=${PIPESTATUS[0]}
  if [ "$rc" -eq 0 ]; then say "DONE $name in $(($(date +%s) - t0))s"
  elif [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then say "FAILED $name: timed out after ${t}s (rc=$rc)"
  else say "FAILED $name: rc=$rc after $(($(date +%s) - t0))s"; fi
  return 0
}

B=experiments/benchmarks
part dpo_step_gpu 110 200 "$PY" $B/dpo_step.py "${STEPS[@]}" \
    --results "$RES" --json "$OUT/dpo_step_gpu.json"
part dpo_step_gpu_medium 150 110 "$PY" $B/dpo_step.py "${STEPS[@]}" --shapes medium \
    --results "$RES" --json "$OUT/dpo_step_gpu_medium.json"
part lora_step_gpu 100 65 "$PY" $B/lora_step.py "${STEPS[@]}" \
    --results "$RES" --json "$OUT/lora_step_gpu.json"
part nf4_ops_gpu 60 45 "$PY" $B/nf4_ops.py --bf16 ${SMK[@]+"${SMK[@]}"} \
    --results "$RES" --json "$OUT/nf4_ops_gpu.json"
# GPU_RUN_DUMP=1: XLA dumps the compiled train steps (HLO after optimisation, buffer assignment,
# memory-usage report: which buffers are alive at the peak) into $OUT/xla_dump.tgz
MEM_ENV=()
if [ "${GPU_RUN_DUMP:-0}" = 1 ]; then
  DUMP=/tmp/xla_dump; rm -rf "$DUMP"
  MEM_ENV=(env "XLA_FLAGS=$XLA_FLAGS --xla_dump_to=$DUMP --xla_dump_hlo_as_text --xla_dump_hlo_module_re=jit_step")
fi
part memory_on_paper_gpu 120 0 ${MEM_ENV[@]+"${MEM_ENV[@]}"} "$PY" $B/memory_on_paper.py --quick ${SMK[@]+"${SMK[@]}"} \
    --results "$RES" --json "$OUT/memory_on_paper_gpu.json"
if [ "${GPU_RUN_DUMP:-0}" = 1 ] && [ -d "$DUMP" ]; then
  # the largest set that fits in one returned file (16 MiB)
  for pat in 'memory-usage-report|buffer-assignment|after_optimizations\.txt' 'memory-usage-report|buffer-assignment' \
             'memory-usage-report'; do
    files=$(cd "$DUMP" && ls | grep -E "$pat")
    [ -n "$files" ] || continue
    (cd "$DUMP" && tar czf "$OUT/xla_dump.tgz" $files)
    [ "$(stat -c %s "$OUT/xla_dump.tgz")" -le 15000000 ] && break
  done
  say "xla dump: $(ls "$DUMP" | wc -l) files, kept $(stat -c %s "$OUT/xla_dump.tgz" 2>/dev/null || echo 0) bytes compressed"
fi
# optional, only with time to spare (auto: at least 100 s left)
left=$((BUDGET - ($(date +%s) - START)))
if [ "$LORA_MEDIUM" = 1 ] || { [ "$LORA_MEDIUM" = auto ] && [ "$left" -ge 100 ]; }; then
  part lora_step_gpu_medium 100 0 "$PY" $B/lora_step.py "${STEPS[@]}" --shapes medium \
      --results "$RES" --json "$OUT/lora_step_gpu_medium.json"
else
  say "SKIPPED lora_step_gpu_medium (GPU_RUN_LORA_MEDIUM=$LORA_MEDIUM, ${left}s left)"
fi

# ---------------------------------------------------------------------------- summary
say "summary"
timeout 60 "$PY" $B/gpu_summary.py "$OUT" 2>&1 | tee -a "$LOG" || say "FAILED: summary"
say "files in $OUT: $(ls "$OUT" | tr '\n' ' ')"
