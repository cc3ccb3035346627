import json

import pytest

from jaxalign.train.sweep import format_table, grid_points, parse_grid, sweep
from tests.train.conftest import TINY


def test_parse_grid_and_points():
    grid = parse_grid(["loss.beta=0.05,0.1", "loss.name=dpo,ipo"])
    assert grid == {"loss.beta": [0.05, 0.1], "loss.name": ["dpo", "ipo"]}
    assert len(grid_points(grid)) == 4
    with pytest.raises(ValueError, match="key=v1"):
        parse_grid(["loss.beta"])


def test_sweep_runs_each_point_once_and_resumes(tmp_path):
    calls = []

    def fake_run(cfg):
        calls.append(cfg.loss.beta)
        return {"history": [{"loss": cfg.loss.beta * 2}], "eval": {"loss": cfg.loss.beta}}

    rows = sweep("experiments/dpo.py:tiny", {"loss.beta": [0.1, 0.5]}, str(tmp_path),
                 run_fn=fake_run)
    assert calls == [0.1, 0.5]
    assert [r["train_loss"] for r in rows] == [0.2, 1.0]
    again = sweep("experiments/dpo.py:tiny", {"loss.beta": [0.1, 0.5]}, str(tmp_path),
                  run_fn=fake_run)
    assert calls == [0.1, 0.5] and again == rows  # finished points are skipped
    assert json.loads((tmp_path / "sweep.json").read_text()) == rows
    assert "loss.beta=0.5" in format_table(rows)
    with pytest.raises(KeyError, match="betta"):
        sweep("experiments/dpo.py:tiny", {"loss.betta": [0.1]}, str(tmp_path / "x"), run_fn=fake_run)


def test_sweep_real_runs(tmp_path):
    rows = sweep("experiments/dpo.py:tiny", {"loss.beta": [0.1, 1.0]}, str(tmp_path),
                 overrides={**TINY, "train.steps": 2})
    assert len(rows) == 2 and all(r["train_loss"] is not None for r in rows)
