"""Smoke tests of the benchmark scripts (experiments/benchmarks): each runs in its tiny --smoke
mode and must produce finite numbers, its RESULTS section, and the correctness facts it reports
(identical first-step losses, identical NF4 bytes, equal sharded losses). Timings are never
asserted."""

import importlib
import json
import math

import pytest

from experiments.benchmarks import common

LOG2 = math.log(2.0)


def _numbers(tree):
    """All int/float leaves of a JSON-like tree (bools and None excluded)."""
    if isinstance(tree, dict):
        for v in tree.values():
            yield from _numbers(v)
    elif isinstance(tree, (list, tuple)):
        for v in tree:
            yield from _numbers(v)
    elif isinstance(tree, (int, float)) and not isinstance(tree, bool):
        yield tree


def _run(name, tmp_path, *extra, section=None):
    mod = importlib.import_module(f"experiments.benchmarks.{name}")
    results, out = tmp_path / "RESULTS.md", tmp_path / "numbers.json"
    # --system-malloc: the pytest process keeps its allocator (tests/test_host_memory.py covers it)
    flags = ["--system-malloc"] if name in ("dpo_step", "lora_step") else []
    returned = mod.main(["--smoke", *flags, "--results", str(results), "--json", str(out), *extra])
    text = results.read_text()
    section = section or name
    assert f"<!-- BEGIN bench:{section} -->" in text and f"<!-- END bench:{section} -->" in text
    assert "nproc" in text and "Command: `python" in text
    numbers = json.loads(out.read_text())
    assert numbers == json.loads(json.dumps(returned, default=float))
    values = list(_numbers(numbers))
    assert values and all(math.isfinite(v) for v in values)
    return numbers


def _positive_times(med):
    assert med and all(v > 0 for v in med.values())


@pytest.mark.slow
def test_dpo_step_smoke(tmp_path):
    n = _run("dpo_step", tmp_path)
    _positive_times(n["median_s"])
    s = n["sanity"]
    assert s["jaxalign_first_loss"] == pytest.approx(LOG2, abs=1e-5)
    assert s["trl_first_loss"] == pytest.approx(LOG2, abs=1e-5)
    # same checkpoint, same tokens: the policies' summed chosen log-probs agree
    assert s["jaxalign_logps_chosen"] == pytest.approx(s["trl_logps_chosen"], rel=1e-4)
    # prefix sharing (jaxalign's default) gives the unshared step's log-probs
    assert s["jaxalign_logps_chosen"] == pytest.approx(s["jaxalign_unshared_logps_chosen"], rel=1e-5)
    assert set(n["tokens_per_s"]) == {"trl", "jaxalign", "jaxalign, pairs unshared",
                                      "jaxalign, pairs unshared, LM head at all positions",
                                      "jaxalign vocab_chunk=32", "trl precomputed",
                                      "jaxalign precomputed", "trl, torch.set_num_threads(1)",
                                      "trl precomputed, torch.set_num_threads(1)"}


@pytest.mark.slow
def test_dpo_step_bf16_parts(tmp_path):
    """--bf16 on the CPU, the pieces a GPU run uses (a cheap stand-in for the whole --bf16 smoke run,
    which costs twice the time): TRL's trainer under bf16 autocast through its accelerator, jaxalign's
    step with bf16 compute over fp32 params, the bf16 peak probes and the bf16 table headers."""
    from experiments.benchmarks import dpo_step as D

    s = common.SMOKE
    D.set_precision(common.Precision(bf16=True))
    try:
        model_dir = common.save_tiny_llama(str(tmp_path / "model"), s)
        rows = common.preference_rows(s.pairs, s)
        trainer = D.make_trl_trainer(model_dir, common.word_tokenizer(s.vocab), rows, s, str(tmp_path / "trl"))
        assert trainer.accelerator.mixed_precision == "bf16" and trainer.args.use_cpu
        batches = D.trl_batches(trainer, s, 1)
        trl_loss = D.trl_step_fn(trainer, batches)()
        jx, info = D.make_jaxalign_step(model_dir, [common.trl_to_jaxalign(b) for b in batches])
        assert jx() > 0
        probes, flops, _ = D.peak_fns(True)
        for f in probes.values():
            f()
        times = {k: [0.01] for k in probes}
        times.update({"trl": [0.02], "jaxalign": [0.01]})
        meta = {"trl": {"flops": 1e9, "baseline": "trl", "lib": "torch"},
                "jaxalign": {"flops": 1e9, "baseline": "trl", "lib": "jax", "xla_flops": info["xla_flops"]}}
        rows_out, _, _ = D.step_rows(times, meta, flops, s.tokens_per_step)
        headers = D.step_headers()
        line = D.shapes_line(s, 2, 1)
    finally:
        D.set_precision(common.Precision())  # the module setting back to fp32 for other tests
    assert set(probes) == {"bf16 matmul peak, JAX", "bf16 matmul peak, torch"}
    assert trl_loss == pytest.approx(LOG2, abs=1e-5) and info["first_loss"] == pytest.approx(LOG2, abs=1e-5)
    # same checkpoint, same tokens, both in bf16: the summed log-probs agree to bf16 rounding
    trl_logps = D.trl_first_logps(trainer)
    assert info["first_logps_chosen"] == pytest.approx(trl_logps, rel=1e-2)
    assert "% of bf16 matmul peak (same lib, same run)" in headers and len(rows_out[0]) == len(headers)
    assert "fp32 master weights, bf16 compute" in line and "on the CPU" in line


