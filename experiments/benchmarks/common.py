"""Shared helpers for the benchmark scripts: machine description, side-by-side timing, tables,
RESULTS.md sections, a tiny word-level tokenizer and Llama checkpoint, analytic FLOP counts.

Each script owns one section of RESULTS.md, delimited by
`<!-- BEGIN bench:<name> -->` / `<!-- END bench:<name> -->`; `write_section` replaces that section
in place (or appends it) and leaves every other section untouched.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib.metadata
import json
import math
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
RESULTS = HERE / "RESULTS.md"
PACKAGES = ("jax", "jaxlib", "flax", "optax", "torch", "transformers", "trl", "peft", "bitsandbytes")

# JAX and torch share one GPU inside each benchmark process: JAX must not grab 75% of the device
# memory at start-up (its default), or torch's allocations fail.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")


# ----------------------------------------------------------------------------- command line
def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description, allow_abbrev=False)
    p.add_argument("--smoke", action="store_true", help="tiny shapes, few steps (CI smoke test)")
    p.add_argument("--results", default=str(RESULTS),
                   help="markdown file whose bench section is replaced ('' to skip writing)")
    p.add_argument("--json", default="", help="also write the raw numbers here")
    return p


def add_precision_flag(p: argparse.ArgumentParser) -> None:
    """--bf16: mixed precision (fp32 master weights, bf16 compute) for the step benchmarks."""
    p.add_argument("--bf16", action="store_true",
                   help="bf16 compute with fp32 master weights: TRL with bf16=True (autocast), "
                        "jaxalign with compute_dtype=bfloat16, matmul peaks in bf16 (default: fp32)")


@dataclasses.dataclass(frozen=True)
class Precision:
    """What a run computes in and where. `gpu`: JAX's default backend is a GPU (then torch runs
    on CUDA too)."""
    bf16: bool = False
    gpu: bool = False

    @property
    def name(self) -> str:
        return "bf16" if self.bf16 else "fp32"

    @property
    def describe(self) -> str:
        if not self.bf16:
            return "fp32"
        return ("fp32 master weights, bf16 compute (TRL: `bf16=True`, torch autocast; jaxalign: "
                "`compute_dtype=bfloat16`)")

    def jax_dtype(self):
        import jax.numpy as jnp

        return jnp.bfloat16 if self.bf16 else jnp.float32

    def torch_dtype(self):
        import torch

        return torch.bfloat16 if self.bf16 else torch.float32

    def torch_device(self):
        import torch

        return torch.device("cuda" if self.gpu else "cpu")


def precision(args) -> Precision:
    return Precision(bf16=bool(getattr(args, "bf16", False)), gpu=on_gpu())


def section_name(base: str, prec: Precision, shapes: str = "tiny") -> str:
    """RESULTS.md section of a run: `base` for the CPU fp32 runs (unchanged), then `_gpu`,
    `_bf16` on CPU / `_fp32` on GPU (bf16 is the GPU default), and the shape set if not tiny:
    dpo_step, dpo_step_gpu, dpo_step_gpu_medium, dpo_step_bf16, ..."""
    name = base
    if prec.gpu:
        name += "_gpu" + ("" if prec.bf16 else "_fp32")
    elif prec.bf16:
        name += "_bf16"
    return name + ("" if shapes in ("", "tiny") else f"_{shapes}")


def section_title(title: str, prec: Precision, shapes: str = "tiny") -> str:
    tags = ([f"GPU ({gpu_name()})"] if prec.gpu else []) + ([prec.name] if prec.bf16 or prec.gpu else [])
    if shapes not in ("", "tiny"):
        tags.append(f"{shapes} shapes")
    return title + (f" [{', '.join(tags)}]" if tags else "")


def add_host_memory_flag(p: argparse.ArgumentParser) -> None:
    """--system-malloc, for the training-step benchmarks (see `host_memory_setting`)."""
    p.add_argument("--system-malloc", action="store_true",
                   help="leave glibc's malloc settings alone (default: jaxalign.host_memory."
                        "reuse_freed_memory(), as jaxalign's command-line entry points do; it "
                        "applies to every contestant in the process)")


def host_memory_setting(args) -> str:
    """Applies jaxalign's host-memory setting unless --system-malloc; returns a line for RESULTS."""
    if getattr(args, "system_malloc", False):
        return "Host memory: glibc malloc defaults (`--system-malloc`)."
    from jaxalign.host_memory import reuse_freed_memory

    applied = reuse_freed_memory()
    return ("Host memory: `jaxalign.host_memory.reuse_freed_memory()` " +
            ("applied" if applied else "not available here") +
            " at process start (as jaxalign's command-line entry points do): one malloc arena, no "
            "mmap, no trimming, for every contestant in the process.")


