"""Null-space projection of alignment updates (NSPO: Niu et al., 2025, "Mitigating the Safety
Alignment Tax with Null-Space Constrained Policy Optimization", arXiv:2512.11391).

Idea: estimate the subspace in which a small *capability* (reference) set moves the weights, then
keep every alignment update out of it, so that, to first order, outputs on capability inputs do not
change. For a kernel W [in, out] (y = x W) the gradient of any loss on inputs X is X^T delta, so its
column space lies in the span of the capability inputs; if an update dW satisfies
(I - U U^T) dW = dW with U [in, k] spanning those inputs, then x^T dW = 0 for every x in span(U):
the layer's outputs on capability inputs are unchanged (the null-space condition dW K = 0 of
NSPO/AlphaEdit, with K the capability representations).

Two estimates of the critical subspace, from n capability gradient samples G_1..G_n:

- `matrix` (per weight): U = top-k left singular vectors of [G_1 | ... | G_n] ([in, n*out]) for
  kernels, the projection g -> (I - U U^T) g; for embeddings [V, D] the right side (the hidden
  axis D, which is the input side of a tied LM head): g -> g (I - V V^T).
- `flat` (whole tree, e.g. a LoRA adapter): Q = top-k right singular vectors of the [n, D] matrix
  of flattened gradients; g -> g - Q^T Q g (gradient projection in the spirit of Farajtabar et al.,
  2019, "Orthogonal Gradient Descent for Continual Learning").

Directions whose singular value is below `rtol` times the largest are dropped (stored as zero
columns, so shapes stay static): a zero gradient (e.g. LoRA's A at init, when B = 0) gives no basis.

The basis is a plain pytree of arrays, `{'left': {path: U}, 'right': {path: V}, 'flat': tree or
None}` with '/'-joined paths into the trainable tree, so it can travel in the training step's
`frozen` argument (never baked into the compiled program). `make_transform` gives the hook for
`jaxalign.train.step.make_train_step(grad_transform=..., update_transform=...)`.

Where to project: projecting the *gradient* before Adam does not keep the *update* in the null
space (Adam rescales each coordinate); projecting the optimizer's *update* does, exactly, so
`where='updates'` is the default in the runner (`config.nspo.where`).
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

__all__ = [
    "adapter_basis_from_kernels", "basis_for_training", "empty_basis", "flat_basis",
    "gradient_samples", "make_transform", "matrix_basis", "matrix_side", "nspo_basis", "project",
    "project_flat", "project_matrix", "removed_fraction",
]

SIDES = ("left", "right")
MODES = ("matrix", "flat")


def _flat(tree) -> dict[str, Any]:
    return {"/".join(map(str, k)): v for k, v in traverse_util.flatten_dict(tree).items()}


def _unflat(flat: Mapping[str, Any]):
    return traverse_util.unflatten_dict({tuple(k.split("/")): v for k, v in flat.items()})


def empty_basis() -> dict:
    return {"left": {}, "right": {}, "flat": None}


def matrix_side(path: str) -> str | None:
    """Which side of a 2-D leaf holds its input representations: 'left' for kernels and LoRA A
    ([in, ...]), 'right' for embedding tables [V, D]; None for leaves NSPO leaves alone."""
    leaf = path.rsplit("/", 1)[-1]
    if leaf in ("kernel", "lora_a"):
        return "left"
    if leaf == "embedding":
        return "right"
    return None


# ----------------------------------------------------------------------------- estimation
def _orthonormal(vectors, s, *, rank: int, rtol: float):
    """First `rank` columns of `vectors`, zeroed where s <= rtol * s_max (or all when s_max == 0)."""
    keep = s[:rank] > rtol * jnp.maximum(s[0], jnp.finfo(jnp.float32).tiny)
    return vectors[:, :rank] * keep[None, :].astype(vectors.dtype)


def matrix_basis(samples, *, rank: int, side: str = "left", rtol: float = 1e-5):
    """Top-`rank` singular directions of n gradient samples of one weight.

    samples: [n, a, b]. side='left' -> U [a, rank] from [G_1 | ... | G_n] ([a, n*b]);
    side='right' -> V [b, rank] from [G_1; ...; G_n] ([n*a, b]). Columns are orthonormal, or
    zero for directions with singular value <= rtol * the largest.
    """
    samples = jnp.asarray(samples, jnp.float32)
    if samples.ndim != 3:
        raise ValueError(f"matrix_basis: `samples` must be [n, a, b], got shape {samples.shape}")
    if side not in SIDES:
        raise ValueError(f"matrix_basis: side must be one of {SIDES}, got {side!r}")
    n, a, b = samples.shape
    dim = a if side == "left" else b
    if not isinstance(rank, int) or not 1 <= rank <= dim:
        raise ValueError(f"matrix_basis: rank must be an int in [1, {dim}] for samples of shape "
                         f"{samples.shape} (side={side!r}), got {rank!r}")
    if side == "left":
        vectors, s, _ = jnp.linalg.svd(jnp.transpose(samples, (1, 0, 2)).reshape(a, n * b),
                                       full_matrices=False)
    else:
        _, s, vh = jnp.linalg.svd(samples.reshape(n * a, b), full_matrices=False)
        vectors = vh.T
    m = min(rank, vectors.shape[1])  # fewer samples than the rank: pad with zero columns
    return _pad(_orthonormal(vectors, s, rank=m, rtol=rtol), rank)


def _pad(u, rank):
    """Pads [d, m] to [d, rank] with zero columns (fewer samples than the rank)."""
    return jnp.pad(u, ((0, 0), (0, rank - u.shape[1])))


def flat_basis(samples, *, rank: int, rtol: float = 1e-5):
    """Top-`rank` right singular vectors of the [n, D] matrix of flattened gradient samples.

    samples: a tree whose leaves have a leading sample axis n. Returns a tree of the same
    structure whose leaves have a leading axis `rank` ([rank, *leaf.shape]); the `rank` flattened
    rows are orthonormal (or zero where the singular value is <= rtol * the largest; always zero
    beyond n, since n samples span at most n directions).
    """
    leaves, treedef = jax.tree.flatten(samples)
    if not leaves:
        raise ValueError("flat_basis: `samples` has no leaves")
    n = leaves[0].shape[0]
    if any(x.shape[0] != n for x in leaves):
        raise ValueError(f"flat_basis: every leaf needs the same leading sample axis; got "
                         f"{[x.shape for x in leaves]}")
    if not isinstance(rank, int) or rank < 1:
        raise ValueError(f"flat_basis: rank must be a positive int, got {rank!r}")
    m = jnp.concatenate([jnp.asarray(x, jnp.float32).reshape(n, -1) for x in leaves], axis=1)
    _, s, vh = jnp.linalg.svd(m, full_matrices=False)  # vh [min(n, D), D]
    q = _orthonormal(vh.T, s, rank=min(rank, vh.shape[0]), rtol=rtol).T
    q = jnp.pad(q, ((0, rank - q.shape[0]), (0, 0)))
    out, start = [], 0
    for x in leaves:
        size = int(np.prod(x.shape[1:], dtype=np.int64))
        out.append(q[:, start:start + size].reshape((rank,) + x.shape[1:]))
        start += size
    return jax.tree.unflatten(treedef, out)


def gradient_samples(loss_fn: Callable, trainable, batches: Iterable) -> Any:
    """Stacked gradients of `loss_fn(trainable, batch) -> scalar` over `batches`: a tree like
    `trainable` whose leaves have a leading axis n = number of batches (one jit compile per shape).
    """
    grad = jax.jit(jax.grad(loss_fn))
    samples = [jax.device_get(grad(trainable, b)) for b in batches]
    if not samples:
        raise ValueError("gradient_samples: `batches` is empty; NSPO needs capability batches")
    return jax.tree.map(lambda *xs: np.stack(xs), *samples)


def nspo_basis(samples, *, rank: int, mode: str = "matrix", rtol: float = 1e-5,
               paths: Callable[[str], bool] | None = None) -> dict:
    """The NSPO basis from stacked gradient samples (see the module docstring).

    mode='matrix': a basis for every 2-D leaf with a `matrix_side` (and selected by `paths`, a
    predicate on '/'-joined paths); leaves smaller than `rank` on their side are skipped.
    mode='flat': one basis over all leaves (selected by `paths`).
    """
    if mode not in MODES:
        raise ValueError(f"nspo_basis: mode must be one of {MODES}, got {mode!r}")
    flat = _flat(samples)
    chosen = {p: x for p, x in flat.items() if paths is None or paths(p)}
    if not chosen:
        raise ValueError(f"nspo_basis: no leaf selected; leaves are {sorted(flat)}")
    basis = empty_basis()
    if mode == "flat":
        basis["flat"] = flat_basis(chosen, rank=rank, rtol=rtol)
        return basis
    for p, x in chosen.items():
        side = matrix_side(p)
        if side is None or x.ndim != 3:
            continue
        dim = x.shape[1] if side == "left" else x.shape[2]
        if dim <= rank:
            continue
        basis[side][p] = matrix_basis(x, rank=rank, side=side, rtol=rtol)
    if not basis["left"] and not basis["right"]:
        raise ValueError(f"nspo_basis: no 2-D weight with more than rank={rank} rows/columns among "
                         f"{sorted(chosen)}")
    return basis


def adapter_basis_from_kernels(basis: Mapping, adapters) -> dict:
    """Maps a 'matrix' basis of base kernels ('params/<module>/kernel' -> U) to the LoRA A factors
    of `adapters` ('lora/<module>/lora_a' -> U; modules without an adapter are dropped). With A_0
    and every update of A projected by it, the merged update s * A B keeps x^T dW = 0 for x in
    span(U) (B is unconstrained)."""
    present = set(_flat({"lora": adapters}))
    out = empty_basis()
    for p, u in basis["left"].items():
        parts = p.split("/")
        target = "/".join(["lora"] + parts[1:-1] + ["lora_a"])
        if parts[-1] == "kernel" and target in present:
            out["left"][target] = u
    if not out["left"]:
        raise ValueError(f"adapter_basis_from_kernels: no adapted module has a kernel basis; "
                         f"kernel paths {sorted(basis['left'])}, adapter paths {sorted(present)}")
    return out


# ----------------------------------------------------------------------------- projection
def project_matrix(g, u, *, side: str = "left"):
    """(I - U U^T) g for side='left' (u [a, k], g [a, b]); g (I - U U^T) for side='right'
    (u [b, k]). Computed in fp32, returned in g's dtype."""
    g32, u32 = jnp.asarray(g, jnp.float32), jnp.asarray(u, jnp.float32)
    if side == "left":
        out = g32 - u32 @ (u32.T @ g32)
    elif side == "right":
        out = g32 - (g32 @ u32) @ u32.T
    else:
        raise ValueError(f"project_matrix: side must be one of {SIDES}, got {side!r}")
    return out.astype(g.dtype)


