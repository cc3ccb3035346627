"""Rollouts: sample `group_size` completions per prompt with the jitted KV-cache sampler, decode
them, and score them with the reward sources.

Layout (TRL's): the `group_size` completions of one prompt are consecutive rows, so rows
``g * group_size ... (g + 1) * group_size - 1`` are prompt g's group. N = num_prompts * group_size.
Rows are the prompt (left-padded to a fixed width P) followed by the completion (right-padded to
C = max_new_tokens), L = P + C:

    tokens          int32 [N, L]
    attention_mask  bool  [N, L]   real tokens (prompt and completion, up to and including EOS)
    loss_mask       bool  [N, L]   completion tokens (the trainer shifts: position t predicts t+1)
    sample_logps    fp32  [N, L-1] sampler log-probs of tokens[:, 1:] (0 outside completions)

so every array has one shape per run and each jitted function compiles once.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxalign import data as jdata
from jaxalign.evaluate import decode_completions
from jaxalign.losses.logps import token_logps
from jaxalign.rl.rewards import RewardSource, reward_metrics, score_with


@dataclasses.dataclass
class Rollout:
    """One batch of scored completions (numpy arrays; shapes in the module docstring)."""

    tokens: np.ndarray
    attention_mask: np.ndarray
    loss_mask: np.ndarray
    sample_logps: np.ndarray
    rewards: np.ndarray  # [N] weighted total
    reward_parts: dict[str, np.ndarray]  # {source name: [N]}
    prompts: list[str]
    completions: list[str]
    columns: dict[str, list]
    group_size: int

    @property
    def lengths(self) -> np.ndarray:
        """Completion lengths [N] (tokens up to and including EOS)."""
        return self.loss_mask.sum(-1)

    def take(self, rows: Sequence[int]) -> "Rollout":
        """The given rows (group_size becomes 1: the result is not grouped any more)."""
        rows = np.asarray(rows, np.int64)
        pick = lambda xs: [xs[int(i)] for i in rows]  # noqa: E731
        return Rollout(self.tokens[rows], self.attention_mask[rows], self.loss_mask[rows],
                       self.sample_logps[rows], self.rewards[rows],
                       {k: v[rows] for k, v in self.reward_parts.items()}, pick(self.prompts),
                       pick(self.completions), {k: pick(v) for k, v in self.columns.items()}, 1)


def concat_rollouts(rollouts: Sequence[Rollout]) -> Rollout:
    """Stacks rollouts of one shape and group size along the rows."""
    if not rollouts:
        raise ValueError("`rollouts` is empty")
    g = {r.group_size for r in rollouts}
    shapes = {r.tokens.shape[1] for r in rollouts}
    if len(g) != 1 or len(shapes) != 1:
        raise ValueError(f"rollouts must share group_size and row length, got {g} and {shapes}")
    cat = lambda f: np.concatenate([f(r) for r in rollouts], 0)  # noqa: E731
    return Rollout(cat(lambda r: r.tokens), cat(lambda r: r.attention_mask),
                   cat(lambda r: r.loss_mask), cat(lambda r: r.sample_logps),
                   cat(lambda r: r.rewards),
                   {k: cat(lambda r: r.reward_parts[k]) for k in rollouts[0].reward_parts},
                   sum((r.prompts for r in rollouts), []),
                   sum((r.completions for r in rollouts), []),
                   {k: sum((r.columns[k] for r in rollouts), []) for k in rollouts[0].columns},
                   g.pop())


class PromptStream:
    """Endless, resumable batches of `batch_size` prompts, left-padded to one width (the longest
    prompt of the dataset), so the sampler compiles once. `state` is a `jaxalign.data.IteratorState`
    to save with a checkpoint."""

    def __init__(self, tokenized_prompts, *, pad_id: int, batch_size: int, seed: int,
                 state: jdata.IteratorState | None = None):
        examples = tokenized_prompts.examples
        if not examples:
            raise ValueError("the prompt dataset is empty")
        if batch_size > len(examples):
            raise ValueError(f"prompts per batch ({batch_size}) exceeds the prompt dataset size "
                             f"({len(examples)})")
        self.batch_size = batch_size
        self.width = max(len(e["prompt_ids"]) for e in examples)
        collate = jdata.make_collate_fn("prompt", pad_id=pad_id, buckets=[self.width])
        self.state = state or jdata.IteratorState()
        self._it = jdata.iterate_batches(examples, collate, batch_size=batch_size, seed=seed,
                                         state=self.state)

    def next(self) -> dict:
        batch, self.state = next(self._it)
        return batch


def forward_logps(model, variables, tokens, attention_mask, loss_mask, *, temperature: float = 1.0,
                  return_hidden: bool = False):
    """Teacher-forced log-probs of tokens[:, 1:] under softmax(logits / temperature), as sampled.

    Returns (logps [N, L-1] fp32 masked by loss_mask[:, 1:], entropy [N, L-1] fp32 of the same
    distribution (0 where masked), hidden [N, L, D] or None). With `return_hidden`, logits come
    from the final hidden states times the LM head (one forward pass for policy and value head).
    """
    hidden = None
    if return_hidden:
        from jaxalign.models.layers import materialize_kernel
        from jaxalign.train.objectives import lm_head_kernel

        if "lora" in variables and "lm_head" in variables["lora"]:
            raise ValueError("return_hidden=True computes logits with the base lm_head; a LoRA "
                             "adapter on lm_head is not supported here")
        hidden = model.apply(variables, tokens, attention_mask=attention_mask, return_hidden=True)
        kernel = materialize_kernel(lm_head_kernel(variables["params"], model.config), model.dtype)
        logits = hidden[:, :-1] @ kernel
    else:  # the LM head runs on positions 0..L-2 only (the last one predicts nothing)
        logits = model.apply(variables, tokens, attention_mask=attention_mask,
                             logits_at=slice(None, -1))
    logits = logits.astype(jnp.float32) / temperature
    mask = loss_mask[:, 1:]
    lp = token_logps(logits, tokens[:, 1:], mask)
    logp_all = jax.nn.log_softmax(logits, axis=-1)
    entropy = -jnp.sum(jnp.exp(logp_all) * logp_all, axis=-1)
    entropy = jnp.where(mask, jax.lax.stop_gradient(entropy), 0.0)
    return lp, entropy, hidden


def make_logps_fn(model, *, temperature: float = 1.0):
    """Jitted `logps(variables, tokens, attention_mask, loss_mask) -> [N, L-1]` (no gradient)."""

    @jax.jit
    def logps(variables, tokens, attention_mask, loss_mask):
        return forward_logps(model, variables, tokens, attention_mask, loss_mask,
                             temperature=temperature)[0]

    return logps


def generate(sample_fn, variables, prompt_batch: dict, *, group_size: int, rng, tokenizer,
             sources: Sequence[RewardSource]) -> Rollout:
    """Samples `group_size` completions for each prompt of a `PromptStream` batch and scores them.

    `sample_fn` is a jitted sampler from `jaxalign.sample.make_sampler` (KV cache; `variables` may
    hold LoRA adapters). Rewards are computed in Python by `sources`.
    """
    if not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"`group_size` must be a positive int, got {group_size!r}")
    ptoks = np.repeat(np.asarray(prompt_batch["prompt_tokens"]), group_size, axis=0)
    pmask = np.repeat(np.asarray(prompt_batch["prompt_attention_mask"]), group_size, axis=0)
    out = jax.device_get(sample_fn(variables, ptoks, pmask, rng))
    ctoks, cmask = np.asarray(out["tokens"]), np.asarray(out["mask"]).astype(bool)
    n, p = ptoks.shape
    tokens = np.concatenate([ptoks, ctoks], 1).astype(np.int32)
    attention_mask = np.concatenate([pmask.astype(bool), cmask], 1)
    loss_mask = np.concatenate([np.zeros_like(pmask, dtype=bool), cmask], 1)
    sample_logps = np.zeros((n, tokens.shape[1] - 1), np.float32)
    sample_logps[:, p - 1:] = np.where(cmask, np.asarray(out["logps"], np.float32), 0.0)
    completions = decode_completions(tokenizer, ctoks, cmask)
    prompts = [tokenizer.decode(row[m.astype(bool)].tolist(), skip_special_tokens=True)
               for row, m in zip(ptoks, pmask)]
    meta = {k: v for k, v in prompt_batch.items()
            if k not in ("prompt_tokens", "prompt_attention_mask")}
    columns = {k: [x for x in v for _ in range(group_size)] for k, v in meta.items()}
    rewards, parts = score_with(sources, prompts=prompts, completions=completions, tokens=tokens,
                                attention_mask=attention_mask, columns=columns)
    return Rollout(tokens, attention_mask, loss_mask, sample_logps, rewards, parts, prompts,
                   completions, columns, group_size)


def terminated(rollout: Rollout, eos_id: int | Sequence[int]) -> np.ndarray:
    """[N] bool: the completion's last token is an EOS (False for truncated completions)."""
    lm = rollout.loss_mask
    last = lm.shape[1] - 1 - np.argmax(lm[:, ::-1], axis=1)
    tok = np.take_along_axis(rollout.tokens, last[:, None], 1)[:, 0]
    return np.isin(tok, np.atleast_1d(np.asarray(eos_id))) & lm.any(1)


