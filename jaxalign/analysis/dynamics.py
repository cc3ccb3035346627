"""Learning dynamics of preference tuning: how one update moves log pi(y|x) of probe responses
(Ren & Sutherland, 2025, "Learning Dynamics of LLM Finetuning", ICLR).

For a probe prompt x we follow several groups of responses: the `chosen` answer y+, the `rejected`
answer y-, `similar` wrong answers (other one-digit errors, never trained on) and `random` answers,
and optionally the model's own `greedy` answer at the start. After each update we record
log pi(y|x) for every group; the per-step change shows DPO's *squeezing effect*: the negative
gradient on y- pushes probability mass not back to y+ but to whatever the model already rates
highest, so log pi of most responses falls (often y+ too: "likelihood displacement") while the
peak sharpens.

The effect is visible in closed form on a single softmax. A step of size eta that lowers
log p_k (logits z, p = softmax(z); z <- z - eta * d log p_k / dz = z - eta * (e_k - p)) changes
log p_i, for i != k, by (first order)

    d log p_i = eta * (p_i + p_k - sum_j p_j^2)

so every class with p_i < sum_j p_j^2 - p_k loses mass and the classes above that line gain: the
most likely class gains most (`squeeze_first_order`, `negative_gradient_step`).
"""

from __future__ import annotations

from typing import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxalign.analysis.tax import EvalSet, score_completions

__all__ = [
    "GROUPS", "logp_trajectory", "make_probe_set", "negative_gradient_step", "per_step_change",
    "plot_dynamics", "probe_logps", "squeeze_first_order",
]

GROUPS = ("chosen", "rejected", "similar", "random", "greedy")


# ----------------------------------------------------------------------------- closed form
def negative_gradient_step(logits, index: int, lr: float):
    """Logits [..., V] after one gradient-descent step of size `lr` on log softmax(logits)[index]
    (lowering that class): z - lr * (onehot(index) - softmax(z))."""
    logits = jnp.asarray(logits, jnp.float32)
    p = jax.nn.softmax(logits, axis=-1)
    return logits - lr * (jax.nn.one_hot(index, logits.shape[-1]) - p)


def squeeze_first_order(probs, index: int):
    """[..., V]: d log p_i / d eta at eta = 0 for the step of `negative_gradient_step`,
    p_i - [i == k] + p_k - sum_j p_j^2 (for i != k: p_i + p_k - sum_j p_j^2)."""
    p = jnp.asarray(probs, jnp.float32)
    onehot = jax.nn.one_hot(index, p.shape[-1])
    return p - onehot + p[..., index:index + 1] - jnp.sum(p * p, axis=-1, keepdims=True)


