"""Grid sweeps over dotted config overrides, run one after another in this process.

  python -m jaxalign.train.sweep --config experiments/dpo.py:tiny \
      --grid loss.beta=0.05,0.1,0.5 --grid optim.learning_rate=1e-4,1e-3 --out runs/sweep_dpo

Each point gets its own output directory (<out>/<key>=<value>_...), so an interrupted sweep
resumes point by point (finished points are skipped; a partly trained point resumes from its
checkpoint). A summary table (final train loss and every eval metric) is printed and written to
<out>/sweep.json.
"""

from __future__ import annotations

import argparse
import ast
import itertools
import json
import os
from typing import Any, Callable, Mapping, Sequence

from jaxalign.train.config import load_config


def parse_grid(specs: Sequence[str]) -> dict[str, list[Any]]:
    """['loss.beta=0.05,0.1'] -> {'loss.beta': [0.05, 0.1]} (values parsed as Python literals
    where possible, otherwise kept as strings)."""
    grid: dict[str, list[Any]] = {}
    for spec in specs:
        key, sep, values = spec.partition("=")
        if not sep or not key or not values:
            raise ValueError(f"--grid {spec!r}: expected key=v1,v2,...")
        parsed = []
        for v in values.split(","):
            try:
                parsed.append(ast.literal_eval(v))
            except (ValueError, SyntaxError):
                parsed.append(v)
        grid[key] = parsed
    return grid


def grid_points(grid: Mapping[str, Sequence[Any]]) -> list[dict[str, Any]]:
    keys = list(grid)
    return [dict(zip(keys, combo)) for combo in itertools.product(*(grid[k] for k in keys))]


def point_name(point: Mapping[str, Any]) -> str:
    return "_".join(f"{k}={v}" for k, v in point.items()).replace("/", "-") or "default"


def sweep(config_spec: str, grid: Mapping[str, Sequence[Any]], out_dir: str, *,
          overrides: Mapping[str, Any] | None = None, run_fn: Callable | None = None) -> list[dict]:
    """Runs every grid point; returns one summary row per point."""
    if run_fn is None:
        from jaxalign.train.run import run as run_fn
    rows = []
    for point in grid_points(grid):
        name = point_name(point)
        point_dir = os.path.join(out_dir, name)
        done_file = os.path.join(point_dir, "summary.json")
        if os.path.exists(done_file):
            with open(done_file) as f:
                rows.append(json.load(f))
            print(f"[sweep] {name}: already done")
            continue
        cfg = load_config(config_spec, {**(overrides or {}), **point, "output_dir": point_dir})
        print(f"[sweep] {name}")
        result = run_fn(cfg)
        last = result["history"][-1] if result["history"] else {}
        row = {"point": dict(point), "output_dir": point_dir, "train_loss": last.get("loss"),
               **{f"eval/{k}": v for k, v in result.get("eval", {}).items()}}
        if result.get("task", {}).get("after"):
            row["task_accuracy"] = result["task"]["after"]["accuracy"]
        os.makedirs(point_dir, exist_ok=True)
        with open(done_file, "w") as f:
            json.dump(row, f, indent=2)
        rows.append(row)
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "sweep.json"), "w") as f:
        json.dump(rows, f, indent=2)
    return rows


def format_table(rows: Sequence[Mapping[str, Any]]) -> str:
    if not rows:
        return "(no runs)"
    cols = ["point"] + sorted({k for r in rows for k in r if k not in ("point", "output_dir")})
    lines = [" | ".join(cols), " | ".join("---" for _ in cols)]
    for r in rows:
        cells = [point_name(r["point"])]
        for c in cols[1:]:
            v = r.get(c)
            cells.append(f"{v:.4g}" if isinstance(v, float) else str(v))
        lines.append(" | ".join(cells))
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True, help="experiments/<name>.py[:variant]")
    ap.add_argument("--grid", action="append", default=[], help="key=v1,v2,... (repeatable)")
    ap.add_argument("--set", action="append", default=[], help="key=value fixed for all points")
    ap.add_argument("--out", required=True, help="sweep output directory")
    args = ap.parse_args(argv)
    from absl import logging

    logging.set_verbosity(logging.WARNING)
    fixed = {k: v[0] for k, v in parse_grid(args.set).items()}
    rows = sweep(args.config, parse_grid(args.grid), args.out, overrides=fixed)
    print(format_table(rows))


if __name__ == "__main__":
    main()
