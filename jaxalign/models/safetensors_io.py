"""Streaming safetensors reading and writing.

Reading memory-maps the file and yields one tensor at a time; writing computes the header from
shapes first and then streams each tensor, so neither direction holds a second full copy of the
weights. bf16 goes through `ml_dtypes` (numpy has no bfloat16).
"""

from __future__ import annotations

import json
import os
import struct
from typing import Callable, Iterable, Mapping

import ml_dtypes
import numpy as np

_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
    "BOOL": np.bool_,
}
_NAMES = {np.dtype(v): k for k, v in _DTYPES.items()}


class SafetensorsFile:
    """A memory-mapped safetensors file: `keys()`, `shape(k)`, `dtype(k)`, `get(k) -> np.ndarray`."""

    def __init__(self, path: str):
        self.path = path
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) != 8:
                raise ValueError(f"{path}: not a safetensors file (shorter than 8 bytes)")
            (n,) = struct.unpack("<Q", raw)
            try:
                header = json.loads(f.read(n))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise ValueError(f"{path}: corrupt safetensors header: {e}") from None
        self.metadata = header.pop("__metadata__", {}) or {}
        self._header = header
        self._offset = 8 + n
        self._mm = np.memmap(path, dtype=np.uint8, mode="r")

    def keys(self):
        return list(self._header)

    def __contains__(self, key):
        return key in self._header

    def shape(self, key) -> tuple[int, ...]:
        return tuple(self._header[key]["shape"])

    def dtype(self, key):
        return np.dtype(_DTYPES[self._header[key]["dtype"]])

    def get(self, key) -> np.ndarray:
        info = self._header[key]
        if info["dtype"] not in _DTYPES:
            raise ValueError(f"{self.path}: tensor {key!r} has unsupported dtype {info['dtype']}")
        start, end = info["data_offsets"]
        buf = self._mm[self._offset + start: self._offset + end]
        return buf.view(_DTYPES[info["dtype"]]).reshape(info["shape"])


def open_checkpoint(directory: str) -> dict[str, SafetensorsFile]:
    """Maps every tensor key of a (possibly sharded) safetensors checkpoint to its open file."""
    index = os.path.join(directory, "model.safetensors.index.json")
    single = os.path.join(directory, "model.safetensors")
    files: dict[str, SafetensorsFile] = {}
    if os.path.exists(index):
        with open(index) as f:
            weight_map = json.load(f).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ValueError(f"{index}: missing 'weight_map'")
        opened = {}
        for key, fname in weight_map.items():
            if fname not in opened:
                p = os.path.join(directory, fname)
                if not os.path.exists(p):
                    raise FileNotFoundError(f"{index}: shard {fname!r} (for {key!r}) does not exist")
                opened[fname] = SafetensorsFile(p)
            files[key] = opened[fname]
        return files
    if os.path.exists(single):
        st = SafetensorsFile(single)
        return {k: st for k in st.keys()}
    raise FileNotFoundError(
        f"{directory}: no model.safetensors or model.safetensors.index.json (only safetensors "
        "checkpoints are supported)"
    )


def write_safetensors(path: str, specs: Iterable[tuple[str, tuple, np.dtype]],
                      fetch: Callable[[str], np.ndarray], metadata: Mapping[str, str] | None = None):
    """Writes tensors given as (key, shape, dtype) specs; `fetch(key)` is called once per tensor,
    in order, and its result is written and released before the next one."""
    specs = list(specs)
    header, offset = {}, 0
    for key, shape, dtype in specs:
        dtype = np.dtype(dtype)
        if dtype not in _NAMES:
            raise ValueError(f"{key}: dtype {dtype} cannot be written to safetensors")
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        header[key] = {"dtype": _NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    if metadata:
        header["__metadata__"] = dict(metadata)
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for key, shape, dtype in specs:
            arr = np.ascontiguousarray(fetch(key))
            if arr.shape != tuple(shape) or arr.dtype != np.dtype(dtype):
                raise ValueError(f"{key}: fetched {arr.dtype}{arr.shape}, declared {np.dtype(dtype)}{tuple(shape)}")
            f.write(arr.tobytes())
