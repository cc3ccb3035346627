"""Host-offloaded optimizer state.

Adam keeps two fp32 moments per trainable parameter; for full fine-tuning they are the largest
thing in device memory. JAX lets an array live in host memory: every sharding has a memory kind,
'device' (default) or 'pinned_host' (page-locked host RAM the accelerator reads by DMA). The pattern
(JAX docs, "Memories and host offloading"):

    host = offload_shardings(opt_state)              # shardings with memory_kind='pinned_host'
    opt_state = jax.device_put(opt_state, host)      # park the state on the host
    step = offloaded_step(update_fn, host)           # jit: state comes in from the host, is moved
    params, opt_state, aux = step(params, opt_state, batch)   # to the device, updated, written back

Inside the step `jax.device_put(state, device_shardings)` moves the state to device memory and the
updated state is returned through `out_shardings` with memory kind 'pinned_host'. Backends without
a pinned_host memory fall back to device memory with a printed message, so the same code runs.
"""

from __future__ import annotations

from typing import Callable

import jax
from jax.sharding import SingleDeviceSharding

HOST = "pinned_host"
DEVICE = "device"


def supported_memory_kinds(device=None) -> set[str]:
    """Memory kinds addressable from `device` (default `jax.devices()[0]`), e.g.
    {'device', 'pinned_host', 'unpinned_host'} on CPU and recent GPU/TPU backends."""
    device = device or jax.devices()[0]
    try:
        return {m.kind for m in device.addressable_memories()}
    except Exception:  # noqa: BLE001 - backends without the memories API
        return {DEVICE}


def host_offload_available(device=None, memory_kind: str = HOST) -> bool:
    return memory_kind in supported_memory_kinds(device)


def _base_sharding(leaf, default):
    s = getattr(leaf, "sharding", None)
    if s is None:
        return default
    if not isinstance(s, jax.sharding.Sharding):
        raise ValueError(f"offload_shardings: leaf has sharding {s!r}, expected a jax.sharding.Sharding")
    return s


def offload_shardings(tree, *, shardings=None, memory_kind: str = HOST, device=None, verbose: bool = True):
    """Shardings that keep `tree` (an optax state, or its `jax.eval_shape` abstract shapes) in host
    memory.

    Each leaf keeps its own layout: from `shardings` (a matching tree of shardings, e.g. from
    `jaxalign.sharding`), else the leaf's `.sharding` (a placed array, or a ShapeDtypeStruct that
    carries one), else a single-device sharding on `device` (default `jax.devices()[0]`); only the
    memory kind changes. When the backend has no `memory_kind` memory, prints why and returns the
    device-memory shardings instead (the offloaded step then behaves like a normal one).
    """
    device = device or jax.devices()[0]
    default = SingleDeviceSharding(device)
    if shardings is None:
        base = jax.tree.map(lambda x: _base_sharding(x, default), tree)
    else:
        base = shardings
        if jax.tree.structure(jax.tree.map(lambda _: 0, tree)) != jax.tree.structure(
                jax.tree.map(lambda _: 0, base)):
            raise ValueError("offload_shardings: `shardings` does not have the structure of `tree`")
    kinds = supported_memory_kinds(device)
    if memory_kind not in kinds:
        if verbose:
            print(f"jaxalign.peft.offload: the {device.platform} backend has no {memory_kind!r} memory "
                  f"(memory kinds: {sorted(kinds)}); optimizer state stays in device memory")
        memory_kind = DEVICE
    return jax.tree.map(lambda s: s.with_memory_kind(memory_kind), base)


def device_shardings(host_shardings):
    """The same shardings in device memory."""
    return jax.tree.map(lambda s: s.with_memory_kind(DEVICE), host_shardings)


def memory_kinds(tree):
    """The memory kind of each placed array in `tree` (for checks and logging)."""
    return jax.tree.map(lambda x: x.sharding.memory_kind, tree)


def offloaded_step(update_fn: Callable, opt_shardings):
    """jit(update_fn) with the optimizer state living in host memory between steps.

    update_fn(params, opt_state, *args) -> (params, opt_state, aux), a pure step (e.g. grads of the
    adapter tree + `optimizer.update` + `optax.apply_updates`). opt_shardings: from
    `offload_shardings`. The returned function takes `opt_state` placed with those shardings
    (`jax.device_put(opt_state, opt_shardings)`) and returns the new state with them; inside, the
    state is moved to device memory for the update.

    The host state is not donated: with jax 0.10.2 donating pinned_host buffers aborts the process
    on the CPU backend ("PjRtBuffer's memory kind does not match sharding's memory kind"); the
    cost is a second host copy of the state during the step, device memory is unaffected.
    """
    on_device = device_shardings(opt_shardings)

    def step(params, opt_state, *args):
        opt_state = jax.device_put(opt_state, on_device)
        params, opt_state, aux = update_fn(params, opt_state, *args)
        return params, jax.device_put(opt_state, opt_shardings), aux

    # None leaves of jit's out_shardings are "unspecified": params and aux keep their inferred layout.
    return jax.jit(step, out_shardings=(None, opt_shardings, None))
