"""Task evaluation by generation: greedy completions of held-out prompts scored by a reward
function (exact-match accuracy on the synthetic arithmetic task by default)."""

from __future__ import annotations

from typing import Callable, Sequence

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


def generate_for_prompts(model, variables, tokenizer, prompt_examples: Sequence[dict], *,
                         batch_size: int, max_new_tokens: int, rng=None, greedy=True,
                         temperature=1.0, sampler=None):
    """Completions (text) for tokenized prompt examples, in order. Last partial batch is padded
    with copies and trimmed, so every call has one shape (one compile)."""
    collate = jdata.make_collate_fn("prompt", pad_id=tokenizer.pad_token_id)
    sampler = sampler or make_sampler(model, max_new_tokens=max_new_tokens, eos_ids=tokenizer.eos_token_id,
                                      pad_id=tokenizer.pad_token_id, greedy=greedy, temperature=temperature)
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
                  reward_fn: Callable = jdata.exact_match_reward) -> dict:
    """Greedy accuracy on a prompt dataset with an `answer` column. Returns a dict with
    'accuracy', 'n' and a few example completions."""
    tok = jdata.tokenize_dataset(prompt_dataset, tokenizer, kind="prompt")
    examples = tok.examples
    texts = generate_for_prompts(model, variables, tokenizer, examples, batch_size=batch_size,
                                 max_new_tokens=max_new_tokens)
    answers = [e["metadata"]["answer"] for e in examples]
    rewards = reward_fn(texts, answers, eos=tokenizer.eos_token)
    return {"accuracy": float(np.mean(rewards)), "n": len(texts),
            "examples": list(zip(texts[:4], answers[:4]))}
