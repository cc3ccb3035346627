"""DPO training step, full fine-tune: jaxalign's jitted step vs TRL's DPOTrainer, side by side.

  python experiments/benchmarks/dpo_step.py              # full benchmark, writes RESULTS.md
  python experiments/benchmarks/dpo_step.py --smoke --results ''   # tiny shapes (CI)
  python experiments/benchmarks/dpo_step.py --xla-sweep  # also try XLA CPU flags (subprocesses)
  python experiments/benchmarks/dpo_step.py --bf16 [--shapes medium]   # e.g. on a GPU

On a GPU (JAX's default backend 'gpu'/'cuda') every contestant runs there: TRL with
`use_cpu=False` (batches moved to the device before timing, `torch.cuda.synchronize()` ending each
step), jaxalign on JAX's default device. `--bf16`: mixed precision on both sides, fp32 master
weights and optimizer state with bf16 compute (TRL/Trainer `bf16=True`, i.e. torch autocast, with
the model and optimizer prepared by the trainer's accelerator as `Trainer.train` does; jaxalign
`from_pretrained(dtype=float32, compute_dtype=bfloat16)`); the matmul-peak probes then run in bf16
(8192^3 on a GPU) and the table adds MFU against the GPU's datasheet bf16 peak. `--shapes medium`
(vocab 32000, hidden 2048, 4 layers, 8 pairs x 512 tokens) gives matmuls large enough for a
meaningful MFU on a GPU. GPU runs write their own RESULTS sections (`dpo_step_gpu`,
`dpo_step_gpu_medium`, ...); the CPU fp32 section stays `dpo_step`.

Setup: one random Llama (vocab 4096, hidden 256, 4 layers, 4 heads, intermediate 688, fp32) saved
with transformers' `save_pretrained` and loaded by both libraries; 8 pairs of prompt 64 +
completion 64 tokens (one batch = 16 sequences x 128 tokens), sigmoid DPO with beta 0.1, AdamW with
global-norm clipping 1.0 on both sides.

* jaxalign: `ObjectiveSpec(kind='preference', loss_fn=dpo_loss, reference='model')`,
  `make_objective`, `make_train_step` (one jitted, donated XLA program: policy forward + backward,
  reference forward, clip, AdamW).
* TRL: `DPOTrainer(precompute_ref_log_probs=False, bf16=False, gradient_checkpointing=False)`.
  One step = what `Trainer._inner_training_loop` does per optimizer step without logging or data
  loading: `trainer.training_step` (the trainer's DPO loss + backward) then `_clip_grad_norm`,
  `optimizer.step()`, `lr_scheduler.step()`, `model.zero_grad()`. Batches are collated by
  TRL's own collator once, before timing, and the same token ids feed jaxalign.

The same is repeated with reference log-probs precomputed (TRL `precompute_ref_log_probs=True`,
jaxalign `reference='precomputed'`), and jaxalign's vocabulary-chunked log-prob path is timed too.
All contestants run in one process, interleaved step by step; medians after warm-up.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import tempfile
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
os.environ.setdefault("TQDM_DISABLE", "1")

from experiments.benchmarks import common as C  # noqa: E402

BETA = 0.1
LR = 1e-6
# What this process computes in and where (fp32 on CPU unless `set_precision` says otherwise): the
# contestant builders, the peak probes and the headers below follow it, so every contestant of a
# run gets the same setting without passing it around.
PREC = C.Precision()


def set_precision(prec: C.Precision) -> C.Precision:
    global PREC
    PREC = prec
    return prec


# ----------------------------------------------------------------------------- TRL contestant
def make_trl_trainer(model_dir, tokenizer, rows, s: C.Shapes, out_dir, *, precompute=False,
                     peft_config=None, quantization_config=None, bf16=None):
    """A DPOTrainer configured for timing (no checkpointing/logging/eval), optimizer built.
    fp32 unless `bf16` (default: the process setting `PREC`): then Trainer's bf16 mixed precision,
    with the model and optimizer prepared by its accelerator as `Trainer.train` does (that is where
    the autocast is attached). On a GPU the trainer runs on CUDA (`use_cpu=False`)."""
    import datasets
    import torch
    import transformers
    from trl import DPOConfig, DPOTrainer

    bf16 = PREC.bf16 if bf16 is None else bf16
    C.progress(f"TRL trainer: precompute={precompute}, peft={peft_config is not None}, "
               f"4-bit={quantization_config is not None}, bf16={bf16}, gpu={PREC.gpu}")
    args = DPOConfig(
        output_dir=out_dir, per_device_train_batch_size=s.pairs, bf16=bf16, fp16=False,
        gradient_checkpointing=False, precompute_ref_log_probs=precompute, report_to=[],
        logging_steps=10 ** 6, save_strategy="no", eval_strategy="no", use_cpu=not PREC.gpu,
        dataloader_num_workers=0, beta=BETA, learning_rate=LR, weight_decay=0.0, max_grad_norm=1.0,
        lr_scheduler_type="linear", seed=0, max_length=None,
        model_init_kwargs={"dtype": torch.float32} if quantization_config is not None else None)
    if quantization_config is not None:  # TRL only quantizes models it loads from a path
        model, ref = model_dir, None
    else:
        model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        ref = None
        if not precompute and peft_config is None:
            ref = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    trainer = DPOTrainer(model=model, ref_model=ref, args=args,
                         train_dataset=datasets.Dataset.from_list(rows), processing_class=tokenizer,
                         peft_config=peft_config, quantization_config=quantization_config)
    trainer.create_optimizer_and_scheduler(num_training_steps=10 ** 4)
    if bf16:  # as Trainer._inner_training_loop: accelerate wraps forward in bf16 autocast
        trainer.model_wrapped, trainer.optimizer = trainer.accelerator.prepare(trainer.model, trainer.optimizer)
    trainer.current_gradient_accumulation_steps = 1
    return trainer


def trl_batches(trainer, s: C.Shapes, n_batches: int):
    ds = trainer.train_dataset
    return [trainer.data_collator([ds[i] for i in range(j * s.pairs, (j + 1) * s.pairs)])
            for j in range(n_batches)]


def trl_step_fn(trainer, batches):
    """One optimizer step exactly as Trainer's loop does it (minus logging and data loading). On a
    GPU the batches are moved to the device once, before timing (as jaxalign's are), and each step
    ends with `torch.cuda.synchronize()` so that its time is the GPU's."""
    import torch

    device = trainer.args.device
    cuda = device.type == "cuda"
    if cuda:
        batches = [{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in b.items()}
                   for b in batches]
    i = [0]

    def step():
        inputs = batches[i[0] % len(batches)]
        i[0] += 1
        loss = trainer.training_step(trainer.model_wrapped, inputs)
        trainer._clip_grad_norm(trainer.model_wrapped)
        trainer.optimizer.step()
        trainer.lr_scheduler.step()
        trainer.model.zero_grad()
        if cuda:
            torch.cuda.synchronize()
        return float(loss)

    return step


def with_torch_threads(fn, n: int):
    """fn run with torch's intra-op thread count set to n (restored afterwards)."""
    import torch

    def run():
        old = torch.get_num_threads()
        torch.set_num_threads(n)
        try:
            return fn()
        finally:
            torch.set_num_threads(old)

    return run


def trl_head_positions(s: C.Shapes, k_head: int) -> int:
    """Positions per sequence at which TRL's fused LM head projects: only the loss (completion)
    positions where its Triton kernel runs (CUDA), every position but the last elsewhere (CPU)."""
    if PREC.gpu:
        try:
            import torch
            from trl.kernels.chunked_logprob import _use_triton

            if _use_triton(torch.device("cuda")):
                return k_head
        except Exception:  # noqa: BLE001 - another TRL layout: assume the CPU path
            return s.seq_len - 1
    return s.seq_len - 1


def trl_first_logps(trainer) -> float:
    vals = trainer._metrics["train"].get("logps/chosen") or [float("nan")]
    return float(vals[0])


# ----------------------------------------------------------------------------- jaxalign contestant
def make_jaxalign_step(model_dir, batches, *, reference="model", vocab_chunk=None, lora_spec=None,
                       nf4=False, remat=False, compute_dtype=None):
    """Returns (step_fn, info). step_fn() runs one jitted, donated train step on JAX's default
    device and blocks on it. fp32 params and optimizer state; compute in `compute_dtype` (default:
    the process setting `PREC`, bf16 or fp32).
    info: {'xla_flops', 'first_loss', 'first_logps_chosen', 'trainable_params', 'compile_s'}."""
    import time

    import jax
    import jax.numpy as jnp

    from jaxalign.losses import dpo_loss
    from jaxalign.models import from_pretrained
    from jaxalign.train.objectives import ObjectiveSpec, make_objective
    from jaxalign.train.optim import make_optimizer, make_schedule
    from jaxalign.train.step import init_state, make_train_step

    compute_dtype = compute_dtype or PREC.jax_dtype()
    C.progress(f"jaxalign step: reference={reference}, vocab_chunk={vocab_chunk}, "
               f"lora={lora_spec is not None}, nf4={nf4}, compute {jnp.dtype(compute_dtype).name}")
    model, params = from_pretrained(model_dir, dtype=jnp.float32, compute_dtype=compute_dtype, remat=remat)
    if lora_spec is not None:
        from jaxalign.peft import init_lora

        model = model.clone(lora=lora_spec)
        if nf4:
            from jaxalign.quant import quantize_params

            params = quantize_params(params)
        trainable = {"lora": init_lora(params, lora_spec, jax.random.PRNGKey(1))}
        frozen = {"params": params}
        if reference == "model":
            reference = "base"
    else:
        trainable = {"params": params}
        frozen = {"ref_params": jax.tree.map(jnp.copy, params)} if reference == "model" else {}
    spec = ObjectiveSpec(kind="preference", loss_fn=dpo_loss, loss_kwargs=(("beta", BETA),),
                         reference=reference, vocab_chunk=vocab_chunk)
    objective = make_objective(model, spec)
    schedule = make_schedule(learning_rate=LR, total_steps=10 ** 4, schedule="linear")
    optimizer = make_optimizer(name="adamw", learning_rate_fn=schedule, weight_decay=0.0, clip_norm=1.0)
    state = init_state(trainable, optimizer, jax.random.PRNGKey(0))
    train_step = make_train_step(objective, optimizer)
    jb = [jax.device_put({k: v for k, v in b.items()
                          if reference == "precomputed" or not k.startswith("ref_")}) for b in batches]
    t0 = time.perf_counter()
    compiled = train_step.lower(state, frozen, jb[0]).compile()
    compile_s = time.perf_counter() - t0
    C.progress(f"  compiled in {compile_s:.1f} s")
    holder = {"state": state, "i": 0}

    def step():
        b = jb[holder["i"] % len(jb)]
        holder["i"] += 1
        holder["state"], metrics = train_step(holder["state"], frozen, b)
        jax.block_until_ready((holder["state"], metrics))
        return metrics

    m = step()
    info = {"xla_flops": C.xla_flops(compiled), "first_loss": float(m["loss"]),
            "first_logps_chosen": float(m["logps/chosen"]),
            "trainable_params": sum(x.size for x in jax.tree.leaves(trainable)), "compile_s": compile_s}
    return (lambda: step()["loss"]), info


# ----------------------------------------------------------------------------- worker (XLA sweep)
def worker(argv):
    """One jaxalign-only timing in a fresh process (so XLA_FLAGS can differ)."""
    import argparse

    p = argparse.ArgumentParser()
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--vocab-chunk", type=int, default=0)
    a = p.parse_args(argv)
    s = C.SMOKE if a.smoke else C.FULL
    with tempfile.TemporaryDirectory() as d:
        model_dir = C.save_tiny_llama(os.path.join(d, "model"), s)
        batches = [jax_batch(s, seed=j) for j in range(2)]
        fn, info = make_jaxalign_step(model_dir, batches, vocab_chunk=a.vocab_chunk or None)
        t = C.alternate({"jax": fn}, steps=a.steps, warmup=1)["jax"]
    C.emit({"median_s": C.median(t), "xla_flops": info["xla_flops"], "loss": info["first_loss"]})


def jax_batch(s: C.Shapes, *, seed: int, loss_index: bool = True):
    """A preference batch like TRL's collator makes (no padding: fixed lengths), numpy int32, with
    jaxalign's loss index unless `loss_index=False`."""
    import numpy as np

    from jaxalign.data.collate import add_loss_index

    rng = np.random.default_rng(seed)
    out = {}
    for side in ("chosen", "rejected"):
        ids = rng.integers(len(C.SPECIALS), s.vocab, size=(s.pairs, s.seq_len)).astype(np.int32)
        ids[:, -1] = 1  # <eos>
        lm = np.zeros_like(ids)
        lm[:, s.prompt:] = 1
        out.update({f"{side}_tokens": ids, f"{side}_attention_mask": np.ones_like(ids),
                    f"{side}_loss_mask": lm})
    return add_loss_index(out, ("chosen_", "rejected_")) if loss_index else out


XLA_SWEEP = ("", "--xla_cpu_use_onednn=true", "--xla_cpu_use_xnnpack=true",
             "--xla_cpu_enable_concurrency_optimized_scheduler=true",
             "--xla_cpu_multi_thread_eigen=false")
SWEEP_ROUNDS = 3


# ----------------------------------------------------------------------------- reporting
PEAK_JAX, PEAK_TORCH = "fp32 matmul peak, JAX", "fp32 matmul peak, torch"  # the CPU fp32 names


def peak_names() -> tuple[str, str]:
    """The probes' names under the process setting: '<dtype> matmul peak, JAX' / ', torch'."""
    return f"{PREC.name} matmul peak, JAX", f"{PREC.name} matmul peak, torch"


TRL_1T = "trl, torch.set_num_threads(1)"
UNSHARED = "jaxalign, pairs unshared"
ALL_POS = "jaxalign, pairs unshared, LM head at all positions"
TRL_PRE_1T = "trl precomputed, torch.set_num_threads(1)"


def peak_fns(smoke: bool):
    """The two matmul-peak probes in the run's dtype, timed inside the same alternation as the
    steps: n^3 with n = 2048 on CPU, 8192 on a GPU (4 back-to-back products per call there, so
    the launch overhead is negligible); 512 under --smoke."""
    n = 512 if smoke else (8192 if PREC.gpu else 2048)
    reps = 4 if PREC.gpu and not smoke else 1
    pj, pt = peak_names()
    fj, flj = C.jax_matmul(n, PREC.jax_dtype(), reps=reps)
    ft, flt = C.torch_matmul(n, PREC.torch_dtype(), PREC.torch_device(), reps=reps)
    return {pj: fj, pt: ft}, {pj: flj, pt: flt}, n


def spec_peak() -> float | None:
    """The GPU's datasheet dense bf16 FLOP/s on a bf16 GPU run, else None (no column)."""
    return C.spec_bf16_peak(C.gpu_name()) if PREC.gpu and PREC.bf16 else None


def step_rows(times, meta, peak_flops, tokens):
    """Table rows for step contestants. meta[name] = dict(flops=, baseline=, lib='jax'|'torch',
    xla_flops=). Percent of peak (MFU on a GPU) uses the peak of the contestant's own library,
    measured in the same alternation; on a bf16 GPU run a last column gives MFU against the
    datasheet's bf16 peak."""
    med = {k: C.median(v) for k, v in times.items()}
    pj, pt = peak_names()
    peak = {"jax": peak_flops[pj] / med[pj], "torch": peak_flops[pt] / med[pt]}
    spec = spec_peak()
    rows = []
    for name, info in meta.items():
        t = med[name]
        fl = info["flops"]
        xf = info.get("xla_flops")
        rows.append([name, t * 1e3, tokens / t, med[info["baseline"]] / t, fl / 1e9, fl / t / 1e9,
                     100 * fl / t / peak[info["lib"]], xf / 1e9 if xf else None]
                    + ([100 * fl / t / spec] if spec else []))
    return rows, med, peak


STEP_HEADERS = ["contestant", "median step ms", "tokens/s", "speedup vs TRL (same setting)",
                "model GFLOP/step", "achieved GFLOP/s", "% of fp32 matmul peak (same lib, same run)",
                "XLA cost_analysis GFLOP"]


def step_headers() -> list[str]:
    """STEP_HEADERS for the run's dtype; on a GPU the % of peak is MFU, plus MFU vs the datasheet."""
    h = list(STEP_HEADERS)
    if PREC.gpu:
        h[6] = f"MFU % (vs measured {PREC.name} matmul peak, same lib, same run)"
    else:
        h[6] = f"% of {PREC.name} matmul peak (same lib, same run)"
    spec = spec_peak()
    if spec:
        h.append(f"MFU % vs datasheet bf16 peak ({spec / 1e12:.0f} TFLOP/s)")
    return h


def shapes_line(s, steps, warmup):
    where = f"on the GPU ({C.gpu_name()}), both libraries" if PREC.gpu else "on the CPU"
    return (f"Shapes: vocab {s.vocab}, hidden {s.hidden}, {s.layers} layers, {s.heads} heads, "
            f"intermediate {s.intermediate}, {s.pairs} pairs x (prompt {s.prompt} + completion "
            f"{s.completion}) = {s.tokens_per_step} tokens/step, {PREC.describe}, {where}. {steps} "
            f"timed steps per contestant after {warmup} warm-up, interleaved round by round in one "
            "process (the matmul-peak probes too); medians.")


def peak_line(peak, n):
    line = (f"Measured {PREC.name} matmul peak ({n}^3, interleaved with the steps): JAX "
            f"{peak['jax'] / 1e9:.1f} GFLOP/s, torch {peak['torch'] / 1e9:.1f} GFLOP/s.")
    spec = spec_peak()
    if PREC.gpu:
        line += (f" GPU: {C.gpu_name()}; datasheet dense bf16 peak "
                 + (f"{spec / 1e12:.0f} TFLOP/s (measured JAX {100 * peak['jax'] / spec:.0f}%, torch "
                    f"{100 * peak['torch'] / spec:.0f}% of it)." if spec else "unknown.")
                 + " MFU = model FLOPs / median step time / peak.")
    return line


# ----------------------------------------------------------------------------- main
def main(argv=None):
    if (wargv := C.worker_argv(argv)) is not None:  # a subprocess started by run_worker
        return worker(wargv)
    p = C.parser(__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=0, help="timed steps per contestant")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--xla-sweep", action="store_true", help="time jaxalign under other XLA CPU flags")
    C.add_host_memory_flag(p)
    p.add_argument("--rounds", type=int, default=1,
                   help="repeat the whole comparison in this many fresh processes; report each")
    C.add_precision_flag(p)
    C.add_shapes_flag(p)
    p.add_argument("--main-only", action="store_true",
                   help="only TRL and jaxalign (shared, unshared, precomputed): no torch-thread, "
                        "all-positions or vocab-chunk rows (the default on a GPU)")
    args = p.parse_args(argv)
    if args.rounds > 1:
        return rounds_main(args, list(sys.argv[1:] if argv is None else argv))
    malloc_line = C.host_memory_setting(args)
    prec = set_precision(C.precision(args))
    _, s = C.shapes_of(args)
    steps = args.steps or (2 if args.smoke else 10)
    warmup = 1 if args.smoke else args.warmup
    m = C.machine(device=True)
    n_batches = 2 if args.smoke else 4
    chunk = 1024 if s.vocab > 1024 else s.vocab // 4
    with tempfile.TemporaryDirectory() as d:
        model_dir = C.save_tiny_llama(os.path.join(d, "model"), s)
        tok = C.word_tokenizer(s.vocab)
        rows = C.preference_rows(n_batches * s.pairs, s)
        trl_ref = make_trl_trainer(model_dir, tok, rows, s, os.path.join(d, "trl_ref"))
        trl_pre = make_trl_trainer(model_dir, tok, rows, s, os.path.join(d, "trl_pre"), precompute=True)
        b_ref = trl_batches(trl_ref, s, n_batches)
        b_pre = trl_batches(trl_pre, s, n_batches)
        seq_len = b_ref[0]["input_ids"].shape[1]
        if seq_len != s.seq_len:
            raise RuntimeError(f"TRL collated length {seq_len}, expected {s.seq_len}")
        # jaxalign's defaults: each pair packed after one copy of its prompt (prefix sharing), the
        # LM head at the completion positions; and the same without sharing / without the index
        jb_ref = [C.trl_to_jaxalign_shared(b) for b in b_ref]
        jb_unshared = [C.trl_to_jaxalign(b) for b in b_ref]
        k_head = jb_unshared[0]["chosen_loss_index"].shape[1]  # completion positions per sequence
        packed_len = jb_ref[0]["packed_tokens"].shape[1]
        jx_ref, info_ref = make_jaxalign_step(model_dir, jb_ref)
        jx_uns, info_uns = make_jaxalign_step(model_dir, jb_unshared)
        # CPU-only diagnostics (a GPU run keeps to the main contestants: each costs a compile)
        extra = not (PREC.gpu or args.main_only)
        if extra:
            jx_all, info_all = make_jaxalign_step(model_dir, [C.trl_to_jaxalign(b, loss_index=False)
                                                              for b in b_ref])
            jx_chunk, info_chunk = make_jaxalign_step(model_dir, jb_ref, vocab_chunk=chunk)
        jx_pre, info_pre = make_jaxalign_step(model_dir, [C.trl_to_jaxalign_shared(b) for b in b_pre],
                                              reference="precomputed")
        trl_fn, trl_pre_fn = trl_step_fn(trl_ref, b_ref), trl_step_fn(trl_pre, b_pre)
        first_trl = trl_fn()  # TRL's first step records logps/chosen for the sanity check
        trl_logps = trl_first_logps(trl_ref)
        probes, probe_flops, n_peak = peak_fns(args.smoke)
        fns = {"trl": trl_fn, "jaxalign": jx_ref, UNSHARED: jx_uns,
               "trl precomputed": trl_pre_fn, "jaxalign precomputed": jx_pre, **probes}
        if extra:
            fns.update({ALL_POS: jx_all, f"jaxalign vocab_chunk={chunk}": jx_chunk,
                        TRL_1T: with_torch_threads(trl_fn, 1),
                        TRL_PRE_1T: with_torch_threads(trl_pre_fn, 1)})
        times = C.alternate(fns, steps=steps, warmup=warmup)
    m["uptime_end"] = C.load_average()

    # FLOPs each contestant performs: the LM head at seq_len - 1 positions per sequence (TRL on
    # CPU, jaxalign without a loss index) or at the k_head completion positions (loss index; TRL
    # on CUDA, where its Triton kernel compacts to the loss positions)
    t1 = s.seq_len - 1
    t_trl = trl_head_positions(s, k_head)
    f_trl = C.dpo_step_flops(s, reference_forward=True, head_positions=t_trl)
    f_all = C.dpo_step_flops(s, reference_forward=True, head_positions=t1)
    f_uns = C.dpo_step_flops(s, reference_forward=True, head_positions=k_head)
    f_ref = C.dpo_step_flops(s, reference_forward=True, head_positions=k_head, packed_len=packed_len)
    f_trl_pre = C.dpo_step_flops(s, reference_forward=False, head_positions=t_trl)
    f_pre = C.dpo_step_flops(s, reference_forward=False, head_positions=k_head, packed_len=packed_len)
    meta = {
        "trl": dict(flops=f_trl, baseline="trl", lib="torch"),
        "jaxalign": dict(flops=f_ref, baseline="trl", lib="jax", xla_flops=info_ref["xla_flops"]),
        UNSHARED: dict(flops=f_uns, baseline="trl", lib="jax", xla_flops=info_uns["xla_flops"]),
        "trl precomputed": dict(flops=f_trl_pre, baseline="trl precomputed", lib="torch"),
        "jaxalign precomputed": dict(flops=f_pre, baseline="trl precomputed", lib="jax",
                                     xla_flops=info_pre["xla_flops"]),
    }
    if extra:
        meta.update({
            ALL_POS: dict(flops=f_all, baseline="trl", lib="jax", xla_flops=info_all["xla_flops"]),
            f"jaxalign vocab_chunk={chunk}": dict(flops=f_ref, baseline="trl", lib="jax",
                                                  xla_flops=info_chunk["xla_flops"]),
            TRL_1T: dict(flops=f_trl, baseline="trl", lib="torch"),
            TRL_PRE_1T: dict(flops=f_trl_pre, baseline="trl precomputed", lib="torch"),
        })
    tokens = s.tokens_per_step
    rows_out, med, peak = step_rows(times, meta, probe_flops, tokens)
    nan = float("nan")
    get = lambda k: med.get(k, nan)  # noqa: E731 - a contestant a GPU run leaves out
    numbers = {
        "shapes": dataclasses.asdict(s), "peak_flops": peak, "median_s": med, "times": times,
        "tokens_per_s": {k: tokens / med[k] for k in meta},
        "speedup_vs_trl": med["trl"] / med["jaxalign"],
        "speedup_unshared_vs_trl": med["trl"] / med[UNSHARED],
        "speedup_all_positions_vs_trl": med["trl"] / get(ALL_POS),
        "speedup_precomputed_vs_trl_precomputed": med["trl precomputed"] / med["jaxalign precomputed"],
        "speedup_jaxalign_precomputed_vs_trl": med["trl"] / med["jaxalign precomputed"],
        "best_jaxalign_vs_trl": med["trl"] / min(med["jaxalign"], get(f"jaxalign vocab_chunk={chunk}")),
        "speedup_vs_best_trl": min(med["trl"], get(TRL_1T)) / med["jaxalign"],
        "speedup_precomputed_vs_best_trl_precomputed":
            min(med["trl precomputed"], get(TRL_PRE_1T)) / med["jaxalign precomputed"],
        "fraction_of_peak": f_ref / med["jaxalign"] / peak["jax"],
        "fraction_of_peak_unshared": f_uns / med[UNSHARED] / peak["jax"],
        "fraction_of_peak_all_positions": f_all / get(ALL_POS) / peak["jax"],
        "fraction_of_peak_precomputed": f_pre / med["jaxalign precomputed"] / peak["jax"],
        "sanity": {"jaxalign_first_loss": info_ref["first_loss"], "trl_first_loss": first_trl,
                   "jaxalign_logps_chosen": info_ref["first_logps_chosen"], "trl_logps_chosen": trl_logps,
                   "jaxalign_unshared_logps_chosen": info_uns["first_logps_chosen"]},
    }
    if not extra:  # NaN placeholders would fail JSON consumers that check finiteness
        numbers = {k: v for k, v in numbers.items() if not (isinstance(v, float) and v != v)}

    sweep_rows = []
    if args.xla_sweep:
        here = str(Path(__file__).resolve())
        wargs = ["--smoke"] if args.smoke else []
        per_flag = {f: [] for f in XLA_SWEEP}
        for _ in range(SWEEP_ROUNDS):  # rounds of fresh processes, alternating flag sets
            for flags in XLA_SWEEP:
                r = C.run_worker(here, wargs + ["--steps", str(max(2, steps // 2))], extra_xla_flags=flags)
                per_flag[flags].append(r["median_s"])
        for flags, ts in per_flag.items():
            sweep_rows.append([flags or "(default)", " / ".join(f"{t * 1e3:.0f}" for t in ts),
                               C.median(ts) * 1e3, tokens / C.median(ts)])
        numbers["xla_sweep"] = {f or "(default)": ts for f, ts in per_flag.items()}

    parts = [
        shapes_line(s, steps, warmup),
        C.table(step_headers(), rows_out),
        peak_line(peak, n_peak) + " Model FLOPs: 6 N tokens (policy forward+backward) + 2 N tokens "
        "(reference forward, absent when precomputed) + attention (4 H d per visible (query, key) "
        "pair per layer forward, x3 with backward: the pairs the causal mask lets a query see, for "
        "every contestant), N = all matmul weights "
        f"({C.linear_params(s.hidden, s.intermediate, s.layers, s.heads, s.heads, s.hidden // s.heads, s.vocab):,}), "
        f"each contestant's LM head counted where it runs: TRL at {t_trl} positions per sequence "
        "(on CPU it scores every position; on CUDA its Triton kernel only the loss positions), "
        f"`{ALL_POS}` at {t1}, jaxalign with the loss index its collator "
        f"adds at the {k_head} completion positions. Each library's % is of its own measured peak. "
        f"`jaxalign` (and `precomputed`, `vocab_chunk`) run jaxalign's defaults for preference "
        f"training: prefix sharing, each pair one row [prompt | chosen | rejected] of {packed_len} "
        f"positions instead of two rows of {s.seq_len} (same log-probs; its FLOPs are counted over "
        f"those {packed_len} positions, attention over the pairs each continuation sees: the "
        f"prompt and itself); `{UNSHARED}` is the same step on the two unpacked rows. On the CPU, "
        "jaxalign's attention is its native kernel (`jaxalign/models/attention_cpu.cc`), which "
        "skips key tiles the mask hides.",
        f"Sanity: log-probs of the unshared step {info_uns['first_logps_chosen']:.4f} (shared "
        f"{info_ref['first_logps_chosen']:.4f}).",
        f"Sanity: first-step loss jaxalign {info_ref['first_loss']:.6f} / TRL {first_trl:.6f} (log 2 = "
        f"0.693147); mean chosen log-prob at step 0 jaxalign {info_ref['first_logps_chosen']:.4f} / TRL "
        f"{trl_logps:.4f}.",
        malloc_line,
        f"Load at end: `{m['uptime_end']}`.",
    ]
    numbers["parts"] = list(parts)
    if sweep_rows:
        parts.append(f"XLA CPU flag sweep (jaxalign step with reference model only; one fresh process per "
                     f"flag set and round, {SWEEP_ROUNDS} rounds alternating the flag sets):\n\n"
                     + C.table(["XLA_FLAGS", "per-round median step ms", "median of rounds ms",
                                "tokens/s"], sweep_rows))
    numbers["precision"] = {"bf16": prec.bf16, "gpu": prec.gpu}
    return C.finish(args, C.section_name("dpo_step", prec, args.shapes),
                    C.section_title("DPO step, full fine-tune: jaxalign vs TRL", prec, args.shapes),
                    argv, m, parts, numbers)


# ----------------------------------------------------------------------------- rounds
def rounds_main(args, argv_list):
    """The comparison in `args.rounds` fresh processes, one after another: each round is the
    single-process benchmark (contestants interleaved step by step). Both libraries' step times
    move between processes on this machine (TRL 680-958 ms in runs of one afternoon: RESULTS.md),
    so the section reports every round and the median of the per-round speedups."""
    import json
    import subprocess

    here = str(Path(__file__).resolve())
    pass_on = ["--smoke"] if args.smoke else []
    if args.steps:
        pass_on += ["--steps", str(args.steps)]
    pass_on += ["--warmup", str(args.warmup)]
    if args.system_malloc:
        pass_on.append("--system-malloc")
    if args.bf16:
        pass_on.append("--bf16")
    pass_on += ["--shapes", args.shapes]
    prec = set_precision(C.precision(args))
    m = C.machine(device=True)
    rounds = []
    with tempfile.TemporaryDirectory() as d:
        for r in range(args.rounds):
            out = os.path.join(d, f"round{r}.json")
            proc = subprocess.run([sys.executable, here, *pass_on, "--results", "", "--json", out],
                                  capture_output=True, text=True, cwd=str(C.REPO))
            if proc.returncode != 0:
                raise RuntimeError(f"round {r} failed (rc={proc.returncode}):\n{proc.stderr[-3000:]}")
            rounds.append(json.loads(Path(out).read_text()))
    m["uptime_end"] = C.load_average()
    cols = [("speedup vs TRL", "speedup_vs_trl", 1),
            ("pairs unshared vs TRL", "speedup_unshared_vs_trl", 1),
            ("unshared, LM head at all positions vs TRL", "speedup_all_positions_vs_trl", 1),
            ("precomputed vs TRL precomputed", "speedup_precomputed_vs_trl_precomputed", 1),
            (f"% of JAX {prec.name} peak", "fraction_of_peak", 100),
            ("% of peak, unshared", "fraction_of_peak_unshared", 100),
            ("% of peak, unshared, all positions", "fraction_of_peak_all_positions", 100)]
    rows = [[i + 1, n["median_s"]["trl"] * 1e3, n["median_s"]["jaxalign"] * 1e3]
            + [scale * n[key] for _, key, scale in cols] for i, n in enumerate(rounds)]
    summary = {name: C.median([n[key] for n in rounds]) for name, key, _ in cols}
    rows.append(["median", C.median([r[1] for r in rows]), C.median([r[2] for r in rows])]
                + [scale * summary[name] for name, _, scale in cols])
    order = sorted(range(len(rounds)), key=lambda i: rounds[i]["speedup_vs_trl"])
    mid = order[len(order) // 2]
    parts = [
        f"{args.rounds} rounds, each a fresh process running the whole comparison below (contestants "
        "interleaved step by step, medians); per round:",
        C.table(["round", "TRL ms", "jaxalign ms"] + [name for name, _, _ in cols], rows),
        f"The full table of the median round (round {mid + 1}):",
        *rounds[mid]["parts"],
    ]
    numbers = {"rounds": rounds, "median": summary}
    return C.finish(args, C.section_name("dpo_step", prec, args.shapes),
                    C.section_title("DPO step, full fine-tune: jaxalign vs TRL", prec, args.shapes),
                    argv_list, m, parts, numbers)


if __name__ == "__main__":
    main()
