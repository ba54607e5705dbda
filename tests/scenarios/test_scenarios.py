"""workbench.scenarios: every teaching scenario raises its expected alert in time; every healthy run stays
quiet; a preset is looked up by name.

Thresholds are the detectors' defaults; the scenarios are seeded. The per-kind precision/recall over
several seeds is measured by scripts/diagnosis_report.py (figures in the README's Diagnosis section).
(The tests of workbench.scenarios live here: a tests/test_scenarios.py would clash with this module's name.)
"""
from __future__ import annotations

import pytest

from workbench import Trainer
from workbench.scenarios import SCENARIOS, get, scenario_config

PATHOLOGIES = [n for n, s in SCENARIOS.items() if s.expect]
HEALTHY = [n for n, s in SCENARIOS.items() if not s.expect]


def test_the_suite_is_big_enough():
    assert len(PATHOLOGIES) >= 10 and len(HEALTHY) >= 5
    assert len({SCENARIOS[n].expect for n in PATHOLOGIES}) >= 10


@pytest.mark.parametrize("name", PATHOLOGIES)
def test_pathology_raises_its_alert_in_time(name, runs_root):
    sc = SCENARIOS[name]
    tr = Trainer(scenario_config(name, runs_root=str(runs_root), tensorboard=False, on_divergence="stop"))
    tr.run()
    first = {}
    for a in tr.alerts:
        first.setdefault(a.kind, a)
    assert sc.expect in first, f"{name}: expected {sc.expect}, got {[str(a) for a in tr.alerts]}"
    alert = first[sc.expect]
    assert alert.step <= sc.within, f"{name}: {sc.expect} fired at step {alert.step}, later than {sc.within}"
    assert alert.severity in ("warning", "critical")
    assert alert.message.count(".") >= 2 and alert.evidence and 0 < alert.confidence <= 1
    unexpected = {a.kind for a in tr.alerts if a.severity != "info"} - {sc.expect, *sc.also}
    assert not unexpected, f"{name}: unrelated alerts {unexpected}"


@pytest.mark.parametrize("name", HEALTHY)
def test_healthy_run_raises_no_warning(name, runs_root):
    tr = Trainer(scenario_config(name, runs_root=str(runs_root), tensorboard=False))
    tr.run()
    assert tr.status == "finished"
    loud = [str(a) for a in tr.alerts if a.severity in ("warning", "critical")]
    assert not loud
    assert tr.diagnose()["health"] == "healthy"


def test_healthy_teaching_preset_is_documented():
    sc = get("healthy")
    assert sc.expect is None and sc.watch
    with pytest.raises(ValueError, match="scenario.*allowed: lr_too_high"):
        get("nope")