def command_line(argv: Sequence[str] | None) -> str:
    script = Path(sys.argv[0]).resolve()
    try:
        script = script.relative_to(REPO)
    except ValueError:
        pass
    args = list(sys.argv[1:] if argv is None else argv)
    return "python " + " ".join(shlex.quote(a) for a in [str(script), *args])


# ----------------------------------------------------------------------------- machine
def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def load_average() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "load average: %.2f, %.2f, %.2f" % os.getloadavg()


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "absent"
    return out


GPU_BACKENDS = ("gpu", "cuda", "rocm")
# Dense bf16 tensor-core peaks from the vendors' datasheets (no sparsity), by device-name fragment;
# the first match wins, so the specific names come first.
SPEC_BF16_PEAK = (("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("GH200", 989e12), ("H200", 989e12),
                  ("H100", 989e12), ("H800", 989e12), ("A100", 312e12))


def on_gpu() -> bool:
    """True when JAX's default backend is a GPU (the benchmarks then put torch on CUDA too)."""
    import jax

    return jax.default_backend() in GPU_BACKENDS


def gpu_name() -> str:
    import jax

    return jax.devices()[0].device_kind


def jax_backend() -> str:
    import jax

    return jax.default_backend()


def spec_bf16_peak(name: str | None) -> float | None:
    """The datasheet's dense bf16 FLOP/s of a GPU named `name` (H100 SXM / H200: 989e12), or None."""
    for frag, flops in SPEC_BF16_PEAK:
        if name and frag.lower() in name.lower():
            return flops
    return None


def accelerator() -> dict | None:
    """JAX's backend and devices, and what torch sees; None on a CPU-only run."""
    import jax

    if not on_gpu():
        return None
    out = {"jax_backend": jax.default_backend(), "jax_devices": len(jax.devices()),
           "name": gpu_name(), "spec_bf16_flops": spec_bf16_peak(gpu_name())}
    try:
        import torch

        if torch.cuda.is_available():
            out["torch_device"] = torch.cuda.get_device_name(0)
            out["torch_cuda"] = torch.version.cuda
    except ImportError:
        pass
    return out


def machine(*, device: bool = False) -> dict:
    """The machine's description; `device=True` adds the accelerator (imports jax) when JAX's
    default backend is a GPU."""
    out = {
        "nproc": os.cpu_count(),
        "cpu": cpu_model(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "uptime": load_average(),
        "versions": versions(),
    }
    acc = accelerator() if device else None
    if acc:
        out["accelerator"] = acc
    return out


def machine_lines(m: dict) -> list[str]:
    v = ", ".join(f"{k} {val}" for k, val in m["versions"].items())
    lines = [f"- machine: `nproc`={m['nproc']}, CPU: {m['cpu']}"]
    acc = m.get("accelerator")
    if acc:
        spec = acc.get("spec_bf16_flops")
        lines.append(f"- GPU: {acc['name']} (JAX backend `{acc['jax_backend']}`, {acc['jax_devices']} "
                     f"device(s); torch: {acc.get('torch_device', 'no CUDA')}, CUDA "
                     f"{acc.get('torch_cuda')}); datasheet dense bf16 peak "
                     + (f"{spec / 1e12:.0f} TFLOP/s" if spec else "unknown"))
    return lines + [f"- date: {m['date']}; load at start: `{m['uptime']}`", f"- versions: {v}"]


def progress(msg: str) -> None:
    """A timestamped progress line on stderr (where a GPU run's time goes: loads, compiles)."""
    print(f"[{time.strftime('%H:%M:%S')} +{time.perf_counter() - _T0:.1f}s] {msg}", file=sys.stderr,
          flush=True)


_T0 = time.perf_counter()


# ----------------------------------------------------------------------------- timing
def median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs)) if xs else float("nan")


