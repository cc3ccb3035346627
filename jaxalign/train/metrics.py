"""Training metrics: a JSON-lines log, TensorBoard scalars and a tqdm progress bar.

`MetricsLogger.log(step, metrics, split)` does three things per call:

1. appends one JSON object to `{logdir}/metrics.jsonl`:
   `{"step": 10, "split": "train", "time": <unix seconds>, "loss": 0.69, "rewards/margins": ...}`.
   Metric keys keep TRL's names (`rewards/chosen`, `rewards/margins`, `rewards/accuracies`,
   `logps/chosen`, `kl`, `grad_norm`, `tokens_per_sec`, `step_time`, `loss`, ...); for any split
   other than "train" they are prefixed with the split (`eval/loss`), as TRL does.
   JSON has no NaN/Infinity, so a non-finite value is written as `null` and recorded in a
   `"nonfinite"` object mapping the key to `"nan"`, `"inf"` or `"-inf"`; `read_metrics` puts the
   float back. Every line is strict JSON (`json.loads` in any language reads it).
2. writes TensorBoard scalars `train/<key>` / `eval/<key>` to `{logdir}/events.out.tfevents.*`
   (non-finite values are written as they are; TensorBoard shows them as gaps). The event file is
   produced by the small writer below (TFRecord framing with masked CRC-32C around hand-encoded
   `Event` protobufs), so no TensorFlow/tensorboard/tensorboardX install is needed.
3. advances a tqdm bar with ETA and a few key metrics. With `progress=True` the bar is shown only
   when the stream is a terminal (`tqdm(disable=None)`), so CI logs and redirected output get no
   carriage-return spam; `progress=False` never shows it.

Values may be Python numbers, numpy scalars or 0-d jax arrays; the whole dict is fetched from the
device with one `jax.device_get` per call. Both files are flushed after every call, so a killed run
loses at most the line being written; readers ignore a truncated last record.
"""

from __future__ import annotations

import json
import math
import os
import socket
import struct
import sys
import time
from typing import Any, Iterable

import jax
import numpy as np
from tqdm import tqdm

METRICS_FILE = "metrics.jsonl"
PROGRESS_KEYS = ("loss", "rewards/accuracies", "rewards/margins", "kl", "tokens_per_sec")

# ----------------------------------------------------------------------------- TFRecord + CRC-32C


def _crc32c_table() -> tuple[int, ...]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1  # reflected Castagnoli poly
        table.append(crc)
    return tuple(table)


_CRC_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli), as used by TFRecord; `crc32c(b"123456789") == 0xE3069283`."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc = _CRC_TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def masked_crc32c(data: bytes) -> int:
    """TFRecord's masked CRC: rotate right by 15 bits and add 0xA282EAD8 (mod 2**32)."""
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _tfrecord(data: bytes) -> bytes:
    """uint64 length, uint32 masked crc of the length, data, uint32 masked crc of the data."""
    header = struct.pack("<Q", len(data))
    return (
        header
        + struct.pack("<I", masked_crc32c(header))
        + data
        + struct.pack("<I", masked_crc32c(data))
    )


# ----------------------------------------------------------------------------- Event protobuf
# tensorflow/core/util/event.proto: Event{double wall_time = 1; int64 step = 2;
#   oneof what {string file_version = 3; ... Summary summary = 5;}}
# tensorflow/core/framework/summary.proto: Summary{repeated Value value = 1;}
#   Value{string tag = 1; oneof value {float simple_value = 2; ...}}


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        bits, n = n & 0x7F, n >> 7
        if n:
            out.append(bits | 0x80)
        else:
            out.append(bits)
            return bytes(out)


def _field(number: int, wire_type: int) -> bytes:
    return _varint((number << 3) | wire_type)


def _length_delimited(number: int, payload: bytes) -> bytes:
    return _field(number, 2) + _varint(len(payload)) + payload


def _float32_le(value: float) -> bytes:
    """Little-endian float32; values beyond float32 range become +-inf, as a cast does."""
    with np.errstate(over="ignore"):
        return np.asarray(value, dtype="<f4").tobytes()


def encode_event(*, wall_time: float, step: int, file_version: str | None = None,
                 scalars: dict[str, float] | None = None) -> bytes:
    """Serialises an `Event` with either `file_version` or a summary of simple scalar values."""
    # proto3 omits fields holding their default value; so do we (byte-identical to protobuf).
    out = (_field(1, 1) + struct.pack("<d", wall_time)) if wall_time != 0 else b""
    if step != 0:
        out += _field(2, 0) + _varint(step)
    if file_version is not None:
        out += _length_delimited(3, file_version.encode())
    if scalars:
        summary = b"".join(
            _length_delimited(
                1, _length_delimited(1, tag.encode()) + _field(2, 5) + _float32_le(value)
            )
            for tag, value in scalars.items()
        )
        out += _length_delimited(5, summary)
    return out