def rollout_metrics(rollout: Rollout, *, eos_id: int | Sequence[int]) -> dict[str, float]:
    """TRL GRPOTrainer's rollout metrics: `reward`, `reward_std` (unbiased, whole batch),
    `reward_std/group` (mean over groups of the per-group std), `frac_reward_zero_std`,
    `completions/{mean,min,max}_length`, `completions/clipped_ratio` (no EOS within
    max_new_tokens), `rewards/<source>/{mean,std}`."""
    r = rollout.rewards.astype(np.float64)
    g = rollout.group_size
    grouped = r.reshape(-1, g)
    group_std = grouped.std(axis=1, ddof=1) if g > 1 else np.zeros(grouped.shape[0])
    lengths = rollout.lengths
    done = terminated(rollout, eos_id)
    m = {
        "reward": float(r.mean()),
        "reward_std": float(r.std(ddof=1)) if r.size > 1 else 0.0,
        "reward_std/group": float(group_std.mean()),
        "frac_reward_zero_std": float(np.mean(np.isclose(group_std, 0.0))) if g > 1 else 1.0,
        "completions/mean_length": float(lengths.mean()),
        "completions/min_length": float(lengths.min()),
        "completions/max_length": float(lengths.max()),
        "completions/clipped_ratio": float(np.mean(~done)),
    }
    m.update(reward_metrics(rollout.rewards, rollout.reward_parts))
    return m

