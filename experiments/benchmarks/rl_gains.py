"""Online alignment on the synthetic task: SFT -> GRPO and SFT -> iterative DPO, held-out accuracy.

  python experiments/benchmarks/rl_gains.py
  python experiments/benchmarks/rl_gains.py --sft-dir runs/rl_gains/sft/hf --seeds 0,1,2
  python experiments/benchmarks/rl_gains.py --smoke --results ''

1. SFT: `experiments/sft.py:demo` (a tiny random-init Llama learns 2-digit addition from
   demonstrations of which 30% are wrong in one digit), with the overrides printed in the table;
   `--sft-dir` reuses an earlier SFT export instead (e.g. to try RL settings without redoing SFT).
2. From the SFT export, once per seed of `--seeds` (the seed of the RL run: its training prompts
   and samples; the SFT model is the same): `experiments/grpo.py:tiny` (exact-answer reward) and
   `experiments/iterative_dpo.py:tiny` (pairs of the policy's own correct and incorrect samples,
   reference updated every round, chosen-NLL term), each with the overrides printed.
3. Every model is scored on the same held-out prompts (never seen in training): greedy exact-match
   accuracy (`jaxalign.evaluate.task_accuracy`) and the accuracy of one sample at temperature 1
   (what the RL objectives optimise).
Writes the tables (per run, and the gains' mean and minimum over seeds), the commands and plots
(accuracy bars; each run's metrics.png) to RESULTS.md.
"""

from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from experiments.benchmarks import common as C  # noqa: E402

# experiments/sft.py:demo with the SFT budget this section was measured with (the demo's SFT now
# runs 2400 steps)
SFT: dict = {"train.steps": 1200}
GRPO: dict = {}  # experiments/grpo.py:tiny as it is
IDPO: dict = {}  # experiments/iterative_dpo.py:tiny as it is
SMOKE_MODEL = {"model.init.hidden_size": 16, "model.init.intermediate_size": 32,
               "model.init.num_hidden_layers": 1, "model.init.num_attention_heads": 2,
               "model.init.num_key_value_heads": 1}
METHODS = (("SFT -> GRPO", "grpo", "experiments/grpo.py:tiny"),
           ("SFT -> iterative DPO", "iterative_dpo", "experiments/iterative_dpo.py:tiny"))


def _overrides(d: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in d.items())


def run_name(method: str, seed: int, first: int) -> str:
    """The key of a run in the numbers: the method, with the seed unless it is the first seed."""
    return method if seed == first else f"{method} (seed {seed})"


def load_sft(hf_dir: str) -> dict:
    """An earlier SFT export as the stage result `sft_run` returns (model, variables, tokenizer)."""
    from jaxalign import data as jdata
    from jaxalign import models

    if not Path(hf_dir, "config.json").exists():
        raise FileNotFoundError(f"--sft-dir {hf_dir!r} is not a Hugging Face export "
                                "(no config.json)")
    model, params = models.from_pretrained(hf_dir)
    return {"model": model, "variables": {"params": params},
            "tokenizer": jdata.build_char_tokenizer(),  # the runs' tokenizer.path = 'synthetic'
            "export": {"hf_dir": str(Path(hf_dir).resolve())}}


