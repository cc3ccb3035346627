"""Task evaluation by generation: completions of held-out prompts (greedy, or sampled at a
temperature) scored by a reward function (exact-match accuracy on the synthetic arithmetic task by
default). `heldout_evaluator` is what the training runs call before and after training."""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import numpy as np

from jaxalign import data as jdata
from jaxalign.sample import make_sampler


def decode_completions(tokenizer, tokens, mask) -> list[str]:
    """Decodes each row's generated tokens (up to and including EOS) keeping special tokens."""
    out = []
    for row, m in zip(np.asarray(tokens), np.asarray(mask)):
        out.append(tokenizer.decode(row[m.astype(bool)].tolist(), skip_special_tokens=False))
    return out


def prompt_sampler(model, tokenizer, *, max_new_tokens: int, temperature: float | None = None):
    """`make_sampler` for `tokenizer`'s EOS and pad ids: greedy when `temperature` is None, else
    sampling at `temperature`."""
    return make_sampler(model, max_new_tokens=max_new_tokens, eos_ids=tokenizer.eos_token_id,
                        pad_id=tokenizer.pad_token_id, greedy=temperature is None,
                        temperature=1.0 if temperature is None else temperature)


def generate_for_prompts(model, variables, tokenizer, prompt_examples: Sequence[dict], *,
                         batch_size: int, max_new_tokens: int, rng=None, greedy=True,
                         temperature=1.0, sampler=None):
    """Completions (text) for tokenized prompt examples, in order. Last partial batch is padded
    with copies and trimmed, so every call has one shape (one compile)."""
    collate = jdata.make_collate_fn("prompt", pad_id=tokenizer.pad_token_id)
    sampler = sampler or prompt_sampler(model, tokenizer, max_new_tokens=max_new_tokens,
                                        temperature=None if greedy else temperature)
    rng = rng if rng is not None else jax.random.PRNGKey(0)
    texts: list[str] = []
    maxlen = max(len(e["prompt_ids"]) for e in prompt_examples)
    for start in range(0, len(prompt_examples), batch_size):
        chunk = list(prompt_examples[start:start + batch_size])
        n = len(chunk)
        chunk += [chunk[-1]] * (batch_size - n)
        batch = collate(chunk)
        toks, pm = batch["prompt_tokens"], batch["prompt_attention_mask"]
        if toks.shape[1] < maxlen:  # one prompt width for every batch: left-pad further
            pad = maxlen - toks.shape[1]
            toks = np.pad(toks, ((0, 0), (pad, 0)), constant_values=tokenizer.pad_token_id)
            pm = np.pad(pm, ((0, 0), (pad, 0)))
        rng, sub = jax.random.split(rng)
        out = sampler(variables, toks, pm, sub)
        texts += decode_completions(tokenizer, out["tokens"], out["mask"])[:n]
    return texts


def task_accuracy(model, variables, tokenizer, prompt_dataset, *, batch_size: int = 64,
                  max_new_tokens: int = 8,
                  reward_fn: Callable = jdata.exact_match_reward,
                  temperature: float | None = None, seed: int = 0) -> dict:
    """Accuracy on a prompt dataset with an `answer` column: the mean reward of one completion per
    prompt, greedy when `temperature` is None, else sampled at `temperature` (> 0) with the PRNG
    key `seed` (the policy as it behaves when sampled, e.g. by an RL or online-DPO loop). Returns a
    dict with 'accuracy', 'n' and a few example completions."""
    if temperature is not None and not temperature > 0:
        raise ValueError(f"`temperature` must be > 0 (None for greedy decoding), got {temperature!r}")
    examples = jdata.tokenize_dataset(prompt_dataset, tokenizer, kind="prompt").examples
    return _scored(model, variables, tokenizer, examples, batch_size=batch_size,
                   max_new_tokens=max_new_tokens, reward_fn=reward_fn, temperature=temperature,
                   seed=seed)


def _scored(model, variables, tokenizer, examples, *, batch_size, max_new_tokens, reward_fn,
            temperature, seed, sampler=None) -> dict:
    """`task_accuracy` on tokenized prompt examples (`sampler`: one made for this temperature)."""
    texts = generate_for_prompts(model, variables, tokenizer, examples, batch_size=batch_size,
                                 max_new_tokens=max_new_tokens, greedy=temperature is None,
                                 temperature=1.0 if temperature is None else temperature,
                                 rng=jax.random.PRNGKey(seed), sampler=sampler)
    answers = [e["metadata"]["answer"] for e in examples]
    rewards = reward_fn(texts, answers, eos=tokenizer.eos_token)
    return {"accuracy": float(np.mean(rewards)), "n": len(texts),
            "examples": list(zip(texts[:4], answers[:4]))}


def heldout_evaluator(model, tokenizer, *, num_prompts: int, seed: int, max_new_tokens: int = 6,
                      sampled_temperature: float = 0.0, batch_size: int = 64,
                      **problems: Any) -> Callable[[dict], dict]:
    """A function variables -> {'accuracy', 'n', 'examples'} on `num_prompts` held-out synthetic
    arithmetic prompts (the test split, drawn once with `seed`; `problems`: `digits`, `operators`
    as for `jaxalign.data.make_prompt_dataset`): greedy exact match, plus
    'sampled_accuracy' (one completion per prompt sampled at `sampled_temperature`, PRNG key
    `seed`) when `sampled_temperature` > 0."""
    if sampled_temperature < 0:
        raise ValueError(f"`sampled_temperature` must be >= 0 (0: greedy only), got {sampled_temperature!r}")
    ds = jdata.make_prompt_dataset(num_prompts, seed=seed, split="test", **problems)
    # tokenized once, and one jitted sampler per decoding, for every evaluation of the run
    examples = jdata.tokenize_dataset(ds, tokenizer, kind="prompt").examples
    temps = [None] + ([sampled_temperature] if sampled_temperature > 0 else [])
    samplers = {t: prompt_sampler(model, tokenizer, max_new_tokens=max_new_tokens, temperature=t)
                for t in temps}
    kw = dict(batch_size=batch_size, max_new_tokens=max_new_tokens, reward_fn=jdata.exact_match_reward,
              seed=seed)

    def evaluate(variables) -> dict:
        out = _scored(model, variables, tokenizer, examples, **kw, temperature=None,
                      sampler=samplers[None])
        if sampled_temperature > 0:
            out["sampled_accuracy"] = _scored(model, variables, tokenizer, examples, **kw,
                                              temperature=sampled_temperature,
                                              sampler=samplers[sampled_temperature])["accuracy"]
            out["sampled_temperature"] = sampled_temperature
        return out

    return evaluate


def accuracy_summary(result: dict) -> dict:
    """The numbers of a `heldout_evaluator` result (no example texts), for task_accuracy.json."""
    return {k: v for k, v in result.items() if k in ("accuracy", "n", "sampled_accuracy", "sampled_temperature")}


def accuracy_line(result: dict) -> str:
    """'0.875' or '0.875 greedy, 0.690 sampled at T=1'."""
    line = f"{result['accuracy']:.3f}"
    if "sampled_accuracy" in result:
        line += f" greedy, {result['sampled_accuracy']:.3f} sampled at T={result['sampled_temperature']:g}"
    return line
