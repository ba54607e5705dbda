"""A small TensorBoard event-file writer for scalars: TFRecord framing and the protobuf bytes by hand.

Why not ``torch.utils.tensorboard.SummaryWriter``: ``add_scalar`` costs ~90 us of Python per value, and
its record checksum (CRC-32C) is computed in pure Python; a training step logs five scalars, so on a
small CPU model the writer took about half a training step's worth of CPU from the same two cores.
Here one step's scalars are one event (one ``Summary`` holding a value per tag), encoded with a few
byte joins, and the checksum comes from the ``crc32c`` package (C) when it is installed.

The format, as TensorBoard reads it:

* a file named ``events.out.tfevents.<time>.<host>.<pid>.<n>`` holding TFRecords: ``uint64 length``,
  ``uint32 masked_crc32c(length bytes)``, the data, ``uint32 masked_crc32c(data)`` (little-endian);
* the first record is ``Event{wall_time, file_version: "brain.Event:2"}``;
* each scalar record is ``Event{wall_time (1, double), step (2, int64), summary (5)}`` with
  ``Summary{value (1, repeated): Value{tag (1, string), simple_value (2, float)}}``;
* a text record (TensorBoard's Text tab, markdown) is a ``Value`` holding ``tensor (8)``: a string tensor
  ``TensorProto{dtype (1): DT_STRING, tensor_shape (2): {}, string_val (8)}`` and ``metadata (9)``:
  ``SummaryMetadata{plugin_data (1): {plugin_name (1): "text"}}``;
* hyperparameters (the HParams tab) are two ``Value`` records, tags ``_hparams_/experiment`` and
  ``_hparams_/session_start_info``, each an empty float tensor with ``plugin_name "hparams"`` and as
  ``content`` an ``HParamsPluginData`` (``experiment (2)``: ``Experiment{time_created_secs (3), hparam_infos
  (4): {name (1), type (4)}, metric_infos (5): {name (1): {tag (2)}}}``; ``session_start_info (3)``:
  ``SessionStartInfo{hparams (1): map<string, google.protobuf.Value>, start_time_secs (5)}``).
"""
from __future__ import annotations

import itertools
import os
import socket
import struct
import time
from pathlib import Path
from typing import Iterable

try:  # C implementation when installed (a dependency of the workbench); pure Python otherwise
    from crc32c import crc32c as _crc32c
except ImportError:  # pragma: no cover - exercised only where the package is missing
    _crc32c = None

__all__ = ["EventFile", "crc32c", "crc32c_python", "mask_crc32c", "masked_crc32c", "encode_scalars", "encode_text",
           "encode_hparams"]

_TABLE: list[int] = []
for _n in range(256):
    _c = _n
    for _ in range(8):
        _c = (_c >> 1) ^ 0x82F63B78 if _c & 1 else _c >> 1
    _TABLE.append(_c)
_COUNTER = itertools.count()


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli) of ``data``: the ``crc32c`` package's (C) where it is installed, else
    :func:`crc32c_python`."""
    if _crc32c is not None:
        return _crc32c(data)
    return crc32c_python(data)


def crc32c_python(data: bytes) -> int:
    """CRC-32C of ``data`` in pure Python (a table per byte): the fallback :func:`crc32c` uses where the C
    package is missing. The same values, much slower."""
    crc = 0xFFFFFFFF
    table = _TABLE
    for b in data:
        crc = table[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def mask_crc32c(crc: int) -> int:
    """The mask TFRecord puts on a stored CRC-32C (so that a CRC of data holding CRCs stays well-behaved)."""
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def masked_crc32c(data: bytes) -> int:
    """The masked checksum TFRecord stores: ``mask_crc32c(crc32c(data))``."""
    return mask_crc32c(crc32c(data))


def _varint(n: int) -> bytes:
    n &= 0xFFFFFFFFFFFFFFFF  # int64 as protobuf encodes it: negative numbers take ten bytes
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _field_bytes(number: int, payload: bytes) -> bytes:
    """A length-delimited field (wire type 2)."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _event(wall_time: float, step: int | None, body: bytes) -> bytes:
    head = b"\x09" + struct.pack("<d", wall_time)
    if step is not None:
        head += b"\x10" + _varint(step)
    return head + body


class _TagCache(dict):
    """tag -> the bytes of a ``Summary.Value`` up to (and including) the simple_value key."""

    def __missing__(self, tag: str) -> bytes:
        b = tag.encode("utf-8")
        prefix = b"\x0a" + _varint(len(b)) + b + b"\x15"
        self[tag] = prefix
        return prefix


_TAGS = _TagCache()
_FLOAT = struct.Struct("<f")