def test_section_names():
    P = common.Precision
    assert common.section_name("dpo_step", P()) == "dpo_step"
    assert common.section_name("dpo_step", P(bf16=True)) == "dpo_step_bf16"
    assert common.section_name("dpo_step", P(bf16=True, gpu=True)) == "dpo_step_gpu"
    assert common.section_name("dpo_step", P(bf16=True, gpu=True), "medium") == "dpo_step_gpu_medium"
    assert common.section_name("dpo_step", P(gpu=True)) == "dpo_step_gpu_fp32"
    assert common.spec_bf16_peak("NVIDIA H100 80GB HBM3") == 989e12
    assert common.spec_bf16_peak("NVIDIA H200") == 989e12
    assert common.spec_bf16_peak("NVIDIA H100 PCIe") == 756e12
    assert common.spec_bf16_peak("TPU v5 lite") is None


def test_gpu_summary_digest():
    from experiments.benchmarks import gpu_summary

    text = ("<!-- BEGIN bench:dpo_step_gpu -->\n## DPO [GPU (H100), bf16]\n\n"
            "| contestant | median step ms | tokens/s | MFU % (vs measured bf16 matmul peak) |\n"
            "|---|---|---|---|\n| trl | 10 | 100 | 20 |\n\nMeasured bf16 matmul peak: JAX 1.\n"
            "other text\n<!-- END bench:dpo_step_gpu -->\n")
    out = gpu_summary.digest(text)
    assert out[0] == "--- dpo_step_gpu: DPO [GPU (H100), bf16]"
    assert out[1] == "  contestant | median step ms | MFU % (vs measured bf16 matmul peak)"
    assert out[2] == "  trl | 10 | 20"
    assert out[3].startswith("  Measured") and len(out) == 4


@pytest.mark.slow
def test_dpo_step_rounds_smoke(tmp_path):
    n = _run("dpo_step", tmp_path, "--rounds", "2")
    assert len(n["rounds"]) == 2
    for r in n["rounds"]:
        _positive_times(r["median_s"])
    assert all(v > 0 for v in n["median"].values())
    assert "round | TRL ms" in (tmp_path / "RESULTS.md").read_text()


@pytest.mark.slow
def test_lora_step_smoke(tmp_path):
    n = _run("lora_step", tmp_path)
    _positive_times(n["median_s"])
    assert n["trainable_params"]["jaxalign"] == n["trainable_params"]["trl"]
    for name, loss in n["first_loss"].items():  # B = 0 at init: policy == reference
        assert loss == pytest.approx(LOG2, abs=1e-4), name
    assert "qlora_speedup_vs_trl" in n  # TRL + bitsandbytes 4-bit ran on CPU


@pytest.mark.slow
def test_nf4_ops_smoke(tmp_path):
    n = _run("nf4_ops", tmp_path)
    assert all(n["bytes_equal"].values()), n["bytes_equal"]
    assert n["dequantize_max_abs_diff"] == 0.0
    assert n["matmul_max_abs_diff"] < 1e-4
    _positive_times(n["matmul_s"])
    _positive_times(n["dequantize_blocks_s"])
    assert n["dequantize_block"] == 2
    _positive_times(n["dequantize_burst_s"])
    assert set(n["dequantize_burst_s"]) == {"jaxalign", "bitsandbytes", "jaxalign in one jit"}
    assert n["dequantize_burst"] == 2


def test_alternate_turns():
    calls = []
    fns = {k: (lambda k=k: calls.append(k)) for k in "abc"}
    times = common.alternate(fns, steps=3, warmup=1, block=2)
    assert {k: len(v) for k, v in times.items()} == {"a": 6, "b": 6, "c": 6}
    assert all(t >= 0 for v in times.values() for t in v)
    # one warm-up round, then turns of 2 calls; the order rotates each round
    assert "".join(calls) == "abc" + "aabbcc" + "bbccaa" + "ccaabb"
    with pytest.raises(ValueError, match="block"):
        common.alternate(fns, steps=1, block=0)
    # `before` runs before every timed call, not before the warm-up calls
    calls.clear()
    common.alternate(fns, steps=2, warmup=1, before=lambda: calls.append("|"))
    assert "".join(calls) == "abc" + "|a|b|c" + "|b|c|a"


