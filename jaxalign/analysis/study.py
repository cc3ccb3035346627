"""The alignment-tax study on the synthetic task, end to end through the training runner.

  python -m jaxalign.analysis.study --out runs/tax [--quick]

1. SFT (experiments/alignment_tax.py:sft): a tiny Llama learns 2-digit '+' and '-'.
2. Alignment arms from the SFT model, each a `jaxalign.train.run` of experiments/alignment_tax.py:
   plain DPO at several learning rates (its own tax-vs-gain curve), DPO + auxiliary SFT
   (lambda_sft), and DPO with NSPO (null-space projected updates) at several learning rates.
3. Heterogeneous model averaging between the SFT model and one DPO model over per-layer ratio
   schedules, with the Pareto front of (capability, alignment).

Measured on held-out prompts (jaxalign/analysis/tax.py): capability = greedy exact-match accuracy on
subtraction (taught by SFT, absent from the preference data); alignment = the mean log-probability
margin log pi(correct) - log pi(wrong) on held-out addition pairs (`preference/pref_margin`, what
DPO raises; its change is the mean DPO implicit-reward margin / beta). Also recorded: the policy's
own preference accuracy on those pairs and greedy accuracy on addition.

Outputs in --out: summary.json (every arm's before/after metrics and tax/gain), tax_vs_gain.png,
averaging_pareto.png, and each run's directory.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from typing import Any, Sequence

import numpy as np

ALIGNMENT = "preference/pref_margin"
CAPABILITY = "capability/accuracy"

# (arm name, experiment variant, overrides)
ARMS = (
    ("dpo lr=3e-5", "dpo", {"optim.learning_rate": 3e-5}),
    ("dpo lr=1e-4", "dpo", {"optim.learning_rate": 1e-4}),
    ("dpo lr=3e-4", "dpo", {"optim.learning_rate": 3e-4}),
    ("aux_sft 0.1", "aux_sft", {"optim.learning_rate": 1e-4, "aux_sft.lambda_sft": 0.1}),
    ("aux_sft 0.2", "aux_sft", {"optim.learning_rate": 1e-4, "aux_sft.lambda_sft": 0.2}),
    ("nspo lr=1e-4", "nspo", {"optim.learning_rate": 1e-4}),
    ("nspo lr=3e-4", "nspo", {"optim.learning_rate": 3e-4}),
    ("nspo lr=1e-3", "nspo", {"optim.learning_rate": 1e-3}),
    ("nspo-flat lr=3e-4", "nspo", {"optim.learning_rate": 3e-4, "nspo.mode": "flat"}),
)
AVERAGED_ARM = "dpo lr=1e-4"

QUICK = {"sft": {"train.steps": 60, "data.num_examples": 512},
         "align": {"train.steps": 8, "data.num_examples": 128, "aux_sft.num_examples": 128,
                   "nspo.num_batches": 2},
         "both": {"tax.num_examples": 32}}

COMMON = {"train.resume": False, "train.progress": False, "train.plots": False}


def averaging_schedules(num_layers: int) -> dict[str, list[float]]:
    """Uniform ratios and lower->upper layer-wise schedules (ratio 1 = the aligned model)."""
    from jaxalign.analysis.averaging import layer_ratios

    out = {f"uniform {a:g}": layer_ratios(num_layers, low=a, high=a, kind="constant").tolist()
           for a in (0.0, 0.25, 0.5, 0.75, 1.0)}
    for low, high in ((0.0, 1.0), (1.0, 0.0), (0.25, 0.75), (0.75, 0.25), (0.0, 0.5), (0.5, 1.0)):
        out[f"linear {low:g}->{high:g}"] = layer_ratios(num_layers, low=low, high=high).tolist()
    return out


def _arm_summary(tax: dict) -> dict[str, Any]:
    before, after = tax["before"], tax["after"]
    return {"before": before, "after": after,
            "tax": before[CAPABILITY] - after[CAPABILITY],
            "gain": after[ALIGNMENT] - before[ALIGNMENT],
            "pref_accuracy_gain": after["preference/pref_accuracy"] - before["preference/pref_accuracy"],
            "addition_accuracy_gain": after["alignment/accuracy"] - before["alignment/accuracy"]}


def plot_tax_vs_gain(arms: dict[str, dict], out_path) -> str:
    """Alignment gain (x) against tax (y) per arm, one colour per method, lines along the lr sweeps."""
    from jaxalign.train.plots import Figure, _save

    fig = Figure(figsize=(6.5, 4.5))
    ax = fig.add_subplot(1, 1, 1)
    methods: dict[str, list] = {}
    for name, a in arms.items():
        methods.setdefault(name.split()[0], []).append((a["gain"], a["tax"], name))
    for method, pts in methods.items():
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "-o", label=method)
        for gx, ty, name in pts:
            ax.annotate(name.split(" ", 1)[1], (gx, ty), fontsize=7, xytext=(3, 3),
                        textcoords="offset points")
    ax.axhline(0.0, c="k", lw=0.5)
    ax.set_xlabel(f"alignment gain ({ALIGNMENT})")
    ax.set_ylabel(f"alignment tax (drop in {CAPABILITY})")
    ax.set_title("Alignment tax vs alignment gain (lower right is better)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, out_path)


def run_study(out_dir: str, *, quick: bool = False, arms: Sequence = ARMS,
              averaged_arm: str = AVERAGED_ARM, sft_dir: str = "") -> dict[str, Any]:
    """Runs the study (module docstring); returns the summary written to <out_dir>/summary.json.
    `sft_dir`: reuse an exported SFT model instead of training one."""
    from jaxalign.analysis import averaging
    from jaxalign.analysis.tax import make_tax_evaluator
    from jaxalign.train.config import load_config
    from jaxalign.train.run import run

    t0 = time.time()
    os.makedirs(out_dir, exist_ok=True)
    q = QUICK if quick else {"sft": {}, "align": {}, "both": {}}
    exp = "experiments/alignment_tax.py"
    summary: dict[str, Any] = {"capability": CAPABILITY, "alignment": ALIGNMENT, "arms": {}}
    if not sft_dir:
        print("== SFT ==")
        sft = run(load_config(f"{exp}:sft", {**COMMON, **q["sft"], **q["both"],
                                             "output_dir": os.path.join(out_dir, "sft")}))
        sft_dir = sft["export"]["hf_dir"]
        summary["sft"] = {"after": sft["tax"]["after"]}
    summary["sft_dir"] = sft_dir
    kept = None
    for name, variant, over in arms:
        print(f"== {name} ==")
        slug = name.replace(" ", "_").replace("=", "")
        r = run(load_config(f"{exp}:{variant}", {
            **COMMON, **q["align"], **q["both"], **over, "init_from": sft_dir,
            "export.hf_dir": False, "output_dir": os.path.join(out_dir, slug)}))
        summary["arms"][name] = _arm_summary(r["tax"])
        a = summary["arms"][name]
        print(f"[study] {name}: tax {a['tax']:+.3f}, gain {a['gain']:+.3f}")
        if name == averaged_arm:
            kept = r
    if kept is not None:
        print(f"== layer-wise averaging of the SFT model and '{averaged_arm}' ==")
        from jaxalign.models import from_pretrained

        model, tok = kept["model"], kept["tokenizer"]
        _, sft_params = from_pretrained(sft_dir)
        cfg = load_config(f"{exp}:dpo", q["both"])
        evaluate = make_tax_evaluator(
            model, tok, capability_source=cfg.tax.capability_source,
            capability_synthetic=dict(cfg.tax.capability_synthetic),
            alignment_source=cfg.tax.alignment_source,
            alignment_synthetic=dict(cfg.tax.alignment_synthetic),
            preference_source=cfg.tax.preference_source, num_examples=cfg.tax.num_examples,
            seed=cfg.seed + 101, batch_size=cfg.tax.batch_size, max_length=cfg.data.max_length)
        schedules = averaging_schedules(model.config.num_hidden_layers)
        res = averaging.sweep(sft_params, kept["variables"]["params"], schedules,
                              lambda p: evaluate({"params": p}))
        pts = np.array([[res[n][CAPABILITY], res[n][ALIGNMENT]] for n in res])
        front = [list(res)[i] for i in averaging.pareto_front(pts)]
        summary["averaging"] = {"arm": averaged_arm, "schedules": schedules, "results": res,
                                "pareto_front": front}
        summary["averaging"]["plot"] = averaging.plot_pareto(
            res, os.path.join(out_dir, "averaging_pareto.png"), x=CAPABILITY, y=ALIGNMENT,
            title=f"Layer-wise averaging: SFT <-> {averaged_arm}")
        for n in res:
            print(f"[avg] {n:<18} capability {res[n][CAPABILITY]:.3f}  alignment {res[n][ALIGNMENT]:.3f}"
                  + ("  (Pareto)" if n in front else ""))
    summary["plot"] = plot_tax_vs_gain(summary["arms"], os.path.join(out_dir, "tax_vs_gain.png"))
    summary["seconds"] = time.time() - t0
    with open(os.path.join(out_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2, default=float)
    print(f"\n{'arm':<16}{'tax':>8}{'gain':>8}{'pref acc':>10}{'add acc':>9}")
    for name, a in summary["arms"].items():
        print(f"{name:<16}{a['tax']:>+8.3f}{a['gain']:>+8.2f}{a['pref_accuracy_gain']:>+10.3f}"
              f"{a['addition_accuracy_gain']:>+9.3f}")
    return summary


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/tax")
    ap.add_argument("--quick", action="store_true", help="a few steps per stage (smoke test)")
    ap.add_argument("--sft_dir", default="", help="reuse this exported SFT model")
    args = ap.parse_args(argv)
    return run_study(args.out, quick=args.quick, sft_dir=args.sft_dir)


if __name__ == "__main__":
    main()
