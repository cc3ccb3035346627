"""A trained reward model as a reward source.

A reward run (`experiments/preference.py:bradley_terry`, the `reward` objective of
jaxalign/train/objectives.py) trains a decoder plus a scalar head `score/kernel` [D, 1] read at the
last real token (`make_score_fn`). Its trainable tree is {'params' or 'lora', 'score'}. Load it from
the dict `jaxalign.train.run.run` returns (`reward_model_from_run`) or from the run's directory
(`load_reward_model`: config.json + the newest checkpoint), then score rollouts with a jitted
forward pass (`reward_model_source`).

Scores are read at the last real token of each row whatever the padding side, so rollout rows
(left-padded prompt, right-padded completion) score exactly as the right-padded training rows did.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxalign.rl.rewards import RewardSource


@dataclasses.dataclass(frozen=True)
class RewardModel:
    """`model` (flax module, LoRA-configured if the run used LoRA), `trainable` ({'params' or
    'lora', 'score'}) and `frozen` ({'params': base} under LoRA, else {})."""

    model: Any
    trainable: dict
    frozen: dict

    def __post_init__(self):
        if "score" not in self.trainable or "kernel" not in self.trainable["score"]:
            raise ValueError(f"reward model trainable tree needs 'score': {{'kernel': [D, 1]}}, got "
                             f"keys {sorted(self.trainable)}")
        d = self.model.config.hidden_size
        shape = tuple(self.trainable["score"]["kernel"].shape)
        if shape != (d, 1):
            raise ValueError(f"reward model 'score/kernel' has shape {shape}, expected ({d}, 1)")


def last_real_index(attention_mask):
    """Index [B] of each row's last nonzero mask entry (left, right or no padding); 0 if none."""
    m = jnp.asarray(attention_mask).astype(jnp.int32)
    t = m.shape[1]
    return jnp.where(m.any(-1), t - 1 - jnp.argmax(m[:, ::-1], axis=-1), 0)


def make_scorer(model):
    """Jitted `score(trainable, frozen, tokens [B, L], attention_mask [B, L]) -> [B]` fp32:
    score/kernel applied to the hidden state of the last real token."""
    from jaxalign.train.objectives import policy_variables

    @jax.jit
    def score(trainable, frozen, tokens, attention_mask):
        h = model.apply(policy_variables(trainable, frozen), tokens, attention_mask=attention_mask,
                        return_hidden=True)
        idx = last_real_index(attention_mask)
        h_last = jnp.take_along_axis(h, idx[:, None, None], axis=1)[:, 0].astype(jnp.float32)
        return (h_last @ trainable["score"]["kernel"].astype(jnp.float32))[:, 0]

    return score


def reward_model_source(rm: RewardModel, *, weight: float = 1.0, name: str = "reward_model",
                        vocab_size: int | None = None) -> RewardSource:
    """A `RewardSource` scoring the rollout's token rows with `rm` (one jitted call per shape).
    The reward model must share the policy's tokenizer (`vocab_size` is checked when given)."""
    if vocab_size is not None and vocab_size != rm.model.config.vocab_size:
        raise ValueError(f"reward model vocab_size {rm.model.config.vocab_size} != policy vocab_size "
                         f"{vocab_size}: the reward model must share the policy's tokenizer")
    scorer = make_scorer(rm.model)

    def fn(*, tokens, attention_mask, **_):
        return np.asarray(scorer(rm.trainable, rm.frozen, jnp.asarray(tokens),
                                 jnp.asarray(attention_mask)))

    return RewardSource(name, fn, weight)


def reward_model_from_run(result: dict) -> RewardModel:
    """From the dict returned by `jaxalign.train.run.run` on a reward (bradley_terry) config."""
    trainable = result["state"]["trainable"]
    if "score" not in trainable:
        raise ValueError(f"run result is not a reward-model run: its trainable tree has keys "
                         f"{sorted(trainable)} (no 'score' head); train one with "
                         f"experiments/preference.py:bradley_terry")
    frozen = {"params": result["variables"]["params"]} if "lora" in trainable else {}
    return RewardModel(result["model"], trainable, frozen)


def load_reward_model(run_dir: str, *, step: int | None = None) -> RewardModel:
    """Rebuilds a reward run's model from `<run_dir>/config.json` and restores the trainable tree
    (score head + params or adapters) from `<run_dir>/checkpoints` (newest step by default)."""
    import ml_collections as mlc

    from jaxalign.train import setup
    from jaxalign.train.checkpoint import Checkpointer
    from jaxalign.train.optim import make_optimizer, make_schedule
    from jaxalign.train.step import init_state

    path = os.path.join(run_dir, "config.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found: `run_dir` must be a reward run's output_dir")
    with open(path) as f:
        cfg = mlc.ConfigDict(json.load(f))
    if setup.objective_kind(cfg.loss.name) != "reward":
        raise ValueError(f"{path}: loss.name={cfg.loss.name!r} is not a reward-model loss")
    # The same key splits as jaxalign.train.run.run, so a random-init base is rebuilt exactly.
    rng = jax.random.PRNGKey(cfg.seed)
    rng, init_rng, lora_rng, state_rng = jax.random.split(rng, 4)
    tokenizer = setup.build_tokenizer(cfg.tokenizer.path)
    model, params = setup.build_model(cfg.model, tokenizer, init_rng, init_from=cfg.init_from)
    trainable: dict = {}
    frozen: dict = {}
    if cfg.lora.enabled:
        from jaxalign.peft import LoraSpec, init_lora, lora_targets

        targets = cfg.lora.targets
        if targets in ("attention", "attention_mlp", "all_linear"):
            targets = lora_targets(model.config.model_type, targets)
        spec = LoraSpec(rank=cfg.lora.rank, alpha=cfg.lora.alpha, targets=targets,
                        dropout=cfg.lora.dropout, use_rslora=cfg.lora.use_rslora)
        model = model.clone(lora=spec)
        if cfg.quant.nf4:
            from jaxalign.quant import quantize_params

            params = quantize_params(params, block_size=cfg.quant.block_size,
                                     double_quant=cfg.quant.double_quant)
        trainable["lora"] = init_lora(params, spec, lora_rng)
        frozen["params"] = params
    else:
        trainable["params"] = params
    trainable["score"] = {"kernel": jnp.zeros((model.config.hidden_size, 1), jnp.float32)}
    schedule = make_schedule(learning_rate=cfg.optim.learning_rate, total_steps=cfg.train.steps,
                             warmup_steps=cfg.optim.warmup_steps, schedule=cfg.optim.schedule)
    optimizer = make_optimizer(name=cfg.optim.name, learning_rate_fn=schedule,
                               weight_decay=cfg.optim.weight_decay, b1=cfg.optim.b1,
                               b2=cfg.optim.b2, clip_norm=cfg.optim.clip_norm or None)
    target = jax.eval_shape(lambda t: init_state(t, optimizer, state_rng), trainable)
    ckpt = Checkpointer(os.path.join(run_dir, "checkpoints"), save_every=1, keep=1 << 30,
                        async_save=False)
    try:
        state, _ = ckpt.restore(step, target=target)
    finally:
        ckpt.close()
    return RewardModel(model, state["trainable"], frozen)
