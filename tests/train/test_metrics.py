"""Tests for jaxalign.train.metrics (JSONL log, TensorBoard event files, progress bar) and
jaxalign.train.plots (PNG output)."""

from __future__ import annotations

import io
import json
import math
import os
import struct

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxalign.train import metrics as metrics_lib
from jaxalign.train.metrics import (
    MetricsLogger,
    crc32c,
    decode_event,
    encode_event,
    masked_crc32c,
    read_metrics,
    read_tensorboard_events,
    scalars_by_tag,
)
from jaxalign.train.plots import plot_bars, plot_metrics

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# ----------------------------------------------------------------------------- CRC and framing


def test_crc32c_known_vectors():
    # RFC 3720 (iSCSI) appendix B.4 test vectors and the standard check value.
    assert crc32c(b"123456789") == 0xE3069283
    assert crc32c(bytes(32)) == 0x8A9136AA
    assert crc32c(b"\xff" * 32) == 0x62A8AB43
    assert crc32c(bytes(range(32))) == 0x46DD794E
    assert crc32c(b"") == 0


def test_masked_crc_by_hand():
    # 0xE3069283 rotated right by 15 bits is 0x2507C60D; + 0xA282EAD8 = 0xC78AB0E5 (mod 2**32).
    assert masked_crc32c(b"123456789") == 0xC78AB0E5
    assert masked_crc32c(b"") == 0xA282EAD8


def _event_classes():
    """Event / Summary / Summary.Value message classes built with the protobuf runtime from the
    field numbers and types of tensorflow/core/util/event.proto and framework/summary.proto: an
    encoder independent of ours."""
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

    F = descriptor_pb2.FieldDescriptorProto
    fdp = descriptor_pb2.FileDescriptorProto(name="jaxalign_test_event.proto", package="jt",
                                      syntax="proto3")
    value = fdp.message_type.add(name="Value")
    value.field.add(name="tag", number=1, type=F.TYPE_STRING, label=F.LABEL_OPTIONAL)
    value.oneof_decl.add(name="value")
    value.field.add(name="simple_value", number=2, type=F.TYPE_FLOAT, label=F.LABEL_OPTIONAL,
                    oneof_index=0)
    summary = fdp.message_type.add(name="Summary")
    summary.field.add(name="value", number=1, type=F.TYPE_MESSAGE, label=F.LABEL_REPEATED,
                      type_name=".jt.Value")
    event = fdp.message_type.add(name="Event")
    event.field.add(name="wall_time", number=1, type=F.TYPE_DOUBLE, label=F.LABEL_OPTIONAL)
    event.field.add(name="step", number=2, type=F.TYPE_INT64, label=F.LABEL_OPTIONAL)
    event.oneof_decl.add(name="what")
    event.field.add(name="file_version", number=3, type=F.TYPE_STRING, label=F.LABEL_OPTIONAL,
                    oneof_index=0)
    event.field.add(name="summary", number=5, type=F.TYPE_MESSAGE, label=F.LABEL_OPTIONAL,
                    type_name=".jt.Summary", oneof_index=0)
    pool = descriptor_pool.DescriptorPool()
    pool.Add(fdp)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("jt.Event"))


def test_event_encoding_matches_protobuf_runtime():
    Event = _event_classes()
    scalars = {"train/loss": 0.6931471805599453, "eval/rewards/accuracies": 0.75, "kl": -2.5e-7,
               "train/zero": 0.0, "train/nan": math.nan}
    ours = encode_event(wall_time=1712345678.25, step=300, scalars=scalars)
    parsed = Event.FromString(ours)
    assert parsed.wall_time == 1712345678.25
    assert parsed.step == 300
    assert [v.tag for v in parsed.summary.value] == list(scalars)
    for v, want in zip(parsed.summary.value, scalars.values()):
        assert v.WhichOneof("value") == "simple_value"
        assert v.simple_value == np.float32(want) or (math.isnan(want) and math.isnan(v.simple_value))
    # protobuf serialises these fields in field order, like we do: the bytes are identical.
    theirs = Event(wall_time=1712345678.25, step=300)
    for tag, x in scalars.items():
        theirs.summary.value.add(tag=tag, simple_value=x)
    assert theirs.SerializeToString() == ours
    header = encode_event(wall_time=1.5, step=0, file_version="brain.Event:2")
    assert Event(wall_time=1.5, file_version="brain.Event:2").SerializeToString() == header
    # Large steps need multi-byte varints.
    big = encode_event(wall_time=0.0, step=2**40 + 5, scalars={"a": 1.0})
    assert Event.FromString(big).step == 2**40 + 5
    assert decode_event(big)["step"] == 2**40 + 5


