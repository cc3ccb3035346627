"""Optimizers and learning-rate schedules from plain keyword arguments (built at the entry point)."""

from __future__ import annotations

import optax

SCHEDULES = ("constant", "linear", "cosine")
OPTIMIZERS = ("adamw", "adam", "sgd", "lion", "adafactor")


def make_schedule(*, learning_rate: float, total_steps: int, warmup_steps: int = 0,
                  schedule: str = "cosine", end_factor: float = 0.0):
    """Linear warmup then constant / linear decay / cosine decay to `end_factor * learning_rate`."""
    if schedule not in SCHEDULES:
        raise ValueError(f"optim.schedule must be one of {SCHEDULES}, got {schedule!r}")
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    warmup_steps = min(warmup_steps, total_steps)
    decay_steps = max(total_steps - warmup_steps, 1)
    if schedule == "constant":
        main = optax.constant_schedule(learning_rate)
    elif schedule == "linear":
        main = optax.linear_schedule(learning_rate, learning_rate * end_factor, decay_steps)
    else:
        main = optax.cosine_decay_schedule(learning_rate, decay_steps, alpha=end_factor)
    if warmup_steps == 0:
        return main
    warm = optax.linear_schedule(0.0, learning_rate, warmup_steps)
    return optax.join_schedules([warm, main], [warmup_steps])


def make_optimizer(*, name: str = "adamw", learning_rate_fn, weight_decay: float = 0.0,
                   b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8, clip_norm: float | None = 1.0):
    """optax chain: optional global-norm clipping, then the optimizer."""
    if name not in OPTIMIZERS:
        raise ValueError(f"optim.name must be one of {OPTIMIZERS}, got {name!r}")
    if name == "adamw":
        opt = optax.adamw(learning_rate_fn, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay)
    elif name == "adam":
        opt = optax.adam(learning_rate_fn, b1=b1, b2=b2, eps=eps)
    elif name == "sgd":
        opt = optax.sgd(learning_rate_fn)
    elif name == "lion":
        opt = optax.lion(learning_rate_fn, b1=b1, b2=b2, weight_decay=weight_decay)
    else:
        opt = optax.adafactor(learning_rate_fn, weight_decay_rate=weight_decay or None)
    if clip_norm:
        opt = optax.chain(optax.clip_by_global_norm(clip_norm), opt)
    return opt
