"""Weighted combination of registered losses evaluated on the same batch (as TRL's MPO).

TRL's DPOTrainer accepts `loss_type=["sigmoid", "bco_pair", "sft"]` with `loss_weights=[0.8, 0.2,
1.0]` (mixed preference optimisation, Wang et al. 2024, "Enhancing the Reasoning Ability of
Multimodal Large Language Models via Mixed Preference Optimization"). `combine_losses` does the
same for any functions following the loss contract.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp

__all__ = ["combine_losses"]

Array = jax.Array
LossFn = Callable[..., tuple[Array, dict[str, Array]]]


def _parameters(fn: LossFn) -> tuple[set[str], set[str], bool, list[str]]:
    """(accepted keyword names, required keyword names, takes **kwargs, required positional-only)."""
    accepted, required, var_keyword, positional = set(), set(), False, []
    for param in inspect.signature(fn).parameters.values():
        if param.kind is inspect.Parameter.VAR_KEYWORD:
            var_keyword = True
        elif param.kind in (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD):
            accepted.add(param.name)
            if param.default is inspect.Parameter.empty:
                required.add(param.name)
        elif param.kind is inspect.Parameter.POSITIONAL_ONLY and param.default is inspect.Parameter.empty:
            positional.append(param.name)
    return accepted, required, var_keyword, positional


def _known_names(registry: Mapping[str, LossFn]) -> set[str]:
    known: set[str] = set()
    for fn in registry.values():
        try:
            known |= _parameters(fn)[0]
        except (TypeError, ValueError):  # not introspectable: it cannot vouch for any name
            pass
    return known


def _normalise_terms(terms) -> list[tuple[str, Any, dict[str, Any]]]:
    if isinstance(terms, (str, bytes)) or not isinstance(terms, Sequence) or len(terms) == 0:
        raise ValueError(
            f"combine_losses: `terms` must be a non-empty sequence of (name, weight[, kwargs]), got {terms!r}"
        )
    out = []
    for i, term in enumerate(terms):
        if not isinstance(term, (tuple, list)) or len(term) not in (2, 3) or not isinstance(term[0], str):
            raise ValueError(
                f"combine_losses: terms[{i}] must be (name, weight) or (name, weight, kwargs), got {term!r}"
            )
        overrides = dict(term[2]) if len(term) == 3 else {}
        out.append((term[0], term[1], overrides))
    names = [name for name, _, _ in out]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(
            f"combine_losses: loss names repeat in `terms` ({duplicates}); their metrics would collide"
        )
    return out


def combine_losses(
    terms: Sequence[tuple[str, float] | tuple[str, float, Mapping[str, Any]]],
    registry: Mapping[str, LossFn],
    /,
    **kwargs: Any,
) -> tuple[Array, dict[str, Array]]:
    """Weighted sum of several losses on the same arrays.

        losses = sum_i w_i * loss_i(**kwargs restricted to loss_i's arguments, | overrides_i)

    Each loss receives only the keyword arguments its signature accepts (all of them if it takes
    **kwargs), so shared arrays (`policy_chosen_logps`, ...) and shared hyperparameters (`beta`)
    are given once. A term's own overrides, the optional third element, take precedence, e.g.
    `("simpo", 0.5, {"beta": 2.0})`.

    Args:
      terms: (name, weight) or (name, weight, overrides) per loss; names must be distinct. The
        weight may be a float or a traced scalar.
      registry: name -> loss function, e.g. `jaxalign.losses.REGISTRY`.
      **kwargs: arrays and hyperparameters for the losses.

    Returns:
      losses [B] fp32 (the weighted sum) and metrics: each term's metrics prefixed with
      `"{name}/"`, plus `"{name}/loss"` with that term's unweighted losses [B].

    Raises:
      ValueError: for an unknown name, a missing required argument of some loss, a keyword that no
        registered loss accepts (usually a typo; arrays for unselected registered losses are
        ignored), or terms whose losses have different shapes.
    """
    terms = _normalise_terms(terms)
    used: set[str] = set()
    total = None
    metrics: dict[str, Array] = {}
    shape, first = None, None
    for name, weight, overrides in terms:
        if name not in registry:
            raise ValueError(f"combine_losses: unknown loss {name!r}; registered: {sorted(registry)}")
        fn = registry[name]
        accepted, required, var_keyword, positional = _parameters(fn)
        if positional:
            raise ValueError(
                f"combine_losses: loss {name!r} has positional-only argument(s) {positional}; "
                "losses must take keyword arguments"
            )
        available = {**kwargs, **overrides}
        unknown_overrides = set(overrides) - accepted
        if unknown_overrides and not var_keyword:
            raise ValueError(
                f"combine_losses: loss {name!r} does not accept the override(s) {sorted(unknown_overrides)}; "
                f"it accepts {sorted(accepted)}"
            )
        missing = sorted(required - set(available))
        if missing:
            raise ValueError(
                f"combine_losses: loss {name!r} needs the argument(s) {missing}, which were not given"
            )
        call = available if var_keyword else {k: v for k, v in available.items() if k in accepted}
        used.update(call)
        losses, term_metrics = fn(**call)
        losses = jnp.asarray(losses, jnp.float32)
        if shape is None:
            shape, first = losses.shape, name
        elif losses.shape != shape:
            raise ValueError(
                f"combine_losses: loss {name!r} returned shape {losses.shape} but {first!r} returned {shape}"
            )
        total = weight * losses if total is None else total + weight * losses
        metrics[f"{name}/loss"] = jax.lax.stop_gradient(losses)
        for key, value in term_metrics.items():
            metrics[f"{name}/{key}"] = value
    # Arrays meant for other registered losses may ride along (a batch carries them all); a name no
    # registered loss knows is most likely a typo.
    unknown = sorted(set(kwargs) - used - _known_names(registry))
    if unknown:
        raise ValueError(
            f"combine_losses: argument(s) {unknown} are accepted by none of the registered losses "
            f"(selected: {[n for n, _, _ in terms]})"
        )
    return jnp.asarray(total, jnp.float32), metrics
