"""The training entry point: `run(config)` turns an ml_collections config into plain objects once
and drives the jitted step; `python -m jaxalign.train --config experiments/dpo.py:tiny` calls it.

Resume: with `train.resume`, the newest complete checkpoint in `<output_dir>/checkpoints` restores
the trainable params (only the adapters under LoRA), the optimizer state, step, RNG and the data
iterator's position, so an interrupted-and-resumed run reproduces the uninterrupted losses.
"""

from __future__ import annotations

import json
import math
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxalign import sharding as jshard
from jaxalign.data import IteratorState, iterate_batches
from jaxalign.evaluate import accuracy_line, accuracy_summary, heldout_evaluator
from jaxalign.losses import REGISTRY
from jaxalign.models import abstract_params
from jaxalign.train import setup
from jaxalign.train.objectives import ObjectiveSpec, make_objective, make_score_fn, token_logps_of
from jaxalign.train.export import export_run
from jaxalign.train.step import init_state, make_eval_step, make_train_step


def _place(tree, shardings):
    return jax.tree.map(lambda x, s: jax.device_put(x, s), tree, shardings)


def _flatten_config(cfg) -> dict:
    return json.loads(cfg.to_json_best_effort()) if hasattr(cfg, "to_json_best_effort") else dict(cfg)


class _Cycle:
    """An endless resumable iterator over a tokenized dataset (the aux-SFT stream)."""

    def __init__(self, examples, collate, batch_size, seed, state: IteratorState):
        self._args = (examples, collate, batch_size, seed)
        self.state = state
        self._it = iterate_batches(examples, collate, batch_size=batch_size, seed=seed, state=state)

    def next(self):
        batch, self.state = next(self._it)
        return batch


def precompute_reference(model, ref_variables, examples, collate, *, kind, batch_size, vocab_chunk,
                         average):
    """Adds ref_chosen_logps / ref_rejected_logps to each preference example (one pass, no shuffle)."""
    if kind != "preference":
        raise ValueError(f"reference.mode='precomputed' supports preference losses, not {kind!r}")

    @jax.jit
    def ref_logps(variables, tokens, am, lm):
        tok = token_logps_of(model, variables, tokens, am, lm, vocab_chunk=vocab_chunk)
        from jaxalign.losses.logps import reduce_sequence

        return reduce_sequence(tok, lm[:, 1:], average=average)

    for start in range(0, len(examples), batch_size):
        chunk = examples[start:start + batch_size]
        b = collate(chunk)
        for side in ("chosen", "rejected"):
            lp = np.asarray(ref_logps(ref_variables, b[f"{side}_tokens"], b[f"{side}_attention_mask"],
                                      b[f"{side}_loss_mask"]))
            for ex, v in zip(chunk, lp):
                ex[f"ref_{side}_logps"] = float(v)


def _with_ref(collate, keys):
    def f(examples):
        batch = collate(examples)
        for k in keys:
            batch[k] = np.asarray([ex[k] for ex in examples], np.float32)
        return batch
    return f


def _packing(collate, data_cfg, *, kind, pad_id):
    """data.share_prefix (default: on for preference losses): the preference batches packed after
    one copy of each pair's prompt."""
    if kind != "preference":
        raise ValueError(f"data.share_prefix=True packs chosen/rejected pairs for the preference "
                         f"losses; loss kind {kind!r} cannot use it")
    from jaxalign.data.prefix_sharing import sharing_prefix

    return sharing_prefix(collate, pad_id=pad_id, pad_to_multiple_of=data_cfg.pad_to_multiple_of or None)


