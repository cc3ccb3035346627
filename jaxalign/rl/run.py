"""The online entry point: `run(config)` turns an online experiment config (jaxalign.rl.config)
into plain objects once and runs `jaxalign.rl.loop.run_rounds`;
`python -m jaxalign.rl --config experiments/grpo.py:tiny` calls it.

Outputs in `output_dir`: config.json, metrics.jsonl (+ TensorBoard events), checkpoints/ (every
`train.checkpoint_every` rounds; with `train.resume` a rerun continues from the newest one),
task_accuracy.json, hf/ (the final policy, LoRA merged), adapter/ (PEFT, under LoRA), metrics.png.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

import jax
import jax.numpy as jnp

from jaxalign import sharding as jshard
from jaxalign.data import IteratorState
from jaxalign.evaluate import accuracy_line, accuracy_summary, heldout_evaluator
from jaxalign.losses import REGISTRY
from jaxalign.models import abstract_params
from jaxalign.rl import trainers
from jaxalign.rl.loop import run_rounds
from jaxalign.rl.ppo import init_value_head, make_policy_value_fn
from jaxalign.rl.rewards import sources_from_weights
from jaxalign.rl.rollout import PromptStream, make_logps_fn
from jaxalign.sample import make_sampler
from jaxalign.train import setup
from jaxalign.train.export import export_run
from jaxalign.train.step import init_state, make_train_step

NEEDS_REFERENCE = ("ppo", "online_dpo", "iterative_dpo", "rso")
PLOT_KEYS = ("reward", "eval/task_accuracy", "kl", "entropy", "completions/mean_length",
             "clip_ratio/region_mean", "frac_reward_zero_std", "loss", "grad_norm")


def _opt(x):
    return None if x is None else float(x)


def make_trainer(config, model, tokenizer) -> trainers.Trainer:
    """The `Trainer` named by config.rl.trainer with the config's hyperparameters."""
    rl, loss = config.rl, config.loss
    common = dict(epochs=rl.epochs, batch_size=config.train.batch_size)
    name = rl.trainer
    if name == "grpo":
        return trainers.grpo_trainer(
            model, group_size=rl.group_size, beta=loss.beta, epsilon_low=loss.epsilon_low,
            epsilon_high=_opt(loss.epsilon_high), delta=_opt(loss.delta), loss_type=loss.loss_type,
            scale_rewards=loss.scale_rewards, max_completion_length=rl.max_new_tokens,
            temperature=rl.temperature, grad_accum=config.train.grad_accum, log_kl=rl.log_kl,
            **common)
    if name == "rloo":
        return trainers.rloo_trainer(
            model, group_size=rl.group_size, beta=loss.beta, epsilon_low=loss.epsilon_low,
            epsilon_high=_opt(loss.epsilon_high), normalize_advantages=loss.normalize_advantages,
            temperature=rl.temperature, **common)
    if name == "ppo":
        return trainers.ppo_trainer(
            model, eos_id=tokenizer.eos_token_id, group_size=rl.group_size, epsilon=loss.epsilon,
            clip_range_value=_opt(loss.clip_range_value), vf_coef=loss.vf_coef,
            kl_coef=loss.kl_coef, kl_estimator=loss.kl_estimator, gamma=loss.gamma, lam=loss.lam,
            whiten_advantages=loss.whiten_advantages,
            missing_eos_penalty=loss.missing_eos_penalty or None, temperature=rl.temperature,
            **common)
    if name in ("online_dpo", "iterative_dpo", "rso"):
        if loss.name not in REGISTRY:
            raise ValueError(f"loss.name={loss.name!r} is not in jaxalign.losses.REGISTRY")
        return trainers.preference_trainer(
            model, loss_fn=REGISTRY[loss.name], loss_kwargs=dict(setup.loss_hparams(loss)),
            average_logps=loss.name in setup.AVERAGE_LOGPS,
            group_size=rl.group_size,
            pair_selection="rso" if name == "rso" else rl.pair_selection,
            drop_ties=name != "online_dpo", rso_beta=rl.rso_beta,
            rso_num_samples=rl.rso_num_samples, ref_update=rl.ref_update,
            rpo_alpha=float(config.train.rpo_alpha), temperature=rl.temperature, name=name, **common)
    if name == "best_of_n":
        return trainers.best_of_n_trainer(model, group_size=rl.group_size,
                                          min_reward=_opt(rl.min_reward), **common)
    raise ValueError(f"unknown rl.trainer {name!r}")


