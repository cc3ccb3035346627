"""PNG plots of logged metrics (training curves) and of before/after comparisons.

Figures are built with `matplotlib.figure.Figure` and rendered by the Agg canvas: no pyplot state,
no display needed, safe in CI and in threads.
"""

from __future__ import annotations

import math
import os
from typing import Iterable, Sequence

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from jaxalign.train.metrics import read_metrics

DEFAULT_KEYS = ("loss", "rewards/accuracies", "rewards/margins", "kl", "grad_norm")


def _series(records: Iterable[dict], key: str) -> tuple[list[int], list[float]]:
    steps, values = [], []
    for record in records:
        value = record.get(key)
        if key in record:
            steps.append(record["step"])
            values.append(math.nan if value is None else float(value))
    return steps, values


def _save(fig: Figure, out_path) -> str:
    out_path = os.fspath(out_path)
    parent = os.path.dirname(out_path)
    if parent:
        os.makedirs(parent, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(out_path, format="png", dpi=100)
    return out_path


def plot_metrics(logdir_or_records, out_path, keys: Sequence[str] | None = None) -> str:
    """Plots one subplot per metric with its train curve and, when logged, its eval curve.

    Args:
      logdir_or_records: a directory holding metrics.jsonl, or records from `read_metrics`.
      out_path: PNG file to write (parent directories are created).
      keys: metric names without split prefix (eval curves use `eval/<key>`); default: those of
        DEFAULT_KEYS that were logged. Non-finite values show as gaps.
    Returns the path written.
    """
    if isinstance(logdir_or_records, (str, os.PathLike)):
        records = read_metrics(logdir_or_records)
    else:
        records = list(logdir_or_records)
    available = sorted({k for r in records for k in r if k not in ("step", "split", "time")})
    if keys is None:
        keys = [k for k in DEFAULT_KEYS if k in available or f"eval/{k}" in available]
        if not keys:
            raise ValueError(f"no default metric {DEFAULT_KEYS} was logged; available: {available}")
    keys = list(keys)
    missing = [k for k in keys if k not in available and f"eval/{k}" not in available]
    if missing or not keys:
        raise ValueError(f"`keys` {missing or keys} not found in the records; available: {available}")

    ncols = min(3, len(keys))
    nrows = math.ceil(len(keys) / ncols)
    fig = Figure(figsize=(4.2 * ncols, 3.2 * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax, key in zip(axes, keys):
        for split_key, label, style in ((key, "train", "-"), (f"eval/{key}", "eval", "o-")):
            steps, values = _series(records, split_key)
            if steps:
                ax.plot(steps, values, style, label=label, markersize=3, linewidth=1.2)
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    for ax in axes[len(keys):]:
        ax.set_visible(False)
    return _save(fig, out_path)


def plot_bars(values: dict, out_path, title: str) -> str:
    """Bar chart of `{label: value}` (e.g. accuracy before and after training), values on top."""
    if not isinstance(values, dict) or not values:
        raise ValueError(f"`values` must be a non-empty dict of label -> number, got {values!r}")
    numbers = []
    for label, value in values.items():
        try:
            number = float(value)
        except (TypeError, ValueError) as e:
            raise ValueError(f"`values[{label!r}]` must be a number, got {value!r}") from e
        numbers.append(number)
    labels = [str(k) for k in values]
    fig = Figure(figsize=(max(4.0, 1.2 * len(labels) + 1.5), 3.6), layout="constrained")
    ax = fig.subplots()
    colors = [f"C{i % 10}" for i in range(len(labels))]
    bars = ax.bar(labels, numbers, color=colors)
    ax.bar_label(bars, labels=[f"{n:.3g}" for n in numbers], padding=2)
    finite = [n for n in numbers if math.isfinite(n)]
    if finite and min(finite) >= 0:
        ax.set_ylim(0, max(finite) * 1.15 or 1.0)
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, out_path)
