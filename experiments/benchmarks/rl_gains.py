"""Online alignment on the synthetic task: SFT -> GRPO and SFT -> iterative DPO, held-out accuracy.

  python experiments/benchmarks/rl_gains.py
  python experiments/benchmarks/rl_gains.py --smoke --results ''

1. SFT: `experiments/sft.py:demo` (a tiny random-init Llama learns 2-digit addition from
   demonstrations of which 40% are wrong in one digit), with the overrides printed in the table.
2. From the SFT export: `experiments/grpo.py:tiny` (exact-answer reward) and
   `experiments/iterative_dpo.py:tiny` (best-vs-worst pairs of the policy's own samples, reference
   updated every round), each with the overrides printed.
3. Every model is scored on the same held-out prompts (never seen in training): greedy exact-match
   accuracy (`jaxalign.evaluate.task_accuracy`) and the accuracy of one sample at temperature 1
   (what the RL objectives optimise).
Writes the table, the commands and plots (accuracy bars; each run's metrics.png) to RESULTS.md.
"""

from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from experiments.benchmarks import common as C  # noqa: E402

SFT: dict = {}  # experiments/sft.py:demo as it is
GRPO: dict = {}  # experiments/grpo.py:tiny as it is
IDPO: dict = {}  # experiments/iterative_dpo.py:tiny as it is
SMOKE_MODEL = {"model.init.hidden_size": 16, "model.init.intermediate_size": 32,
               "model.init.num_hidden_layers": 1, "model.init.num_attention_heads": 2,
               "model.init.num_key_value_heads": 1}


def sampled_accuracy(model, variables, tokenizer, prompt_ds, *, temperature=1.0, seed=0):
    """Exact-match accuracy of one sample per prompt at `temperature`."""
    import jax
    import numpy as np

    from jaxalign import data as jdata
    from jaxalign.evaluate import generate_for_prompts

    tok = jdata.tokenize_dataset(prompt_ds, tokenizer, kind="prompt")
    texts = generate_for_prompts(model, variables, tokenizer, tok.examples, batch_size=250,
                                 max_new_tokens=6, greedy=False, temperature=temperature,
                                 rng=jax.random.PRNGKey(seed))
    answers = [e["metadata"]["answer"] for e in tok.examples]
    return float(np.mean(jdata.exact_match_reward(texts, answers, eos=tokenizer.eos_token)))


def _overrides(d: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in d.items())