def rows_per_round(config) -> int:
    rl = config.rl
    if rl.trainer in ("grpo", "rloo", "ppo"):
        return rl.prompts_per_round * rl.group_size
    if rl.get("pair_selection", "best_worst") == "ranked":  # up to group_size // 2 pairs a prompt
        return rl.prompts_per_round * max(1, rl.group_size // 2)
    return rl.prompts_per_round  # at most one pair / kept sample per prompt


def _load_prompts(config, tokenizer):
    syn = {k: v for k, v in dict(config.data.synthetic).items() if k in ("digits", "operators")}
    ds = setup.load_rows(config.data.source, n=config.data.num_examples, seed=config.seed,
                         split="train", synthetic_kwargs=syn, on_error=config.data.on_error)
    return setup.tokenize(ds, tokenizer, config.data, "prompt", config.data.source)


def run(config) -> dict[str, Any]:
    """Runs the online experiment; returns a summary (history, task accuracy, paths, model, ...)."""
    jshard.maybe_initialize_distributed(config.get("distributed", None))
    out_dir = os.path.abspath(config.output_dir)
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        f.write(config.to_json_best_effort(indent=2))
    rl = config.rl
    rng = jax.random.PRNGKey(config.seed)
    rng, init_rng, lora_rng, state_rng = jax.random.split(rng, 4)

    tokenizer = setup.build_tokenizer(config.tokenizer.path)
    model, params = setup.build_model(config.model, tokenizer, init_rng, init_from=config.init_from)
    prompts_ds = _load_prompts(config, tokenizer)
    mesh = jshard.make_mesh(**dict(config.mesh))
    boxed = abstract_params(model)
    params = jax.tree.map(jax.device_put, params, jshard.param_shardings(boxed, mesh))

    spec = setup.lora_spec(config.lora, model.config.model_type)
    lora = spec is not None
    if lora:
        from jaxalign.peft import init_lora

        model = model.clone(lora=spec)
    params = setup.quantize_base(config.quant, params, lora=lora)
    trainable: dict = {}
    frozen: dict = {}
    if lora:
        trainable["lora"] = init_lora(params, spec, lora_rng)
        frozen["params"] = params
    else:
        trainable["params"] = params
    if rl.trainer == "ppo":
        trainable["value"] = init_value_head(model.config.hidden_size)

    mode = config.reference.mode
    if mode == "auto":
        mode = "base" if lora else "model"
    if mode not in ("model", "base", "none"):
        raise ValueError(f"reference.mode for online runs must be auto/model/base/none, got {mode!r}")
    if mode == "base" and not lora:
        raise ValueError("reference.mode='base' needs lora.enabled=True")
    needs_ref = (rl.trainer in NEEDS_REFERENCE or (rl.trainer in ("grpo", "rloo") and config.loss.beta))
    if mode == "none" and needs_ref:
        raise ValueError(f"rl.trainer={rl.trainer!r} with these settings needs a reference model, "
                         f"but reference.mode='none'")
    rm = None
    if rl.reward_model.path and rl.reward_model.weight:
        from jaxalign.rl.reward_model import load_reward_model

        rm = load_reward_model(rl.reward_model.path)
    sources = sources_from_weights(dict(rl.rewards), eos=tokenizer.eos_token, reward_model=rm,
                                   reward_model_weight=rl.reward_model.weight)

    trainer = make_trainer(config, model, tokenizer)
    bs = config.train.batch_size
    rows = rows_per_round(config)
    total = max(1, rl.rounds * rl.epochs * (math.ceil(rows / bs) if bs else 1))
    optimizer, schedule = setup.optimizer_and_schedule(config.optim, total_steps=total)
    # Scalars (step, optimizer counts, RNG) replicated on the mesh: the first update then sees the
    # shardings later ones see, and the donated step compiles once.
    state = jshard.place_on_mesh(init_state(trainable, optimizer, state_rng), mesh)
    frozen = jshard.place_on_mesh(frozen, mesh)
    # The reference: a copy of the initial weights, or under LoRA the frozen base (no copy).
    ref_variables = None
    if mode != "none":
        ref_variables = {"params": frozen["params"] if lora else jax.tree.map(jnp.copy, params)}
    state_sh = jax.tree.map(lambda x: x.sharding, state)
    train_step = make_train_step(trainer.objective, optimizer, grad_accum=config.train.grad_accum,
                                 learning_rate_fn=schedule, state_shardings=state_sh)
    top_k = rl.top_k or None
    top_p = rl.top_p if rl.top_p < 1.0 else None
    sampler = make_sampler(model, max_new_tokens=rl.max_new_tokens, eos_ids=tokenizer.eos_token_id,
                           pad_id=tokenizer.pad_token_id, temperature=rl.temperature, top_k=top_k,
                           top_p=top_p)
    logps_fn = make_logps_fn(model, temperature=rl.temperature)
    pv_fn = make_policy_value_fn(model, temperature=rl.temperature) if rl.trainer == "ppo" else None

    from jaxalign.train.checkpoint import Checkpointer
    from jaxalign.train.metrics import MetricsLogger

    ckpt = Checkpointer(os.path.join(out_dir, "checkpoints"), save_every=config.train.checkpoint_every,
                        keep=config.train.keep_checkpoints, async_save=config.train.async_checkpoint)
    ref_keys = [k for k in ("params", "lora") if k in trainable]

    def ckpt_tree(st, ref):
        tree = {"state": st}
        if trainer.ref_update == "round":
            tree["ref"] = {k: ref[k] if k in ref else st["trainable"][k] for k in ref_keys}
        return tree

    start_round, prompt_state = 0, IteratorState()
    if config.train.resume and ckpt.latest_step() is not None:
        restored, meta = ckpt.restore(target=ckpt_tree(state, ref_variables))
        state = restored["state"]
        if "ref" in restored:
            ref_variables = {**ref_variables, **restored["ref"]}
        start_round, prompt_state = int(meta["round"]), IteratorState.from_dict(meta["prompts"])
        print(f"[resume] round {start_round} (step {int(state['step'])}) from {ckpt.directory}")
    gen_batch = rl.generation_batch or rl.prompts_per_round
    prompts = PromptStream(prompts_ds, pad_id=tokenizer.pad_token_id, batch_size=gen_batch,
                           seed=config.seed, state=prompt_state)
    logger = MetricsLogger(out_dir, total_steps=total, use_tensorboard=config.train.tensorboard,
                           progress=config.train.progress and jax.process_index() == 0,
                           initial_step=min(int(state["step"]), total))

    def current_variables(st):
        from jaxalign.train.objectives import policy_variables

        return policy_variables(st["trainable"], frozen)

    task_eval = None
    if config.eval.task_accuracy:
        task_eval = heldout_evaluator(model, tokenizer, **setup.task_eval_args(config))

    task: dict = {}
    if config.eval.task_accuracy:
        task["before"] = task_eval(current_variables(state))
        print(f"[task] held-out accuracy before: {accuracy_line(task['before'])} "
              f"(n={task['before']['n']})")
        if start_round == 0:
            logger.log(0, {"task_accuracy": task["before"]["accuracy"]}, split="eval")

    def on_round_end(done, st, ref):
        if config.eval.task_accuracy and rl.eval_every and done % rl.eval_every == 0 and done < rl.rounds:
            acc = task_eval(current_variables(st))["accuracy"]
            logger.log(int(st["step"]), {"task_accuracy": acc}, split="eval")
        meta = {"round": done, "prompts": prompts.state.to_dict(), "step": int(st["step"])}
        ckpt.save(done, state_tree=ckpt_tree(st, ref), meta=meta, force=done == rl.rounds)

    state, ref_variables, history = run_rounds(
        trainer, state=state, frozen=frozen, ref_variables=ref_variables, sample_fn=sampler,
        prompts=prompts, prompts_per_round=rl.prompts_per_round, tokenizer=tokenizer,
        sources=sources, train_step=train_step, logps_fn=logps_fn, policy_value_fn=pv_fn,
        rounds=rl.rounds, start_round=start_round, seed=config.seed, logger=logger,
        on_round_end=on_round_end, shard=lambda b: jshard.shard_batch(b, mesh))
    ckpt.wait()
    ckpt.close()

    variables = current_variables(state)
    if config.eval.task_accuracy:
        task["after"] = task_eval(variables)
        logger.log(int(state["step"]), {"task_accuracy": task["after"]["accuracy"]}, split="eval")
        print(f"[task] held-out accuracy after: {accuracy_line(task['after'])}; examples: "
              f"{task['after']['examples']}")
        with open(os.path.join(out_dir, "task_accuracy.json"), "w") as f:
            json.dump({k: accuracy_summary(v) for k, v in task.items()}, f)
    logger.close()

    export = export_run(out_dir, model=model, variables=variables, tokenizer=tokenizer,
                        spec=spec if lora else None, hf_dir=bool(config.export.hf_dir),
                        peft=bool(config.export.peft))
    if config.train.plots and history:
        from jaxalign.train.metrics import read_metrics
        from jaxalign.train.plots import plot_metrics

        records = read_metrics(out_dir)
        logged = {k for r in records for k in r}
        keys = [k.split("/", 1)[1] if k.startswith("eval/") else k for k in PLOT_KEYS if k in logged]
        export["plot"] = plot_metrics(records, os.path.join(out_dir, "metrics.png"), keys=keys)
    return {"output_dir": out_dir, "history": history, "task": task, "export": export,
            "model": model, "variables": variables, "tokenizer": tokenizer, "state": state,
            "ref_variables": ref_variables, "mesh": mesh, "trainer": trainer}