def _read_varint(buf: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return result, pos


def _parse_fields(buf: bytes):
    """Yields (field number, wire type, value) of one protobuf message (wire types 0, 1, 2, 5)."""
    pos = 0
    while pos < len(buf):
        key, pos = _read_varint(buf, pos)
        number, wire_type = key >> 3, key & 7
        if wire_type == 0:
            value, pos = _read_varint(buf, pos)
        elif wire_type == 1:
            value, pos = buf[pos:pos + 8], pos + 8
        elif wire_type == 2:
            size, pos = _read_varint(buf, pos)
            value, pos = buf[pos:pos + size], pos + size
        elif wire_type == 5:
            value, pos = buf[pos:pos + 4], pos + 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire_type} (field {number})")
        yield number, wire_type, value


def decode_event(data: bytes) -> dict:
    """Inverse of `encode_event` -> {"wall_time", "step", "file_version"?, "scalars"?}."""
    event: dict[str, Any] = {"wall_time": 0.0, "step": 0}
    for number, _, value in _parse_fields(data):
        if number == 1:
            event["wall_time"] = struct.unpack("<d", value)[0]
        elif number == 2:
            event["step"] = value
        elif number == 3:
            event["file_version"] = value.decode()
        elif number == 5:
            scalars = event.setdefault("scalars", {})
            for vnum, _, vbytes in _parse_fields(value):
                if vnum != 1:
                    continue
                fields = {n: v for n, _, v in _parse_fields(vbytes)}
                if 1 in fields and 2 in fields:
                    scalars[fields[1].decode()] = struct.unpack("<f", fields[2])[0]
    return event


def read_tensorboard_events(path) -> list[dict]:
    """Reads an event file written by `TensorBoardWriter`, checking every CRC.

    A truncated final record (a run killed mid-write) is ignored; a CRC mismatch raises ValueError.
    """
    with open(path, "rb") as f:
        buf = f.read()
    events, pos = [], 0
    while pos + 12 <= len(buf):
        header = buf[pos:pos + 8]
        (length,) = struct.unpack("<Q", header)
        (header_crc,) = struct.unpack("<I", buf[pos + 8:pos + 12])
        if header_crc != masked_crc32c(header):
            raise ValueError(f"{path}: corrupt record length at byte {pos}")
        end = pos + 12 + length + 4
        if end > len(buf):
            break
        data = buf[pos + 12:pos + 12 + length]
        (data_crc,) = struct.unpack("<I", buf[end - 4:end])
        if data_crc != masked_crc32c(data):
            raise ValueError(f"{path}: corrupt record data at byte {pos}")
        events.append(decode_event(data))
        pos = end
    return events


class TensorBoardWriter:
    """Appends scalar summaries to a new `events.out.tfevents.<time>.<host>` file in `logdir`."""

    def __init__(self, logdir):
        os.makedirs(logdir, exist_ok=True)
        now = time.time()
        name = f"events.out.tfevents.{int(now)}.{socket.gethostname()}.{os.getpid()}"
        self.path = os.path.join(logdir, name)
        self._file = open(self.path, "ab")
        self._file.write(_tfrecord(encode_event(wall_time=now, step=0,
                                                file_version="brain.Event:2")))
        self._file.flush()

    def scalars(self, step: int, values: dict[str, float], wall_time: float | None = None):
        if not values:
            return
        wall_time = time.time() if wall_time is None else wall_time
        self._file.write(_tfrecord(encode_event(wall_time=wall_time, step=step, scalars=values)))
        self._file.flush()

    def close(self):
        if not self._file.closed:
            self._file.close()


# ----------------------------------------------------------------------------- metrics logger


def _to_floats(metrics: dict) -> dict[str, float]:
    """One device_get for the whole dict, then scalar -> float (raises on non-scalars)."""
    if not isinstance(metrics, dict):
        raise ValueError(f"`metrics` must be a dict of scalars, got {type(metrics).__name__}")
    host = jax.device_get(metrics)
    out = {}
    for key, value in host.items():
        if not isinstance(key, str):
            raise ValueError(f"`metrics` keys must be strings, got {key!r}")
        shape = np.shape(value)
        if shape not in ((), (1,)):
            raise ValueError(
                f"`metrics[{key!r}]` must be a scalar, got shape {shape}; reduce it first"
            )
        try:
            out[key] = float(np.asarray(value).reshape(()))
        except (TypeError, ValueError) as e:
            raise ValueError(f"`metrics[{key!r}]` is not a number: {value!r}") from e
    return out


def _nonfinite_name(x: float) -> str:
    return "nan" if math.isnan(x) else ("inf" if x > 0 else "-inf")


