"""Per-batch objectives: model forward passes composed with the pure losses.

Each objective is `objective(trainable, frozen, batch, rng) -> (loss scalar, metrics dict)` built
once by `make_objective(...)` from plain Python values (no config objects inside).

Variables: the policy runs with `{'params': trainable['params'] or frozen['params'],
'lora': trainable['lora']}`; the reference model is `frozen['ref_params']` (full fine-tuning),
the same base *without* the adapter (LoRA: no second copy of the weights), or log-probs
precomputed once and carried in the batch (`ref_chosen_logps`, `ref_rejected_logps`, ...).

Batches (from jaxalign.data collators): token arrays aligned with the input, loss_mask[b, t] = 1
iff token t is a completion token to predict. Preference batches may instead be prefix-shared
(`jaxalign.data.prefix_sharing.share_prefix`: each pair's prompt computed once); the preference
objective then runs one packed forward and gets the same log-probs.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Callable

import jax
import jax.numpy as jnp

from jaxalign.data.prefix_sharing import is_packed
from jaxalign.losses.logps import reduce_sequence, token_logps, token_logps_from_hidden

REFERENCE_MODES = ("none", "model", "base", "precomputed")


@dataclasses.dataclass(frozen=True)
class ObjectiveSpec:
    """Static description of what a step optimises (built once from the config)."""

    kind: str  # 'sft' | 'preference' | 'kto' | 'reward'
    loss_fn: Callable | None = None
    loss_kwargs: tuple = ()  # ((name, value), ...) hyperparameters
    reference: str = "none"
    average_logps: bool = False  # pass length-normalised log-probs to the loss (IPO as in TRL)
    vocab_chunk: int | None = None  # chunked log-prob path from hidden states
    lambda_sft: float = 0.0  # auxiliary SFT mixing on a second batch (`sft_*` keys)
    rpo_alpha: float = 0.0  # + rpo_alpha * NLL of the chosen response (TRL's rpo_alpha; IRPO)

    def __post_init__(self):
        if self.kind not in ("sft", "preference", "kto", "reward"):
            raise ValueError(f"objective kind must be sft/preference/kto/reward, got {self.kind!r}")
        if self.reference not in REFERENCE_MODES:
            raise ValueError(f"reference must be one of {REFERENCE_MODES}, got {self.reference!r}")


def policy_variables(trainable, frozen):
    v = {"params": trainable["params"] if "params" in trainable else frozen["params"]}
    if "lora" in trainable:
        v["lora"] = trainable["lora"]
    return v


def reference_variables(frozen, mode):
    if mode == "model":
        return {"params": frozen["ref_params"]}
    if mode == "base":
        return {"params": frozen["params"]}
    raise ValueError(f"no reference model for mode {mode!r}")


def lm_head_kernel(params, config):
    if getattr(config, "tie_word_embeddings", False):
        table = params["wte"]["embedding"] if "wte" in params else params["embed_tokens"]["embedding"]
        return table.T
    return params["lm_head"]["kernel"]


def indexed_loss_mask(loss_mask, loss_index):
    """loss_mask [B, T] read at loss_index [B, K] (0 = padding slot) -> bool [B, K]."""
    picked = jnp.take_along_axis(loss_mask.astype(bool), loss_index, axis=1)
    return picked & (loss_index > 0)


def scored_logps(model, variables, tokens, labels, mask, *, vocab_chunk=None, rng=None,
                 deterministic=True, **apply_kw):
    """log p(labels) [B, K] (0 where not mask) from one forward of `tokens` whose final norm and
    LM head run at `apply_kw['logits_at']`: the logits path, or with `vocab_chunk` the chunked
    path from hidden states. apply_kw: the model's other call arguments (attention_mask, ...)."""
    rngs = {"dropout": rng} if rng is not None and not deterministic else None
    kw = dict(deterministic=deterministic, rngs=rngs, **apply_kw)
    if not vocab_chunk:
        return token_logps(model.apply(variables, tokens, **kw), labels, mask)
    from jaxalign.models.layers import materialize_kernel

    hidden = model.apply(variables, tokens, return_hidden=True, **kw)
    kernel = materialize_kernel(lm_head_kernel(variables["params"], model.config), model.dtype)
    return token_logps_from_hidden(hidden, kernel, labels, mask, vocab_chunk=vocab_chunk)