def project_flat(tree: Mapping[str, Any], q: Mapping[str, Any]):
    """g - sum_j <q_j, g> q_j over the flattened leaves of `tree` selected by `q` (path -> [k, ...]);
    other leaves pass through."""
    coeff = sum(jnp.tensordot(jnp.asarray(qq, jnp.float32), jnp.asarray(tree[p], jnp.float32),
                              axes=tree[p].ndim) for p, qq in q.items())
    out = dict(tree)
    for p, qq in q.items():
        delta = jnp.tensordot(coeff, jnp.asarray(qq, jnp.float32), axes=1)
        out[p] = (jnp.asarray(tree[p], jnp.float32) - delta).astype(tree[p].dtype)
    return out


def project(tree, basis: Mapping) -> Any:
    """Removes from `tree` (gradients, updates or params, shaped like the trainable tree) its
    components in the NSPO `basis`; leaves the basis does not cover pass through unchanged."""
    flat = _flat(tree)
    for side in SIDES:
        for p, u in basis[side].items():
            if p not in flat:
                raise ValueError(f"project: basis path {p!r} is not in the tree; paths: {sorted(flat)}")
            flat[p] = project_matrix(flat[p], u, side=side)
    if basis.get("flat") is not None:
        missing = sorted(set(basis["flat"]) - set(flat))
        if missing:
            raise ValueError(f"project: flat-basis paths {missing} are not in the tree")
        flat = project_flat(flat, basis["flat"])
    return _unflat(flat)


