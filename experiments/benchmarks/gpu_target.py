"""Compile for a GPU that is not in this machine: XLA's GPU compiler with a compile-only device.

JAX's CUDA plugin (`pip install "jax[cuda12]"`, the same version as jax) compiles without a GPU or
a driver when it is given the GPU's description, an XLA `GpuTargetConfigProto` in text form
(`gpu_targets/<name>.txtpb`). Programs lowered for the returned device (`compiling_for`) go
through XLA:GPU's passes, scheduling and buffer assignment for a GPU of that description, and
nothing runs. Close to a compile on the GPU itself, not always the same: RESULTS.md compares the
two (the 65B QLoRA step and the dequantization probe matched the H200's, the remat probe did not).

Call `prepare()` before JAX initialises its backends (before the first `jax.devices()`):
- the plugin's start-up check of the CUDA installation calls the driver, which is absent here, so
  it is skipped (`JAX_SKIP_CUDA_CONSTRAINTS_CHECK`);
- jaxalign's native CPU kernels are turned off (`JAXALIGN_NATIVE=0`): jaxalign picks them while
  tracing when the process's default backend is the CPU, which it stays here, and a GPU program
  cannot call them.
"""

from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path

TARGETS = Path(__file__).resolve().parent / "gpu_targets"


def names() -> list[str]:
    """The GPUs described in gpu_targets/ (file stems)."""
    return sorted(p.stem for p in TARGETS.glob("*.txtpb"))


def spec(name: str) -> str:
    """The text of gpu_targets/<name>.txtpb."""
    path = TARGETS / f"{name}.txtpb"
    if not path.is_file():
        raise ValueError(f"no GPU target {name!r}: expected {path} (known: {', '.join(names())})")
    return path.read_text()


def describe(name: str) -> str:
    """'NVIDIA H100 80GB HBM3 (sm_90, 132 SMs; gpu_targets/h100.txtpb)'."""
    text = spec(name)
    field = lambda key: (re.search(rf"{key}:\s*\"?([^\"\n]+)\"?", text) or [None, "?"])[1].strip()
    cc = re.search(r"cuda_compute_capability\s*\{\s*major:\s*(\d+)\s*minor:\s*(\d+)", text)
    arch = f"sm_{cc[1]}{cc[2]}" if cc else "sm_?"
    return (f"{field('device_description_str')} ({arch}, {field('core_count')} SMs; "
            f"gpu_targets/{name}.txtpb)")


def prepare() -> None:
    """Environment for compiling for a GPU target in this process (module doc). Idempotent."""
    os.environ["JAX_SKIP_CUDA_CONSTRAINTS_CHECK"] = "1"
    os.environ["JAXALIGN_NATIVE"] = "0"


def device(name: str):
    """A compile-only device for the GPU `name` (after `prepare()`). Raises RuntimeError naming
    the package to install when JAX has no CUDA plugin."""
    import jax
    from jax.experimental import topologies

    text = spec(name)
    try:
        topology = topologies.get_topology_desc(platform="cuda", target_config=text, topology="1x1x1")
    except (NotImplementedError, RuntimeError, ValueError) as e:
        if _plugin_installed():
            raise RuntimeError(
                f"JAX's CUDA plugin is installed but did not start, so it cannot compile for GPU "
                f"target {name!r}: call gpu_target.prepare() (or set JAX_SKIP_CUDA_CONSTRAINTS_CHECK=1) "
                f"before JAX starts its backends; JAX said: {str(e).splitlines()[0] if str(e) else e!r}"
            ) from e
        raise RuntimeError(
            f"compiling for GPU target {name!r} needs JAX's CUDA plugin, version {jax.__version__} "
            f"like jax: pip install \"jax[cuda12]=={jax.__version__}\" (no GPU or driver needed); "
            f"JAX said: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from e
    return topology.devices[0]


def _plugin_installed() -> bool:
    import importlib.util

    return (importlib.util.find_spec("jax_plugins") is not None
            and importlib.util.find_spec("jax_plugins.xla_cuda12") is not None)


def compiling_for(dev) -> contextlib.AbstractContextManager:
    """Lower and compile (`jax.jit(...).lower(...).compile()`) for `dev` inside this context;
    a null context for dev=None. Only compile inside it: nothing can run on a compile-only device."""
    import jax

    return jax.default_device(dev) if dev is not None else contextlib.nullcontext()