def token_logps_of(model, variables, tokens, attention_mask, loss_mask, *, loss_index=None,
                   vocab_chunk=None, rng=None, deterministic=True):
    """Per-token log-probs of the predicted tokens under the model, masked by loss_mask.

    Without `loss_index`: [B, T-1], of tokens[:, 1:] (the LM head runs on positions 0..T-2).
    With `loss_index` int [B, K] (`jaxalign.data.collate.loss_index`: the t >= 1 with
    loss_mask[b, t], 0 in unused slots): [B, K], of tokens[b, loss_index[b, k]]; the final norm and
    LM head run on those K positions per row only, and slots that are not loss tokens are 0 (mask:
    `indexed_loss_mask`). A row whose loss_mask has a loss token that loss_index misses gives NaN,
    so an inconsistent batch cannot pass unnoticed.
    """
    if loss_index is None:
        at, labels, mask = slice(None, -1), tokens[:, 1:], loss_mask[:, 1:]
    else:
        at = jnp.maximum(loss_index - 1, 0)
        labels = jnp.take_along_axis(tokens, loss_index, axis=1)
        mask = indexed_loss_mask(loss_mask, loss_index)
    out = scored_logps(model, variables, tokens, labels, mask, vocab_chunk=vocab_chunk, rng=rng,
                       deterministic=deterministic, attention_mask=attention_mask, logits_at=at)
    if loss_index is not None:
        missed = loss_mask[:, 1:].astype(jnp.int32).sum(-1) != mask.astype(jnp.int32).sum(-1)
        out = jnp.where(missed[:, None], jnp.nan, out)
    return out


def packed_token_logps_of(model, variables, batch, *, vocab_chunk=None, rng=None,
                          deterministic=True):
    """Per-token log-probs of a prefix-shared preference batch (`jaxalign.data.prefix_sharing`):
    one forward over the packed rows [B, S], the final norm and LM head at the 2K scored slots.

    Returns (token log-probs, mask), each [2B, K]: the chosen rows, then the rejected rows, like
    `token_logps_of` on the two halves of an unpacked batch with a loss index.
    """
    at = jnp.concatenate([batch["chosen_logits_at"], batch["rejected_logits_at"]], 1)
    labels = jnp.concatenate([batch["chosen_labels"], batch["rejected_labels"]], 1)
    mask = jnp.concatenate([batch["chosen_label_mask"], batch["rejected_label_mask"]], 1)
    out = scored_logps(model, variables, batch["packed_tokens"], labels, mask,
                       vocab_chunk=vocab_chunk, rng=rng, deterministic=deterministic,
                       attention_mask=batch["packed_attention_mask"],
                       segment_ids=batch["packed_segment_ids"], logits_at=at)
    k = batch["chosen_labels"].shape[1]
    split = lambda x: jnp.concatenate([x[:, :k], x[:, k:]], 0)  # noqa: E731
    return split(out), split(mask.astype(bool))


def _call_loss(fn, kwargs, available):
    params = inspect.signature(fn).parameters
    if any(p.kind == p.VAR_KEYWORD for p in params.values()):
        return fn(**available, **kwargs)
    args = {k: v for k, v in available.items() if k in params}
    return fn(**args, **kwargs)


def _mean_metrics(metrics):
    return {k: jnp.mean(jnp.asarray(v, jnp.float32)) for k, v in metrics.items()}


