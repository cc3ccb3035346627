"""Hugging Face PEFT adapter directories in and out.

A PEFT LoRA directory holds `adapter_config.json` and `adapter_model.safetensors` with, for every
adapted module, `base_model.model.<hf module>.lora_A.weight` [r, in] and `...lora_B.weight`
[out, r] (also for GPT-2's Conv1D, whose config says `fan_in_fan_out: true`). jaxalign stores the
same factors transposed: `lora_a` [in, r] = lora_A.T, `lora_b` [r, out] = lora_B.T.

Module names map with `jaxalign.models.hf_module_name`; per-module ranks and alphas travel as
PEFT's `rank_pattern` / `alpha_pattern` keyed by the full HF module name.
"""

from __future__ import annotations

import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from jaxalign.models.config import GPT2Config
from jaxalign.models.hf import abstract_params, build_model, hf_module_name
from jaxalign.models.safetensors_io import SafetensorsFile, write_safetensors
from jaxalign.peft.lora import adapted_modules, linear_modules
from jaxalign.peft.spec import LoraSpec

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
_PREFIX = "base_model.model."
_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<factor>[AB])\.weight$")


def _model_modules(config) -> dict[str, tuple[str, tuple[int, int]]]:
    """HF module name -> (jaxalign path, (in, out)) for every adaptable Linear of the model."""
    abstract = abstract_params(build_model(config))
    out = {}
    for path, shape in linear_modules(abstract).items():
        if path.split("/")[-1] == "lm_head":
            continue
        out[hf_module_name(config, tuple(path.split("/")))] = (path, shape)
    return out


def _leaf_names_select_exactly(names: set[str], chosen: set[str], available, sep: str) -> bool:
    return {m for m in available if m.split(sep)[-1] in names} == chosen


def _peft_pattern_value(pattern: dict, name: str, default):
    """PEFT's `get_pattern_key` semantics: the first key k with re.match(rf'(.*\\.)?({k})$', name)."""
    for key, value in pattern.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


# ----------------------------------------------------------------------------- saving
def save_peft_adapter(adapters, spec: LoraSpec, config, directory: str, *,
                      base_model_name_or_path: str = "", dtype=None) -> None:
    """Writes a PEFT LoRA directory that `peft.PeftModel.from_pretrained(hf_model, directory)` loads.

    adapters: the jaxalign adapter tree; spec: its LoraSpec; config: the base model's jaxalign config.
    target_modules lists the HF leaf names (e.g. ["q_proj", "v_proj"]) when those select exactly the
    adapted modules, else a regex full-matching their HF names. Modules whose rank differs from
    `spec.rank` or whose alpha differs from `spec.alpha` get `rank_pattern` / `alpha_pattern`
    entries keyed by their full HF module name. dtype: storage dtype (default: the adapter's).
    """
    modules = _model_modules(config)
    by_path = {p: (name, shape) for name, (p, shape) in modules.items()}
    entries, rank_pattern, alpha_pattern, chosen = [], {}, {}, set()
    for path, (a, b) in sorted(adapted_modules(adapters).items()):
        if path not in by_path:
            raise ValueError(f"save_peft_adapter: adapter for {path!r}, which the {config.model_type} "
                             f"model does not have (adaptable modules: {sorted(by_path)})")
        name, (fan_in, fan_out) = by_path[path]
        if (a.shape[0], b.shape[1]) != (fan_in, fan_out):
            raise ValueError(f"save_peft_adapter: {path!r} lora_a {tuple(a.shape)} / lora_b "
                             f"{tuple(b.shape)} do not fit the kernel [{fan_in}, {fan_out}]")
        r = int(a.shape[1])
        if r != spec.rank:
            rank_pattern[name] = r
        if spec.alpha_for(path) != float(spec.alpha):
            alpha_pattern[name] = float(spec.alpha_for(path))
        chosen.add(name)
        out_dtype = np.dtype(dtype) if dtype is not None else np.dtype(a.dtype)
        entries.append((f"{_PREFIX}{name}.lora_A.weight", (r, fan_in), out_dtype, a))
        entries.append((f"{_PREFIX}{name}.lora_B.weight", (fan_out, r), out_dtype, b))
    leaves = {n.split(".")[-1] for n in chosen}
    if _leaf_names_select_exactly(leaves, chosen, modules, "."):
        target_modules = sorted(leaves)
    else:
        target_modules = "^(?:" + "|".join(re.escape(n) for n in sorted(chosen)) + ")$"
    cfg = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path or None,
        "r": int(spec.rank),
        "lora_alpha": float(spec.alpha),
        "target_modules": target_modules,
        "lora_dropout": float(spec.dropout),
        "use_rslora": bool(spec.use_rslora),
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "bias": "none",
        "fan_in_fan_out": isinstance(config, GPT2Config),
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        "use_dora": False,
    }
    os.makedirs(directory, exist_ok=True)
    by_key = {e[0]: e for e in entries}

    def fetch(key):
        _, _, out_dtype, arr = by_key[key]
        return np.asarray(jax.device_get(arr)).T.astype(out_dtype)

    write_safetensors(os.path.join(directory, WEIGHTS_NAME), [e[:3] for e in entries], fetch,
                      {"format": "pt"})
    with open(os.path.join(directory, CONFIG_NAME), "w") as f:
        json.dump(cfg, f, indent=2)