def _read_jsonl(path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        lines = f.read().split("\n")
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            if number == len(lines):  # no trailing newline: the last write was cut short
                break
            raise ValueError(f"{path}: line {number} is not valid JSON: {e}") from e
    return records


def read_metrics(logdir) -> list[dict]:
    """Reads `{logdir}/metrics.jsonl` back as a list of dicts, in logged order.

    Values recorded as non-finite come back as float NaN/inf (the `"nonfinite"` key is removed).
    """
    path = os.path.join(os.fspath(logdir), METRICS_FILE)
    if not os.path.exists(path):
        raise ValueError(f"no metrics file at {path}")
    records = _read_jsonl(path)
    for record in records:
        for key, name in record.pop("nonfinite", {}).items():
            record[key] = float(name)
    return records


class MetricsLogger:
    """Logs metrics to `{logdir}/metrics.jsonl`, TensorBoard and a progress bar.

    Args:
      logdir: output directory (created if missing).
      total_steps: number of training steps, for the progress bar's ETA.
      use_tensorboard: also write a TensorBoard event file.
      progress: show a tqdm bar (only when `progress_stream` is a terminal).
      initial_step: step the run starts from. When resuming from a checkpoint at step S, pass S:
        records with step > S (logged by the interrupted run after that checkpoint) are removed
        from metrics.jsonl so they are not duplicated, and the bar starts at S.
      progress_stream: where the bar is drawn (default sys.stderr).
    """

    def __init__(self, logdir, *, total_steps: int, use_tensorboard: bool = True,
                 progress: bool = True, initial_step: int = 0, progress_stream=None):
        if not isinstance(total_steps, int) or total_steps < 1:
            raise ValueError(f"`total_steps` must be a positive int, got {total_steps!r}")
        if not isinstance(initial_step, int) or not 0 <= initial_step <= total_steps:
            raise ValueError(
                f"`initial_step` must be an int in [0, total_steps={total_steps}], "
                f"got {initial_step!r}"
            )
        self.logdir = os.fspath(logdir)
        os.makedirs(self.logdir, exist_ok=True)
        self.path = os.path.join(self.logdir, METRICS_FILE)
        if initial_step > 0 and os.path.exists(self.path):
            self._truncate_after(initial_step)
        self._file = open(self.path, "a", encoding="utf-8")
        self._tb = TensorBoardWriter(self.logdir) if use_tensorboard else None
        self._bar = tqdm(
            total=total_steps, initial=initial_step, unit="step", dynamic_ncols=True,
            mininterval=1.0, file=progress_stream or sys.stderr,
            disable=None if progress else True, leave=True,
        )
        self._postfix: dict[str, str] = {}

    def _truncate_after(self, step: int) -> None:
        kept = [r for r in _read_jsonl(self.path) if r.get("step", 0) <= step]
        tmp = self.path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r, allow_nan=False) + "\n" for r in kept)
        os.replace(tmp, self.path)

    def log(self, step: int, metrics: dict, split: str = "train") -> dict:
        """Logs one set of scalar metrics; returns the JSON record written."""
        if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 0:
            raise ValueError(f"`step` must be a non-negative int, got {step!r}")
        if not isinstance(split, str) or not split:
            raise ValueError(f"`split` must be a non-empty string, got {split!r}")
        step = int(step)
        values = _to_floats(metrics)
        if split != "train":
            prefix = split + "/"
            values = {k if k.startswith(prefix) else prefix + k: v for k, v in values.items()}
        now = time.time()
        record: dict[str, Any] = {"step": step, "split": split, "time": now}
        nonfinite = {}
        for key, value in values.items():
            if math.isfinite(value):
                record[key] = value
            else:
                record[key] = None
                nonfinite[key] = _nonfinite_name(value)
        if nonfinite:
            record["nonfinite"] = nonfinite
        self._file.write(json.dumps(record, allow_nan=False) + "\n")
        self._file.flush()
        if self._tb is not None:
            tags = {k if split != "train" else f"train/{k}": v for k, v in values.items()}
            self._tb.scalars(step, tags, wall_time=now)
        self._update_bar(step, values, split)
        return record

    def _update_bar(self, step: int, values: dict[str, float], split: str) -> None:
        if self._bar.disable:
            return
        if split == "train":
            if step > self._bar.n:
                self._bar.update(step - self._bar.n)
            shown = {k: f"{values[k]:.4g}" for k in PROGRESS_KEYS if k in values}
        else:
            shown = {k: f"{v:.4g}" for k, v in values.items()
                     if k.split("/", 1)[-1] in ("loss", "rewards/accuracies")}
        if shown:
            self._postfix.update(shown)
            self._bar.set_postfix(self._postfix, refresh=False)

    def close(self) -> None:
        self._bar.close()
        if self._tb is not None:
            self._tb.close()
        if not self._file.closed:
            self._file.close()

    def __enter__(self) -> "MetricsLogger":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def scalars_by_tag(events: Iterable[dict]) -> dict[str, list[tuple[int, float]]]:
    """Groups decoded events into {tag: [(step, value), ...]} (for tests and notebooks)."""
    out: dict[str, list[tuple[int, float]]] = {}
    for event in events:
        for tag, value in event.get("scalars", {}).items():
            out.setdefault(tag, []).append((event["step"], value))
    return out