def _nspo_setup(config, model, tokenizer, trainable, frozen):
    """(basis, trainable, step transforms) for config.nspo: capability gradients at the start on
    `nspo.num_batches` batches of the (train split of the) capability source."""
    from jaxalign.analysis import nspo as jnspo
    from jaxalign.data import make_collate_fn

    n = config.nspo
    if n.where not in ("grads", "updates"):
        raise ValueError(f"nspo.where must be 'grads' or 'updates', got {n.where!r}")
    rows = setup.load_rows(n.source, n=n.num_batches * n.batch_size, seed=config.seed + 3,
                           split="train", synthetic_kwargs=dict(n.synthetic),
                           on_error=config.data.on_error)
    examples = setup.tokenize(rows, tokenizer, config.data, "sft", n.source).examples
    collate = make_collate_fn("sft", pad_id=tokenizer.pad_token_id,
                              pad_to_multiple_of=config.data.pad_to_multiple_of or None)
    batches = [collate(examples[i:i + n.batch_size])
               for i in range(0, len(examples) - n.batch_size + 1, n.batch_size)]
    sft = make_objective(model, ObjectiveSpec(kind="sft", vocab_chunk=config.train.vocab_chunk or None))
    key = jax.random.PRNGKey(0)
    basis, trainable = jnspo.basis_for_training(
        lambda t, b: sft(t, frozen, b, key, deterministic=True)[0], trainable, frozen, batches,
        rank=n.rank, mode=n.mode, rtol=n.rtol)
    print(f"[nspo] {n.mode} basis of rank {n.rank} from {len(batches)} batches of {n.source}: "
          f"{len(basis['left']) + len(basis['right'])} matrices" if n.mode == "matrix" else
          f"[nspo] flat basis of rank {n.rank} from {len(batches)} batches of {n.source}")
    transform = jnspo.make_transform("nspo")
    return basis, trainable, {"grad_transform" if n.where == "grads" else "update_transform": transform}


