"""Periodic, crash-safe checkpoints of a training state with orbax.

One checkpoint step is a directory `{directory}/{step}/` with two items:

- `state`: any pytree of arrays (full params or LoRA adapters only, optimizer state, PRNG key data,
  step counter, ...), written with orbax `StandardSave` (tensorstore/OCDBT, one file set per array,
  shardings recorded, restored into whatever sharding and dtype the caller asks for);
- `meta`: a JSON object (data iterator position `{"epoch": .., "index": ..}`, the config as a dict,
  metrics so far, ...).

Atomicity. Orbax writes a step into `{step}.orbax-checkpoint-tmp-<timestamp>/` and renames it to
`{step}/` only after every array and the JSON are on disk (on object stores without atomic rename it
writes `commit_success.txt` last instead). Unfinalised directories are never listed as steps, so a
process killed mid-save (SIGKILL, preemption, OOM) resumes from the last *complete* checkpoint; the
leftover temporary directory is deleted when the next `Checkpointer` opens the directory
(`cleanup_tmp_directories=True`). `tests/train/test_checkpoint.py` kills a real process at the
commit point to check this.

Asynchrony. With `async_save=True`, `save` returns once the arrays have been copied to host memory;
serialisation and the commit run in a background thread. The caller may therefore donate or delete
the saved device buffers right after `save` returns (the train step donates its state). Call
`wait()` before reading a checkpoint back in the same process and `close()` (or use the object as a
context manager) before exiting, or the last save may be lost.

PRNG keys. Store `jax.random.key_data(key)` (a uint32 array) in `state_tree` and rebuild the key with
`jax.random.wrap_key_data(data)` after restoring. Typed key arrays (`jax.random.key`) are rejected
with a ValueError: their on-disk form depends on the orbax version and on the PRNG implementation,
while plain uint32 data restores anywhere. Legacy `jax.random.PRNGKey` keys already are uint32 data.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

_ITEMS = ("state", "meta")


def _is_typed_key(leaf) -> bool:
    dtype = getattr(leaf, "dtype", None)
    return dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)


def _check_no_typed_keys(tree, argname: str) -> None:
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        if _is_typed_key(leaf):
            raise ValueError(
                f"`{argname}` leaf {jax.tree_util.keystr(path)} is a typed PRNG key array "
                f"(dtype {leaf.dtype}, shape {tuple(leaf.shape)}); store "
                "`jax.random.key_data(key)` (uint32) instead and rebuild the key with "
                "`jax.random.wrap_key_data` after restoring"
            )


def _json_default(value):
    """Converts numpy/jax scalars and arrays inside `meta` to Python numbers and lists."""
    if isinstance(value, (np.generic, np.ndarray, jax.Array)):
        return np.asarray(value).tolist()
    raise TypeError(f"object of type {type(value).__name__} is not JSON serialisable")


def _to_json(meta: dict) -> dict:
    if not isinstance(meta, dict):
        raise ValueError(f"`meta` must be a dict (a JSON object), got {type(meta).__name__}")
    try:
        # NaN/inf survive (Python's json writes NaN/Infinity and reads them back).
        return json.loads(json.dumps(meta, default=_json_default))
    except (TypeError, ValueError) as e:
        raise ValueError(f"`meta` must be JSON serialisable: {e}") from e


def _abstract_leaf(leaf):
    """Target leaf -> ShapeDtypeStruct carrying the leaf's sharding when it has one."""
    if isinstance(leaf, jax.ShapeDtypeStruct):
        return leaf
    if isinstance(leaf, jax.Array):
        return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=leaf.sharding)
    if isinstance(leaf, (np.ndarray, np.generic)):
        return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype)
    if isinstance(leaf, (bool, int, float)):
        arr = np.asarray(leaf)
        return jax.ShapeDtypeStruct(arr.shape, arr.dtype)
    raise ValueError(
        f"`target` leaves must be arrays or jax.ShapeDtypeStruct, got {type(leaf).__name__}"
    )


