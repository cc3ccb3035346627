"""Memory of a DPO step at 7B-70B scale, on paper: abstract shapes and XLA's memory analysis only.

  python experiments/benchmarks/memory_on_paper.py
  python experiments/benchmarks/memory_on_paper.py --smoke --results ''
  python experiments/benchmarks/memory_on_paper.py --quick   # 65B QLoRA + 7B full FT, this backend
  python experiments/benchmarks/memory_on_paper.py --quick --gpu-target h100   # no GPU needed

`--quick` compiles only the 65B QLoRA step and the 7B full fine-tune step on one device (2 and 3
layers each, extrapolated as below), and the two schedule probes, in this process on JAX's
default backend: on a GPU that is XLA's GPU compiler and memory analysis (still abstract shapes,
nothing allocated), the case the CPU backend's numbers stand in for. No emulated fsdp. Its
section is `memory_on_paper_gpu` on a GPU, `memory_on_paper_quick` on the CPU.
`--gpu-target NAME` (with `--quick`) compiles the same programs with XLA's GPU compiler for the
GPU described in `gpu_targets/NAME.txtpb`, on a machine without one (`gpu_target.py`: needs JAX's
CUDA plugin, `pip install "jax[cuda12]"`); section `memory_on_paper_gpu_target_NAME`.

Nothing of model size is allocated: params, adapters, optimizer state and batch are
`jax.ShapeDtypeStruct`s (`jax.eval_shape` of the real initialisers, NF4 included), and the
jaxalign train step (`make_objective` + `make_train_step`) is lowered and compiled for them;
`compiled.memory_analysis()` gives XLA's per-device argument / output / temporary bytes.

Two methods, per device 1 preference pair (2 sequences) of 512 tokens, DPO, bf16 compute,
rematerialised blocks (`remat=True`), vocabulary-chunked log-probs (8000 columns):
* QLoRA: every Linear kernel of the decoder layers NF4 (block 64, double quantization; embedding,
  LM head and norms bf16), LoRA rank 16 on all 7 linear modules (fp32 adapters, fp32 AdamW),
  reference = the base without the adapter.
* full fine-tune: fp32 master params, fp32 AdamW moments, fp32 grads, a frozen bf16 reference copy.

Compiling 32-80 full layers on CPU is slow, so each configuration is compiled with 2 and 3 layers
and the per-layer difference is extrapolated linearly to the real depth (stated in the table).
Sharding: subprocesses with XLA_FLAGS=--xla_force_host_platform_device_count=N compile the same
step on an fsdp mesh of N emulated devices (params/adapters/optimizer sharded by logical axis,
NF4 buffers split along their flat axis, batch split). An analytic model (parameters, gradients,
optimizer, activations) extends per-device bytes to fsdp sizes 1..256.
Two things make the compiled numbers honest on XLA:CPU (see `probes`): NF4 kernels go through
`jaxalign.quant.nf4_matmul` (dequantization tied to the activation / cotangent, so one dense
kernel is alive at a time instead of every layer's), and `remat=True` uses
`jaxalign.models.remat` (a recomputation tied to the cotangent; XLA:CPU drops `jax.checkpoint`'s
barriers and CSEs the recomputation away, keeping every layer's activations). XLA's CPU backend
still computes bf16 dots in fp32, so its temporaries are larger than an accelerator's would be.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from experiments.benchmarks import common as C  # noqa: E402
from experiments.benchmarks import gpu_target  # noqa: E402

GB = 1e9
NF4_BITS = 4 + 8 / 64 + 32 / (64 * 256)  # 4.127 bits per quantized parameter


@dataclasses.dataclass(frozen=True)
class Arch:
    name: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int = 32000

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


ARCHS = (
    Arch("7B (Llama-2)", 4096, 11008, 32, 32, 32),
    Arch("13B (Llama-2)", 5120, 13824, 40, 40, 40),
    Arch("65B (LLaMA)", 8192, 22016, 80, 64, 64),
    Arch("70B (Llama-2, GQA)", 8192, 28672, 80, 64, 8),
)
SMOKE_ARCHS = (Arch("tiny", 128, 256, 2, 4, 2, vocab=512),)
SEQ, PAIRS, RANK, VOCAB_CHUNK = 512, 1, 16, 8000
SMOKE_SEQ, SMOKE_CHUNK = 32, 128
METHODS = ("qlora", "full")


# ----------------------------------------------------------------------------- analytic model
def counts(a: Arch) -> dict:
    layer_linear = (2 * a.hidden * a.heads * a.head_dim + 2 * a.hidden * a.kv_heads * a.head_dim
                    + 3 * a.hidden * a.intermediate)
    linear = a.layers * layer_linear
    embed_head = 2 * a.vocab * a.hidden
    norms = (2 * a.layers + 1) * a.hidden
    lora = C.lora_params(a.hidden, a.intermediate, a.layers, a.heads, a.kv_heads, a.head_dim, RANK)
    return {"linear": linear, "layer_linear": layer_linear, "embed_head": embed_head, "norms": norms,
            "total": linear + embed_head + norms, "lora": lora}


def activation_bytes(a: Arch, seq: int, pairs: int, chunk: int) -> dict:
    """Per-device activation bytes of the policy forward+backward with per-block remat (bf16 compute).

    saved: each block's input [2p, T, D] bf16, kept for the backward pass.
    layer: the live set while one block is recomputed and differentiated: ~10 [2p, T, D] and
      4 [2p, T, I] bf16 tensors, plus fp32 attention scores and probabilities [2p, H, T, T] (x2).
    head: final hidden [2p, T, D] and one vocabulary chunk of fp32 logits [2p, T, chunk] (x3).
    """
    n = 2 * pairs
    saved = a.layers * n * seq * a.hidden * 2
    layer = n * seq * (10 * a.hidden + 4 * a.intermediate) * 2 + 2 * n * a.heads * seq * seq * 4
    head = n * seq * a.hidden * 4 + 3 * n * seq * chunk * 4
    return {"saved": saved, "layer": layer, "head": head, "total": saved + layer + head}


def analytic(a: Arch, method: str, fsdp: int, seq: int = SEQ, pairs: int = PAIRS,
             chunk: int = VOCAB_CHUNK) -> dict:
    """Per-device bytes for fsdp size `fsdp` (batch of `pairs` per device)."""
    c = counts(a)
    act = activation_bytes(a, seq, pairs, chunk)["total"]
    if method == "qlora":
        weights = (c["linear"] * NF4_BITS / 8 + (c["embed_head"] + c["norms"]) * 2) / fsdp
        trainable = c["lora"] * 4 / fsdp
        grads = c["lora"] * 4 / fsdp
        opt = c["lora"] * 8 / fsdp
        ref = 0.0  # the base without the adapter
        gathered = c["layer_linear"] * 2 * 2 if fsdp > 1 else c["layer_linear"] * 2  # dequantized layer
    else:
        weights = c["total"] * 4 / fsdp
        trainable = 0.0  # the fp32 weights are the trainable params
        grads = c["total"] * 4 / fsdp
        opt = c["total"] * 8 / fsdp
        ref = c["total"] * 2 / fsdp
        gathered = c["layer_linear"] * 2 * 2 if fsdp > 1 else c["layer_linear"] * 2
    total = weights + trainable + grads + opt + ref + act + gathered
    return {"weights": weights, "adapters": trainable, "grads": grads, "optimizer": opt,
            "reference": ref, "activations": act, "gathered_layer": gathered, "total": total}


# ----------------------------------------------------------------------------- compiled (worker)
def nf4_sharding(q, mesh):
    """NamedShardings for an NF4Tensor's buffers: flat codes / absmax split over 'fsdp' when
    divisible, the nested absmax and offset replicated."""
    from jax.sharding import NamedSharding, PartitionSpec as P

    n = mesh.shape["fsdp"]

    def flat(x):
        return NamedSharding(mesh, P("fsdp") if n > 1 and x.shape[0] % n == 0 else P())

    rep = NamedSharding(mesh, P())
    return dataclasses.replace(q, codes=flat(q.codes), absmax=flat(q.absmax),
                               nested_absmax=None if q.nested_absmax is None else rep,
                               offset=None if q.offset is None else rep)


def compile_step(a: Arch, method: str, layers: int, fsdp: int, seq: int, pairs: int, chunk: int, *,
                 reference: str | None = None, remat: bool = True, device=None) -> dict:
    """XLA memory analysis of one jitted DPO step on abstract inputs (`reference` overrides the
    method's default reference mode; 'precomputed' adds the two log-prob vectors to the batch).
    device: compile for this device (a `gpu_target` compile-only one) instead of the default's."""
    import jax
    import jax.numpy as jnp
    import optax
    from jax.sharding import NamedSharding, PartitionSpec as P

    from jaxalign import sharding as jshard
    from jaxalign.losses import dpo_loss
    from jaxalign.models import LlamaConfig, abstract_params, build_model
    from jaxalign.peft import LoraSpec, init_lora, lora_targets
    from jaxalign.quant import NF4Tensor, quantize_params
    from jaxalign.train.objectives import ObjectiveSpec, make_objective
    from jaxalign.train.optim import make_optimizer, make_schedule
    from jaxalign.train.step import init_state, make_train_step

    cfg = LlamaConfig(vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=a.intermediate,
                      num_hidden_layers=layers, num_attention_heads=a.heads,
                      num_key_value_heads=a.kv_heads, head_dim=a.head_dim,
                      max_position_embeddings=max(4096, seq))
    qlora = method == "qlora"
    model = build_model(cfg, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16 if qlora else jnp.float32,
                        remat=remat)
    boxed = abstract_params(model)
    import flax.linen as nn

    params = nn.unbox(boxed)
    key = jax.random.PRNGKey(0)
    spec = LoraSpec(rank=RANK, alpha=2.0 * RANK, targets=lora_targets("llama", "all_linear"))
    optimizer = make_optimizer(name="adamw", learning_rate_fn=make_schedule(
        learning_rate=1e-4, total_steps=1000, schedule="constant"), clip_norm=1.0)
    mesh = jshard.make_mesh(data=1, fsdp=fsdp) if fsdp > 1 else None
    is_nf4 = lambda x: isinstance(x, NF4Tensor)
    if qlora:
        model = model.clone(lora=spec)
        adapters = jax.eval_shape(lambda p: init_lora(p, spec, key), params)
        base = jax.eval_shape(quantize_params, params)
        trainable, frozen, default_ref = {"lora": adapters}, {"params": base}, "base"
    else:
        ref = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.bfloat16), params)
        trainable, frozen, default_ref = {"params": params}, {"ref_params": ref}, "model"
    reference = reference or default_ref
    if reference == "precomputed":
        frozen = {k: v for k, v in frozen.items() if k != "ref_params"}
    state = jax.eval_shape(lambda t: init_state(t, optimizer, key), trainable)
    tok = jax.ShapeDtypeStruct((pairs * fsdp, seq), jnp.int32)
    batch = {f"{s}_{k}": tok for s in ("chosen", "rejected") for k in ("tokens", "attention_mask", "loss_mask")}
    if reference == "precomputed":
        batch.update({f"ref_{s}_logps": jax.ShapeDtypeStruct((pairs * fsdp,), jnp.float32)
                      for s in ("chosen", "rejected")})

    if mesh is not None:
        psh = jshard.param_shardings(boxed, mesh)
        rep = NamedSharding(mesh, P())
        if qlora:
            base_sh = jax.tree.map(lambda q, s: nf4_sharding(q, mesh) if is_nf4(q) else s,
                                   frozen["params"], psh, is_leaf=is_nf4)
            frozen_sh = {"params": base_sh}
            tr_sh = {"lora": jshard.adapter_shardings(adapters, boxed, mesh)}
        else:
            frozen_sh = {"ref_params": psh}
            tr_sh = {"params": psh}
        opt_sh = optax.tree_map_params(optimizer, lambda _, s: s, state["opt_state"], tr_sh,
                                       transform_non_params=lambda _: rep)
        state_sh = {"step": rep, "trainable": tr_sh, "opt_state": opt_sh, "rng": rep}
        attach = lambda t, s: jax.tree.map(
            lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh), t, s)
        state = attach(state, state_sh)
        frozen = attach(frozen, frozen_sh)
        batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=jshard.batch_sharding(mesh, len(v.shape)))
                 for k, v in batch.items()}
    else:
        state_sh = None
    objective = make_objective(model, ObjectiveSpec(kind="preference", loss_fn=dpo_loss,
                                                    loss_kwargs=(("beta", 0.1),), reference=reference,
                                                    vocab_chunk=chunk))
    step = make_train_step(objective, optimizer, state_shardings=state_sh)
    ctx = jax.sharding.use_mesh(mesh) if mesh is not None and hasattr(jax.sharding, "use_mesh") else None
    import contextlib
    import time

    t0 = time.perf_counter()
    with ctx or contextlib.nullcontext(), gpu_target.compiling_for(device):
        compiled = step.lower(state, frozen, batch).compile()
    ma = compiled.memory_analysis()
    out = {k: int(getattr(ma, k + "_size_in_bytes")) for k in ("argument", "output", "alias", "temp")}
    out["peak"] = out["argument"] + out["output"] - out["alias"] + out["temp"]
    out["compile_s"] = time.perf_counter() - t0
    return out


