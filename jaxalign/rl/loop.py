"""The shared online training loop: generate -> score -> build -> update, in rounds.

Every online method is a `Trainer`: a jit-able `objective` (turned into one jitted, donated update
by `jaxalign.train.step.make_train_step`) and a `build(rollout, tools)` that turns one round's
scored rollout into training rows (advantages, pairs, kept samples, ...). A round:

1. the current policy samples `group_size` completions for `prompts_per_round` prompts
   (jitted KV-cache sampler, in chunks of the prompt stream's batch size);
2. the reward sources score them (Python);
3. `build` computes what the update needs (old/reference log-probs and values come from
   `RoundTools`, jitted forward passes under the round's starting weights);
4. `epochs` passes over the rows in minibatches of `batch_size` rows (0 = all rows at once), one
   jitted update each; minibatches of a variable number of rows (pairs, kept samples) are padded
   with weight-0 rows so every update has one shape;
5. with `ref_update="round"` the reference becomes the updated policy (iterative DPO).

GRPO/RLOO/PPO/online DPO are rounds of a few updates; iterative DPO, RSO and best-of-N are rounds
of many updates on a larger generated dataset. Metrics of a round are logged at the optimizer step
reached at its end.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxalign.rl.rewards import RewardSource
from jaxalign.rl.rollout import PromptStream, Rollout, concat_rollouts, generate, rollout_metrics
from jaxalign.train.objectives import policy_variables

REF_UPDATES = ("never", "round")


@dataclasses.dataclass(frozen=True)
class Trainer:
    """One online method, as plain values and functions (see the module docstring)."""

    name: str
    objective: Callable
    build: Callable[[Rollout, "RoundTools"], tuple[dict, dict]]
    group_size: int
    epochs: int = 1
    batch_size: int = 0  # rows per update; 0 = every row of the round in one update
    ref_update: str = "never"

    def __post_init__(self):
        if self.group_size < 1 or self.epochs < 1 or self.batch_size < 0:
            raise ValueError(f"trainer {self.name!r}: group_size >= 1, epochs >= 1 and "
                             f"batch_size >= 0 required, got {self.group_size}, {self.epochs}, "
                             f"{self.batch_size}")
        if self.ref_update not in REF_UPDATES:
            raise ValueError(f"trainer {self.name!r}: ref_update must be one of {REF_UPDATES}, got "
                             f"{self.ref_update!r}")


class RoundTools:
    """Forward passes under the round's starting weights, for `Trainer.build` (all jitted)."""

    def __init__(self, *, trainable, frozen, ref_variables, logps_fn, policy_value_fn=None,
                 rng: np.random.Generator):
        self._trainable, self._frozen, self._ref = trainable, frozen, ref_variables
        self._logps_fn, self._pv_fn = logps_fn, policy_value_fn
        self.rng = rng

    @property
    def has_reference(self) -> bool:
        return self._ref is not None

    def _rows(self, r: Rollout):
        return jnp.asarray(r.tokens), jnp.asarray(r.attention_mask), jnp.asarray(r.loss_mask)

    def policy_logps(self, rollout: Rollout) -> np.ndarray:
        """[N, L-1] log-probs of the sampled tokens under the sampling policy."""
        v = policy_variables(self._trainable, self._frozen)
        return np.asarray(self._logps_fn(v, *self._rows(rollout)))

    def ref_logps(self, rollout: Rollout) -> np.ndarray:
        """[N, L-1] log-probs under the reference."""
        if self._ref is None:
            raise ValueError("this run has no reference model (ref_variables=None)")
        return np.asarray(self._logps_fn(self._ref, *self._rows(rollout)))

    def policy_logps_and_values(self, rollout: Rollout) -> tuple[np.ndarray, np.ndarray]:
        """([N, L-1] log-probs, [N, L-1] value-head values) under the sampling policy."""
        if self._pv_fn is None:
            raise ValueError("no value head in this run")
        lp, v = self._pv_fn(self._trainable, self._frozen, *self._rows(rollout))
        return np.asarray(lp), np.asarray(v)