class Checkpointer:
    """Saves `(state_tree, meta)` every `save_every` steps, keeping the newest `keep` checkpoints.

    Args:
      directory: checkpoint root (created if missing; made absolute, as orbax requires).
      save_every: save only when `step % save_every == 0` (unless `force=True`).
      keep: number of most recent checkpoints kept; older ones are deleted after each save.
      async_save: serialise in a background thread (see module docstring).
    """

    def __init__(self, directory, *, save_every: int, keep: int, async_save: bool = True):
        if not isinstance(save_every, int) or save_every < 1:
            raise ValueError(f"`save_every` must be a positive int, got {save_every!r}")
        if not isinstance(keep, int) or keep < 1:
            raise ValueError(f"`keep` must be a positive int, got {keep!r}")
        self.directory = os.path.abspath(os.fspath(directory))
        self.save_every = save_every
        self.keep = keep
        options = ocp.CheckpointManagerOptions(
            save_interval_steps=save_every,
            max_to_keep=keep,
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True,
            create=True,
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=_ITEMS)
        # orbax deletes unfinalised step directories in a background thread and waits for it only
        # before its next save; wait now, so that opening the directory has cleaned it (module doc)
        await_cleanup = getattr(self._manager, "_maybe_await_cleanup_tmp_directory", None)
        if await_cleanup is not None:
            await_cleanup()

    def save(self, step: int, *, state_tree: Any, meta: dict, force: bool = False) -> bool:
        """Saves a checkpoint if `step % save_every == 0` (or `force`); returns whether it saved.

        `state_tree`: pytree of arrays (no typed PRNG keys, see module docstring).
        `meta`: JSON-serialisable dict; numpy/jax scalars and arrays are converted to numbers/lists.
        A step that already has a checkpoint is never overwritten: the call returns False.
        """
        if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 0:
            raise ValueError(f"`step` must be a non-negative int, got {step!r}")
        step = int(step)
        if not force and step % self.save_every != 0:
            return False
        if step in self._manager.all_steps():
            return False
        _check_no_typed_keys(state_tree, "state_tree")
        meta_json = _to_json(meta)
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state_tree), meta=ocp.args.JsonSave(meta_json)
        )
        # The decision is ours; force=True stops orbax's own policy from also saving the very
        # first step it sees (its InitialSavePolicy) whatever `save_every` says.
        return bool(self._manager.save(step, args=args, force=True))

    def latest_step(self) -> int | None:
        """Newest finalised step, or None when the directory holds no complete checkpoint."""
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        """All finalised steps, ascending."""
        return sorted(self._manager.all_steps())

    def restore(self, step: int | None = None, *, target: Any) -> tuple[Any, dict]:
        """Restores `(state_tree, meta)` from `step` (default: the latest complete step).

        `target` gives the tree structure, shapes, dtypes and shardings to restore into: a tree of
        `jax.ShapeDtypeStruct` (e.g. from `jax.eval_shape`, with `.sharding` set for sharded
        restores) or of concrete arrays (their `.sharding` and dtype are used). Leaves are cast to
        the target dtype; a ShapeDtypeStruct without sharding restores onto the default device.
        """
        if step is None:
            step = self.latest_step()
            if step is None:
                raise ValueError(f"no complete checkpoint in directory {self.directory}")
        steps = self.all_steps()
        if step not in steps:
            raise ValueError(
                f"`step` {step} has no complete checkpoint in {self.directory}; "
                f"available steps: {steps}"
            )
        _check_no_typed_keys(target, "target")
        abstract = jax.tree.map(_abstract_leaf, target)
        args = ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()
        )
        try:
            restored = self._manager.restore(step, args=args)
        except ValueError as e:
            raise ValueError(
                f"cannot restore step {step} from {self.directory} into `target`: {e}"
            ) from e
        return restored["state"], restored["meta"]

    def wait(self) -> None:
        """Blocks until the pending asynchronous save (if any) is committed."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Waits for pending saves and releases orbax's background resources."""
        self._manager.close()

    def __enter__(self) -> "Checkpointer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