def alternate(fns: dict[str, Callable[[], object]], *, steps: int, warmup: int = 1,
              block: int = 1, before: Callable[[], object] | None = None) -> dict[str, list[float]]:
    """Times each callable `steps` times after `warmup` untimed calls, interleaving them round by
    round (the order rotates each round) so that load changes hit every contestant alike.

    `block` > 1: each turn is `block` consecutive timed calls of one contestant (steps * block
    calls each), so that most calls find the caches and threads as the contestant's own previous
    call left them, not as a competitor's did.

    `before`: called, untimed, before every timed call (e.g. a cache flush, so that every call
    starts from the same state whoever ran last).

    Each callable must block until its work is done. Returns name -> list of seconds."""
    if block < 1:
        raise ValueError(f"block must be >= 1, got {block}")
    names = list(fns)
    for _ in range(warmup):
        for n in names:
            fns[n]()
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(steps):
        order = names[r % len(names):] + names[:r % len(names)]
        for n in order:
            for _ in range(block):
                if before is not None:
                    before()
                t0 = time.perf_counter()
                fns[n]()
                times[n].append(time.perf_counter() - t0)
    return times


def jax_matmul(n: int = 2048, dtype=None, reps: int = 1):
    """(fn, flops): fn() runs `reps` jitted [n, n] @ [n, n] matmuls of `dtype` (default fp32; random
    data) on JAX's default device and blocks on the last. Put it in the `alternate` dict to measure
    the machine's matmul peak under the same load as the steps."""
    import jax
    import jax.numpy as jnp

    dtype = dtype or jnp.float32
    a = jax.random.normal(jax.random.PRNGKey(0), (n, n), dtype)
    b = jax.random.normal(jax.random.PRNGKey(1), (n, n), dtype)
    f = jax.jit(lambda x, y: x @ y)
    f(a, b).block_until_ready()

    def run():
        for _ in range(reps - 1):  # dispatched asynchronously, run back to back
            f(a, b)
        return f(a, b).block_until_ready()

    return run, 2.0 * n ** 3 * reps


def torch_matmul(n: int = 2048, dtype=None, device=None, reps: int = 1):
    """(fn, flops) for torch's [n, n] @ [n, n] matmul (the BLAS / cuBLAS TRL runs on), `reps` per
    call; on CUDA the call synchronizes, so its time is the GPU's."""
    import torch

    dtype = dtype or torch.float32
    device = torch.device(device or "cpu")
    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    cuda = device.type == "cuda"

    def run():
        for _ in range(reps):
            c = a @ b
        if cuda:
            torch.cuda.synchronize()
        return c

    run()
    return run, 2.0 * n ** 3 * reps


def xla_flops(compiled) -> float | None:
    """FLOPs from XLA's `cost_analysis()` of a compiled computation, or None."""
    try:
        ca = compiled.cost_analysis()
    except Exception:  # noqa: BLE001 - backends may not implement it
        return None
    if isinstance(ca, (list, tuple)):
        ca = ca[0] if ca else None
    if not ca or "flops" not in ca:
        return None
    return float(ca["flops"])


# ----------------------------------------------------------------------------- tables / results
def fmt(x, digits: int = 3) -> str:
    if isinstance(x, str):
        return x
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "n/a"
    if isinstance(x, int):
        return f"{x:,}"
    ax = abs(x)
    if ax >= 1e4:
        return f"{x:,.0f}"
    return f"{x:.{digits}g}"


def table(headers: Sequence[str], rows: Sequence[Sequence]) -> str:
    cells = [[fmt(c) for c in r] for r in rows]
    out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in cells]
    return "\n".join(out)