def dequant_probe(d: int, layers=(2, 3), *, device=None) -> dict:
    """XLA temp bytes of jax.grad of a chain x <- tanh(x @ W_i) over L NF4 [d, d] kernels (bf16,
    1024 tokens), written as `x @ dequantize_nf4(Q_i)` ('plain') and as `nf4_matmul(x, Q_i)`.
    A memory-optimal schedule holds one dequantized kernel at a time plus one activation per layer;
    the growth per layer shows what the backend keeps. Returns {variant: {L: bytes}}."""
    import jax
    import jax.numpy as jnp

    from jaxalign.quant import dequantize_nf4, quantize_nf4
    from jaxalign.quant.nf4_matmul import nf4_matmul

    variants = {"plain": lambda x, q: x @ dequantize_nf4(q, x.dtype), "nf4_matmul": nf4_matmul}
    out = {}
    for name, mm in variants.items():
        out[name] = {}
        for n_layers in layers:
            qs = [jax.eval_shape(lambda w: quantize_nf4(w, transposed=True),
                                 jax.ShapeDtypeStruct((d, d), jnp.bfloat16)) for _ in range(n_layers)]

            def loss(x, qs, mm=mm):
                for q in qs:
                    x = jnp.tanh(mm(x, q))
                return x.astype(jnp.float32).sum()

            x = jax.ShapeDtypeStruct((1024, d), jnp.bfloat16)
            with gpu_target.compiling_for(device):
                ma = jax.jit(jax.grad(loss)).lower(x, qs).compile().memory_analysis()
            out[name][n_layers] = int(ma.temp_size_in_bytes)
    return out


