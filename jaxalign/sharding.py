"""Device meshes and shardings by logical axis names.

A mesh has three axes: 'data' (pure data parallel), 'fsdp' (data parallel with parameters
sharded), 'tensor' (megatron-style within a layer). Parameters carry logical axis names
(`nn.with_logical_partitioning` in jaxalign.models); `RULES` maps them to mesh axes. A dimension
whose size is not divisible by its mesh axes is replicated instead (tiny test models).
"""

from __future__ import annotations

import math
import os
from typing import Any, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

AXES = ("data", "fsdp", "tensor")

# logical axis -> mesh axes (flax lm1b style: a short rule list)
RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv", "tensor"),
    ("mlp", "tensor"),
    ("norm", None),
    ("head_dim", None),
)


def maybe_initialize_distributed(enabled: bool | None = None) -> None:
    """Calls `jax.distributed.initialize()` for multi-host runs.

    enabled=None initialises when the environment names a coordinator (JAX_COORDINATOR_ADDRESS,
    or a cluster that JAX auto-detects: SLURM, Open MPI, Cloud TPU pods via JAX_DISTRIBUTED=1).
    Must be called before any other JAX call.
    """
    if enabled is None:
        enabled = bool(os.environ.get("JAX_COORDINATOR_ADDRESS") or os.environ.get("JAX_DISTRIBUTED"))
    if enabled:
        jax.distributed.initialize()


def make_mesh(*, data: int = -1, fsdp: int = 1, tensor: int = 1, devices: Sequence | None = None) -> Mesh:
    """A ('data', 'fsdp', 'tensor') mesh; one size may be -1 (fill with the remaining devices)."""
    devices = list(devices) if devices is not None else jax.devices()
    sizes = [data, fsdp, tensor]
    if sizes.count(-1) > 1:
        raise ValueError(f"mesh: at most one axis may be -1, got data={data} fsdp={fsdp} tensor={tensor}")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if len(devices) % known:
            raise ValueError(f"mesh: {len(devices)} devices are not divisible by {known}")
        sizes[sizes.index(-1)] = len(devices) // known
    if math.prod(sizes) != len(devices):
        raise ValueError(f"mesh: data*fsdp*tensor = {math.prod(sizes)} but {len(devices)} devices are available")
    arr = np.asarray(devices).reshape(sizes)
    return Mesh(arr, AXES)


def _axis_size(mesh: Mesh, axes) -> int:
    if axes is None:
        return 1
    axes = (axes,) if isinstance(axes, str) else axes
    return math.prod(mesh.shape[a] for a in axes)


def logical_to_spec(logical: Sequence[str | None], shape: Sequence[int], mesh: Mesh,
                    rules=RULES) -> P:
    """PartitionSpec for one array from its logical axes; indivisible dims are replicated and each
    mesh axis is used at most once."""
    table = dict(rules)
    used: set[str] = set()
    out = []
    for name, dim in zip(logical, shape):
        axes = table.get(name) if name is not None else None
        if axes is not None:
            tup = (axes,) if isinstance(axes, str) else tuple(axes)
            tup = tuple(a for a in tup if a not in used and mesh.shape.get(a, 1) > 1)
            if tup and dim % _axis_size(mesh, tup) == 0:
                used.update(tup)
                out.append(tup[0] if len(tup) == 1 else tup)
                continue
        out.append(None)
    return P(*out)


def logical_axes(boxed_tree):
    """Tree of logical-axis tuples from a boxed (nn.Partitioned) param tree (e.g. `abstract_params`)."""
    return jax.tree.map(lambda x: tuple(x.names) if isinstance(x, nn.Partitioned) else None,
                        boxed_tree, is_leaf=lambda x: isinstance(x, nn.Partitioned))


def param_shardings(boxed_tree, mesh: Mesh, rules=RULES):
    """NamedSharding tree for params, from the boxed abstract tree of `jaxalign.models.abstract_params`."""

    def one(x):
        if isinstance(x, nn.Partitioned):
            return NamedSharding(mesh, logical_to_spec(x.names, x.value.shape, mesh, rules))
        return NamedSharding(mesh, P())

    return jax.tree.map(one, boxed_tree, is_leaf=lambda x: isinstance(x, nn.Partitioned))


def adapter_shardings(adapters, boxed_base, mesh: Mesh, rules=RULES):
    """Shardings for a LoRA adapter tree: lora_a [in, r] follows the kernel's input axis, lora_b
    [r, out] its output axis; the rank axis is replicated."""
    axes = logical_axes(boxed_base)

    def walk(ad, ax):
        out = {}
        for k, v in ad.items():
            if k in ("lora_a", "lora_b"):
                kin, kout = ax["kernel"]
                names = (kin, None) if k == "lora_a" else (None, kout)
                out[k] = NamedSharding(mesh, logical_to_spec(names, v.shape, mesh, rules))
            else:
                out[k] = walk(v, ax[k])
        return out

    return walk(adapters, axes)


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    """Shards the leading (batch) axis over ('data', 'fsdp')."""
    return NamedSharding(mesh, P(("data", "fsdp"), *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def shard_batch(batch: dict, mesh: Mesh):
    """Places a host batch (dict of numpy arrays with a leading batch axis) on the mesh.

    Multi-host: each process passes its local slice; the global array is assembled with
    `jax.make_array_from_process_local_data`.
    """
    def put(x):
        x = np.asarray(x)
        s = batch_sharding(mesh, x.ndim) if x.ndim else replicated(mesh)
        if jax.process_count() > 1:
            return jax.make_array_from_process_local_data(s, x)
        return jax.device_put(x, s)

    return {k: put(v) for k, v in batch.items()}


def per_device_bytes(tree) -> int:
    """Bytes of `tree` held by the most loaded device (for memory checks)."""
    totals: dict = {}
    for x in jax.tree.leaves(tree):
        for shard in x.addressable_shards:
            totals[shard.device] = totals.get(shard.device, 0) + shard.data.nbytes
    return max(totals.values()) if totals else 0


def place_on_mesh(tree, mesh: Mesh):
    """Leaves already sharded over `mesh` stay as they are; every other leaf (step counters,
    optimizer counts, RNG key data) is replicated over the mesh."""

    def put(x):
        s = getattr(x, "sharding", None)
        if isinstance(s, NamedSharding) and s.mesh == mesh:
            return x
        return jax.device_put(x, replicated(mesh))

    return jax.tree.map(put, tree)
