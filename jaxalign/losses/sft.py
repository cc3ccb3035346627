"""Supervised (NLL) loss on token log-probs, and mixing it into a preference objective."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxalign.losses._checks import check_same_shape

__all__ = ["masked_nll", "mix_sft"]

Array = jax.Array


def masked_nll(
    *,
    token_logps: Array,
    mask: Array,
    average: bool = True,
) -> tuple[Array, dict[str, Array]]:
    """Per-sequence negative log-likelihood over the masked (completion) tokens.

        nll_b = -sum_t m_bt * logp_bt / max(1, sum_t m_bt)    (average=True)
        nll_b = -sum_t m_bt * logp_bt                          (average=False)

    Masked positions contribute exactly 0 (even if their log-prob is -inf or NaN, and so does
    their gradient), and a fully masked row gives 0, not NaN. Note that TRL's SFT/CPO/ORPO trainers
    average over all tokens of the batch instead (long sequences weigh more); that value is
    `sum(nll * n) / sum(n)` with `n = metrics["num_tokens"]` and `average=True`.

    Args:
      token_logps: [B, T] log-probs of the target tokens (e.g. from `token_logps`).
      mask: [B, T] bool or 0/1, True on the tokens that count.
      average: mean over the counted tokens (True) or sum (False).

    Returns:
      losses [B] fp32 and metrics [B]: `nll_loss` (= losses) and `num_tokens`.
    """
    check_same_shape("masked_nll", {"token_logps": token_logps, "mask": mask}, ndim=2)
    mask = jnp.asarray(mask).astype(bool)
    logps = jnp.where(mask, jnp.asarray(token_logps, jnp.float32), 0.0)
    total = -jnp.sum(logps, axis=-1)
    num_tokens = jnp.sum(mask, axis=-1).astype(jnp.float32)
    losses = total / jnp.maximum(num_tokens, 1.0) if average else total
    return losses, {"nll_loss": jax.lax.stop_gradient(losses), "num_tokens": num_tokens}


def mix_sft(*, preference_losses: Array, sft_losses: Array, lambda_sft: float) -> Array:
    """Preference objective plus an auxiliary SFT term: the alignment-tax mitigation.

        total = mean(preference_losses) + lambda_sft * mean(sft_losses)

    Mixing a likelihood term into preference training keeps the policy from drifting off the data
    it should still model: InstructGPT's PPO-ptx mixes pretraining NLL (Ouyang et al. 2022, eq. 2)
    to reduce the alignment tax on public NLP benchmarks, and RPO (Pang et al. 2024, "Iterative
    Reasoning Preference Optimization") adds the chosen-sequence NLL to DPO. The SFT batch may come
    from a different dataset, so it may have another batch size B'.

    Args:
      preference_losses: [B] per-example preference losses.
      sft_losses: [B'] per-example NLLs (e.g. `masked_nll(...)[0]`) or an already-reduced scalar.
      lambda_sft: weight of the SFT term.

    Returns:
      scalar fp32 total loss.
    """
    pref_shape = jnp.shape(preference_losses)
    if len(pref_shape) != 1 or pref_shape[0] == 0:
        raise ValueError(
            f"mix_sft: `preference_losses` must have shape [B] with B > 0, got shape {pref_shape}"
        )
    sft_shape = jnp.shape(sft_losses)
    if len(sft_shape) > 1 or sft_shape == (0,):
        raise ValueError(
            f"mix_sft: `sft_losses` must be a scalar or have shape [B'] with B' > 0, got shape {sft_shape}"
        )
    preference = jnp.mean(jnp.asarray(preference_losses, jnp.float32))
    sft = jnp.mean(jnp.asarray(sft_losses, jnp.float32))
    return preference + lambda_sft * sft


LOSSES = {"nll": masked_nll}
