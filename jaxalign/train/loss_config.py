"""Fills `config.loss` with a loss function's hyperparameters and their defaults, so every
hyperparameter can be overridden from the command line under `lock_config`."""

from __future__ import annotations

import inspect

import ml_collections as mlc

from jaxalign.losses import REGISTRY

# Array arguments that the objective provides, not hyperparameters.
ARRAY_ARGS = {
    "policy_chosen_logps", "policy_rejected_logps", "ref_chosen_logps", "ref_rejected_logps",
    "chosen_lengths", "rejected_lengths", "chosen_nll", "target_logps", "policy_logps", "ref_logps",
    "labels", "kl", "rewards_chosen", "rewards_rejected", "margin", "token_logps", "mask",
}


def loss_config(name: str, **overrides) -> mlc.ConfigDict:
    """ConfigDict(name=..., <each scalar keyword-only hyperparameter>=default, **overrides)."""
    if name not in REGISTRY:
        raise ValueError(f"unknown loss {name!r}; known: {sorted(REGISTRY)}")
    c = {"name": name}
    for p in inspect.signature(REGISTRY[name]).parameters.values():
        if p.name in ARRAY_ARGS or p.kind != p.KEYWORD_ONLY:
            continue
        if isinstance(p.default, (bool, int, float, str)):
            c[p.name] = p.default
    for k, v in overrides.items():
        if k not in c:
            raise ValueError(f"loss {name!r} has no hyperparameter {k!r}; it has {sorted(c)}")
        c[k] = type(c[k])(v) if isinstance(c[k], float) else v
    return mlc.ConfigDict(c)