# ----------------------------------------------------------------------------- logger end to end


def _strict_json(line: str):
    def reject(name):
        raise AssertionError(f"non-standard JSON constant {name} in {line!r}")

    return json.loads(line, parse_constant=reject)


def _event_file(logdir) -> str:
    names = [n for n in os.listdir(logdir) if n.startswith("events.out.tfevents.")]
    assert len(names) == 1, names
    return os.path.join(logdir, names[0])


def test_logger_writes_jsonl_and_tensorboard(tmp_path):
    with MetricsLogger(tmp_path, total_steps=10, progress=False) as logger:
        logger.log(1, {"loss": jnp.float32(0.75), "rewards/margins": jnp.asarray(0.5),
                       "rewards/accuracies": 1, "grad_norm": np.float64(2.0)})
        logger.log(2, {"loss": jnp.float32(jnp.nan), "kl": jnp.asarray(jnp.inf),
                       "logps/chosen": -jnp.inf, "step_time": 0.125})
        logger.log(2, {"loss": 0.25, "rewards/accuracies": jnp.asarray([0.5])}, split="eval")

    with open(tmp_path / "metrics.jsonl") as f:
        lines = f.read().splitlines()
    raw = [_strict_json(line) for line in lines]  # strict JSON: no NaN/Infinity tokens
    assert raw[0]["step"] == 1 and raw[0]["split"] == "train"
    assert raw[0]["loss"] == 0.75 and raw[0]["rewards/accuracies"] == 1.0
    assert raw[1]["loss"] is None and raw[1]["kl"] is None and raw[1]["logps/chosen"] is None
    assert raw[1]["nonfinite"] == {"loss": "nan", "kl": "inf", "logps/chosen": "-inf"}
    assert raw[1]["step_time"] == 0.125
    assert "nonfinite" not in raw[0]
    assert raw[2]["split"] == "eval"
    assert {k for k in raw[2] if "/" in k} == {"eval/loss", "eval/rewards/accuracies"}

    records = read_metrics(tmp_path)
    assert math.isnan(records[1]["loss"])
    assert records[1]["kl"] == math.inf and records[1]["logps/chosen"] == -math.inf
    assert "nonfinite" not in records[1]
    assert records[2]["eval/loss"] == 0.25

    events = read_tensorboard_events(_event_file(tmp_path))
    assert events[0]["file_version"] == "brain.Event:2"
    tags = scalars_by_tag(events[1:])
    assert tags["train/loss"][0] == (1, 0.75)
    assert tags["train/loss"][1][0] == 2 and math.isnan(tags["train/loss"][1][1])
    assert tags["train/kl"] == [(2, math.inf)]
    assert tags["train/rewards/margins"] == [(1, 0.5)]
    assert tags["eval/loss"] == [(2, 0.25)]
    assert tags["eval/rewards/accuracies"] == [(2, 0.5)]
    assert {e["wall_time"] for e in events[1:]} == {r["time"] for r in raw}