def removed_fraction(tree, basis: Mapping):
    """1 - |P g|^2 / |g|^2: the share of the squared norm of `tree` that `project` removes."""
    total = sum(jnp.sum(jnp.square(jnp.asarray(x, jnp.float32))) for x in jax.tree.leaves(tree))
    kept = sum(jnp.sum(jnp.square(jnp.asarray(x, jnp.float32)))
               for x in jax.tree.leaves(project(tree, basis)))
    return 1.0 - kept / jnp.maximum(total, jnp.finfo(jnp.float32).tiny)


def make_transform(key: str = "nspo") -> Callable:
    """A `grad_transform` / `update_transform` for `make_train_step`: `f(tree, frozen)` projects
    `tree` with the basis found at `frozen[key]`."""

    def transform(tree, frozen):
        return project(tree, frozen[key])

    return transform


# ----------------------------------------------------------------------------- training setup
def basis_for_training(loss_fn: Callable, trainable: dict, frozen: dict, batches: Iterable, *,
                       rank: int, mode: str = "matrix", rtol: float = 1e-5) -> tuple[dict, dict]:
    """(basis, trainable) for a training run, from capability batches at the starting point.

    loss_fn(trainable, batch) -> scalar capability loss (e.g. the SFT NLL objective).
    Full fine-tuning (trainable = {'params': ...}): the basis comes from the gradients of the
    trainable tree itself. LoRA (trainable = {'lora': adapters}) with mode='matrix': LoRA's A gets
    no gradient at init (B = 0), so the basis comes from the gradients of the frozen base kernels
    (`frozen['params']`, differentiated with the adapters in place) and moves to the A factors
    (`adapter_basis_from_kernels`); A_0 is projected too, so every merged update s * A B stays in
    the null space. LoRA with mode='flat' uses the flattened adapter gradient. Returns the
    (possibly re-initialised) trainable tree to build the optimizer state from.
    """
    if "lora" in trainable and mode == "matrix":
        base = frozen.get("params")
        if base is None or any(not isinstance(x, (jax.Array, np.ndarray))
                               for x in jax.tree.leaves(base)):
            raise ValueError("NSPO mode='matrix' with LoRA needs dense base kernels in "
                             "frozen['params'] (not NF4); use mode='flat' for QLoRA")
        samples = gradient_samples(loss_fn, {**trainable, "params": base}, batches)
        kernel_basis = nspo_basis({"params": samples["params"]}, rank=rank, mode="matrix", rtol=rtol,
                                  paths=lambda p: p.endswith("/kernel"))
        basis = adapter_basis_from_kernels(kernel_basis, trainable["lora"])
        lora = project({"lora": trainable["lora"]}, basis)["lora"]
        return basis, {**trainable, "lora": lora}
    samples = gradient_samples(loss_fn, trainable, batches)
    return nspo_basis(samples, rank=rank, mode=mode, rtol=rtol), trainable
