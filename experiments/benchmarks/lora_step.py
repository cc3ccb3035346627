"""DPO step with LoRA and QLoRA: jaxalign vs TRL + PEFT (+ bitsandbytes), side by side.

  python experiments/benchmarks/lora_step.py
  python experiments/benchmarks/lora_step.py --smoke --results ''
  python experiments/benchmarks/lora_step.py --bf16 [--shapes medium]   # e.g. on a GPU

On a GPU everything runs there, and `--bf16` is mixed precision on both sides, as in dpo_step.py
(TRL `bf16=True` autocast, jaxalign `compute_dtype=bfloat16`; fp32 base weights, fp32 adapters
except TRL's QLoRA adapters, which TRL casts to bf16); bitsandbytes then computes in bf16
(`bnb_4bit_compute_dtype=bfloat16`). GPU runs write the sections `lora_step_gpu[_medium]`.

Same model, data, loss and optimizer as dpo_step.py (vocab 4096, hidden 256, 4 layers, 8 pairs of
64 + 64 tokens, fp32 compute, sigmoid DPO beta 0.1, AdamW + clip 1.0), with LoRA rank 16,
alpha 32, no dropout, on all linear modules of the decoder layers (q/k/v/o/gate/up/down; not the
LM head). The reference is the base model without the adapter on both sides (TRL disables the
adapter; jaxalign calls the same module without the 'lora' collection).

* LoRA: jaxalign `LoraSpec(targets=lora_targets('llama', 'all_linear'))` + `init_lora`, training
  the adapter tree only; TRL `DPOTrainer(peft_config=LoraConfig(target_modules='all-linear'))`.
* QLoRA: the base Linear kernels in NF4 (block 64, double quantization). jaxalign
  `quantize_params` (NF4Tensor leaves, dequantised inside the jitted step); TRL loads the model
  with `BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type='nf4',
  bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=float32)` on CPU. Note TRL casts the
  trainable adapter weights of a quantized model to bf16 (its QLoRA recipe); jaxalign keeps fp32.
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
from experiments.benchmarks import dpo_step as D  # noqa: E402

RANK, ALPHA = 16, 32.0
LORA_1T = "trl + peft (LoRA), torch.set_num_threads(1)"
QLORA_1T = "trl + peft + bitsandbytes (QLoRA), torch.set_num_threads(1)"


def main(argv=None):
    p = C.parser(__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=0, help="timed steps per contestant")
    p.add_argument("--warmup", type=int, default=2)
    C.add_host_memory_flag(p)
    C.add_precision_flag(p)
    C.add_shapes_flag(p)
    args = p.parse_args(argv)
    malloc_line = C.host_memory_setting(args)
    prec = D.set_precision(C.precision(args))
    import transformers
    from peft import LoraConfig

    from jaxalign.peft import LoraSpec, lora_targets

    _, s = C.shapes_of(args)
    steps = args.steps or (2 if args.smoke else 10)
    warmup = 1 if args.smoke else args.warmup
    m = C.machine(device=True)
    n_batches = 2 if args.smoke else 4
    spec = LoraSpec(rank=RANK, alpha=ALPHA, targets=lora_targets("llama", "all_linear"))
    peft_cfg = lambda: LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, target_modules="all-linear",
                                  task_type="CAUSAL_LM")
    bnb = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                          bnb_4bit_use_double_quant=True,
                                          bnb_4bit_compute_dtype=prec.torch_dtype())
    notes = []
    with tempfile.TemporaryDirectory() as d:
        model_dir = C.save_tiny_llama(os.path.join(d, "model"), s)
        tok = C.word_tokenizer(s.vocab)
        rows = C.preference_rows(n_batches * s.pairs, s)
        trl_lora = D.make_trl_trainer(model_dir, tok, rows, s, os.path.join(d, "lora"), peft_config=peft_cfg())
        batches = D.trl_batches(trl_lora, s, n_batches)
        # jaxalign's defaults: prefix sharing (each pair one row), LM head at completion positions
        jb = [C.trl_to_jaxalign_shared(b) for b in batches]
        k_head = C.trl_to_jaxalign(batches[0])["chosen_loss_index"].shape[1]  # completion positions
        packed_len = jb[0]["packed_tokens"].shape[1]
        jx_lora, info_lora = D.make_jaxalign_step(model_dir, jb, lora_spec=spec)
        jx_q, info_q = D.make_jaxalign_step(model_dir, jb, lora_spec=spec, nf4=True)
        trl_lora_fn = D.trl_step_fn(trl_lora, batches)
        fns = {"trl + peft (LoRA)": trl_lora_fn, "jaxalign LoRA": jx_lora,
               LORA_1T: D.with_torch_threads(trl_lora_fn, 1)}
        try:
            trl_q = D.make_trl_trainer(model_dir, tok, rows, s, os.path.join(d, "qlora"),
                                       peft_config=peft_cfg(), quantization_config=bnb)
            trl_q_fn = D.trl_step_fn(trl_q, D.trl_batches(trl_q, s, n_batches))
            fns["trl + peft + bitsandbytes (QLoRA)"] = trl_q_fn
            fns[QLORA_1T] = D.with_torch_threads(trl_q_fn, 1)
            trl_trainable = sum(p.numel() for p in trl_q.model.parameters() if p.requires_grad)
            notes.append(f"TRL QLoRA trainable params: {trl_trainable:,} (dtype "
                         f"{next(p.dtype for p in trl_q.model.parameters() if p.requires_grad)}).")
        except Exception as e:  # noqa: BLE001 - documented in the results instead
            notes.append(f"TRL + bitsandbytes QLoRA on {'GPU' if prec.gpu else 'CPU'} failed: "
                         f"{type(e).__name__}: {e}")
        fns["jaxalign QLoRA (NF4 base)"] = jx_q
        first = {k: fns[k]() for k in list(fns) if k.startswith("trl") and "set_num_threads" not in k}
        probes, probe_flops, n_peak = D.peak_fns(args.smoke)
        fns.update(probes)
        times = C.alternate(fns, steps=steps, warmup=warmup)
        trl_lora_params = sum(p.numel() for p in trl_lora.model.parameters() if p.requires_grad)
    m["uptime_end"] = C.load_average()

    # the LM head counted where each runs: TRL on CPU at seq_len - 1 positions (on CUDA at the
    # completion positions), jaxalign (loss index) at the completion positions
    t_trl = D.trl_head_positions(s, k_head)
    fl = C.dpo_step_flops(s, reference_forward=True, lora_rank=RANK, head_positions=t_trl)
    fl_jx = C.dpo_step_flops(s, reference_forward=True, lora_rank=RANK, head_positions=k_head,
                             packed_len=packed_len)
    meta = {"trl + peft (LoRA)": dict(flops=fl, baseline="trl + peft (LoRA)", lib="torch"),
            "jaxalign LoRA": dict(flops=fl_jx, baseline="trl + peft (LoRA)", lib="jax",
                                  xla_flops=info_lora["xla_flops"])}
    meta[LORA_1T] = dict(flops=fl, baseline="trl + peft (LoRA)", lib="torch")
    q_base = "trl + peft + bitsandbytes (QLoRA)"
    if q_base in times:
        meta[q_base] = dict(flops=fl, baseline=q_base, lib="torch")
        meta[QLORA_1T] = dict(flops=fl, baseline=q_base, lib="torch")
    meta["jaxalign QLoRA (NF4 base)"] = dict(flops=fl_jx, baseline=q_base if q_base in times else "trl + peft (LoRA)",
                                             lib="jax", xla_flops=info_q["xla_flops"])
    tokens = s.tokens_per_step
    rows_out, med, peak = D.step_rows(times, meta, probe_flops, tokens)
    numbers = {"shapes": dataclasses.asdict(s), "peak_flops": peak, "median_s": med, "times": times,
               "tokens_per_s": {k: tokens / med[k] for k in meta},
               "lora_speedup_vs_trl": med["trl + peft (LoRA)"] / med["jaxalign LoRA"],
               "lora_speedup_vs_best_trl": min(med["trl + peft (LoRA)"], med[LORA_1T]) / med["jaxalign LoRA"],
               "first_loss": {**first, "jaxalign LoRA": info_lora["first_loss"],
                              "jaxalign QLoRA": info_q["first_loss"]},
               "trainable_params": {"jaxalign": info_lora["trainable_params"], "trl": trl_lora_params}}
    if q_base in med:
        numbers["qlora_speedup_vs_trl"] = med[q_base] / med["jaxalign QLoRA (NF4 base)"]
        numbers["qlora_speedup_vs_best_trl"] = min(med[q_base], med[QLORA_1T]) / med["jaxalign QLoRA (NF4 base)"]
    hd = s.hidden // s.heads
    parts = [
        D.shapes_line(s, steps, warmup) + f" LoRA rank {RANK}, alpha {ALPHA:g}, all 7 linear modules "
        f"per layer; trainable params jaxalign {info_lora['trainable_params']:,} / TRL+PEFT {trl_lora_params:,}.",
        C.table(D.step_headers(), rows_out),
        D.peak_line(peak, n_peak) + " Model FLOPs (LoRA): frozen base forward + activation gradient "
        "= 2 x (2 N tokens + attention), adapters 3 x 2 N_lora tokens, reference forward 2 N tokens + "
        f"attention; N = {C.linear_params(s.hidden, s.intermediate, s.layers, s.heads, s.heads, hd, s.vocab):,}, "
        f"N_lora = {C.lora_params(s.hidden, s.intermediate, s.layers, s.heads, s.heads, hd, RANK):,}; "
        f"the LM head counted where it runs: TRL at {t_trl} positions per sequence (every position on "
        f"CPU, the loss positions on CUDA), jaxalign (loss index from its collator) at the {k_head} "
        f"completion positions. jaxalign runs its default prefix sharing: each pair one row "
        f"[prompt | chosen | rejected] of {packed_len} positions instead of two of {s.seq_len}, FLOPs "
        "counted over those positions. Attention is counted over the (query, key) pairs the causal "
        "mask lets a query see, for both libraries.",
        "First-step losses (all start at log 2 = 0.693147 since B = 0): "
        + ", ".join(f"{k} {v:.6f}" for k, v in numbers["first_loss"].items()) + ".",
        *notes,
        malloc_line,
        f"Load at end: `{m['uptime_end']}`.",
    ]
    numbers["precision"] = {"bf16": prec.bf16, "gpu": prec.gpu}
    return C.finish(args, C.section_name("lora_step", prec, args.shapes),
                    C.section_title("DPO step with LoRA / QLoRA: jaxalign vs TRL + PEFT (+ bitsandbytes)",
                                    prec, args.shapes), argv, m, parts, numbers)


if __name__ == "__main__":
    main()
