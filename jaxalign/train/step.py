"""Jitted, donated training and evaluation steps.

State is a plain dict pytree: {'step': int32, 'trainable': tree, 'opt_state': optax state,
'rng': uint32 key data}. `frozen` holds what is not trained (the base under LoRA, the reference
params under full fine-tuning); it is an argument, not a closure, so it is never baked into the
compiled program as a constant.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax

SUMMED_METRICS = ("num_tokens",)


def init_state(trainable, optimizer: optax.GradientTransformation, rng) -> dict:
    return {
        "step": jnp.zeros((), jnp.int32),
        "trainable": trainable,
        "opt_state": optimizer.init(trainable),
        "rng": jax.random.key_data(rng) if jnp.issubdtype(rng.dtype, jax.dtypes.prng_key) else rng,
    }


def _split_micro(batch, n):
    def f(x):
        if x.ndim == 0:
            return jnp.broadcast_to(x, (n,))
        if x.shape[0] % n:
            raise ValueError(f"batch size {x.shape[0]} is not divisible by grad_accum={n}")
        return x.reshape(n, x.shape[0] // n, *x.shape[1:])
    return jax.tree.map(f, batch)


def grads_and_metrics(objective: Callable, trainable, frozen, batch, rng, *, grad_accum: int = 1):
    """Mean gradient and metrics over `grad_accum` micro-batches (a `lax.scan`, one compile)."""
    vg = jax.value_and_grad(objective, has_aux=True)
    if grad_accum == 1:
        (_, metrics), grads = vg(trainable, frozen, batch, rng)
        return grads, metrics
    micro = _split_micro(batch, grad_accum)
    keys = jax.random.split(rng, grad_accum)

    def body(acc, xs):
        mb, key = xs
        (_, m), g = vg(trainable, frozen, mb, key)
        acc_g, acc_m = acc
        return (jax.tree.map(jnp.add, acc_g, g), jax.tree.map(jnp.add, acc_m, m)), None

    (_, m0), g0 = jax.eval_shape(vg, trainable, frozen, jax.tree.map(lambda x: x[0], micro), keys[0])
    zeros = lambda t: jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), t)
    (g, m), _ = jax.lax.scan(body, (zeros(g0), zeros(m0)), (micro, keys))
    grads = jax.tree.map(lambda x: x / grad_accum, g)
    metrics = {k: (v if k in SUMMED_METRICS else v / grad_accum) for k, v in m.items()}
    return grads, metrics


def make_train_step(objective: Callable, optimizer: optax.GradientTransformation, *,
                    grad_accum: int = 1, learning_rate_fn: Callable | None = None,
                    state_shardings=None, grad_transform: Callable | None = None,
                    update_transform: Callable | None = None):
    """Returns jitted `step(state, frozen, batch) -> (state, metrics)`; `state` is donated.

    `grad_transform(grads, frozen) -> grads` runs on the (accumulated) gradients before the
    optimizer, `update_transform(updates, frozen) -> updates` on the optimizer's updates before
    they are applied (e.g. NSPO's null-space projection, `jaxalign.analysis.nspo.make_transform`);
    `grad_norm` is reported before either transform, `update_norm` after the update transform.
    """

    def step(state, frozen, batch):
        key = jax.random.wrap_key_data(state["rng"])
        key, sub = jax.random.split(key)
        grads, metrics = grads_and_metrics(objective, state["trainable"], frozen, batch, sub,
                                           grad_accum=grad_accum)
        metrics = {**metrics, "grad_norm": optax.global_norm(grads)}
        if grad_transform is not None:
            grads = grad_transform(grads, frozen)
        updates, opt_state = optimizer.update(grads, state["opt_state"], state["trainable"])
        if update_transform is not None:
            updates = update_transform(updates, frozen)
            metrics["update_norm"] = optax.global_norm(updates)
        trainable = optax.apply_updates(state["trainable"], updates)
        if learning_rate_fn is not None:
            metrics["learning_rate"] = learning_rate_fn(state["step"])
        new_state = {"step": state["step"] + 1, "trainable": trainable, "opt_state": opt_state,
                     "rng": jax.random.key_data(key)}
        return new_state, metrics

    out = (state_shardings, None) if state_shardings is not None else None
    return jax.jit(step, donate_argnums=(0,), out_shardings=out)


def make_eval_step(objective: Callable):
    """Returns jitted `eval_step(trainable, frozen, batch) -> metrics` (dropout off)."""

    @jax.jit
    def eval_step(trainable, frozen, batch):
        _, metrics = objective(trainable, frozen, batch, jax.random.PRNGKey(0), deterministic=True)
        return metrics

    return eval_step