def main(argv=None):
    p = C.parser(__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/rl_gains", help="directory for the runs")
    p.add_argument("--eval-prompts", type=int, default=500)
    p.add_argument("--seeds", default="0,1",
                   help="comma-separated seeds of the GRPO and iterative DPO runs (one SFT model)")
    p.add_argument("--sft-dir", default="",
                   help="reuse this SFT Hugging Face export instead of training SFT")
    args = p.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    if not seeds or len(set(seeds)) != len(seeds):
        raise SystemExit(f"--seeds must list distinct integers, got {args.seeds!r}")
    m = C.machine()
    from jaxalign import data as jdata
    from jaxalign.evaluate import task_accuracy
    from jaxalign.rl.run import run as rl_run
    from jaxalign.train.config import load_config
    from jaxalign.train.run import run as sft_run

    sft_over = dict(SFT)
    rl_over = {"grpo": dict(GRPO), "iterative_dpo": dict(IDPO)}
    common = {"train.resume": False, "train.progress": False}
    if args.smoke:
        sft_over.update({"train.steps": 20, "data.num_examples": 256, **SMOKE_MODEL})
        rl_over["grpo"].update({"rl.rounds": 2, "rl.prompts_per_round": 8, "rl.group_size": 4})
        rl_over["iterative_dpo"].update({"rl.rounds": 2, "rl.prompts_per_round": 16,
                                         "rl.generation_batch": 16, "rl.group_size": 4,
                                         "rl.epochs": 1, "train.batch_size": 4})
        args.eval_prompts = min(args.eval_prompts, 32)
    ev = {"eval.num_prompts": args.eval_prompts}
    out = Path(args.out)
    dirs = [f"{stage}_seed{s}" for stage in rl_over for s in seeds]
    for d in dirs + ([] if args.sft_dir else ["sft"]):  # fresh runs: no stale metrics/checkpoints
        shutil.rmtree(out / d, ignore_errors=True)
    t0 = time.perf_counter()
    if args.sft_dir:
        sft, t_sft = load_sft(args.sft_dir), None
    else:
        sft = sft_run(load_config("experiments/sft.py:demo", {
            "output_dir": str(out / "sft"), **common, **ev, **sft_over}))
        t_sft = time.perf_counter() - t0
    init = {"init_from": sft["export"]["hf_dir"]}
    runs = {}  # name -> (method, seed, result, seconds)
    for seed in seeds:
        for method, stage, cfg in METHODS:
            t0 = time.perf_counter()
            res = rl_run(load_config(cfg, {
                "output_dir": str(out / f"{stage}_seed{seed}"), "seed": seed, **common, **ev,
                **init, **rl_over[stage]}))
            runs[run_name(method, seed, seeds[0])] = (method, seed, res, time.perf_counter() - t0)

    tokenizer = sft["tokenizer"]
    heldout = jdata.make_prompt_dataset(args.eval_prompts, seed=12345, split="test", digits=2,
                                        operators="+")

    def score(model, variables):
        greedy = task_accuracy(model, variables, tokenizer, heldout, batch_size=250,
                               max_new_tokens=6)["accuracy"]
        return {"greedy": greedy, "sampled_t1": task_accuracy(
            model, variables, tokenizer, heldout, batch_size=250, max_new_tokens=6, temperature=1.0,
            seed=0)["accuracy"]}

    numbers = {"SFT": score(sft["model"], sft["variables"])}
    if t_sft is not None:
        numbers["SFT"]["seconds"] = t_sft
    sft_note = (f"reused `{args.sft_dir}`" if args.sft_dir else _overrides(sft_over))
    rows = [["SFT", "", numbers["SFT"]["greedy"], numbers["SFT"]["sampled_t1"], t_sft, sft_note]]
    order = sorted(runs, key=lambda k: ([m for m, _, _ in METHODS].index(runs[k][0]),
                                        seeds.index(runs[k][1])))
    base = numbers["SFT"]
    for name in order:
        method, seed, res, secs = runs[name]
        h = res["history"]
        n = {**score(res["model"], res["variables"]), "seconds": secs, "seed": seed,
             "train_reward_first_round": h[0]["reward"], "train_reward_last_round": h[-1]["reward"],
             "updates": int(h[-1]["step"])}
        n["greedy_gain"] = n["greedy"] - base["greedy"]
        n["sampled_gain"] = n["sampled_t1"] - base["sampled_t1"]
        numbers[name] = n
        stage = {mm: st for mm, st, _ in METHODS}[method]
        rows.append([method, seed, n["greedy"], n["sampled_t1"], secs,
                     _overrides(rl_over[stage])])
    for method, _, _ in METHODS:  # robustness over seeds, on the first seed's entry
        gains = [numbers[k]["greedy_gain"] for k in order if runs[k][0] == method]
        sampled = [numbers[k]["sampled_gain"] for k in order if runs[k][0] == method]
        numbers[method].update(greedy_gain_mean=sum(gains) / len(gains), greedy_gain_min=min(gains),
                               sampled_gain_mean=sum(sampled) / len(sampled))

    from jaxalign.train.plots import plot_bars

    first = ["SFT"] + [m for m, _, _ in METHODS]
    bars = plot_bars({f"{k}\n(greedy)": numbers[k]["greedy"] for k in first}
                     | {f"{k}\n(T=1)": numbers[k]["sampled_t1"] for k in first},
                     out / "accuracy.png",
                     title=f"Held-out accuracy (n={args.eval_prompts}, seed {seeds[0]})")
    table = C.table(["stage", "seed", "held-out greedy acc.", "held-out sampled acc. (T=1)",
                     "wall s", "overrides"], rows)
    gains = C.table(["method", "seed", "greedy gain", "sampled gain",
                     "train reward first -> last round", "updates"],
                    [[runs[k][0], runs[k][1], numbers[k]["greedy_gain"], numbers[k]["sampled_gain"],
                      f"{C.fmt(numbers[k]['train_reward_first_round'])} -> "
                      f"{C.fmt(numbers[k]['train_reward_last_round'])}", numbers[k]["updates"]]
                     for k in order])
    summary = C.table(["method", "seeds", "greedy gain: mean", "greedy gain: min",
                       "sampled gain: mean"],
                      [[m, ", ".join(map(str, seeds)), numbers[m]["greedy_gain_mean"],
                        numbers[m]["greedy_gain_min"], numbers[m]["sampled_gain_mean"]]
                       for m, _, _ in METHODS])
    plots = [f"- accuracy bars: `{bars}`"]
    if not args.sft_dir:
        plots.append(f"- SFT curves: `{sft['export'].get('plot', '(no plot)')}`")
    plots += [f"- {k} curves: `{runs[k][2]['export'].get('plot', '(no plot)')}`"
              for k in order]
    notes = (f"Held-out prompts: {args.eval_prompts} test-split problems (seed 12345), disjoint from "
             "every training prompt. Greedy accuracy is `jaxalign.evaluate.task_accuracy`; sampled "
             "accuracy is one temperature-1 sample per prompt. Each RL method runs once per seed "
             f"({', '.join(map(str, seeds))}: the RL run's training prompts and samples) from the "
             "same SFT model; gains are over that SFT model.")
    parts = [notes, table, gains, summary, "\n".join(plots)]
    return C.finish(args, "rl_gains", "Online alignment: SFT -> GRPO and SFT -> iterative DPO",
                    argv, m, parts, numbers)


if __name__ == "__main__":
    main()