def run(config) -> dict[str, Any]:
    """Trains as the config says; returns a summary dict (final metrics, paths, model, variables)."""
    jshard.maybe_initialize_distributed(config.get("distributed", None))
    out_dir = os.path.abspath(config.output_dir)
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(_flatten_config(config), f, indent=2, default=str)
    rng = jax.random.PRNGKey(config.seed)
    rng, init_rng, lora_rng, state_rng = jax.random.split(rng, 4)

    tokenizer = setup.build_tokenizer(config.tokenizer.path)
    model, params = setup.build_model(config.model, tokenizer, init_rng, init_from=config.init_from)
    loss_name = config.loss.name
    if loss_name not in REGISTRY:
        raise ValueError(f"loss.name={loss_name!r} is not in jaxalign.losses.REGISTRY; known: "
                         f"{sorted(REGISTRY)}")
    kind = setup.objective_kind(loss_name)
    data = setup.build_data(config.data, tokenizer, kind=kind, seed=config.seed, aux_cfg=config.aux_sft)

    mesh = jshard.make_mesh(**dict(config.mesh))
    boxed = abstract_params(model)
    param_sh = jshard.param_shardings(boxed, mesh)
    params = _place(params, param_sh)

    spec = setup.lora_spec(config.lora, model.config.model_type)
    lora = spec is not None
    if lora:
        from jaxalign.peft import init_lora, print_trainable_parameters

        model = model.clone(lora=spec)
    params = setup.quantize_base(config.quant, params, lora=lora)

    reference = setup.reference_mode(config.reference.mode, loss_name=loss_name, lora=lora)
    trainable: dict = {}
    frozen: dict = {}
    if lora:
        adapters = init_lora(params, spec, lora_rng)
        adapters = _place(adapters, jshard.adapter_shardings(adapters, boxed, mesh))
        trainable["lora"] = adapters
        frozen["params"] = params
        print(print_trainable_parameters(params, adapters))
    else:
        trainable["params"] = params
        if reference == "model":
            frozen["ref_params"] = jax.tree.map(jnp.copy, params)
    if kind == "reward":
        trainable["score"] = {"kernel": jnp.zeros((model.config.hidden_size, 1), jnp.float32)}

    if reference == "precomputed":
        ref_vars = {"params": params}
        avg = loss_name in setup.AVERAGE_LOGPS
        for ds in (data.train, data.eval):
            if ds is not None:
                precompute_reference(model.clone(lora=None) if lora else model, ref_vars, ds.examples,
                                     data.collate, kind=kind, batch_size=config.train.batch_size,
                                     vocab_chunk=config.train.vocab_chunk or None, average=avg)
        data.collate = _with_ref(data.collate, ("ref_chosen_logps", "ref_rejected_logps"))
    share = config.data.get("share_prefix", None)
    packs = bool(share or (share is None and kind == "preference"))
    if packs:
        data.collate = _packing(data.collate, config.data, kind=kind, pad_id=tokenizer.pad_token_id)
        print("[data] prefix sharing: each pair's prompt is computed once (data.share_prefix)")

    obj_spec = ObjectiveSpec(
        kind=kind, loss_fn=REGISTRY[loss_name], loss_kwargs=setup.loss_hparams(config.loss),
        reference=reference, average_logps=loss_name in setup.AVERAGE_LOGPS,
        vocab_chunk=config.train.vocab_chunk or None,
        lambda_sft=float(config.aux_sft.lambda_sft) if data.aux_sft is not None else 0.0,
        rpo_alpha=float(config.train.rpo_alpha))
    objective = make_objective(model, obj_spec, score_fn=make_score_fn(model) if kind == "reward" else None)

    total = config.train.steps
    optimizer, schedule = setup.optimizer_and_schedule(config.optim, total_steps=total)
    transforms = {}
    if config.get("nspo") is not None and config.nspo.enabled:  # analysis/nspo.py
        frozen["nspo"], trainable, transforms = _nspo_setup(config, model, tokenizer, trainable, frozen)
    state = jshard.place_on_mesh(init_state(trainable, optimizer, state_rng), mesh)
    frozen = jshard.place_on_mesh(frozen, mesh)
    state_sh = jax.tree.map(lambda x: x.sharding, state)
    train_step = make_train_step(objective, optimizer, grad_accum=config.train.grad_accum,
                                 learning_rate_fn=schedule, state_shardings=state_sh, **transforms)
    eval_step = make_eval_step(objective)

    from jaxalign.train.checkpoint import Checkpointer
    from jaxalign.train.metrics import MetricsLogger

    ckpt = Checkpointer(os.path.join(out_dir, "checkpoints"), save_every=config.train.checkpoint_every,
                        keep=config.train.keep_checkpoints, async_save=config.train.async_checkpoint)
    data_state = IteratorState()
    aux_state = IteratorState()
    start_step = 0
    if config.train.resume and ckpt.latest_step() is not None:
        state, meta = ckpt.restore(target=state)
        data_state = IteratorState.from_dict(meta["data"])
        aux_state = IteratorState.from_dict(meta.get("aux_data", {"epoch": 0, "index": 0}))
        start_step = int(meta["step"])
        print(f"[resume] step {start_step} from {ckpt.directory} (data at {data_state})")

    batches = iterate_batches(data.train.examples, data.collate, batch_size=config.train.batch_size,
                              seed=config.seed, state=data_state)
    aux = (_Cycle(data.aux_sft.examples, data.aux_collate, config.aux_sft.batch_size, config.seed + 7,
                  aux_state) if data.aux_sft is not None else None)
    logger = MetricsLogger(out_dir, total_steps=total, use_tensorboard=config.train.tensorboard,
                           progress=config.train.progress and jax.process_index() == 0,
                           initial_step=start_step)

    def evaluate(step):
        if data.eval is None or not config.train.eval_batches:
            return {}
        sums: dict = {}
        n = 0
        for i, (b, _) in enumerate(iterate_batches(data.eval.examples, data.collate,
                                                   batch_size=config.train.batch_size, seed=0,
                                                   shuffle=False, num_epochs=1)):
            if i >= config.train.eval_batches:
                break
            m = jax.device_get(eval_step(state["trainable"], frozen, jshard.shard_batch(b, mesh)))
            for k, v in m.items():
                sums[k] = sums.get(k, 0.0) + float(v)
            n += 1
        metrics = {k: v / max(n, 1) for k, v in sums.items()}
        logger.log(step, metrics, split="eval")
        return metrics

    task_eval = None
    if config.eval.task_accuracy:
        task_eval = heldout_evaluator(model, tokenizer, **setup.task_eval_args(config))

    def current_variables(st):
        v = {"params": frozen["params"] if lora else st["trainable"]["params"]}
        if lora:
            v["lora"] = st["trainable"]["lora"]
        return v

    tax_eval = None
    if config.get("tax") is not None and config.tax.capability_source:  # capability regression
        from jaxalign.analysis.tax import make_tax_evaluator

        t = config.tax
        tax_eval = make_tax_evaluator(
            model, tokenizer, capability_source=t.capability_source,
            capability_synthetic=dict(t.capability_synthetic), alignment_source=t.alignment_source,
            alignment_synthetic=dict(t.alignment_synthetic),
            preference_source=t.preference_source, num_examples=t.num_examples,
            seed=config.seed + 101, batch_size=t.batch_size, max_length=config.data.max_length)
        tax_before = tax_eval(current_variables({"trainable": trainable}))  # the start, even on resume
    task = {}
    if config.eval.task_accuracy:
        task["before"] = task_eval(current_variables(state))
        print(f"[task] held-out accuracy before training: {accuracy_line(task['before'])} "
              f"(n={task['before']['n']})")

    history = []
    last_eval: dict = {}
    t_last, tokens_since = time.perf_counter(), 0.0
    steps_since = 0
    done = start_step
    for step in range(start_step, total):
        batch, data_state = next(batches)
        if aux is not None:
            sft = aux.next()
            batch.update({"sft_" + k: v for k, v in sft.items()})
        state, metrics = train_step(state, frozen, jshard.shard_batch(batch, mesh))
        steps_since += 1
        done = step + 1
        if done % config.train.log_every == 0 or done == total:
            m = {k: float(v) for k, v in jax.device_get(metrics).items()}
            now = time.perf_counter()
            tokens_since += m.get("num_tokens", 0.0) * steps_since
            m["step_time"] = (now - t_last) / steps_since
            m["tokens_per_sec"] = tokens_since / max(now - t_last, 1e-9)
            if not math.isfinite(m["loss"]):
                raise FloatingPointError(f"step {done}: loss is {m['loss']}; metrics {m}")
            logger.log(done, m)
            history.append({"step": done, **m})
            t_last, tokens_since, steps_since = time.perf_counter(), 0.0, 0
        if config.train.eval_every and done % config.train.eval_every == 0:
            last_eval = evaluate(done)
        meta = {"step": done, "data": data_state.to_dict(),
                "aux_data": aux.state.to_dict() if aux else {"epoch": 0, "index": 0}}
        stop = bool(config.train.stop_after) and done - start_step >= config.train.stop_after
        ckpt.save(done, state_tree=state, meta=meta, force=done == total or stop)
        if stop:
            print(f"[stop] leaving after step {done} (train.stop_after={config.train.stop_after})")
            break
    if not last_eval or (config.train.eval_every and done % config.train.eval_every):
        last_eval = evaluate(done)
    ckpt.wait()
    ckpt.close()
    logger.close()

    variables = current_variables(state)
    if config.eval.task_accuracy:
        task["after"] = task_eval(variables)
        print(f"[task] held-out accuracy after training: {accuracy_line(task['after'])}; "
              f"examples: {task['after']['examples']}")
        with open(os.path.join(out_dir, "task_accuracy.json"), "w") as f:
            json.dump({k: accuracy_summary(v) for k, v in task.items()}, f)
    tax = {}
    if tax_eval is not None:
        from jaxalign.analysis.tax import alignment_tax

        tax = {"before": tax_before, "after": tax_eval(variables)}
        if t.alignment_metric in tax["before"]:
            tax["report"] = alignment_tax(tax["before"], tax["after"], alignment=t.alignment_metric)
        print("[tax] " + ", ".join(f"{k}: {tax['before'][k]:.3f} -> {tax['after'][k]:.3f}"
                                   for k in tax["before"] if k.endswith(("accuracy", "nll"))))
        with open(os.path.join(out_dir, "tax.json"), "w") as f:
            json.dump(tax, f, indent=2)
    export = export_run(out_dir, model=model, variables=variables, tokenizer=tokenizer,
                        spec=spec if lora else None,
                        hf_dir=bool(config.export.hf_dir and kind != "reward"),
                        peft=bool(config.export.peft))
    if config.train.plots:
        from jaxalign.train.plots import plot_metrics

        export["plot"] = os.path.join(out_dir, "metrics.png")
        plot_metrics(out_dir, export["plot"])
    return {"output_dir": out_dir, "history": history, "eval": last_eval, "export": export,
            "model": model, "variables": variables, "tokenizer": tokenizer, "state": state,
            "reference": reference, "mesh": mesh, "task": task, "tax": tax,
            "nspo_basis": frozen.get("nspo"), "collate_packs": packs}