def write_section(name: str, body: str, path: str | os.PathLike | None = RESULTS) -> None:
    """Replaces (or appends) the `bench:<name>` section of the markdown file at `path`."""
    if not path:
        return
    path = Path(path)
    begin, end = f"<!-- BEGIN bench:{name} -->", f"<!-- END bench:{name} -->"
    block = f"{begin}\n{body.rstrip()}\n{end}\n"
    text = path.read_text() if path.exists() else "# Benchmark results\n\n"
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end) + r"\n?", re.S)
    if pattern.search(text):
        text = pattern.sub(lambda _: block, text, count=1)
    else:
        text = text.rstrip("\n") + "\n\n" + block
    path.write_text(text)


def section(title: str, command: str, m: dict, parts: Sequence[str]) -> str:
    lines = [f"## {title}", "", f"Command: `{command}`", "", *machine_lines(m), ""]
    return "\n".join(lines + [p.rstrip() + "\n" for p in parts])


def dump_json(path: str, obj) -> None:
    if path:
        Path(path).write_text(json.dumps(obj, indent=2, default=float))


def finish(args, name: str, title: str, argv, m: dict, parts: Sequence[str], numbers: dict) -> dict:
    if m.get("accelerator"):
        numbers.setdefault("accelerator", m["accelerator"])
    text = section(title, command_line(argv), m, parts)
    print(text)
    write_section(name, text, args.results)
    dump_json(args.json, numbers)
    return numbers


# ----------------------------------------------------------------------------- subprocess workers
def run_worker(module_file: str, worker_args: Sequence[str], *, devices: int | None = None,
               extra_xla_flags: str = "", timeout: float = 1800) -> dict:
    """Runs `python module_file --worker ...` in a fresh process (optionally with N host devices)
    and returns the JSON object it prints on its last stdout line starting with 'RESULT '."""
    env = dict(os.environ)
    flags = env.get("XLA_FLAGS", "")
    flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", flags)
    if devices:
        flags += f" --xla_force_host_platform_device_count={devices}"
    if extra_xla_flags:
        flags += " " + extra_xla_flags
    env["XLA_FLAGS"] = flags.strip()
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, module_file, "--worker", *worker_args], env=env,
                          capture_output=True, text=True, timeout=timeout, cwd=str(REPO))
    lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"worker {module_file} {list(worker_args)} (XLA_FLAGS={env['XLA_FLAGS']!r}) "
                           f"failed with rc={proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def worker_argv(argv: Sequence[str] | None) -> list[str] | None:
    """The arguments of a worker started by `run_worker` (without `--worker`), or None when
    `argv` (default sys.argv[1:]) is not a worker's command line."""
    argv = list(sys.argv[1:] if argv is None else argv)
    return [x for x in argv if x != "--worker"] if "--worker" in argv else None


def emit(obj: dict) -> None:
    print("RESULT " + json.dumps(obj, default=float), flush=True)


# ----------------------------------------------------------------------------- tiny models / data
@dataclasses.dataclass(frozen=True)
class Shapes:
    vocab: int = 4096
    hidden: int = 256
    layers: int = 4
    heads: int = 4
    intermediate: int = 688
    prompt: int = 64
    completion: int = 64
    pairs: int = 8

    @property
    def seq_len(self) -> int:
        return self.prompt + self.completion

    @property
    def tokens_per_step(self) -> int:
        return 2 * self.pairs * self.seq_len


FULL = Shapes()
SMOKE = Shapes(vocab=128, hidden=64, layers=2, heads=2, intermediate=96, prompt=8, completion=8, pairs=2)
# For MFU on a GPU: matmuls large enough to fill the tensor cores (8192 tokens per step, hidden
# 2048), 4 layers so that every contestant's fp32 state (up to ~5.3 GB each, six of them plus both
# libraries' activations) fits an 80 GB H100 alongside the others in one process.
MEDIUM = Shapes(vocab=32000, hidden=2048, layers=4, heads=16, intermediate=5504, prompt=256,
                completion=256, pairs=8)