@pytest.mark.slow
def test_memory_on_paper_smoke(tmp_path):
    n = _run("memory_on_paper", tmp_path)
    c = n["compiled"]
    for key, v in c.items():
        assert v["peak"] > 0 and v["argument"] > 0, key
    # fsdp=2 holds about half of the full fine-tune's params + optimizer per device
    assert c["tiny|full|fsdp2"]["argument"] < 0.75 * c["tiny|full|fsdp1"]["argument"]
    a = n["analytic"]
    for meth in ("qlora", "full"):
        totals = [a[f"tiny|{meth}|fsdp{k}"]["total"] for k in (1, 2, 4, 8, 16, 32, 64, 128, 256)]
        assert all(x > y for x, y in zip(totals, totals[1:]))


@pytest.mark.slow
def test_memory_on_paper_quick_smoke(tmp_path):
    # --quick: what the GPU run compiles (here on the CPU), with the two schedule probes
    n = _run("memory_on_paper", tmp_path, "--quick", section="memory_on_paper_quick")
    assert set(n["compiled"]) == {"tiny|qlora|fsdp1", "tiny|full|fsdp1"}
    assert all(v["peak"] > 0 for v in n["compiled"].values())
    assert set(n["dequant_probe_temp_bytes"]) == {"plain", "nf4_matmul"}
    assert all(set(v) == {"2", "3"} for v in n["dequant_probe_temp_bytes"].values())
    assert set(n["remat_probe_temp_bytes"]) == {"none", "jax.checkpoint", "jaxalign remat"}
    assert "Probes on XLA's CPU backend" in (tmp_path / "RESULTS.md").read_text()


@pytest.mark.slow
def test_scaling_smoke(tmp_path):
    n = _run("scaling", tmp_path)
    assert n["max_loss_diff"] < 1e-4
    r = n["per_count"]["2"]
    assert r["devices"] == 2
    # fsdp over 2 devices holds less per device than the replicated data-parallel state
    assert r["fsdp"][2] < r["data"][2]


def test_write_section_replaces_only_its_own_block(tmp_path):
    path = tmp_path / "R.md"
    path.write_text("# Results\n\n## RL (another helper)\nkeep me\n")
    common.write_section("a", "## A\nfirst", path)
    common.write_section("b", "## B\nsecond", path)
    common.write_section("a", "## A\nreplaced", path)
    text = path.read_text()
    assert text.count("<!-- BEGIN bench:a -->") == 1 and "replaced" in text and "first" not in text
    assert "## B\nsecond" in text and "keep me" in text
    assert text.index("bench:a") < text.index("bench:b")  # replaced in place, not re-appended


def test_dpo_step_flops_by_hand():
    s = common.Shapes(vocab=10, hidden=4, layers=1, heads=2, intermediate=6, prompt=2, completion=1, pairs=1)
    n = 4 * 4 * 4 + 3 * 4 * 6 + 4 * 10  # q,k,v,o + gate,up,down + LM head = 176
    tokens = 2 * 3
    attn = 4.0 * 1 * 2 * 2 * (1 + 2 + 3) * 2  # 4 B H d x the causally visible pairs of T = 3
    fwd = 2 * n * tokens + attn
    assert common.dpo_step_flops(s, reference_forward=True) == 4 * fwd
    assert common.dpo_step_flops(s, reference_forward=False) == 3 * fwd
    nl = 1 * 3 * ((4 + 4) * 4 + 3 * (4 + 6))  # r (in + out) over 7 modules
    assert common.lora_params(4, 6, 1, 2, 2, 2, 3) == nl
    assert common.dpo_step_flops(s, reference_forward=True, lora_rank=3) == 3 * fwd + 6 * nl * tokens
    # the LM head (4 x 10) at 1 of the 3 positions per sequence (a loss index on the completion)
    fwd1 = fwd - 2 * 4 * 10 * 2 * (3 - 1)
    assert common.dpo_step_flops(s, reference_forward=True, head_positions=1) == 4 * fwd1
    # prefix sharing: one row [prompt 2 | chosen 1 | rejected 1]; each completion token sees the
    # prompt and itself: 3 + 3 + 3 pairs
    assert common.visible_pairs(2, (1, 1)) == 3 + 3 + 3
    attn_packed = 4.0 * 1 * 2 * 9 * 2
    fwd_packed = 2 * (n - 40) * 4 + 2 * 40 * 6 + attn_packed  # body at 4 positions, LM head at 6
    assert common.dpo_step_flops(s, reference_forward=False, packed_len=4) == 3 * fwd_packed


def test_attention_cpu_smoke(tmp_path):
    n = _run("attention_cpu", tmp_path)
    assert all(v["forward"] > 0 and v["forward_backward"] > 0 for v in n["median_ms"].values())
    # the kernel's outputs and gradients equal XLA's attention
    assert n["max_abs_diff"] and max(n["max_abs_diff"].values()) < 1e-4


@pytest.mark.slow
def test_nf4_dequant_processes_smoke(tmp_path):
    n = _run("nf4_dequant_processes", tmp_path)
    (run,) = n["runs"]  # one fresh process in --smoke
    for protocol in ("alternating", "alone", "alternating_flushed"):
        _positive_times(run[protocol])
        assert set(run[protocol]) == {"jaxalign", "bitsandbytes"}
    assert set(n["jaxalign_faster"]) == {"alternating", "alone", "alternating_flushed"}
