"""workbench.tbevents: the hand-written TensorBoard event file.

The bytes are what TensorBoard's own protobuf classes read (one event per step, float32 overflow as +-inf
as protobuf does, negative steps); the masked CRC-32C is TensorBoard's, from the C package and from the
pure-Python fallback alike; an event file is a version record and then TFRecord-framed events, each with
its checksums.
"""
from __future__ import annotations

import math
import struct
from pathlib import Path

from tensorboard.compat.proto.event_pb2 import Event
from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c as tb_masked

from workbench import tbevents

SCALARS = [("train/loss", 0.5), ("lr", 1e39), ("é", -math.inf)]


def test_event_bytes_parse_as_tensorboard_protos() -> None:
    data = tbevents.encode_scalars(123456789, 1_700_000_000.25, SCALARS)
    ev = Event.FromString(data)
    assert (ev.step, ev.wall_time) == (123456789, 1_700_000_000.25)
    assert [(v.tag, v.simple_value) for v in ev.summary.value] == [("train/loss", 0.5), ("lr", math.inf),
                                                                   ("é", -math.inf)]
    assert Event.FromString(tbevents.encode_scalars(-3, 0.0, [("x", 1.0)])).step == -3


def test_the_masked_checksum_is_tensorboards_with_or_without_the_c_package() -> None:
    data = tbevents.encode_scalars(123456789, 1_700_000_000.25, SCALARS)
    for blob in (b"", b"123456789", data, bytes(range(256)) * 3):
        want = tb_masked(blob)
        assert tbevents.masked_crc32c(blob) == want
        assert tbevents.mask_crc32c(tbevents.crc32c_python(blob)) == want  # the fallback where C is missing


def test_an_event_file_is_a_version_record_then_framed_events(tmp_path: Path) -> None:
    data = tbevents.encode_scalars(123456789, 1_700_000_000.25, SCALARS)
    f = tbevents.EventFile(tmp_path)
    f.write_record(data)
    f.close()
    raw = f.path.read_bytes()
    records = []
    while raw:
        (n,) = struct.unpack("<Q", raw[:8])
        assert struct.unpack("<I", raw[8:12])[0] == tb_masked(raw[:8])
        body = raw[12:12 + n]
        assert struct.unpack("<I", raw[12 + n:16 + n])[0] == tb_masked(body)
        records.append(Event.FromString(body))
        raw = raw[16 + n:]
    assert records[0].file_version == "brain.Event:2" and records[1] == Event.FromString(data)
