"""Fuzzed input: YAML configs, ``--set`` arguments, CSV files and inbox rows get a clear error or work.

Every input either gives a valid result or raises ValueError/TypeError whose message names the field or the
file and what is allowed; never a bare KeyError, AttributeError, JSONDecodeError or a YAML parser's error.
Inbox rows with garbage in them are refused one by one while a run trains, and a valid request posted after
them is applied: nothing blocks or strands it.
"""
from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from workbench import Trainer
from workbench.cli import build_config
from workbench.config import TrainConfig, parse_override
from workbench.data import load_dataset
from workbench.rundir import RunDB

from conftest import cfg_for, wait_for

FIELDS = TrainConfig.field_names()
FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                       HealthCheck.too_slow])

# YAML-ish scalars and the odd structure: what a typo or a wrong paste puts in a config
scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**12, 10**12), st.floats(allow_nan=True),
                    st.text(max_size=12), st.sampled_from(["3e-4", "1e999", "-0", "nan", ".inf", "", "~", "[", "{"]))
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6),
                                                                                           inner, max_size=3),
                      max_leaves=6)
keys = st.one_of(st.sampled_from(FIELDS), st.text(max_size=10))


def _clear(e: BaseException, *names: str) -> None:
    """``e`` is a clear error: a ValueError/TypeError that names one of ``names`` or says what is allowed."""
    assert isinstance(e, (ValueError, TypeError)), f"{type(e).__name__}: {e}"
    assert type(e) not in (KeyError, AttributeError, json.JSONDecodeError), f"{type(e).__name__}: {e}"
    text = str(e)
    assert text.strip(), f"{type(e).__name__} with no message"
    assert any(n and n in text for n in names) or "allowed" in text or "valid" in text, text


@FUZZ
@given(st.dictionaries(keys, values, max_size=4))
def test_config_mappings_give_a_config_or_a_clear_error(data):
    try:
        TrainConfig.from_dict(data)
    except Exception as e:  # noqa: BLE001 - what it raises is the point
        _clear(e, *map(str, data))


@FUZZ
@given(text=st.one_of(st.text(max_size=200),
                      st.dictionaries(keys, values, max_size=4).map(lambda d: json.dumps(d, default=str)),
                      st.lists(st.tuples(keys, st.text(max_size=20)), max_size=4).map(
                          lambda kv: "\n".join(f"{k}: {v}" for k, v in kv))))
def test_yaml_files_give_a_config_or_an_error_naming_the_file(tmp_path, text):
    path = tmp_path / "fuzzed.yaml"
    path.write_text(text)
    try:
        TrainConfig.from_yaml(path)
    except Exception as e:  # noqa: BLE001
        _clear(e, str(path))
        assert str(path) in str(e), str(e)


@FUZZ
@given(st.lists(st.one_of(st.text(max_size=30), st.tuples(keys, st.text(max_size=20)).map("=".join),
                          st.tuples(st.sampled_from(FIELDS), st.text(max_size=8), st.text(max_size=8)).map(
                              lambda t: f"{t[0]}.{t[1]}={t[2]}")), max_size=3))
def test_set_arguments_give_a_config_or_an_error_naming_the_argument(overrides):
    for text in overrides:
        try:
            parse_override(text)
        except Exception as e:  # noqa: BLE001
            _clear(e, "--set", text)
    try:
        build_config(None, overrides)
    except Exception as e:  # noqa: BLE001
        _clear(e, "--set", *overrides, *(o.partition("=")[0].partition(".")[0].strip() for o in overrides))


cells = st.one_of(st.integers(-5, 5).map(str), st.floats(allow_nan=True).map(str),
                  st.text(alphabet=st.characters(blacklist_categories=["Cs"]), max_size=6), st.just(""))
csv_text = st.one_of(
    st.text(max_size=300),
    st.binary(max_size=200).map(lambda b: b.decode("latin-1")),
    st.lists(st.lists(cells, min_size=1, max_size=4).map(",".join), max_size=12).map("\n".join),
)


@FUZZ
@given(text=csv_text, target=st.one_of(st.none(), st.text(max_size=5)),
       task=st.sampled_from(["auto", "classification", "regression"]))
def test_csv_files_load_or_give_an_error_naming_the_file(tmp_path, text, target, task):
    path = tmp_path / "fuzzed.csv"
    path.write_bytes(text.encode("utf-8", "surrogatepass"))
    options = {"task": task} if target is None else {"task": task, "target": target}
    try:
        bundle = load_dataset(f"csv:{path}", **options)
    except Exception as e:  # noqa: BLE001
        _clear(e, str(path), "val_fraction", "target", "task")  # the file, or the option that cannot work with it
    else:
        assert len(bundle.train) > 0


def test_a_missing_csv_file_is_named():
    with pytest.raises(FileNotFoundError, match="nowhere.csv"):
        load_dataset("csv:/nowhere/nowhere.csv")


# ---------------------------------------------------------------------------- the inbox of a training run
actions = st.one_of(st.sampled_from(["set", "step", "pause", "resume", "stop", "checkpoint", "dismiss",
                                     "alert_action", "rollback", "eval"]), st.text(max_size=8))
json_values = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(),
                                     st.text(max_size=8)),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner,
                                                                                       max_size=3), max_leaves=6)
args_text = st.one_of(
    st.text(max_size=40),                                                   # garbage, mostly not JSON
    json_values.map(json.dumps),                                            # JSON of any type
    st.dictionaries(st.sampled_from(["lr", "batch_size", "n", "alert", "index", "tag", "weight_decay"]),
                    json_values, max_size=3).map(json.dumps),               # the right names, wrong values
)


def test_garbage_inbox_rows_are_refused_and_never_strand_a_later_request(tmp_path):
    tr = Trainer(cfg_for(tmp_path / "run", max_steps=10_000_000)).start()
    db = RunDB(tr.run_dir / "run.db")
    con = sqlite3.connect(tr.run_dir / "run.db", timeout=30)
    lr = [1e-3]
    try:
        wait_for(lambda: tr.step_count > 2)

        @settings(max_examples=40, deadline=None)
        @given(rows=st.lists(st.tuples(actions, args_text), min_size=1, max_size=4))
        def fuzz(rows):
            ids = []
            for action, controls in rows:
                if action in ("stop", "pause") or action.startswith("stop"):
                    action = "x" + action  # the run must go on for the next example
                ids.append(con.execute("INSERT INTO controls (time, source, action, controls, status) VALUES "
                                       "(?, 'dashboard', ?, ?, 'pending')", (time.time(), action, controls)
                                       ).lastrowid)
            con.commit()
            lr[0] = 2e-3 if lr[0] != 2e-3 else 1e-3
            later = db.post_control({"lr": lr[0]})
            wait_for(lambda: all(db.control(i)["status"] != "pending" for i in (*ids, later)), timeout=60)
            assert db.control(later)["status"] == "applied", db.control(later)
            for i in ids:
                rec = db.control(i)
                assert rec["status"] in ("applied", "refused"), rec
                if rec["status"] == "refused":
                    assert rec["message"].strip(), rec
                    assert "Traceback" not in rec["message"], rec
            if tr.status == "paused":  # a fuzzed row may be a valid pause-like request: go on
                tr.resume()
            assert tr.status in ("running", "paused"), tr.status

        fuzz()
        assert tr.is_alive
    finally:
        con.close()
        tr.stop()
        tr.join(60)
        db.close()
