"""Optuna sweeps: the search space, trials as run directories, pruning by the median pruner and by diagnosis,
grid against TPE, and two sweep processes sharing one study."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from workbench.config import TrainConfig
from workbench.rundir import RunDB
from workbench.sweep import check_space, grid_values, open_study, run_sweep, trial_config, trials_table

ROOT = Path(__file__).resolve().parents[1]
# SGD up to lr 20 on digits: the top of the range diverges, which diagnosis sees and the sweep prunes at once
SPACE = {"lr": {"type": "float", "low": 1e-3, "high": 20.0, "log": True, "grid": 4},
         "batch_size": {"type": "categorical", "choices": [32, 64]}}
BASE = dict(dataset="digits", model="mlp", optimizer="sgd", max_steps=150, max_epochs=None, eval_every=25,
            tensorboard=False, seed=0, layer_every=0)


def test_a_bad_search_space_names_the_entry_and_what_is_allowed():
    with pytest.raises(ValueError, match="space: unknown field 'lrate'"):
        check_space({"lrate": {"type": "float", "low": 0.1, "high": 1}})
    with pytest.raises(ValueError, match="space.lr: a log range needs low > 0"):
        check_space({"lr": {"type": "float", "low": 0, "high": 1, "log": True}})
    with pytest.raises(ValueError, match="space.batch_size: a categorical needs choices"):
        check_space({"batch_size": {"type": "categorical"}})
    with pytest.raises(ValueError, match="space.lr: got low 2, high 1"):
        check_space({"lr": {"type": "float", "low": 2, "high": 1}})
    assert check_space({"model_options.width": {"type": "int", "low": 8, "high": 64}})


def test_grid_points_and_dotted_keys_reach_the_trial_config(tmp_path):
    assert grid_values({"type": "float", "low": 1e-3, "high": 1e-1, "log": True}) == pytest.approx([1e-3, 1e-2, 1e-1])
    assert grid_values({"type": "int", "low": 1, "high": 5, "grid": 3}) == [1, 3, 5]
    assert grid_values({"type": "categorical", "choices": ["a", "b"]}) == ["a", "b"]
    cfg = trial_config(TrainConfig(model_options={"depth": 2}), {"model_options.width": 48, "lr": 0.3},
                       tmp_path / "t")
    assert cfg.model_options == {"depth": 2, "width": 48} and cfg.lr == 0.3 and cfg.run_dir == str(tmp_path / "t")


@pytest.mark.slow
def test_a_tpe_sweep_prunes_diverging_trials_and_finds_what_a_grid_search_finds(tmp_path):
    base = TrainConfig(**BASE)
    study = run_sweep(base, 12, sweep_dir=tmp_path / "tpe", space=SPACE, seed=1)
    table = trials_table(study)
    assert len(table) == 12
    diverged = table[table["prune_reason"] == "divergence"]
    assert len(diverged) >= 1 and (diverged["state"] == "PRUNED").all()
    db = RunDB(Path(diverged.iloc[0]["run_dir"]) / "run.db", readonly=True)
    try:
        pruned = db.read_events().query("kind == 'pruned'")
        assert len(pruned) == 1 and "divergence" in str(pruned.iloc[0]["data"])
        assert db.meta()["status"] == "stopped"
    finally:
        db.close()
    assert (table["prune_reason"] == "median").any()  # the median pruner stops trials behind the others
    # every trial is a run directory the dashboard lists
    assert all((Path(d) / "run.db").exists() for d in table["run_dir"])

    grid = run_sweep(base, 8, sweep_dir=tmp_path / "grid", space=SPACE, sampler="grid", seed=1)
    assert len(grid.trials) == 8
    assert study.best_value <= 1.10 * grid.best_value


@pytest.mark.slow
def test_two_sweep_processes_sharing_one_storage_run_disjoint_trials_of_one_study(tmp_path):
    storage = f"sqlite:///{tmp_path / 'shared.db'}"
    cfg = tmp_path / "cfg.yaml"
    TrainConfig(**{**BASE, "max_steps": 40}).to_yaml(cfg)
    cmd = [sys.executable, "-m", "workbench.cli", "sweep", "--config", str(cfg), "--trials", "3", "--storage",
           storage, "--study", "shared", "--sweep-dir", str(tmp_path / "sweep"), "--sampler", "random"]
    procs = [subprocess.Popen(cmd + ["--seed", str(i)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for i in range(2)]
    for p in procs:
        out, _ = p.communicate(timeout=300)
        assert p.returncode == 0, out[-3000:]
    study = open_study(storage)
    numbers = [t.number for t in study.trials]
    dirs = {t.user_attrs["run_dir"] for t in study.trials}
    assert sorted(numbers) == list(range(6)) and len(dirs) == 6


def test_the_dashboard_shows_a_sweep_its_trials_plots_and_opens_a_trial(tmp_path, monkeypatch):
    from streamlit.testing.v1 import AppTest

    from workbench import handle, registry, runs

    run_sweep(TrainConfig(**{**BASE, "max_steps": 20, "eval_every": 10}), 3, sweep_dir=tmp_path / "sweep-a",
              space=SPACE | {"lr": {"type": "float", "low": 1e-2, "high": 1e-1, "log": True}}, sampler="random",
              seed=0)
    monkeypatch.setenv("WORKBENCH_RUNS", str(tmp_path))
    monkeypatch.delenv("WORKBENCH_DEMO", raising=False)
    at = AppTest.from_file(str(ROOT / "app" / "dashboard.py"), default_timeout=60).run()
    try:
        assert not at.exception and not [e.value for e in at.error]
        assert at.selectbox(key="sweep_pick").value.startswith("sweep")
        table = at.dataframe[-1].value
        assert len(table) == 3 and {"lr", "batch_size", "run_dir", "state"} <= set(table.columns)
        assert len(at.get("plotly_chart")) >= 2  # parallel coordinates and importances
        trial = at.selectbox(key="sweep_trial").value
        at.button(key="sweep_open").click().run()
        assert at.session_state["run_select"] == registry.key(trial)
    finally:
        registry.stop_all(under=tmp_path)
        handle.close_all()
        runs.clear_cache()
