"""workbench.tbevents and the run's TensorBoard folder: the hand-written TensorBoard event file.

The bytes are what TensorBoard's own protobuf classes read (one event per step, float32 overflow as +-inf
as protobuf does, negative steps); the masked CRC-32C is TensorBoard's, from the C package and from the
pure-Python fallback alike; an event file is a version record and then TFRecord-framed events, each with
its checksums. Text and HParams records parse with TensorBoard's own plugin readers, and a real run's folder
holds its config (text and HParams), the controls (weight decay, precision...) as series, the event log as
text at its steps and per-layer statistics.
"""
from __future__ import annotations

import math
import struct
from pathlib import Path

import pytest
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


def test_text_and_hparams_records_parse_as_tensorboard_reads_them() -> None:
    from tensorboard.plugins.hparams import metadata as hp_meta
    from tensorboard.plugins.text import metadata as text_meta
    from tensorboard.util import tensor_util

    text = Event.FromString(tbevents.encode_text(7, 1.5, "events", "* **control** (notebook): lr 1 -> 2"))
    (value,) = text.summary.value
    assert (text.step, value.tag, value.metadata.plugin_data.plugin_name) == (7, "events", text_meta.PLUGIN_NAME)
    assert tensor_util.make_ndarray(value.tensor).item().decode() == "* **control** (notebook): lr 1 -> 2"

    hp = {"lr": 0.003, "optimizer": "adamw", "linear_scaling": True, "model_options.width": 64.0}
    exp, start = (Event.FromString(b) for b in tbevents.encode_hparams(100.0, hp, ["val/loss"]))
    v = exp.summary.value[0]
    assert v.tag == hp_meta.EXPERIMENT_TAG and v.metadata.plugin_data.plugin_name == hp_meta.PLUGIN_NAME
    e = hp_meta.parse_experiment_plugin_data(v.metadata.plugin_data.content)
    assert [i.name for i in e.hparam_infos] == list(hp) and [m.name.tag for m in e.metric_infos] == ["val/loss"]
    assert [i.type for i in e.hparam_infos] == [3, 1, 2, 3]          # FLOAT64, STRING, BOOL, FLOAT64
    v = start.summary.value[0]
    info = hp_meta.parse_session_start_info_plugin_data(v.metadata.plugin_data.content)
    assert v.tag == hp_meta.SESSION_START_INFO_TAG and info.start_time_secs == 100.0
    assert (info.hparams["lr"].number_value, info.hparams["optimizer"].string_value,
            info.hparams["linear_scaling"].bool_value) == (0.003, "adamw", True)


def _accumulator(logdir: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return acc


def test_a_run_in_tensorboard_has_its_config_hparams_controls_events_and_layers(runs_root: Path) -> None:
    """What a TensorBoard user looks for: the config (text and HParams), precision and weight decay as
    series, the event log as text at its steps, per-layer statistics."""
    from tensorboard.plugins.hparams import metadata as hp_meta
    from tensorboard.util import tensor_util

    from workbench import Trainer
    from workbench.rundir.tb import PRECISION_CODES
    from workbench.runlog import PRECISION_CODES as STEP_CODES

    assert PRECISION_CODES == STEP_CODES
    tr = Trainer(dataset="digits", model="mlp", model_options={"width": 16}, optimizer="adamw", weight_decay=0.01,
                 max_steps=40, max_epochs=None, eval_every=20, layer_every=10, seed=0, runs_root=str(runs_root))
    tr.start(paused=True)
    tr.step(10).wait(30)
    tr.set(weight_decay=0.1, source="notebook").wait(10)
    tr.resume()
    assert tr.join(60) == "finished"
    acc = _accumulator(tr.run_dir / "tb")
    scalars = acc.Tags()["scalars"]
    assert {"train/loss", "train/precision", "val/loss", "controls/lr", "controls/weight_decay"} <= set(scalars)
    wd = acc.Scalars("controls/weight_decay")
    assert [e.step for e in wd] == [0, 11] and [e.value for e in wd] == pytest.approx([0.01, 0.1])
    assert {e.value for e in acc.Scalars("train/precision")} == {PRECISION_CODES["fp32"]}
    layer_tags = {t for t in scalars if t.startswith("layer_grad_norm/")}
    assert layer_tags == {f"layer_grad_norm/{n}" for n, _ in tr.model.named_parameters()}
    assert [e.step for e in acc.Scalars("layer_update_ratio/net.0.weight")] == [10, 20, 30, 40]

    def texts(tag):
        return {e.step: tensor_util.make_ndarray(e.tensor_proto).item().decode() for e in acc.Tensors(tag)}

    config = texts("config")[0]
    assert "weight_decay: 0.01" in config and "optimizer: adamw" in config
    events = texts("events")
    assert "weight_decay: 0.01 -> 0.1" in events[11] and "(notebook)" in events[11]
    assert any("checkpoint" in t for t in events.values())
    start = acc.SummaryMetadata(hp_meta.SESSION_START_INFO_TAG).plugin_data.content
    hparams = hp_meta.parse_session_start_info_plugin_data(start).hparams
    assert hparams["weight_decay"].number_value == 0.01 and hparams["model_options.width"].number_value == 16