def minibatches(rows: dict[str, np.ndarray], batch_size: int, rng: np.random.Generator
                ) -> list[dict[str, np.ndarray]]:
    """Shuffled minibatches of `batch_size` rows (0 = all rows, unshuffled). When the row count is
    not a multiple of batch_size, the last minibatch is filled with weight-0 copies of rows, which
    needs a `weight` [M] column; without one the count must divide evenly."""
    sizes = {k: v.shape[0] for k, v in rows.items() if np.ndim(v) > 0}
    m = next(iter(sizes.values()))
    if set(sizes.values()) != {m}:
        raise ValueError(f"rows must share their leading dimension, got {sizes}")
    scalars = {k: v for k, v in rows.items() if np.ndim(v) == 0}
    if batch_size == 0 or batch_size == m:
        return [dict(rows)]
    if m % batch_size and "weight" not in rows:
        raise ValueError(f"{m} rows do not split into minibatches of batch_size={batch_size} and "
                         f"there is no `weight` column to pad with")
    order = rng.permutation(m)
    count = math.ceil(m / batch_size)
    pad = count * batch_size - m
    idx = np.concatenate([order, order[np.arange(pad) % m]])
    live = np.concatenate([np.ones(m, bool), np.zeros(pad, bool)])
    out = []
    for b in range(count):
        sel = idx[b * batch_size:(b + 1) * batch_size]
        mb = {k: v[sel] for k, v in rows.items() if k not in scalars}
        if pad:
            mb["weight"] = np.where(live[b * batch_size:(b + 1) * batch_size], mb["weight"], 0.0
                                    ).astype(np.float32)
        out.append({**mb, **scalars})
    return out


def snapshot_policy(trainable: dict, frozen: dict) -> dict:
    """A copy of the policy's variables that survives donation of `trainable` (the frozen base
    under LoRA is shared, not copied)."""
    out = {"params": jax.tree.map(jnp.copy, trainable["params"]) if "params" in trainable
           else frozen["params"]}
    if "lora" in trainable:
        out["lora"] = jax.tree.map(jnp.copy, trainable["lora"])
    return out


def _mean_metrics(ms: list[dict]) -> dict[str, float]:
    if not ms:
        return {}
    ms = jax.device_get(ms)
    return {k: float(np.mean([float(m[k]) for m in ms])) for k in ms[0]}


def run_rounds(trainer: Trainer, *, state: dict, frozen: dict, ref_variables, sample_fn,
               prompts: PromptStream, prompts_per_round: int, tokenizer,
               sources: list[RewardSource], train_step, logps_fn, policy_value_fn=None,
               rounds: int, start_round: int = 0, seed: int = 0,
               logger=None, on_round_end: Callable[[int, dict, Any], None] | None = None,
               shard: Callable[[dict], dict] = lambda b: b) -> tuple[dict, Any, list[dict]]:
    """Runs rounds `start_round .. rounds-1`; returns (state, ref_variables, history).

    `state`/`frozen`/`train_step` as in `jaxalign.train.step`; `ref_variables` is the reference's
    variables dict (None if unused). Generation for round k uses key fold_in(PRNGKey(seed), k), so
    a resumed run samples what the uninterrupted run would have. `on_round_end(round_done, state,
    ref_variables)` is called after each round (checkpoints, evaluation). `shard` places a batch.
    """
    chunk = prompts.batch_size
    if prompts_per_round % chunk:
        raise ValueError(f"prompts_per_round={prompts_per_round} must be a multiple of the prompt "
                         f"stream's batch size {chunk} (prompts per sampler call)")
    base_key = jax.random.PRNGKey(seed)
    history = []
    for rnd in range(start_round, rounds):
        t0 = time.perf_counter()
        key = jax.random.fold_in(base_key, rnd)
        pv = policy_variables(state["trainable"], frozen)
        parts = [generate(sample_fn, pv, prompts.next(), group_size=trainer.group_size,
                          rng=jax.random.fold_in(key, c), tokenizer=tokenizer, sources=sources)
                 for c in range(prompts_per_round // chunk)]
        rollout = concat_rollouts(parts)
        t1 = time.perf_counter()
        np_rng = np.random.default_rng([seed, rnd])
        tools = RoundTools(trainable=state["trainable"], frozen=frozen, ref_variables=ref_variables,
                           logps_fn=logps_fn, policy_value_fn=policy_value_fn, rng=np_rng)
        rows, build_m = trainer.build(rollout, tools)
        step_ms = []
        has_rows = bool(rows) and next(iter(rows.values())).shape[0] > 0
        if has_rows:
            for _ in range(trainer.epochs):
                for mb in minibatches(rows, trainer.batch_size, np_rng):
                    state, m = train_step(state, frozen, shard(mb))
                    step_ms.append(m)
        if trainer.ref_update == "round":
            ref_variables = snapshot_policy(state["trainable"], frozen)
        t2 = time.perf_counter()
        metrics = {**rollout_metrics(rollout, eos_id=tokenizer.eos_token_id),
                   **build_m, **_mean_metrics(step_ms),
                   "updates": float(len(step_ms)), "round": float(rnd + 1),
                   "time/generate": t1 - t0, "time/update": t2 - t1}
        for k in ("loss", "grad_norm"):
            if k in metrics and not math.isfinite(metrics[k]):
                raise FloatingPointError(f"round {rnd + 1}: {k} is {metrics[k]}; metrics {metrics}")
        step = int(jax.device_get(state["step"]))
        if logger is not None:
            logger.log(step, metrics)
        history.append({"step": step, **metrics})
        if on_round_end is not None:
            on_round_end(rnd + 1, state, ref_variables)
    return state, ref_variables, history