def make_objective(model, spec: ObjectiveSpec, *, score_fn=None):
    """Returns objective(trainable, frozen, batch, rng, deterministic) -> (loss, metrics)."""
    hp = dict(spec.loss_kwargs)

    def logps(variables, tokens, am, lm, rng, deterministic, li=None):
        """(token log-probs, mask): [B, T-1] each, or [B, K] with a loss index `li`."""
        tok = token_logps_of(model, variables, tokens, am, lm, loss_index=li,
                             vocab_chunk=spec.vocab_chunk, rng=rng, deterministic=deterministic)
        return tok, (lm[:, 1:] if li is None else indexed_loss_mask(lm, li))

    def sft_nll(variables, batch, prefix, rng, deterministic):
        tok, m = logps(variables, batch[prefix + "tokens"], batch[prefix + "attention_mask"],
                       batch[prefix + "loss_mask"], rng, deterministic, batch.get(prefix + "loss_index"))
        n = jnp.maximum(m.sum(), 1)
        return -jnp.sum(tok) / n, m.sum()

    def pair_logps(variables, batch, rng, deterministic):
        """(token log-probs, mask) [2B, ...] of the chosen rows then the rejected rows, from a
        plain or a prefix-shared (packed) preference batch."""
        if is_packed(batch):
            return packed_token_logps_of(model, variables, batch, vocab_chunk=spec.vocab_chunk,
                                         rng=rng, deterministic=deterministic)
        tokens = jnp.concatenate([batch["chosen_tokens"], batch["rejected_tokens"]], 0)
        am = jnp.concatenate([batch["chosen_attention_mask"], batch["rejected_attention_mask"]], 0)
        lm = jnp.concatenate([batch["chosen_loss_mask"], batch["rejected_loss_mask"]], 0)
        li = None
        if "chosen_loss_index" in batch and "rejected_loss_index" in batch:
            li = jnp.concatenate([batch["chosen_loss_index"], batch["rejected_loss_index"]], 0)
        return logps(variables, tokens, am, lm, rng, deterministic, li)

    def preference(trainable, frozen, batch, rng, deterministic):
        b = (batch["packed_tokens"] if is_packed(batch) else batch["chosen_tokens"]).shape[0]
        tok, m = pair_logps(policy_variables(trainable, frozen), batch, rng, deterministic)
        lengths = m.sum(-1).astype(jnp.float32)
        seq = reduce_sequence(tok, m, average=spec.average_logps)
        avail = {
            "policy_chosen_logps": seq[:b], "policy_rejected_logps": seq[b:],
            "chosen_lengths": lengths[:b], "rejected_lengths": lengths[b:],
            "chosen_nll": -reduce_sequence(tok[:b], m[:b], average=True),
            "target_logps": reduce_sequence(tok[:b], m[:b]),
        }
        if spec.reference == "precomputed":
            avail["ref_chosen_logps"] = batch["ref_chosen_logps"]
            avail["ref_rejected_logps"] = batch["ref_rejected_logps"]
        elif spec.reference != "none":
            rtok, _ = pair_logps(reference_variables(frozen, spec.reference), batch, None, True)
            rseq = jax.lax.stop_gradient(reduce_sequence(rtok, m, average=spec.average_logps))
            avail["ref_chosen_logps"], avail["ref_rejected_logps"] = rseq[:b], rseq[b:]
        losses, metrics = _call_loss(spec.loss_fn, hp, avail)
        metrics = _mean_metrics(metrics)
        loss = jnp.mean(losses)
        if spec.rpo_alpha:
            # Pang et al. 2024 (Iterative RPO): the chosen NLL keeps DPO from lowering the
            # likelihood of correct answers; token-mean over the batch's chosen tokens as in TRL.
            nll = -jnp.sum(tok[:b]) / jnp.maximum(m[:b].sum(), 1)
            metrics = {**metrics, "nll_loss": nll, "loss/preference": loss}
            loss = loss + spec.rpo_alpha * nll
        return loss, metrics, lengths.sum()

    def kto(trainable, frozen, batch, rng, deterministic):
        from jaxalign.losses.kto import kto_kl_estimate

        b = batch["tokens"].shape[0]
        tokens = jnp.concatenate([batch["tokens"], batch["kl_tokens"]], 0)
        am = jnp.concatenate([batch["attention_mask"], batch["kl_attention_mask"]], 0)
        lm = jnp.concatenate([batch["loss_mask"], batch["kl_loss_mask"]], 0)
        tok, m = logps(policy_variables(trainable, frozen), tokens, am, lm, rng, deterministic)
        seq = reduce_sequence(tok, m)
        if spec.reference == "precomputed":
            rseq = jnp.concatenate([batch["ref_logps"], batch["ref_kl_logps"]], 0)
        else:
            rtok, _ = logps(reference_variables(frozen, spec.reference), tokens, am, lm, None, True)
            rseq = jax.lax.stop_gradient(reduce_sequence(rtok, m))
        kl = kto_kl_estimate(seq[b:], rseq[b:])
        avail = {"policy_logps": seq[:b], "ref_logps": rseq[:b], "labels": batch["label"].astype(bool),
                 "kl": kl}
        losses, metrics = _call_loss(spec.loss_fn, hp, avail)
        metrics = {k: jnp.sum(jnp.asarray(v, jnp.float32)) / b for k, v in metrics.items()}
        metrics["kl"] = kl
        return jnp.mean(losses), metrics, m.sum()

    def reward(trainable, frozen, batch, rng, deterministic):
        if is_packed(batch):
            raise ValueError("reward-model batches score whole sequences; prefix-shared (packed) "
                             "batches are for the preference objectives")
        tokens = jnp.concatenate([batch["chosen_tokens"], batch["rejected_tokens"]], 0)
        am = jnp.concatenate([batch["chosen_attention_mask"], batch["rejected_attention_mask"]], 0)
        b = batch["chosen_tokens"].shape[0]
        r = score_fn(trainable, frozen, tokens, am)
        avail = {"rewards_chosen": r[:b], "rewards_rejected": r[b:]}
        if "margin" in batch:
            avail["margin"] = batch["margin"]
        losses, metrics = _call_loss(spec.loss_fn, hp, avail)
        return jnp.mean(losses), _mean_metrics(metrics), am.sum()

    def sft(trainable, frozen, batch, rng, deterministic):
        nll, ntok = sft_nll(policy_variables(trainable, frozen), batch, "", rng, deterministic)
        return nll, {"nll_loss": nll}, ntok

    body = {"preference": preference, "kto": kto, "reward": reward, "sft": sft}[spec.kind]

    def objective(trainable, frozen, batch, rng, deterministic=False):
        r1, r2 = jax.random.split(rng)
        loss, metrics, ntok = body(trainable, frozen, batch, r1, deterministic)
        if spec.lambda_sft and "sft_tokens" in batch:
            nll, ntok2 = sft_nll(policy_variables(trainable, frozen), batch, "sft_", r2, deterministic)
            metrics = {**metrics, "aux_sft/nll": nll, "loss/preference": loss}
            loss = loss + spec.lambda_sft * nll
            ntok = ntok + ntok2
        metrics = {**metrics, "loss": loss, "num_tokens": jnp.asarray(ntok, jnp.float32)}
        return loss, metrics

    return objective


def last_token_hidden(hidden, attention_mask):
    """Hidden state [B, D] at each row's last real token (right padding)."""
    idx = jnp.maximum(attention_mask.astype(jnp.int32).sum(-1) - 1, 0)
    return jnp.take_along_axis(hidden, idx[:, None, None], axis=1)[:, 0]


def make_score_fn(model):
    """Reward-model scores: a scalar head `score/kernel` [D, 1] on the last real token's hidden
    state (as transformers' *ForSequenceClassification with right padding)."""

    def score(trainable, frozen, tokens, am):
        h = model.apply(policy_variables(trainable, frozen), tokens, attention_mask=am, return_hidden=True)
        h = last_token_hidden(h, am).astype(jnp.float32)
        return (h @ trainable["score"]["kernel"].astype(jnp.float32))[:, 0]

    return score
