"""Capability-regression evaluation: the "alignment tax" of a preference-tuning run.

The tax is what alignment costs on a held-out *capability* set that the alignment data does not
cover: `tax = capability(before) - capability(after)`, reported together with the *alignment gain*
`alignment(after) - alignment(before)` on a held-out set of the aligned task (Lin et al., 2024,
"Mitigating the Alignment Tax of RLHF").

Both sides are measured on prompt/completion sets (any SFT-format dataset: the synthetic task or a
user file) by one forward pass per batch:

- `accuracy`: greedy exact match under teacher forcing. A completion counts as correct iff at every
  completion position (EOS included) the argmax of the model's next-token distribution given the
  *reference* prefix is the reference token. This equals "greedy decoding reproduces the reference
  completion exactly" (when greedy decoding takes the argmax, as `jaxalign.sample` does), because
  greedy decoding follows the reference prefix for as long as every argmax matches. It equals the
  text exact match of `jaxalign.evaluate.task_accuracy` whenever the reference answer has one
  tokenization (true for the character tokenizer of the synthetic task).
- `nll`: mean negative log-likelihood per completion token (fp32).
- `logps`: mean summed log-probability of the completion (the DPO "sequence log-prob").

On preference pairs, `pair_metrics` measures how often the policy itself ranks the chosen
completion above the rejected one (`pref_accuracy`), and, given reference log-probs, the DPO
implicit-reward margin and accuracy (Rafailov et al., 2023).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxalign.losses.logps import token_logps

__all__ = [
    "EvalSet", "alignment_tax", "completion_metrics", "evaluate_sets", "make_completion_scorer",
    "make_eval_set", "make_tax_evaluator", "pair_metrics", "score_completions", "teacher_forced_scores",
]

_SYNTHETIC_KINDS = {"synthetic:sft": "sft", "synthetic:preference": "preference"}


@dataclasses.dataclass(frozen=True)
class EvalSet:
    """A named, tokenized evaluation set: `examples` (dicts from `tokenize_dataset`) of `kind`
    'sft' (prompt/completion) or 'preference' (chosen/rejected pairs) and the `collate` function
    turning a list of them into a batch (`make_collate_fn(kind, ...)`)."""

    name: str
    examples: Sequence[dict]
    collate: Callable[[list], dict]
    kind: str = "sft"

    def __post_init__(self):
        if len(self.examples) == 0:
            raise ValueError(f"EvalSet {self.name!r}: `examples` is empty")
        if self.kind not in ("sft", "preference"):
            raise ValueError(f"EvalSet {self.name!r}: kind must be 'sft' or 'preference', got "
                             f"{self.kind!r}")


def make_eval_set(name: str, tokenizer, *, source: str = "synthetic:sft", n: int = 256,
                  seed: int = 0, split: str = "test", kind: str | None = None,
                  synthetic: Mapping[str, Any] | None = None, max_length: int | None = None,
                  pad_to_multiple_of: int | None = 8, on_error: str = "raise") -> EvalSet:
    """An `EvalSet` from the synthetic task or a user dataset.

    source: 'synthetic:sft' (prompt/completion, the correct answers of the held-out split),
      'synthetic:preference' (held-out correct/one-digit-wrong pairs), or a local dataset file /
      directory (`jaxalign.data.load_dataset`, `split` selects the split of a DatasetDict).
    n / seed / synthetic: size, seed and generator keywords (digits, operators) of a synthetic set.
    kind: 'sft' or 'preference' (default: from the synthetic source, else 'sft').
    """
    from jaxalign import data as jdata

    if source.startswith("synthetic:"):
        if source not in _SYNTHETIC_KINDS:
            raise ValueError(f"EvalSet {name!r}: source={source!r}; synthetic sources are "
                             f"{sorted(_SYNTHETIC_KINDS)}")
        kind = kind or _SYNTHETIC_KINDS[source]
        make = jdata.make_sft_dataset if source == "synthetic:sft" else jdata.make_preference_dataset
        ds = make(n, seed=seed, split=split, **dict(synthetic or {}))
    else:
        kind = kind or "sft"
        ds, _ = jdata.load_dataset(source, split=split, on_error=on_error)
    if kind not in ("sft", "preference"):
        raise ValueError(f"EvalSet {name!r}: kind must be 'sft' or 'preference', got {kind!r}")
    tok = jdata.tokenize_dataset(ds, tokenizer, kind=kind, max_length=max_length, on_error=on_error,
                                 source=source)
    collate = jdata.make_collate_fn(kind, pad_id=tokenizer.pad_token_id,
                                    pad_to_multiple_of=pad_to_multiple_of)
    return EvalSet(name=name, examples=tok.examples, collate=collate, kind=kind)


def teacher_forced_scores(logits, tokens, loss_mask):
    """Per-sequence scores of the completions in a right-padded batch.

    Args:
      logits: [B, T, V] next-token logits for `tokens` (logits[:, t] predicts tokens[:, t + 1]).
      tokens: [B, T] int token ids.
      loss_mask: [B, T] bool, True at the completion tokens to score (EOS included).

    Returns:
      dict of [B] arrays: `correct` (bool: every masked token is the argmax given the reference
      prefix; False for a row with no masked token), `logps` (fp32 sum of log p of the masked
      tokens), `num_tokens` (int32 count of masked tokens).
    """
    if logits.ndim != 3 or tokens.shape != logits.shape[:2] or loss_mask.shape != tokens.shape:
        raise ValueError(f"teacher_forced_scores: expected logits [B, T, V], tokens [B, T] and "
                         f"loss_mask [B, T]; got {logits.shape}, {tokens.shape}, {loss_mask.shape}")
    labels, mask = tokens[:, 1:], loss_mask[:, 1:].astype(bool)
    pred = jnp.argmax(logits[:, :-1], axis=-1)
    hits = jnp.where(mask, pred == labels, True)
    n = mask.sum(-1).astype(jnp.int32)
    logps = token_logps(logits[:, :-1], labels, mask).sum(-1)
    return {"correct": jnp.all(hits, axis=-1) & (n > 0), "logps": logps, "num_tokens": n}


def make_completion_scorer(model) -> Callable:
    """Jitted `score(variables, tokens [B, T], attention_mask [B, T], loss_mask [B, T])` returning
    `teacher_forced_scores` of `model.apply(variables, tokens, attention_mask=...)`. `variables`
    is {'params': ...} (plus 'lora': adapters for a LoRA model). One compile per batch shape."""

    @jax.jit
    def score(variables, tokens, attention_mask, loss_mask):
        logits = model.apply(variables, tokens, attention_mask=attention_mask, deterministic=True)
        return teacher_forced_scores(logits.astype(jnp.float32), tokens, loss_mask)

    return score


def _batches(examples: Sequence[dict], batch_size: int):
    """(chunk padded with copies of its last example to `batch_size`, number of real rows)."""
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"`batch_size` must be a positive int, got {batch_size!r}")
    for start in range(0, len(examples), batch_size):
        chunk = list(examples[start:start + batch_size])
        n = len(chunk)
        yield chunk + [chunk[-1]] * (batch_size - n), n


def score_completions(scorer: Callable, variables, eval_set: EvalSet, *, batch_size: int = 64,
                      prefix: str = "") -> dict[str, np.ndarray]:
    """Runs `scorer` over every example of `eval_set` (SFT kind, or `prefix='chosen_'` /
    'rejected_' on a preference set); returns numpy arrays [N] (see `teacher_forced_scores`)."""
    out: dict[str, list] = {"correct": [], "logps": [], "num_tokens": []}
    for chunk, n in _batches(eval_set.examples, batch_size):
        b = eval_set.collate(chunk)
        if prefix + "tokens" not in b:
            raise ValueError(f"EvalSet {eval_set.name!r}: batches have keys {sorted(b)}, no "
                             f"{prefix + 'tokens'!r}")
        s = jax.device_get(scorer(variables, b[prefix + "tokens"], b[prefix + "attention_mask"],
                                  b[prefix + "loss_mask"]))
        for k in out:
            out[k].append(np.asarray(s[k])[:n])
    return {k: np.concatenate(v) for k, v in out.items()}


def completion_metrics(scorer: Callable, variables, eval_set: EvalSet, *,
                       batch_size: int = 64) -> dict[str, float]:
    """{'accuracy', 'nll', 'logps', 'n'} of `variables` on an SFT-kind `eval_set` (module doc)."""
    s = score_completions(scorer, variables, eval_set, batch_size=batch_size)
    ntok = max(int(s["num_tokens"].sum()), 1)
    return {"accuracy": float(s["correct"].mean()), "nll": float(-s["logps"].sum() / ntok),
            "logps": float(s["logps"].mean()), "n": int(len(s["correct"]))}


def pair_metrics(scorer: Callable, variables, eval_set: EvalSet, *, batch_size: int = 64,
                 ref_logps: Mapping[str, np.ndarray] | None = None,
                 beta: float = 0.1) -> dict[str, Any]:
    """Preference metrics of `variables` on a preference-kind `eval_set`.

    `pref_accuracy` = mean[log pi(y_w|x) > log pi(y_l|x)] (the policy's own ranking) and
    `pref_margin` = mean[log pi(y_w|x) - log pi(y_l|x)] (its change from the reference model is
    the mean DPO implicit-reward margin divided by beta). With
    `ref_logps` ({'chosen': [N], 'rejected': [N]}, e.g. this function's `logps` output for the
    reference model) also the DPO implicit rewards r = beta * (log pi - log pi_ref):
    `reward_margin` = mean(r_w - r_l) and `reward_accuracy` = mean[r_w > r_l].
    Returns floats and `logps` ({'chosen', 'rejected'} arrays [N]) for reuse as a reference.
    """
    chosen = score_completions(scorer, variables, eval_set, batch_size=batch_size, prefix="chosen_")
    rejected = score_completions(scorer, variables, eval_set, batch_size=batch_size,
                                 prefix="rejected_")
    lw, ll = chosen["logps"], rejected["logps"]
    out: dict[str, Any] = {"pref_accuracy": float(np.mean(lw > ll)),
                           "pref_margin": float(np.mean(lw - ll)), "n": int(len(lw)),
                           "logps": {"chosen": lw, "rejected": ll}}
    if ref_logps is not None:
        for side, arr in (("chosen", lw), ("rejected", ll)):
            if side not in ref_logps or np.shape(ref_logps[side]) != arr.shape:
                raise ValueError(f"`ref_logps[{side!r}]` must be an array of shape {arr.shape}, got "
                                 f"{np.shape(ref_logps.get(side))}")
        margin = beta * ((lw - ref_logps["chosen"]) - (ll - ref_logps["rejected"]))
        out["reward_margin"] = float(margin.mean())
        out["reward_accuracy"] = float(np.mean(margin > 0))
    return out


def alignment_tax(before: Mapping[str, float], after: Mapping[str, float], *,
                  capability: str = "capability/accuracy",
                  alignment: str = "alignment/accuracy",
                  capability_higher_is_better: bool = True,
                  alignment_higher_is_better: bool = True) -> dict[str, float]:
    """The alignment tax and gain between two metric dicts (flat 'set/metric' keys).

    tax = capability(before) - capability(after)       (> 0: capability was lost)
    gain = alignment(after) - alignment(before)        (> 0: the aligned metric improved)
    relative_tax = tax / |capability(before)| (nan when capability(before) is 0).
    For a lower-is-better metric (an NLL) set `*_higher_is_better=False`: its sign flips, so a
    positive tax is still a regression and a positive gain still an improvement.
    """
    for name, d in (("before", before), ("after", after)):
        for key in (capability, alignment):
            if key not in d:
                raise ValueError(f"alignment_tax: `{name}` has no metric {key!r}; it has {sorted(d)}")
    cs = 1.0 if capability_higher_is_better else -1.0
    al = 1.0 if alignment_higher_is_better else -1.0
    tax = cs * (float(before[capability]) - float(after[capability]))
    gain = al * (float(after[alignment]) - float(before[alignment]))
    base = abs(float(before[capability]))
    return {"tax": tax, "gain": gain, "relative_tax": tax / base if base else math.nan,
            "capability_before": float(before[capability]),
            "capability_after": float(after[capability]),
            "alignment_before": float(before[alignment]), "alignment_after": float(after[alignment])}


def evaluate_sets(scorer: Callable, variables, sets: Sequence[EvalSet], *,
                  batch_size: int = 64) -> dict[str, float]:
    """Flat '{set name}/{metric}' dict: `completion_metrics` for 'sft' sets, `pair_metrics`
    (`pref_accuracy`) for 'preference' sets."""
    out: dict[str, float] = {}
    for s in sets:
        if s.kind == "sft":
            m = completion_metrics(scorer, variables, s, batch_size=batch_size)
        else:
            m = {k: v for k, v in pair_metrics(scorer, variables, s, batch_size=batch_size).items()
                 if k != "logps"}
        out.update({f"{s.name}/{k}": v for k, v in m.items()})
    return out


def make_tax_evaluator(model, tokenizer, *, capability_source: str,
                       capability_synthetic: Mapping[str, Any] | None = None,
                       alignment_source: str = "",
                       alignment_synthetic: Mapping[str, Any] | None = None,
                       preference_source: str = "",
                       num_examples: int = 256, seed: int = 0, batch_size: int = 64,
                       max_length: int | None = None) -> Callable[[Any], dict[str, float]]:
    """`evaluate(variables) -> {'capability/accuracy', 'capability/nll', ..., 'alignment/...',
    'preference/pref_accuracy'}` on a held-out capability set, and when given a held-out set of
    the aligned task (`alignment_source`, prompt/completion) and held-out preference pairs
    (`preference_source`, generated with `alignment_synthetic`); feed two of its results to
    `alignment_tax`. Sources as in `make_eval_set`."""
    sets = [make_eval_set("capability", tokenizer, source=capability_source, n=num_examples,
                          seed=seed, synthetic=capability_synthetic, max_length=max_length)]
    if alignment_source:
        sets.append(make_eval_set("alignment", tokenizer, source=alignment_source, n=num_examples,
                                  seed=seed + 1, synthetic=alignment_synthetic,
                                  max_length=max_length))
    if preference_source:
        sets.append(make_eval_set("preference", tokenizer, source=preference_source,
                                  n=num_examples, seed=seed + 2, synthetic=alignment_synthetic,
                                  max_length=max_length, kind="preference"))
    scorer = make_completion_scorer(model)
    return lambda variables: evaluate_sets(scorer, variables, sets, batch_size=batch_size)