def remat_probe(layers=(2, 4), *, hidden: int = 512, seq: int = 512, device=None) -> dict:
    """XLA temp bytes of jax.grad of a small Llama (4 x seq tokens, fp32) without remat,
    with flax's `nn.remat` (jax.checkpoint) on each block, and with jaxalign's `remat=True`.
    Returns {variant: {L: bytes}}."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    from jaxalign.models import LlamaConfig, build_model
    from jaxalign.models import llama as llama_mod

    out = {}
    for name in ("none", "jax.checkpoint", "jaxalign remat"):
        out[name] = {}
        for n_layers in layers:
            cfg = LlamaConfig(vocab_size=512, hidden_size=hidden, intermediate_size=hidden * 8 // 3,
                              num_hidden_layers=n_layers, num_attention_heads=8,
                              num_key_value_heads=8, max_position_embeddings=seq)
            model = build_model(cfg, remat=name == "jaxalign remat")
            params = jax.eval_shape(lambda: nn.unbox(build_model(cfg).init(
                jax.random.PRNGKey(0), jnp.zeros((1, 1), jnp.int32))["params"]))
            if name == "jax.checkpoint":  # the same model with each Block under jax.checkpoint
                orig = llama_mod.Block
                llama_mod.Block = nn.remat(orig, static_argnums=(6,))
            try:
                loss = lambda p, t: jnp.mean(model.apply({"params": p}, t))
                tokens = jax.ShapeDtypeStruct((4, seq), jnp.int32)
                with gpu_target.compiling_for(device):
                    ma = jax.jit(jax.grad(loss)).lower(params, tokens).compile().memory_analysis()
            finally:
                if name == "jax.checkpoint":
                    llama_mod.Block = orig
            out[name][n_layers] = int(ma.temp_size_in_bytes)
    return out


def schedule_probes(smoke: bool, *, device=None) -> dict:
    """Both probes at the run's sizes: their temp bytes ('dequant', 'remat': {variant: {L: bytes}}),
    what each compiles ('dequant_setup', 'remat_setup') and its growth per extra layer as text
    ('dequant_growth', 'remat_growth')."""
    d = 256 if smoke else 4096
    probe = dequant_probe(d, device=device)
    growth = {k: v[3] - v[2] for k, v in probe.items()}
    hidden, seq = (128, 128) if smoke else (512, 512)
    rprobe = remat_probe((1, 2) if smoke else (2, 4), hidden=hidden, seq=seq, device=device)
    lo, hi = sorted(next(iter(rprobe.values())))
    return {
        "dequant": probe, "remat": rprobe,
        "dequant_setup": f"jax.grad of a chain x <- tanh(x @ W_i) over {d} x {d} NF4 kernels, 1024 bf16 tokens",
        "remat_setup": f"jax.grad of a Llama (hidden {hidden}, 4 x {seq} tokens, fp32)",
        "dequant_growth": ", ".join(f"`{k}` {g / 1e6:.1f} MB ({g / d ** 2:.2f} bytes per kernel element)"
                                    for k, g in growth.items()),
        "remat_growth": ", ".join(f"{k} {(v[hi] - v[lo]) / (hi - lo) / 1e6:.1f} MB" for k, v in rprobe.items()),
    }


def worker(argv):
    import argparse
    import json

    p = argparse.ArgumentParser()
    p.add_argument("--jobs", required=True, help="json list of [arch_index, method, layers]")
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--fsdp", type=int, default=1)
    a = p.parse_args(argv)
    archs = SMOKE_ARCHS if a.smoke else ARCHS
    seq, chunk = (SMOKE_SEQ, SMOKE_CHUNK) if a.smoke else (SEQ, VOCAB_CHUNK)
    res = []
    for ai, method, layers in json.loads(a.jobs):
        res.append([ai, method, layers, compile_step(archs[ai], method, layers, a.fsdp, seq, PAIRS, chunk)])
    C.emit({"fsdp": a.fsdp, "results": res})


def quick_main(args, argv) -> dict:
    """--quick: the 65B QLoRA and 7B full fine-tune steps on one device, compiled here on JAX's
    default backend (a GPU's when there is one), 2 and 3 layers extrapolated to the real depth."""
    import time

    target = args.gpu_target
    device = gpu_target.device(target) if target else None
    prec = C.Precision(bf16=True, gpu=C.on_gpu())
    backend = gpu_target.describe(target) if target else (C.gpu_name() if prec.gpu else "CPU")
    m = C.machine(device=True)
    seq, chunk = (SMOKE_SEQ, SMOKE_CHUNK) if args.smoke else (SEQ, VOCAB_CHUNK)
    # (arch, method): the goal's case first, so a cut-short run still has it in its log
    configs = ([(SMOKE_ARCHS[0], "qlora"), (SMOKE_ARCHS[0], "full")] if args.smoke
               else [(ARCHS[2], "qlora"), (ARCHS[0], "full")])
    rows, compiled, raw = [], {}, {}
    for a, meth in configs:
        by = {}
        for layers in (2, 3):
            t0 = time.perf_counter()
            by[layers] = compile_step(a, meth, layers, 1, seq, PAIRS, chunk, device=device)
            C.progress(f"{a.name} {meth} {layers} layers on {backend}: peak {by[layers]['peak'] / GB:.2f} GB, "
                       f"temp {by[layers]['temp'] / GB:.2f} GB, compiled in {time.perf_counter() - t0:.1f} s")
        v = extrapolate(by[2], by[3], a.layers)
        compiled[f"{a.name}|{meth}|fsdp1"] = v
        raw[f"{a.name}|{meth}|fsdp1"] = {"L2": by[2], "L3": by[3]}
        an = analytic(a, meth, 1, seq, PAIRS, chunk)
        C.progress(f"{a.name} {meth} extrapolated to {a.layers} layers: peak {v['peak'] / GB:.2f} GB "
                   f"(analytic {an['total'] / GB:.2f} GB)")
        rows.append([a.name, meth, a.layers, v["argument"] / GB, v["temp"] / GB, v["peak"] / GB,
                     an["total"] / GB, by[2]["compile_s"] + by[3]["compile_s"]])
    # the two schedule probes of the full run, on this backend: what one more layer keeps alive
    t0 = time.perf_counter()
    pr = schedule_probes(args.smoke, device=device)
    C.progress(f"probes on {backend} in {time.perf_counter() - t0:.1f} s, growth per layer: dequant "
               f"{pr['dequant_growth']}; remat {pr['remat_growth']}")
    m["uptime_end"] = C.load_average()
    numbers = {"compiled": compiled, "raw": raw, "backend": backend,
               "dequant_probe_temp_bytes": pr["dequant"], "remat_probe_temp_bytes": pr["remat"]}
    goal_key = f"{configs[0][0].name}|qlora|fsdp1"
    goal = compiled[goal_key]["peak"] / GB
    an_goal = analytic(configs[0][0], "qlora", 1, seq, PAIRS, chunk)["total"] / GB
    numbers["qlora_65b_single_device_gb"] = goal if not args.smoke else None
    numbers["goal_config_gb"] = goal
    numbers["goal_config_analytic_gb"] = an_goal
    where = (f"XLA's GPU compiler for {backend}, with a compile-only device (no GPU in this machine; "
             f"JAX {m['versions']['jax']} and its CUDA plugin)" if target
             else f"XLA's GPU backend ({backend}; JAX backend `{C.jax_backend()}`)" if prec.gpu
             else "XLA's CPU backend")
    parts = [
        (f"Per device: {PAIRS} pair ({2 * PAIRS} sequences) x {seq} tokens, DPO (policy forward+backward, "
         f"reference forward), bf16 compute, remat per block, vocab_chunk={chunk}; LoRA rank {RANK}. "
         f"`memory_analysis()` of the jitted step compiled by {where} for abstract inputs (nothing "
         "allocated), one device, with 2 and 3 layers, extrapolated linearly to the real depth "
         "(m(L) = m(2) + (L-2)(m(3)-m(2))); peak = arguments + outputs - aliased (donated) + "
         "temporaries. Same programs as the CPU section `memory_on_paper` (fsdp 1 rows)."),
        C.table(["model", "method", "layers", "compiled args GB", "compiled temp GB", "compiled peak GB",
                 "analytic GB", "compile s (2+3 layers)"], rows),
        (f"Goal, {configs[0][0].name} QLoRA DPO step on one 48 GB device: compiled on {where} and "
         f"extrapolated {goal:.1f} GB ({'fits' if goal <= 48 else 'does NOT fit'}); analytic "
         f"{an_goal:.1f} GB ({'fits' if an_goal <= 48 else 'does NOT fit'})."),
        (f"Probes on {where}, temp growth per extra layer (the full run's probes 1 and 2): "
         f"{pr['dequant_setup']}: {pr['dequant_growth']}; {pr['remat_setup']}: {pr['remat_growth']}. "
         "One dequantized kernel kept per layer would be 2 (bf16) or 4 (fp32) bytes per element."),
        f"Load at end: `{m['uptime_end']}`.",
    ]
    numbers["gpu_target"] = target or None
    name = (f"memory_on_paper_gpu_target_{target}" if target
            else "memory_on_paper_gpu" if prec.gpu else "memory_on_paper_quick")
    title = ("Memory on paper, quick: 65B QLoRA and 7B full fine-tune DPO steps, compiled for "
             + (f"the {backend.split(' (')[0]} without one" if target
                else f"the GPU ({backend})" if prec.gpu else "the CPU"))
    return C.finish(args, name, title, argv, m, parts, numbers)


def extrapolate(m2: dict, m3: dict, layers: int) -> dict:
    """Linear in depth from 2 and 3 layers: m(L) = m(2) + (L - 2) (m(3) - m(2))."""
    return {k: m2[k] + (layers - 2) * (m3[k] - m2[k]) for k in ("argument", "output", "alias", "temp", "peak")}


# ----------------------------------------------------------------------------- main
def main(argv=None):
    if (wargv := C.worker_argv(argv)) is not None:  # a subprocess started by run_worker
        return worker(wargv)
    import json

    p = C.parser(__doc__.splitlines()[0])
    p.add_argument("--fsdp-compiled", default="", help="emulated fsdp sizes to compile (default 2,4,8)")
    p.add_argument("--sharded-archs", default="", help="arch indices compiled sharded (default 0,2)")
    p.add_argument("--quick", action="store_true",
                   help="only the 65B QLoRA and 7B full fine-tune steps on one device, compiled in this "
                        "process on JAX's default backend (the GPU's XLA where there is one)")
    p.add_argument("--gpu-target", default="", choices=[""] + gpu_target.names(),
                   help="with --quick: compile for this GPU (gpu_targets/NAME.txtpb) without one; "
                        "needs JAX's CUDA plugin")
    args = p.parse_args(argv)
    if args.gpu_target and not args.quick:
        p.error("--gpu-target compiles the --quick programs only: add --quick")
    if args.gpu_target:
        gpu_target.prepare()  # before JAX starts its backends
    if args.quick:
        return quick_main(args, argv)
    archs = SMOKE_ARCHS if args.smoke else ARCHS
    seq, chunk = (SMOKE_SEQ, SMOKE_CHUNK) if args.smoke else (SEQ, VOCAB_CHUNK)
    fsdp_sizes = [int(x) for x in args.fsdp_compiled.split(",")] if args.fsdp_compiled else ([2] if args.smoke else [2, 4, 8])
    sharded = [int(x) for x in args.sharded_archs.split(",")] if args.sharded_archs else ([0] if args.smoke else [0, 2])
    m = C.machine()
    here = str(Path(__file__).resolve())
    extra = ["--smoke"] if args.smoke else []
    compiled = {}  # (arch, method, fsdp) -> extrapolated dict
    raw = {}
    for fsdp in [1] + fsdp_sizes:
        idx = range(len(archs)) if fsdp == 1 else sharded
        methods = ("full",) if args.smoke and fsdp > 1 else METHODS  # smoke: keep CI short
        jobs = [[i, meth, L] for i in idx for meth in methods for L in (2, 3)]
        r = C.run_worker(here, extra + ["--fsdp", str(fsdp), "--jobs", json.dumps(jobs)],
                         devices=fsdp, timeout=3600)
        by = {(ai, meth, L): v for ai, meth, L, v in r["results"]}
        for i in idx:
            for meth in methods:
                m2, m3 = by[(i, meth, 2)], by[(i, meth, 3)]
                compiled[(i, meth, fsdp)] = extrapolate(m2, m3, archs[i].layers)
                raw[f"{archs[i].name}|{meth}|fsdp{fsdp}"] = {"L2": m2, "L3": m3}
    m["uptime_end"] = C.load_average()

    rows_c = []
    for (i, meth, fsdp), v in sorted(compiled.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][2])):
        a = archs[i]
        an = analytic(a, meth, fsdp, seq, PAIRS, chunk)
        l2 = raw[f"{a.name}|{meth}|fsdp{fsdp}"]["L2"]
        l3 = raw[f"{a.name}|{meth}|fsdp{fsdp}"]["L3"]
        per_layer = (l3["temp"] - l2["temp"]) / (counts(a)["layer_linear"] / fsdp)
        rows_c.append([a.name, meth, fsdp, v["argument"] / GB, v["temp"] / GB, v["peak"] / GB,
                       an["total"] / GB, per_layer, l2["compile_s"] + l3["compile_s"]])
    pr = schedule_probes(args.smoke)
    fsdp_all = [1, 2, 4, 8, 16, 32, 64, 128, 256]
    rows_a = []
    for a in archs:
        for meth in METHODS:
            rows_a.append([a.name, meth] + [analytic(a, meth, n, seq, PAIRS, chunk)["total"] / GB for n in fsdp_all])
    rows_b = []
    for a in archs:
        for meth in METHODS:
            an = analytic(a, meth, 1, seq, PAIRS, chunk)
            rows_b.append([a.name, meth, counts(a)["total"] / 1e9, counts(a)["lora"] / 1e6]
                          + [an[k] / GB for k in ("weights", "adapters", "grads", "optimizer", "reference",
                                                  "activations", "gathered_layer", "total")])
    numbers = {"compiled": {f"{archs[i].name}|{meth}|fsdp{f}": v for (i, meth, f), v in compiled.items()},
               "raw": raw,
               "analytic": {f"{a.name}|{meth}|fsdp{n}": analytic(a, meth, n, seq, PAIRS, chunk)
                            for a in archs for meth in METHODS for n in fsdp_all}}
    goal = None
    for i, a in enumerate(archs):
        if a.name.startswith("65B") and (i, "qlora", 1) in compiled:
            goal = compiled[(i, "qlora", 1)]["peak"] / GB
    numbers["qlora_65b_single_device_gb"] = goal
    numbers["dequant_probe_temp_bytes"] = pr["dequant"]
    numbers["remat_probe_temp_bytes"] = pr["remat"]
    a65 = [a for a in archs if a.name.startswith("65B")]
    numbers["qlora_65b_analytic_gb"] = analytic(a65[0], "qlora", 1)["total"] / GB if a65 else None
    parts = [
        f"Per device: {PAIRS} pair ({2 * PAIRS} sequences) x {seq} tokens, DPO (policy forward+backward, "
        f"reference forward), bf16 compute, remat per block, vocab_chunk={chunk}; LoRA rank {RANK} on "
        "q/k/v/o/gate/up/down. Compiled numbers: XLA `memory_analysis()` of the jitted step compiled with "
        "2 and 3 layers, extrapolated linearly to the real depth (m(L) = m(2) + (L-2)(m(3)-m(2))); "
        "peak = arguments + outputs - aliased (donated) + temporaries. fsdp > 1: emulated host devices "
        "(one subprocess per size), numbers per device.",
        C.table(["model", "method", "fsdp", "compiled args GB", "compiled temp GB",
                 "compiled peak GB / device", "analytic GB / device",
                 "compiled temp per extra layer, bytes / (layer params / fsdp)", "compile s (2+3 layers)"], rows_c),
        f"Probe 1 (NF4 dequantization schedule): XLA temp of {pr['dequant_setup']}; growth per extra "
        f"layer: {pr['dequant_growth']}"
        + ". With `x @ dequantize_nf4(Q)` XLA:CPU hoists every layer's dequantization (a gather from the "
        "16-entry codebook into an fp32 [n] buffer) to the start and keeps the results for the "
        "backward pass; `nf4_matmul` (what the models use) dequantizes with a fusible select tree, tied "
        "to the activation in the forward and to the cotangent in the backward, and saves only the "
        "quantized weight, so the growth left is the per-layer activation.",
        f"Probe 2 (rematerialisation): XLA temp of {pr['remat_setup']}, growth per extra layer: "
        f"{pr['remat_growth']}"
        + ". XLA:CPU drops jax.checkpoint's optimization barriers before CSE, so flax's `nn.remat` "
        "keeps every activation; `jaxalign.models.remat` ties the recomputation to the cotangent and "
        "keeps one block input per layer.",
        "Analytic per-device bytes by component at fsdp = 1 (GB; weights: NF4 at 4.127 bits + bf16 "
        "embedding/LM head/norms for QLoRA, fp32 master for full FT):",
        C.table(["model", "method", "params (B)", "LoRA params (M)", "weights", "adapters", "grads",
                 "optimizer", "reference", "activations", "gathered layer", "total"], rows_b),
        "Analytic total GB per device vs fsdp size (per-device batch fixed; activations and one "
        "all-gathered layer do not shrink with N):",
        C.table(["model", "method"] + [f"fsdp {n}" for n in fsdp_all], rows_a),
    ]
    if goal is not None:
        an65 = numbers["qlora_65b_analytic_gb"]
        parts.append(f"Goal, 65B QLoRA DPO step on one 48 GB device: analytic {an65:.1f} GB "
                     f"({'fits' if an65 <= 48 else 'does NOT fit'}); XLA-CPU compiled and extrapolated "
                     f"{goal:.1f} GB ({'fits' if goal <= 48 else 'does NOT fit'}); XLA:CPU computes bf16 dots in "
                     "fp32, so its temporaries overstate an accelerator's.")
    parts.append(f"Load at end: `{m['uptime_end']}`.")
    return C.finish(args, "memory_on_paper", "Memory on paper: 7B-70B DPO steps (QLoRA, full fine-tune)",
                    argv, m, parts, numbers)


if __name__ == "__main__":
    main()
