"""Heterogeneous (layer-wise) model averaging between an SFT model and its aligned version.

    theta_l(alpha) = (1 - alpha_l) * theta_l^SFT + alpha_l * theta_l^aligned

with one ratio alpha_l per decoder layer l (Lin et al., 2024, "Mitigating the Alignment Tax of
RLHF", heterogeneous model averaging: lower layers hold more of the general features, so averaging
them more strongly towards the SFT model costs less alignment). alpha = 0 is the SFT model,
alpha = 1 the aligned one. Parameters outside the decoder layers (embeddings, final norm, LM head)
take `embed_ratio` / `head_ratio` (by default the first / last layer's ratio).

For a LoRA-aligned model whose base *is* the SFT model, `scale_adapters` gives the same
interpolation exactly: it scales each layer's B factor by alpha_l, so the merged weight is
W + alpha_l * s * A B.

`sweep` evaluates a list of ratio schedules and `pareto_front` picks the non-dominated
(capability, alignment) points; `plot_pareto` draws them.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

__all__ = [
    "interpolate", "layer_index", "layer_ratios", "pareto_front", "plot_pareto", "ratio_tree",
    "scale_adapters", "sweep",
]

_LAYER = re.compile(r"(?:^|/)layers_(\d+)(?:/|$)")
_EMBED = re.compile(r"(?:^|/)(embed_tokens|wte|wpe)(?:/|$)")
SCHEDULES = ("linear", "step", "constant")


def layer_index(path: str) -> int | None:
    """The decoder-layer index in a '/'-joined parameter path ('layers_3/attn/...' -> 3), else None."""
    m = _LAYER.search(path)
    return int(m.group(1)) if m else None


def layer_ratios(num_layers: int, *, low: float, high: float, kind: str = "linear") -> np.ndarray:
    """Per-layer ratios [num_layers] from the lowest to the highest layer.

    kind='linear': low + (high - low) * l / (L - 1) (low for a single layer);
    kind='step': low for the lower half (floor(L / 2) layers), high for the rest;
    kind='constant': high everywhere (`low` unused), i.e. uniform averaging.
    """
    if not isinstance(num_layers, int) or num_layers < 1:
        raise ValueError(f"layer_ratios: num_layers must be a positive int, got {num_layers!r}")
    if kind not in SCHEDULES:
        raise ValueError(f"layer_ratios: kind must be one of {SCHEDULES}, got {kind!r}")
    for name, v in (("low", low), ("high", high)):
        if not 0.0 <= float(v) <= 1.0:
            raise ValueError(f"layer_ratios: {name} must be in [0, 1], got {v!r}")
    if kind == "constant":
        return np.full(num_layers, float(high))
    if kind == "step":
        return np.where(np.arange(num_layers) < num_layers // 2, float(low), float(high))
    if num_layers == 1:
        return np.array([float(low)])
    return float(low) + (float(high) - float(low)) * np.arange(num_layers) / (num_layers - 1)


def _num_layers(flat: Mapping[str, Any]) -> int:
    idx = [layer_index(p) for p in flat]
    idx = [i for i in idx if i is not None]
    if not idx:
        raise ValueError(f"no 'layers_<i>' parameters found among {sorted(flat)[:8]}...")
    return max(idx) + 1


def ratio_tree(params, ratios: Sequence[float], *, embed_ratio: float | None = None,
               head_ratio: float | None = None):
    """A tree shaped like `params` holding each leaf's ratio: `ratios[l]` under 'layers_l',
    `embed_ratio` (default ratios[0]) for embeddings, `head_ratio` (default ratios[-1]) for
    everything else (final norm, LM head). Raises if len(ratios) != the number of layers."""
    flat = {"/".join(k): v for k, v in traverse_util.flatten_dict(params).items()}
    n = _num_layers(flat)
    ratios = [float(r) for r in ratios]
    if len(ratios) != n:
        raise ValueError(f"ratio_tree: {len(ratios)} ratios for a model with {n} layers")
    embed = ratios[0] if embed_ratio is None else float(embed_ratio)
    head = ratios[-1] if head_ratio is None else float(head_ratio)
    out = {}
    for p in flat:
        i = layer_index(p)
        out[tuple(p.split("/"))] = ratios[i] if i is not None else (
            embed if _EMBED.search(p) else head)
    return traverse_util.unflatten_dict(out)


def interpolate(theta_0, theta_1, ratio):
    """(1 - a) * theta_0 + a * theta_1 leaf by leaf, in fp32, cast back to theta_0's dtypes.

    ratio: a float (uniform averaging) or a tree of floats shaped like the params (`ratio_tree`)."""
    s0, s1 = jax.tree.structure(theta_0), jax.tree.structure(theta_1)
    if s0 != s1:
        raise ValueError(f"interpolate: the two param trees differ in structure:\n{s0}\nvs\n{s1}")
    if not isinstance(ratio, (int, float)):
        if jax.tree.structure(ratio) != s0:
            raise ValueError("interpolate: the ratio tree must have the params' structure "
                             "(build it with ratio_tree)")
    else:
        ratio = jax.tree.map(lambda _: float(ratio), theta_0)

    def mix(a, b, r):
        if a.shape != b.shape:
            raise ValueError(f"interpolate: leaf shapes differ: {a.shape} vs {b.shape}")
        out = (1.0 - r) * jnp.asarray(a, jnp.float32) + r * jnp.asarray(b, jnp.float32)
        return out.astype(a.dtype)

    return jax.tree.map(mix, theta_0, theta_1, ratio)


def scale_adapters(adapters, ratios: Sequence[float]):
    """LoRA adapters with each layer's `lora_b` scaled by its ratio: base + alpha_l * s * A B, the
    exact interpolation between the base (alpha 0) and the adapted model (alpha 1)."""
    flat = {"/".join(k): v for k, v in traverse_util.flatten_dict(adapters).items()}
    n = _num_layers(flat)
    if len(ratios) != n:
        raise ValueError(f"scale_adapters: {len(ratios)} ratios for adapters over {n} layers")
    out = {}
    for p, v in flat.items():
        i = layer_index(p)
        r = float(ratios[i]) if i is not None else 1.0
        out[tuple(p.split("/"))] = (v * r).astype(v.dtype) if p.endswith("lora_b") else v
    return traverse_util.unflatten_dict(out)


def pareto_front(points) -> np.ndarray:
    """Indices of the non-dominated points of [N, 2] (both coordinates maximised), sorted by the
    first coordinate. A point is dominated when another is >= in both and > in one; exact
    duplicates are all kept."""
    pts = np.asarray(points, np.float64)
    if pts.ndim != 2 or pts.shape[1] != 2:
        raise ValueError(f"pareto_front: points must be [N, 2], got shape {pts.shape}")
    keep = []
    for i, p in enumerate(pts):
        dominated = np.any(np.all(pts >= p, axis=1) & np.any(pts > p, axis=1))
        if not dominated:
            keep.append(i)
    keep = np.asarray(keep, dtype=np.int64)
    return keep[np.argsort(pts[keep, 0], kind="stable")]


def sweep(theta_sft, theta_aligned, schedules: Mapping[str, Sequence[float]],
          evaluate: Callable[[Any], Mapping[str, float]], *, embed_ratio: float | None = None,
          head_ratio: float | None = None) -> dict[str, dict[str, float]]:
    """{name: evaluate(interpolated params)} for each per-layer ratio schedule (a list of
    num_layers ratios, e.g. `layer_ratios(...)`)."""
    out = {}
    for name, ratios in schedules.items():
        tree = ratio_tree(theta_sft, ratios, embed_ratio=embed_ratio, head_ratio=head_ratio)
        out[name] = dict(evaluate(interpolate(theta_sft, theta_aligned, tree)))
    return out


def plot_pareto(results: Mapping[str, Mapping[str, float]], out_path, *, x: str, y: str,
                title: str = "Alignment vs capability", highlight: Sequence[str] = ()) -> str:
    """Scatter of `results[name][x]` vs `[y]` with the Pareto front drawn; returns the PNG path."""
    from jaxalign.train.plots import Figure, _save

    names = list(results)
    pts = np.array([[results[n][x], results[n][y]] for n in names], np.float64)
    front = pareto_front(pts)
    fig = Figure(figsize=(6.0, 4.5))
    ax = fig.add_subplot(1, 1, 1)
    ax.scatter(pts[:, 0], pts[:, 1], c="tab:gray", s=18, label="schedules")
    ax.plot(pts[front, 0], pts[front, 1], "-o", c="tab:red", ms=5, label="Pareto front")
    for n, (px, py) in zip(names, pts):
        if n in highlight or len(names) <= 12:
            ax.annotate(n, (px, py), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel(x)
    ax.set_ylabel(y)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, out_path)
