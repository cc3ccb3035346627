"""The config schema shared by every experiment (ml_collections). Experiments in experiments/
start from `base_config()` and change fields; `lock_config` then rejects unknown keys."""

from __future__ import annotations

import ml_collections as mlc


def tiny_model() -> mlc.ConfigDict:
    """A ~0.1M-parameter Llama for the synthetic task (CPU demo and tests)."""
    return mlc.ConfigDict(dict(family="llama", vocab_size=0, hidden_size=64, intermediate_size=192,
                               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                               max_position_embeddings=64, tie_word_embeddings=True))


def base_config() -> mlc.ConfigDict:
    c = mlc.ConfigDict()
    c.seed = 0
    c.output_dir = "runs/default"
    c.init_from = ""  # a Hugging Face directory (e.g. the previous stage's export) to start from
    c.distributed = mlc.config_dict.placeholder(bool)  # None: auto-detect multi-host

    c.tokenizer = mlc.ConfigDict(dict(path="synthetic"))
    c.model = mlc.ConfigDict(dict(path="", dtype="float32", compute_dtype="", remat=False,
                                  init=tiny_model()))

    c.data = mlc.ConfigDict(dict(
        source="synthetic:preference", eval_source="", num_examples=2048, eval_examples=256,
        max_length=32, max_prompt_length=0, truncation_mode="keep_start", pad_to_multiple_of=8,
        # each preference pair's prompt computed once (data/prefix_sharing.py); None: on for the
        # preference losses, off for the others; True where it cannot apply is an error
        share_prefix=mlc.config_dict.placeholder(bool),
        on_error="raise", synthetic=mlc.ConfigDict(dict(digits=2, operators="+", error="digit",
                                      wrong_fraction=0.0))))
    c.aux_sft = mlc.ConfigDict(dict(source="", lambda_sft=0.0, num_examples=1024, batch_size=16))

    c.loss = mlc.ConfigDict(dict(name="dpo", beta=0.1))
    c.reference = mlc.ConfigDict(dict(mode="auto"))  # auto | model | base | precomputed | none

    c.lora = mlc.ConfigDict(dict(enabled=False, rank=8, alpha=16.0, targets="all_linear",
                                 dropout=0.0, use_rslora=False))
    c.quant = mlc.ConfigDict(dict(nf4=False, block_size=64, double_quant=True))

    c.optim = mlc.ConfigDict(dict(name="adamw", learning_rate=1e-3, warmup_steps=10,
                                  schedule="cosine", weight_decay=0.0, b1=0.9, b2=0.999,
                                  clip_norm=1.0))
    c.train = mlc.ConfigDict(dict(
        steps=100, batch_size=16, grad_accum=1, vocab_chunk=0, log_every=10, eval_every=50,
        eval_batches=4, checkpoint_every=50, keep_checkpoints=2, async_checkpoint=True, resume=True,
        tensorboard=True, progress=True, plots=True,
        stop_after=0,  # > 0: leave the loop after that many steps (a preemption drill)
        rpo_alpha=0.0))  # preference runs: + rpo_alpha * chosen NLL (TRL's rpo_alpha)
    c.mesh = mlc.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
    c.export = mlc.ConfigDict(dict(hf_dir=True, peft=True))
    # task_accuracy: held-out exact match before and after training (greedy); sampled_temperature > 0
    # also scores one completion per prompt sampled at that temperature (jaxalign.evaluate)
    c.eval = mlc.ConfigDict(dict(task_accuracy=False, num_prompts=200, max_new_tokens=6,
                                 sampled_temperature=0.0))
    # Alignment tax (jaxalign/analysis/tax.py): held-out capability (and aligned-task) sets scored
    # before and after training; capability_source '' turns it off.
    c.tax = mlc.ConfigDict(dict(
        capability_source="", capability_synthetic=mlc.ConfigDict(dict(digits=2, operators="-")),
        alignment_source="", alignment_synthetic=mlc.ConfigDict(dict(digits=2, operators="+")),
        preference_source="", alignment_metric="alignment/accuracy", num_examples=256,
        batch_size=64))
    # NSPO (jaxalign/analysis/nspo.py): project updates onto the null space of capability gradients.
    c.nspo = mlc.ConfigDict(dict(
        enabled=False, source="synthetic:sft", synthetic=mlc.ConfigDict(dict(digits=2, operators="-")),
        num_batches=8, batch_size=32, rank=16, mode="matrix", where="updates", rtol=1e-5))
    return c


def load_config(spec: str, overrides: dict | None = None) -> mlc.ConfigDict:
    """Loads 'path/to/experiment.py[:arg]' like the command line does, applies dotted overrides
    ({'loss.beta': 0.05}) and locks the config (unknown keys raise)."""
    import importlib.util
    import os

    path, _, arg = spec.partition(":")
    if not os.path.exists(path):
        repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        if os.path.exists(os.path.join(repo, path)):
            path = os.path.join(repo, path)
        else:
            raise FileNotFoundError(f"experiment config {path!r} not found")
    module_spec = importlib.util.spec_from_file_location("_jaxalign_experiment", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    cfg = module.get_config(arg or None)
    cfg.lock()
    for key, value in (overrides or {}).items():
        node = cfg
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        if leaf not in node:
            raise KeyError(f"config has no field {key!r}")
        node[leaf] = value
    return cfg