def main(argv=None):
    p = C.parser(__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/rl_gains", help="directory for the runs")
    p.add_argument("--eval-prompts", type=int, default=500)
    args = p.parse_args(argv)
    m = C.machine()
    from jaxalign import data as jdata
    from jaxalign.evaluate import task_accuracy
    from jaxalign.rl.run import run as rl_run
    from jaxalign.train.config import load_config
    from jaxalign.train.run import run as sft_run

    sft_over, grpo_over, idpo_over = dict(SFT), dict(GRPO), dict(IDPO)
    common = {"train.resume": False, "train.progress": False}
    if args.smoke:
        sft_over.update({"train.steps": 20, "data.num_examples": 256, **SMOKE_MODEL})
        grpo_over.update({"rl.rounds": 2, "rl.prompts_per_round": 8, "rl.group_size": 4})
        idpo_over.update({"rl.rounds": 2, "rl.prompts_per_round": 16, "rl.generation_batch": 16,
                          "rl.group_size": 4, "train.batch_size": 4})
        args.eval_prompts = min(args.eval_prompts, 32)
    ev = {"eval.num_prompts": args.eval_prompts}
    out = Path(args.out)
    for stage in ("sft", "grpo", "iterative_dpo"):  # fresh runs: no stale metrics/checkpoints
        shutil.rmtree(out / stage, ignore_errors=True)
    t0 = time.perf_counter()
    sft = sft_run(load_config("experiments/sft.py:demo", {
        "output_dir": str(out / "sft"), **common, **ev, **sft_over}))
    t_sft = time.perf_counter() - t0
    init = {"init_from": sft["export"]["hf_dir"]}
    t0 = time.perf_counter()
    grpo = rl_run(load_config("experiments/grpo.py:tiny", {
        "output_dir": str(out / "grpo"), **common, **ev, **init, **grpo_over}))
    t_grpo = time.perf_counter() - t0
    t0 = time.perf_counter()
    idpo = rl_run(load_config("experiments/iterative_dpo.py:tiny", {
        "output_dir": str(out / "iterative_dpo"), **common, **ev, **init, **idpo_over}))
    t_idpo = time.perf_counter() - t0

    tokenizer = sft["tokenizer"]
    heldout = jdata.make_prompt_dataset(args.eval_prompts, seed=12345, split="test", digits=2,
                                        operators="+")
    rows, numbers = [], {}
    stages = [("SFT", sft["model"], sft["variables"], t_sft, sft_over),
              ("SFT -> GRPO", grpo["model"], grpo["variables"], t_grpo, grpo_over),
              ("SFT -> iterative DPO", idpo["model"], idpo["variables"], t_idpo, idpo_over)]
    for name, model, variables, secs, over in stages:
        greedy = task_accuracy(model, variables, tokenizer, heldout, batch_size=250,
                               max_new_tokens=6)["accuracy"]
        sampled = sampled_accuracy(model, variables, tokenizer, heldout)
        numbers[name] = {"greedy": greedy, "sampled_t1": sampled, "seconds": secs}
        rows.append([name, greedy, sampled, secs, _overrides(over)])
    for name, res in (("SFT -> GRPO", grpo), ("SFT -> iterative DPO", idpo)):
        h = res["history"]
        numbers[name]["train_reward_first_round"] = h[0]["reward"]
        numbers[name]["train_reward_last_round"] = h[-1]["reward"]
        numbers[name]["updates"] = int(h[-1]["step"])
    base = numbers["SFT"]
    for name in ("SFT -> GRPO", "SFT -> iterative DPO"):
        numbers[name]["greedy_gain"] = numbers[name]["greedy"] - base["greedy"]
        numbers[name]["sampled_gain"] = numbers[name]["sampled_t1"] - base["sampled_t1"]

    from jaxalign.train.plots import plot_bars

    bars = plot_bars({f"{k}\n(greedy)": v["greedy"] for k, v in numbers.items()}
                     | {f"{k}\n(T=1)": v["sampled_t1"] for k, v in numbers.items()},
                     out / "accuracy.png", title=f"Held-out accuracy (n={args.eval_prompts})")
    table = C.table(["stage", "held-out greedy acc.", "held-out sampled acc. (T=1)",
                     "wall s", "overrides"], rows)
    gains = C.table(["method", "greedy gain", "sampled gain", "train reward first -> last round",
                     "updates"],
                    [[k, v["greedy_gain"], v["sampled_gain"],
                      f"{C.fmt(v['train_reward_first_round'])} -> "
                      f"{C.fmt(v['train_reward_last_round'])}", v["updates"]]
                     for k, v in numbers.items() if k != "SFT"])
    plots = [f"- accuracy bars: `{bars}`"] + [
        f"- {k} curves: `{r['export'].get('plot', '(no plot)')}`"
        for k, r in (("SFT", sft), ("GRPO", grpo), ("iterative DPO", idpo))]
    notes = (f"Held-out prompts: {args.eval_prompts} test-split problems (seed 12345), disjoint from "
             "every training prompt. Greedy accuracy is `jaxalign.evaluate.task_accuracy`; sampled "
             "accuracy is one temperature-1 sample per prompt.")
    parts = [notes, table, gains, "\n".join(plots)]
    return C.finish(args, "rl_gains", "Online alignment: SFT -> GRPO and SFT -> iterative DPO",
                    argv, m, parts, numbers)


if __name__ == "__main__":
    main()