SHAPES = {"tiny": FULL, "medium": MEDIUM}


def add_shapes_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--shapes", choices=sorted(SHAPES), default="tiny",
                   help="model and batch shapes: 'tiny' (the issue's, default) or 'medium' "
                        f"({MEDIUM}); --smoke overrides")


def shapes_of(args) -> tuple[str, Shapes]:
    """(name, Shapes) of a run: 'smoke' under --smoke, else --shapes."""
    if args.smoke:
        return "smoke", SMOKE
    name = getattr(args, "shapes", "tiny") or "tiny"
    return name, SHAPES[name]

SPECIALS = ("<pad>", "<eos>", "<unk>")


def word_tokenizer(vocab: int):
    """A whitespace word-level tokenizer with ids <pad>=0, <eos>=1, <unk>=2, then 'w3'..'w{vocab-1}'
    (one token per word, no special tokens added), wrapped as a PreTrainedTokenizerFast."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = list(SPECIALS) + [f"w{i}" for i in range(len(SPECIALS), vocab)]
    tok = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(list(SPECIALS))
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>",
                                   unk_token="<unk>", padding_side="right")


def save_tiny_llama(path: str, s: Shapes, *, seed: int = 0) -> str:
    """A random transformers LlamaForCausalLM of shapes `s`, fp32, written with save_pretrained."""
    import torch
    import transformers

    cfg = transformers.LlamaConfig(
        vocab_size=s.vocab, hidden_size=s.hidden, intermediate_size=s.intermediate,
        num_hidden_layers=s.layers, num_attention_heads=s.heads, num_key_value_heads=s.heads,
        max_position_embeddings=max(256, s.seq_len), tie_word_embeddings=False,
        pad_token_id=0, eos_token_id=1, bos_token_id=None)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    model.save_pretrained(path)
    return path


def preference_rows(n: int, s: Shapes, *, seed: int = 0) -> list[dict]:
    """n text rows {prompt, chosen, rejected}: `s.prompt` words, and `s.completion - 1` words per
    completion (TRL appends <eos>, giving exactly `s.completion` completion tokens)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    lo = len(SPECIALS)

    def words(k):
        return " ".join(f"w{i}" for i in rng.integers(lo, s.vocab, size=k))

    return [{"prompt": words(s.prompt), "chosen": " " + words(s.completion - 1),
             "rejected": " " + words(s.completion - 1)} for _ in range(n)]


def trl_to_jaxalign(batch, *, loss_index: bool = True) -> dict:
    """TRL's DataCollatorForPreference output ([chosen; rejected] stacked on the batch axis,
    `completion_mask` = 1 on completion tokens) -> jaxalign's preference batch of numpy arrays,
    with the loss index jaxalign's own collator adds (LM head on completion positions only) unless
    `loss_index=False`."""
    import numpy as np

    from jaxalign.data.collate import add_loss_index

    ids = np.asarray(batch["input_ids"], np.int32)
    am = np.asarray(batch["attention_mask"], np.int32)
    cm = np.asarray(batch["completion_mask"], np.int32)
    b = ids.shape[0] // 2
    out = {"chosen_tokens": ids[:b], "chosen_attention_mask": am[:b], "chosen_loss_mask": cm[:b],
           "rejected_tokens": ids[b:], "rejected_attention_mask": am[b:], "rejected_loss_mask": cm[b:]}
    for k in ("ref_chosen_logps", "ref_rejected_logps"):
        if k in batch:
            out[k] = np.asarray(batch[k], np.float32)
    return add_loss_index(out, ("chosen_", "rejected_")) if loss_index else out


def trl_to_jaxalign_shared(batch) -> dict:
    """TRL's collated batch -> jaxalign's prefix-shared batch (what `make_collate_fn(...,
    share_prefix=True)` and jaxalign's preference training runs make by default): each pair as
    [prompt | chosen | rejected] in one row, LM head at the completion positions."""
    from jaxalign.data.prefix_sharing import share_prefix

    return share_prefix(trl_to_jaxalign(batch, loss_index=False))