# ----------------------------------------------------------------------------- loading
_UNSUPPORTED = {
    "use_dora": "DoRA adapters", "lora_bias": "LoRA bias terms", "modules_to_save": "modules_to_save",
    "trainable_token_indices": "trainable tokens", "target_parameters": "target_parameters",
    "layer_replication": "layer_replication", "use_qalora": "QA-LoRA",
}


def _read_config(directory: str) -> dict:
    path = os.path.join(directory, CONFIG_NAME)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{directory}: no {CONFIG_NAME} (expected a PEFT adapter directory)")
    with open(path) as f:
        cfg = json.load(f)
    if cfg.get("peft_type") != "LORA":
        raise ValueError(f"{path}: peft_type={cfg.get('peft_type')!r}, expected 'LORA'")
    for field, what in _UNSUPPORTED.items():
        if cfg.get(field):
            raise ValueError(f"{path}: {field}={cfg[field]!r}: {what} are not supported by jaxalign")
    if cfg.get("bias", "none") != "none":
        raise ValueError(f"{path}: bias={cfg['bias']!r}: only bias='none' is supported")
    for field in ("r", "lora_alpha"):
        if field not in cfg:
            raise ValueError(f"{path}: missing field {field!r}")
    return cfg


def load_peft_adapter(directory: str, config, *, dtype=jnp.float32):
    """Reads a PEFT LoRA directory for a base model with jaxalign config `config`.

    Returns (adapters, spec): the adapter tree (fp32 by default) and a LoraSpec whose targets
    select exactly the modules in the file and whose rank/alpha patterns (exact module paths)
    reproduce PEFT's per-module scaling alpha / r (alpha / sqrt(r) with rsLoRA).
    Raises ValueError naming the file and key for a tensor on a module the model lacks, a wrong
    shape, a missing factor, or a rank that disagrees with the config's rank_pattern.
    """
    cfg = _read_config(directory)
    weights = os.path.join(directory, WEIGHTS_NAME)
    if not os.path.exists(weights):
        extra = " (adapter_model.bin is not supported: re-save with safe_serialization=True)" \
            if os.path.exists(os.path.join(directory, "adapter_model.bin")) else ""
        raise FileNotFoundError(f"{directory}: no {WEIGHTS_NAME}{extra}")
    st = SafetensorsFile(weights)
    modules = _model_modules(config)
    factors: dict[str, dict[str, np.ndarray]] = {}
    for key in st.keys():
        m = _KEY.match(key)
        if not m:
            raise ValueError(f"{weights}: tensor {key!r} is not a LoRA factor "
                             f"('{_PREFIX}<module>.lora_A.weight' / '.lora_B.weight')")
        name = m.group("module")
        if name not in modules:
            raise ValueError(f"{weights}: tensor {key!r} adapts module {name!r}, which the "
                             f"{config.model_type} model does not have; adaptable modules: "
                             f"{sorted(modules)[:12]}{' ...' if len(modules) > 12 else ''}")
        factors.setdefault(name, {})[m.group("factor")] = key
    if not factors:
        raise ValueError(f"{weights}: no LoRA tensors")
    r0, alpha0 = int(cfg["r"]), float(cfg["lora_alpha"])
    rank_pattern = cfg.get("rank_pattern") or {}
    alpha_pattern = cfg.get("alpha_pattern") or {}
    flat, ranks, alphas = {}, {}, {}
    for name, keys in sorted(factors.items()):
        path, (fan_in, fan_out) = modules[name]
        for f in ("A", "B"):
            if f not in keys:
                raise ValueError(f"{weights}: module {name!r} has no '{_PREFIX}{name}.lora_{f}.weight'")
        r = int(_peft_pattern_value(rank_pattern, name, r0))
        for f, want in (("A", (r, fan_in)), ("B", (fan_out, r))):
            if st.shape(keys[f]) != want:
                raise ValueError(f"{weights}: tensor {keys[f]!r} has shape {st.shape(keys[f])}, expected "
                                 f"{want} (r={r} from {CONFIG_NAME}, module {name!r} is [{fan_in}, {fan_out}])")
        mod = tuple(path.split("/"))
        flat[mod + ("lora_a",)] = jnp.asarray(np.asarray(st.get(keys["A"]), np.float32).T, dtype)
        flat[mod + ("lora_b",)] = jnp.asarray(np.asarray(st.get(keys["B"]), np.float32).T, dtype)
        ranks[path] = r
        alphas[path] = float(_peft_pattern_value(alpha_pattern, name, alpha0))
    paths = set(ranks)
    leaves = {p.split("/")[-1] for p in paths}
    jax_paths = [p for p, _ in modules.values()]
    if _leaf_names_select_exactly(leaves, paths, jax_paths, "/"):
        targets = r"(^|/)(" + "|".join(sorted(leaves)) + r")$"
    else:
        targets = "^(?:" + "|".join(re.escape(p) for p in sorted(paths)) + ")$"
    exact = lambda p: "^" + re.escape(p) + "$"  # noqa: E731
    spec = LoraSpec(
        rank=r0, alpha=alpha0, targets=targets, dropout=float(cfg.get("lora_dropout", 0.0)),
        use_rslora=bool(cfg.get("use_rslora", False)),
        rank_pattern=tuple((exact(p), r) for p, r in sorted(ranks.items()) if r != r0),
        alpha_pattern=tuple((exact(p), a) for p, a in sorted(alphas.items()) if a != alpha0),
    )
    return traverse_util.unflatten_dict(flat), spec
