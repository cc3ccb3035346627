"""Argument validation shared by the loss functions.

Checks run on static shapes only, so they cost nothing under `jax.jit` and raise at trace time.
"""

from __future__ import annotations

from typing import Mapping

import jax.numpy as jnp


def check_batch(name: str = "loss", /, **arrays) -> int:
    """Checks that every given array is 1-D with one common batch size; returns that size.

    Arguments passed as None are skipped. Raises ValueError naming the argument and its shape.
    """
    size = None
    first = None
    for arg, value in arrays.items():
        if value is None:
            continue
        shape = jnp.shape(value)
        if len(shape) != 1:
            raise ValueError(f"{name}: `{arg}` must have shape [B], got shape {tuple(shape)}")
        if size is None:
            size, first = shape[0], arg
        elif shape[0] != size:
            raise ValueError(
                f"{name}: batch sizes differ: `{first}` has shape ({size},) but `{arg}` has "
                f"shape {tuple(shape)}"
            )
    if size is None:
        raise ValueError(f"{name}: no arrays given")
    return size


def check_same_shape(name: str, arrays: Mapping[str, object], ndim: int | None = None) -> tuple:
    """Checks that all non-None arrays share one shape (and rank `ndim` if given); returns it."""
    shape = None
    first = None
    for arg, value in arrays.items():
        if value is None:
            continue
        s = tuple(jnp.shape(value))
        if ndim is not None and len(s) != ndim:
            raise ValueError(f"{name}: `{arg}` must have {ndim} dimensions, got shape {s}")
        if shape is None:
            shape, first = s, arg
        elif s != shape:
            raise ValueError(f"{name}: `{first}` has shape {shape} but `{arg}` has shape {s}")
    return shape