def test_one_device_get_per_log_call(tmp_path, monkeypatch):
    calls = []
    real = jax.device_get

    def counting(tree):
        calls.append(tree)
        return real(tree)

    monkeypatch.setattr(metrics_lib.jax, "device_get", counting)
    metrics = {f"m{i}": jnp.asarray(float(i)) for i in range(6)}
    with MetricsLogger(tmp_path, total_steps=3, use_tensorboard=False, progress=False) as lg:
        lg.log(1, metrics)
    assert len(calls) == 1
    assert not any(n.startswith("events.out") for n in os.listdir(tmp_path))


finite_or_not = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True, width=64),
    st.sampled_from([math.nan, math.inf, -math.inf, 0.0, -0.0, 5e-324, 1.7e308]),
)


@settings(max_examples=40, deadline=None)
@given(values=st.dictionaries(st.sampled_from(["loss", "kl", "rewards/chosen", "grad_norm"]),
                              finite_or_not, min_size=1),
       step=st.integers(0, 2**40))
def test_roundtrip_property(tmp_path_factory, values, step):
    logdir = tmp_path_factory.mktemp("prop")
    with MetricsLogger(logdir, total_steps=2**41, progress=False) as logger:
        logger.log(step, values)
    (record,) = read_metrics(logdir)
    assert record["step"] == step
    for key, want in values.items():
        got = record[key]
        assert (math.isnan(got) and math.isnan(want)) or got == want, key
    (event,) = read_tensorboard_events(_event_file(logdir))[1:]
    assert event["step"] == step
    with np.errstate(over="ignore"):
        for key, want in values.items():
            got, want32 = event["scalars"]["train/" + key], float(np.float32(want))
            assert (math.isnan(got) and math.isnan(want32)) or got == want32, key


def test_readers_tolerate_truncated_tail_and_reject_corruption(tmp_path):
    with MetricsLogger(tmp_path, total_steps=5, progress=False) as logger:
        for step in range(1, 4):
            logger.log(step, {"loss": 1.0 / step})
    path = tmp_path / "metrics.jsonl"
    text = path.read_text()
    path.write_text(text + '{"step": 4, "split": "tr')  # killed in the middle of a write
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3]
    path.write_text(text.replace('"step": 2', '"step": 2,,', 1))
    with pytest.raises(ValueError, match=r"line 2 is not valid JSON"):
        read_metrics(tmp_path)
    with pytest.raises(ValueError, match="no metrics file"):
        read_metrics(tmp_path / "missing")

    events_path = _event_file(tmp_path)
    data = open(events_path, "rb").read()
    with open(events_path, "wb") as f:
        f.write(data[:-7])  # truncated last record
    assert [e["step"] for e in read_tensorboard_events(events_path)] == [0, 1, 2]
    corrupted = bytearray(data)
    corrupted[-6] ^= 0xFF  # flip a byte inside the last record's payload
    with open(events_path, "wb") as f:
        f.write(bytes(corrupted))
    with pytest.raises(ValueError, match="corrupt record data"):
        read_tensorboard_events(events_path)


def test_resume_drops_records_after_the_checkpoint(tmp_path):
    with MetricsLogger(tmp_path, total_steps=10, progress=False, use_tensorboard=False) as lg:
        for step in range(1, 8):
            lg.log(step, {"loss": float(step)})
        lg.log(6, {"loss": 0.5}, split="eval")
    # The run died after step 7; the newest checkpoint is step 5.
    with MetricsLogger(tmp_path, total_steps=10, progress=False, use_tensorboard=False,
                       initial_step=5) as lg:
        lg.log(6, {"loss": 60.0})
    records = read_metrics(tmp_path)
    assert [(r["step"], r["split"]) for r in records] == [(s, "train") for s in range(1, 7)]
    assert records[-1]["loss"] == 60.0


class _FakeTTY(io.StringIO):
    def isatty(self):
        return True


