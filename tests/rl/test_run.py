"""Online runs end to end from experiment configs: every config builds its trainer; a GRPO run
logs TRL-named metrics, checkpoints and resumes to the uninterrupted result; a LoRA best-of-N run
generates with adapters, trains only them, keeps the base as reference and exports."""

import glob
import json
import os

import jax
import numpy as np
import pytest

from jaxalign.rl.run import make_trainer, run
from jaxalign.train import setup
from jaxalign.train.config import load_config

EXPERIMENTS = {
    "grpo": ("tiny", "dapo", "dr_grpo", "kl", "lora"), "rloo": ("tiny",), "ppo": ("tiny",),
    "online_dpo": ("tiny", "best_of_4"), "iterative_dpo": ("tiny", "dpo", "fixed_ref", "ranked"),
    "rso": ("tiny", "dpo"), "best_of_n": ("tiny",),
}
TINY = {"model.init.hidden_size": 16, "model.init.intermediate_size": 32,
        "model.init.num_hidden_layers": 1, "model.init.num_attention_heads": 2,
        "model.init.num_key_value_heads": 1, "data.num_examples": 64,
        "data.synthetic.digits": 1, "eval.num_prompts": 8, "eval.max_new_tokens": 3,
        "rl.max_new_tokens": 3, "rl.prompts_per_round": 4, "rl.generation_batch": 0,
        "rl.group_size": 2, "train.progress": False, "train.async_checkpoint": False,
        "train.checkpoint_every": 1, "train.batch_size": 0, "rl.epochs": 1}


@pytest.mark.parametrize("name,variant", [(n, v) for n, vs in EXPERIMENTS.items() for v in vs])
def test_every_experiment_config_builds_its_trainer(name, variant, tokenizer):
    cfg = load_config(f"experiments/{name}.py:{variant}")
    assert cfg.rl.trainer == name and "steps" not in cfg.train
    model, _ = setup.build_model(cfg.model, tokenizer, jax.random.PRNGKey(0))
    assert make_trainer(cfg, model, tokenizer).name == name
    with pytest.raises(KeyError, match="rl.gruop_size"):
        load_config(f"experiments/{name}.py:{variant}", {"rl.gruop_size": 4})
    with pytest.raises(ValueError, match="unknown"):
        load_config(f"experiments/{name}.py:nope")


def _cfg(spec, out, **over):
    return load_config(spec, {"output_dir": str(out), **TINY, **over})


@pytest.mark.slow
def test_grpo_run_metrics_checkpoint_and_resume(tmp_path):
    full = run(_cfg("experiments/grpo.py:tiny", tmp_path / "full", **{"rl.rounds": 3}))
    assert [h["step"] for h in full["history"]] == [1, 2, 3]
    records = [json.loads(line) for line in open(tmp_path / "full" / "metrics.jsonl")]
    train = [r for r in records if r["split"] == "train"]
    for key in ("reward", "reward_std", "reward_std/group", "frac_reward_zero_std", "entropy",
                "completions/mean_length", "clip_ratio/region_mean", "loss", "grad_norm",
                "rewards/exact_match/mean"):
        assert key in train[-1], key
    assert sum("eval/task_accuracy" in r for r in records) == 2  # before and after
    assert os.path.exists(tmp_path / "full" / "metrics.png")
    assert os.path.exists(tmp_path / "full" / "hf" / "config.json")

    # 2 rounds, then resume to 3: the same parameters as the uninterrupted run
    part = tmp_path / "part"
    run(_cfg("experiments/grpo.py:tiny", part, **{"rl.rounds": 2}))
    resumed = run(_cfg("experiments/grpo.py:tiny", part, **{"rl.rounds": 3}))
    assert [h["step"] for h in resumed["history"]] == [3]
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6),
                 resumed["variables"]["params"], full["variables"]["params"])


@pytest.mark.slow
def test_lora_best_of_n_run_with_base_reference(tmp_path):
    out = tmp_path / "lora"
    result = run(_cfg("experiments/best_of_n.py:tiny", out,
                      **{"lora.enabled": True, "lora.rank": 2, "lora.alpha": 4.0,
                         "reference.mode": "base", "rl.min_reward": -1.0, "rl.rounds": 2,
                         "rl.group_size": 2, "train.batch_size": 2, "optim.learning_rate": 1e-2}))
    assert set(result["variables"]) == {"params", "lora"}
    assert set(result["ref_variables"]) == {"params"}  # the base without the adapter
    hist = result["history"]
    assert [h["updates"] for h in hist] == [2.0, 2.0]  # 4 kept samples / 2 per update, 1 epoch
    # the adapters were trained (B starts at zero); the base is untouched
    assert any(float(np.abs(x).max()) > 0 for path, x in
               jax.tree_util.tree_leaves_with_path(result["variables"]["lora"])
               if "lora_b" in jax.tree_util.keystr(path))
    assert result["variables"]["params"] is result["ref_variables"]["params"]
    assert os.path.exists(out / "adapter" / "adapter_config.json")
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(str(out / "hf"))
    assert hf.config.hidden_size == 16
    assert glob.glob(str(out / "checkpoints" / "*"))


def test_rows_per_round_bounds_the_pairs_each_selection_can_make():
    from experiments import iterative_dpo
    from jaxalign.rl.run import rows_per_round

    c = iterative_dpo.get_config("tiny")
    assert rows_per_round(c) == c.rl.prompts_per_round
    r = iterative_dpo.get_config("ranked")
    assert rows_per_round(r) == r.rl.prompts_per_round * (r.rl.group_size // 2)