def _f32(value: float) -> bytes:
    try:
        return _FLOAT.pack(value)
    except OverflowError:  # finite but beyond float32: TensorBoard's float field holds +-inf then
        return _FLOAT.pack(float("inf") if value > 0 else float("-inf"))


def encode_scalars(step: int, wall_time: float, values: Iterable[tuple[str, float]]) -> bytes:
    """The bytes of one ``Event`` holding the given ``(tag, value)`` scalars at ``step``."""
    summary = b"".join(_field_bytes(1, _TAGS[tag] + _f32(value)) for tag, value in values)
    return _event(wall_time, step, _field_bytes(5, summary))


def _double(number: int, value: float) -> bytes:
    """A double field (wire type 1)."""
    return _varint(number << 3 | 1) + struct.pack("<d", value)


def _enum(number: int, value: int) -> bytes:
    """A varint field (wire type 0)."""
    return _varint(number << 3) + _varint(value)


def _plugin_value(tag: str, plugin: str, content: bytes, tensor: bytes) -> bytes:
    """A ``Summary.Value`` holding a tensor for a TensorBoard plugin."""
    plugin_data = _field_bytes(1, plugin.encode()) + (_field_bytes(2, content) if content else b"")
    return _field_bytes(1, _field_bytes(1, tag.encode("utf-8")) + _field_bytes(8, tensor)
                        + _field_bytes(9, _field_bytes(1, plugin_data)))


def encode_text(step: int, wall_time: float, tag: str, text: str) -> bytes:
    """The bytes of one ``Event`` holding a markdown text under ``tag`` at ``step`` (TensorBoard's Text tab)."""
    tensor = _enum(1, 7) + _field_bytes(2, b"") + _field_bytes(8, text.encode("utf-8"))   # DT_STRING, scalar
    return _event(wall_time, step, _field_bytes(5, _plugin_value(tag, "text", b"", tensor)))


_NULL_TENSOR = _enum(1, 1) + _field_bytes(2, _field_bytes(2, b""))     # DT_FLOAT, shape [0]: no values
_HP_TYPES = {bool: 2, str: 1, float: 3, int: 3}                         # api.DataType: STRING 1, BOOL 2, FLOAT64 3


def _pb_value(value: bool | int | float | str) -> bytes:
    """A ``google.protobuf.Value``: number (2, double), string (3) or bool (4)."""
    if isinstance(value, bool):
        return _enum(4, int(value))
    if isinstance(value, (int, float)):
        return _double(2, float(value))
    return _field_bytes(3, str(value).encode("utf-8"))


def encode_hparams(wall_time: float, hparams: dict[str, bool | int | float | str],
                   metrics: Iterable[str] = ()) -> list[bytes]:
    """The two ``Event`` records TensorBoard's HParams tab reads for one run: the experiment (each
    hyperparameter's name and type, and the scalar tags shown as metrics) and the run's values."""
    infos = b"".join(_field_bytes(4, _field_bytes(1, k.encode("utf-8")) + _enum(4, _HP_TYPES[type(v)]))
                     for k, v in hparams.items())
    infos += b"".join(_field_bytes(5, _field_bytes(1, _field_bytes(2, m.encode("utf-8")))) for m in metrics)
    experiment = _field_bytes(2, _double(3, wall_time) + infos)
    entries = b"".join(_field_bytes(1, _field_bytes(1, k.encode("utf-8")) + _field_bytes(2, _pb_value(v)))
                       for k, v in hparams.items())
    session = _field_bytes(3, entries + _double(5, wall_time))
    return [_event(wall_time, 0, _field_bytes(5, _plugin_value(tag, "hparams", body, _NULL_TENSOR)))
            for tag, body in (("_hparams_/experiment", experiment), ("_hparams_/session_start_info", session))]


class EventFile:
    """One TensorBoard event file, appended to with framed records; not thread-safe (callers lock)."""

    def __init__(self, logdir: str | os.PathLike, suffix: str = "") -> None:
        self.logdir = Path(logdir)
        self.logdir.mkdir(parents=True, exist_ok=True)
        name = f"events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}.{os.getpid()}.{next(_COUNTER)}{suffix}"
        self.path = self.logdir / name
        self._f = open(self.path, "wb")  # noqa: SIM115 - closed by close()
        self.write_record(_event(time.time(), None, _field_bytes(3, b"brain.Event:2")))
        self.flush()

    def write_record(self, data: bytes) -> None:
        header = struct.pack("<Q", len(data))
        self._f.write(b"".join((header, struct.pack("<I", masked_crc32c(header)), data,
                                struct.pack("<I", masked_crc32c(data)))))

    def flush(self) -> None:
        self._f.flush()

    def close(self) -> None:
        if not self._f.closed:
            self._f.flush()
            self._f.close()