# ----------------------------------------------------------------------------- probes
def make_probe_set(tokenizer, *, n: int = 8, seed: int = 0, digits: int = 2, operators: str = "+",
                   num_similar: int = 3, num_random: int = 3, split: str = "test",
                   greedy: Sequence[str] | None = None, pad_to_multiple_of: int | None = 8
                   ) -> tuple[EvalSet, dict[str, np.ndarray]]:
    """Probe responses for `n` problems of the synthetic arithmetic task.

    Per problem: `chosen` = the correct answer, `rejected` = an answer wrong in one digit (what a
    preference pair of the same distribution would reject), `similar` = `num_similar` other
    one-digit errors, `random` = `num_random` random integers of the answer's length, and, if
    `greedy` (n strings, e.g. the model's own greedy completions) is given, those.
    Returns (EvalSet of kind 'sft' with one row per (problem, response), groups) where groups maps
    each group name to an int array [n, per-problem count] of row indices.
    """
    from jaxalign import data as jdata
    from jaxalign.data.synthetic import corrupt_answer, sample_problems

    if greedy is not None and len(greedy) != n:
        raise ValueError(f"`greedy` must hold n={n} completions, got {len(greedy)}")
    problems = sample_problems(n, seed=seed, digits=digits, operators=operators, split=split)
    rng = np.random.default_rng([seed, 7])
    rows: dict[str, list] = {"prompt": [], "completion": []}
    groups: dict[str, list] = {g: [] for g in GROUPS}

    def add(group, i, prompt, text):
        while len(groups[group]) <= i:
            groups[group].append([])
        groups[group][i].append(len(rows["prompt"]))
        rows["prompt"].append(prompt)
        rows["completion"].append(text)

    for i, pr in enumerate(problems):
        wrong = corrupt_answer(pr.answer, rng)
        add("chosen", i, pr.prompt, pr.answer)
        add("rejected", i, pr.prompt, wrong)
        seen = {pr.answer, wrong}
        for _ in range(num_similar):
            cand = corrupt_answer(pr.answer, rng)
            for _ in range(20):  # a fresh one-digit error when there is one
                if cand not in seen:
                    break
                cand = corrupt_answer(pr.answer, rng)
            seen.add(cand)
            add("similar", i, pr.prompt, cand)
        width = len(pr.answer.lstrip("-"))
        for _ in range(num_random):
            add("random", i, pr.prompt, str(int(rng.integers(10 ** (width - 1) if width > 1 else 0,
                                                                 10 ** width))))
        if greedy is not None:
            add("greedy", i, pr.prompt, greedy[i])
    import datasets

    tok = jdata.tokenize_dataset(datasets.Dataset.from_dict(rows), tokenizer, kind="sft")
    collate = jdata.make_collate_fn("sft", pad_id=tokenizer.pad_token_id,
                                    pad_to_multiple_of=pad_to_multiple_of)
    out = {g: np.asarray(v, np.int64) for g, v in groups.items() if v}
    return EvalSet("probe", tok.examples, collate), out


def probe_logps(scorer: Callable, variables, probe: EvalSet, groups: Mapping[str, np.ndarray], *,
                batch_size: int = 64) -> dict[str, np.ndarray]:
    """{group: log pi(y|x) [n, per-problem count]} for the probe responses (`scorer` from
    `jaxalign.analysis.tax.make_completion_scorer`)."""
    lp = score_completions(scorer, variables, probe, batch_size=batch_size)["logps"]
    return {g: lp[idx] for g, idx in groups.items()}


def logp_trajectory(records: Sequence[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Stacks per-step `probe_logps` results into {group: [steps + 1, n, count]}."""
    if not records:
        raise ValueError("logp_trajectory: no records")
    return {g: np.stack([r[g] for r in records]) for g in records[0]}


def per_step_change(trajectory: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """{group: mean over probes of log pi_{t+1} - log pi_t, shape [steps]}."""
    out = {}
    for g, x in trajectory.items():
        x = np.asarray(x, np.float64)
        out[g] = np.diff(x, axis=0).reshape(x.shape[0] - 1, -1).mean(axis=1)
    return out


def plot_dynamics(trajectory: Mapping[str, np.ndarray], out_path, *,
                  title: str = "Learning dynamics of probe responses") -> str:
    """Two panels: mean log pi(y|x) per group against the step, and its per-step change."""
    from jaxalign.train.plots import Figure, _save

    fig = Figure(figsize=(10.0, 3.8))
    ax1, ax2 = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    change = per_step_change(trajectory)
    for g, x in trajectory.items():
        x = np.asarray(x, np.float64)
        mean = x.reshape(x.shape[0], -1).mean(axis=1)
        ax1.plot(np.arange(len(mean)), mean, label=g)
        ax2.plot(np.arange(1, len(mean)), change[g], label=g)
    ax1.set_xlabel("step")
    ax1.set_ylabel("mean log pi(y|x)")
    ax1.set_title(title)
    ax2.axhline(0.0, c="k", lw=0.5)
    ax2.set_xlabel("step")
    ax2.set_ylabel("change after the update")
    ax2.set_title("per-step change")
    ax1.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, out_path)