def test_progress_bar_shown_only_on_a_terminal(tmp_path):
    tty = _FakeTTY()
    with MetricsLogger(tmp_path / "a", total_steps=4, progress_stream=tty,
                       use_tensorboard=False) as lg:
        for step in range(1, 5):
            lg.log(step, {"loss": 0.5, "rewards/accuracies": 0.75, "grad_norm": 3.0})
        lg.log(4, {"loss": 0.25}, split="eval")
    shown = tty.getvalue()
    assert "4/4" in shown and "loss=0.5" in shown and "rewards/accuracies=0.75" in shown
    assert "eval/loss=0.25" in shown
    assert "grad_norm" not in shown

    for stream, progress in ((io.StringIO(), True), (_FakeTTY(), False)):
        with MetricsLogger(tmp_path / "b", total_steps=4, progress=progress,
                           progress_stream=stream, use_tensorboard=False) as lg:
            for step in range(1, 5):
                lg.log(step, {"loss": 0.5})
        assert stream.getvalue() == ""  # not a terminal, or disabled: nothing at all


def test_bad_input_raises(tmp_path):
    with pytest.raises(ValueError, match="total_steps"):
        MetricsLogger(tmp_path, total_steps=0)
    with pytest.raises(ValueError, match="initial_step"):
        MetricsLogger(tmp_path, total_steps=3, initial_step=4)
    with MetricsLogger(tmp_path, total_steps=3, progress=False) as lg:
        with pytest.raises(ValueError, match=r"metrics\['rewards/chosen'\].*shape \(4,\)"):
            lg.log(1, {"loss": 1.0, "rewards/chosen": jnp.zeros(4)})
        with pytest.raises(ValueError, match=r"metrics\['note'\].*not a number"):
            lg.log(1, {"note": "hello"})
        with pytest.raises(ValueError, match="`step`"):
            lg.log(-1, {"loss": 1.0})
        with pytest.raises(ValueError, match="`metrics` must be a dict"):
            lg.log(1, [("loss", 1.0)])
    assert not (tmp_path / "metrics.jsonl").read_text()  # nothing half-written


# ----------------------------------------------------------------------------- plots


def _png_size(path) -> tuple[int, int]:
    with open(path, "rb") as f:
        head = f.read(24)
    assert head[:8] == PNG_MAGIC and head[12:16] == b"IHDR"
    return struct.unpack(">II", head[16:24])


def test_plot_metrics_from_logdir_and_records(tmp_path):
    with MetricsLogger(tmp_path, total_steps=20, progress=False, use_tensorboard=False) as lg:
        for step in range(1, 21):
            lg.log(step, {"loss": 1.0 / step, "rewards/accuracies": min(1.0, step / 10),
                          "kl": math.nan if step == 7 else 0.01 * step})
            if step % 5 == 0:
                lg.log(step, {"loss": 1.2 / step, "rewards/accuracies": step / 25}, split="eval")
    out = plot_metrics(tmp_path, tmp_path / "curves.png", keys=["loss", "rewards/accuracies", "kl"])
    assert os.fspath(out) == os.fspath(tmp_path / "curves.png")
    width, height = _png_size(out)
    assert width > 300 and height > 200
    assert os.path.getsize(out) > 10_000

    out2 = plot_metrics(read_metrics(tmp_path), tmp_path / "loss.png", keys=["loss"])
    assert _png_size(out2)[0] > 300 and os.path.getsize(out2) > 5_000
    with pytest.raises(ValueError, match=r"`keys`.*'nope'.*available"):
        plot_metrics(tmp_path, tmp_path / "x.png", keys=["nope"])
    assert not (tmp_path / "x.png").exists()


def test_plot_bars(tmp_path):
    out = plot_bars({"base": 0.52, "DPO": 0.81, "SimPO": 0.78}, tmp_path / "bars.png",
                    title="Preference accuracy (held-out)")
    width, height = _png_size(out)
    assert width > 300 and height > 200 and os.path.getsize(out) > 5_000
    with pytest.raises(ValueError, match="`values`"):
        plot_bars({}, tmp_path / "empty.png", title="x")
    with pytest.raises(ValueError, match=r"`values\['a'\]`"):
        plot_bars({"a": "high"}, tmp_path / "bad.png", title="x")
