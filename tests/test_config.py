"""workbench.config: TrainConfig, the one place a run's settings are checked.

An unknown key, a bad value or bad options are refused with the field's name and what is allowed (from a
dict, from keyword fields, from a YAML file, whose path the message names); a config round-trips through
YAML.
"""
from __future__ import annotations

import pytest

from workbench import Trainer, TrainConfig


def test_config_errors_name_the_field(tmp_path):
    with pytest.raises(ValueError, match="unknown key.*'lrr'.*valid keys: dataset"):
        TrainConfig.from_dict({"lrr": 0.1})
    with pytest.raises(ValueError, match="optimizer.*allowed: sgd, adam, adamw"):
        TrainConfig(optimizer="lion")
    with pytest.raises(ValueError, match="precision"):
        TrainConfig(precision="fp64")
    with pytest.raises(ValueError, match="device"):
        TrainConfig(device="tpu")
    with pytest.raises(ValueError, match="schedule_options.*'warmup'"):
        TrainConfig(schedule="cosine", schedule_options={"warmup": 3})
    p = tmp_path / "c.yaml"
    p.write_text("dataset: wine\nlr: 3e-4\nbatch_size: 32\n")
    cfg = TrainConfig.from_yaml(p)
    assert cfg.lr == 3e-4 and cfg.batch_size == 32
    cfg.to_yaml(tmp_path / "d.yaml")
    assert TrainConfig.from_yaml(tmp_path / "d.yaml") == cfg
    p.write_text("dataset: wine\nbatchsize: 32\n")
    with pytest.raises(ValueError, match=r"c\.yaml.*'batchsize'"):
        TrainConfig.from_yaml(p)


def test_cpu_threads_setting_is_checked():
    with pytest.raises(ValueError, match="cpu_threads"):
        TrainConfig(cpu_threads=0)
    with pytest.raises(TypeError, match="cpu_threads"):
        TrainConfig(cpu_threads="two")


def test_checkpoint_writer_setting_is_checked():
    with pytest.raises(ValueError, match=r"checkpoint_writer.*auto, process, thread"):
        Trainer(dataset="digits", model="mlp", max_steps=1, checkpoint_writer="fork")