# ----------------------------------------------------------------------------- FLOPs
def linear_params(hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int,
                  head_dim: int, vocab: int, *, lm_head: bool = True) -> int:
    """Parameters that take part in matmuls (all Linear kernels + LM head; not the embedding)."""
    attn = hidden * heads * head_dim * 2 + hidden * kv_heads * head_dim * 2
    mlp = 3 * hidden * intermediate
    return layers * (attn + mlp) + (hidden * vocab if lm_head else 0)


def lora_params(hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int,
                head_dim: int, rank: int) -> int:
    """LoRA parameters, rank r on all 7 linear modules of each layer: r * (in + out) each."""
    q = o = hidden + heads * head_dim
    kv = hidden + kv_heads * head_dim
    mlp = 3 * (hidden + intermediate)
    return layers * rank * (q + o + 2 * kv + mlp)


def visible_pairs(prefix: int, continuations: Sequence[int] = ()) -> int:
    """(query, key) pairs a causal mask lets queries see in one sequence of `prefix` tokens, or in
    one prefix-shared row: the prefix, then continuations that each see the prefix and themselves."""
    pairs = prefix * (prefix + 1) // 2
    return pairs + sum(c * prefix + c * (c + 1) // 2 for c in continuations)


def attention_flops_fwd(layers: int, heads: int, head_dim: int, pairs: int) -> float:
    """QK^T and PV over `pairs` visible (query, key) pairs in all: 4 * H * d per pair per layer."""
    return 4.0 * layers * heads * head_dim * pairs


def dpo_step_flops(s: Shapes, *, reference_forward: bool, lora_rank: int | None = None,
                   head_positions: int | None = None, packed_len: int | None = None) -> float:
    """Model FLOPs of one DPO step on 2 * pairs sequences of s.seq_len tokens.

    Full fine-tune: policy forward + backward = 3 x forward (6 N tokens + 3 x attention),
    reference forward = 1 x forward (2 N tokens + attention).
    LoRA: the frozen base needs its forward and the activation gradient (2 x forward), not weight
    gradients; the adapters cost 3 x their forward (2 N_lora tokens).
    N counts every matmul parameter; the LM head's share is counted at `head_positions` positions
    per sequence (default: every position; TRL on CPU scores seq_len - 1, jaxalign with a loss
    index only the completion positions). Attention is counted over the (query, key) pairs the
    causal mask lets a query see (`visible_pairs`), the useful work, for every contestant: a
    kernel that skips hidden blocks (torch's causal SDPA, jaxalign's CPU kernel) computes somewhat
    more at block edges, XLA's einsum path all T^2. `packed_len`: prefix sharing, each pair one row
    of that many positions ([prompt | chosen | rejected], completions of s.completion tokens)."""
    hd = s.hidden // s.heads
    body = linear_params(s.hidden, s.intermediate, s.layers, s.heads, s.heads, hd, s.vocab, lm_head=False)
    tokens = s.tokens_per_step
    n_seq = 2 * s.pairs
    head_tokens = n_seq * (s.seq_len if head_positions is None else head_positions)
    attention = attention_flops_fwd(s.layers, s.heads, hd, n_seq * visible_pairs(s.seq_len))
    if packed_len is not None:  # prefix sharing: one row of packed_len positions per pair
        tokens = s.pairs * packed_len
        prefix = packed_len - 2 * s.completion
        attention = attention_flops_fwd(s.layers, s.heads, hd,
                                        s.pairs * visible_pairs(prefix, (s.completion, s.completion)))
    fwd = 2.0 * body * tokens + 2.0 * s.hidden * s.vocab * head_tokens + attention
    if lora_rank is None:
        policy = 3.0 * fwd
    else:
        nl = lora_params(s.hidden, s.intermediate, s.layers, s.heads, s.heads, hd, lora_rank)
        policy = 2.0 * fwd + 3.0 * 2.0 * nl * tokens
    return policy + (fwd if reference_forward else 0.0)
