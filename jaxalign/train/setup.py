"""Turning a config into plain objects, once, at the entry point: tokenizer, model + params,
datasets, LoRA/QLoRA trees, objective spec, optimizer. Nothing below the entry point reads the
config."""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax.numpy as jnp

from jaxalign import data as jdata
from jaxalign import models

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}

# Losses whose TRL implementation feeds length-normalised (average) log-probs.
AVERAGE_LOGPS = {"ipo"}
KIND_OF_LOSS = {"kto": "kto", "apo_zero_unpaired": "kto", "bradley_terry": "reward", "nll": "sft",
                "sft": "sft"}
REFERENCE_FREE = {"simpo", "cpo", "orpo", "slic", "nll", "sft", "bradley_terry"}


def dtype_of(name: str):
    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {list(DTYPES)}, got {name!r}")
    return DTYPES[name]


def build_tokenizer(path: str):
    """'synthetic' -> the char-level arithmetic tokenizer; otherwise a local tokenizer directory."""
    if path in ("", "synthetic"):
        return jdata.build_char_tokenizer()
    from transformers import AutoTokenizer

    if not os.path.isdir(path):
        raise FileNotFoundError(f"tokenizer.path={path!r} is not a directory (no hub downloads at run time)")
    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def build_model(model_cfg, tokenizer, rng, *, init_from: str = ""):
    """(model, params) from a HF directory (`init_from` or model_cfg.path) or a random tiny init."""
    dtype = dtype_of(model_cfg.dtype)
    compute = dtype_of(model_cfg.compute_dtype or model_cfg.dtype)
    path = init_from or model_cfg.path
    if path:
        return models.from_pretrained(path, dtype=dtype, compute_dtype=compute, remat=model_cfg.remat)
    init = dict(model_cfg.init)
    family = init.pop("family", "llama")
    vocab = init.pop("vocab_size", 0) or len(tokenizer)
    ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
               pad_token_id=tokenizer.pad_token_id)
    if family == "gpt2":
        cfg = models.GPT2Config(vocab_size=vocab, **init, **ids)
    else:
        hidden, heads = init["hidden_size"], init["num_attention_heads"]
        init.setdefault("head_dim", hidden // heads)
        init.setdefault("num_key_value_heads", heads)
        cfg = models.LlamaConfig(model_type=family, vocab_size=vocab, **init, **ids)
    model = models.build_model(cfg, dtype=compute, param_dtype=dtype, remat=model_cfg.remat)
    return model, models.init_params(model, rng)


@dataclasses.dataclass
class DataBundle:
    train: Any  # TokenizedDataset
    eval: Any | None
    collate: Any
    aux_sft: Any | None = None
    aux_collate: Any | None = None


# Which `data.synthetic` keys each synthetic maker takes (the rest go to sample_problems).
_PROBLEM_KEYS = {"digits", "operators", "allow_negative", "conversational"}
_MAKER_KEYS = {"sft": {"wrong_fraction", "error"}, "preference": {"error"},
               "kto": {"desirable_fraction"}, "prompt": set()}

SYNTHETIC = {
    "sft": lambda n, seed, **kw: jdata.make_sft_dataset(n, seed=seed, **kw),
    "preference": lambda n, seed, **kw: jdata.make_preference_dataset(n, seed=seed, **kw),
    "kto": lambda n, seed, **kw: jdata.make_kto_dataset(n, seed=seed, **kw),
    "prompt": lambda n, seed, **kw: jdata.make_prompt_dataset(n, seed=seed, **kw),
}


def load_rows(source: str, *, n: int, seed: int, split: str, synthetic_kwargs: dict, on_error: str):
    """A datasets.Dataset from 'synthetic:<kind>' or a local file / directory / hub name."""
    if source.startswith("synthetic:"):
        kind = source.split(":", 1)[1]
        if kind not in SYNTHETIC:
            raise ValueError(f"data source {source!r}: synthetic kinds are {list(SYNTHETIC)}")
        keys = _PROBLEM_KEYS | _MAKER_KEYS[kind]
        return SYNTHETIC[kind](n, seed, split=split,
                               **{k: v for k, v in synthetic_kwargs.items() if k in keys})
    ds, report = jdata.load_dataset(source, split=split, on_error=on_error)
    print(f"[data] {source}: {report}")
    return ds


def tokenize(ds, tokenizer, data_cfg, kind, source):
    tok = jdata.tokenize_dataset(
        ds, tokenizer, kind=kind, max_length=data_cfg.max_length,
        max_prompt_length=data_cfg.max_prompt_length or None, truncation_mode=data_cfg.truncation_mode,
        on_error=data_cfg.on_error, source=source)
    print(f"[data] {source} ({kind}): {tok.report}")
    if len(tok) == 0:
        raise ValueError(f"data source {source!r}: no examples left after tokenization ({tok.report})")
    return tok


def build_data(data_cfg, tokenizer, *, kind: str, seed: int, aux_cfg=None) -> DataBundle:
    data_kind = {"preference": "preference", "reward": "preference", "kto": "unpaired", "sft": "sft"}[kind]
    syn = dict(data_cfg.synthetic)
    train_ds = load_rows(data_cfg.source, n=data_cfg.num_examples, seed=seed, split="train",
                         synthetic_kwargs=syn, on_error=data_cfg.on_error)
    train = tokenize(train_ds, tokenizer, data_cfg, data_kind, data_cfg.source)
    eval_tok = None
    eval_source = data_cfg.eval_source or (data_cfg.source if data_cfg.source.startswith("synthetic:") else "")
    if eval_source:
        eval_ds = load_rows(eval_source, n=data_cfg.eval_examples, seed=seed + 1, split="test",
                            synthetic_kwargs=syn, on_error=data_cfg.on_error)
        eval_tok = tokenize(eval_ds, tokenizer, data_cfg, data_kind, eval_source)
    collate = jdata.make_collate_fn(data_kind, pad_id=tokenizer.pad_token_id,
                                    pad_to_multiple_of=data_cfg.pad_to_multiple_of or None,
                                    max_length=data_cfg.max_length,
                                    truncation_mode=data_cfg.truncation_mode)
    bundle = DataBundle(train=train, eval=eval_tok, collate=collate)
    if aux_cfg is not None and aux_cfg.source and aux_cfg.lambda_sft:
        aux_syn = dict(aux_cfg.get("synthetic", None) or syn)  # its own generator keywords if given
        aux_ds = load_rows(aux_cfg.source, n=aux_cfg.num_examples, seed=seed + 2, split="train",
                           synthetic_kwargs=aux_syn, on_error=data_cfg.on_error)
        bundle.aux_sft = tokenize(aux_ds, tokenizer, data_cfg, "sft", aux_cfg.source)
        bundle.aux_collate = jdata.make_collate_fn("sft", pad_id=tokenizer.pad_token_id,
                                                   pad_to_multiple_of=data_cfg.pad_to_multiple_of or None)
    return bundle


def objective_kind(loss_name: str) -> str:
    return KIND_OF_LOSS.get(loss_name, "preference")


def loss_hparams(loss_cfg) -> tuple:
    return tuple((k, v) for k, v in sorted(loss_cfg.items()) if k != "name")


def reference_mode(requested: str, *, loss_name: str, lora: bool) -> str:
    if loss_name in REFERENCE_FREE:
        return "none"
    if requested == "auto":
        return "base" if lora else "model"
    if requested == "base" and not lora:
        raise ValueError("reference.mode='base' (base without adapter) needs lora.enabled=True")
    return requested


def lora_spec(lora_cfg, model_type: str):
    """The run's LoraSpec from the `lora` config block (None when LoRA is off).

    `targets` may be a preset name (attention, attention_mlp, all_linear) or a regex.
    """
    if not lora_cfg.enabled:
        return None
    from jaxalign.peft import LoraSpec, lora_targets

    targets = lora_cfg.targets
    if targets in ("attention", "attention_mlp", "all_linear"):
        targets = lora_targets(model_type, targets)
    return LoraSpec(rank=lora_cfg.rank, alpha=lora_cfg.alpha, targets=targets,
                    dropout=lora_cfg.dropout, use_rslora=lora_cfg.use_rslora)


def quantize_base(quant_cfg, params, *, lora: bool):
    """QLoRA: the base kernels as NF4 when `quant.nf4` is set (needs LoRA: NF4 weights are frozen)."""
    if not quant_cfg.nf4:
        return params
    if not lora:
        raise ValueError("quant.nf4=True (QLoRA) needs lora.enabled=True: NF4 base weights are frozen")
    from jaxalign.quant import bits_per_parameter, quantize_params

    params = quantize_params(params, block_size=quant_cfg.block_size,
                             double_quant=quant_cfg.double_quant)
    print(f"[quant] NF4 base: {bits_per_parameter(params):.3f} bits/parameter over quantized kernels")
    return params


def optimizer_and_schedule(optim_cfg, *, total_steps: int):
    """(optax optimizer, learning-rate schedule) from the `optim` config block."""
    from jaxalign.train.optim import make_optimizer, make_schedule

    schedule = make_schedule(learning_rate=optim_cfg.learning_rate, total_steps=total_steps,
                             warmup_steps=optim_cfg.warmup_steps, schedule=optim_cfg.schedule)
    optimizer = make_optimizer(name=optim_cfg.name, learning_rate_fn=schedule,
                               weight_decay=optim_cfg.weight_decay, b1=optim_cfg.b1, b2=optim_cfg.b2,
                               clip_norm=optim_cfg.clip_norm or None)
    return optimizer, schedule


def task_eval_args(config) -> dict:
    """Keywords of `jaxalign.evaluate.heldout_evaluator` from an experiment config: `eval.num_prompts`
    test prompts of the run's synthetic task (digits, operators) drawn with seed + 99,
    `eval.max_new_tokens`, and `eval.sampled_temperature` (0: greedy accuracy only)."""
    problems = {k: v for k, v in dict(config.data.synthetic).items() if k in ("digits", "operators")}
    return dict(num_prompts=config.eval.num_prompts, seed=config.seed + 99,
                max_new_tokens=config.eval.max_new_tokens,
                sampled_temperature=float(config.eval.get("sampled_temperature", 0.0)), **problems)
