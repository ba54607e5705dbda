"""Hyperparameter sweeps on Optuna: each trial is a normal run directory, pruned by Optuna's median pruner on the
monitored metric and at once when diagnosis raises divergence.

The search space is YAML, one entry per config field (a dotted key updates one entry of a mapping field)::

    lr:                  {type: float, low: 1.0e-4, high: 1.0, log: true}
    batch_size:          {type: categorical, choices: [16, 32, 64]}
    weight_decay:        {type: float, low: 0.0, high: 1.0e-3}
    schedule:            {type: categorical, choices: [constant, cosine]}
    model_options.width: {type: int, low: 32, high: 256, log: true}

Samplers: ``tpe`` (default), ``random``, ``grid`` (every combination: a categorical's ``choices``, a number's
``grid`` points, default 3, spaced evenly, in log space when ``log``). Storage: ``<sweep dir>/study.db``
(SQLite) by default, or any Optuna RDB URL, so several ``workbench sweep`` processes, on one machine or many,
share one study and each asks it for new trials (disjoint by Optuna's design). ``optuna-dashboard URL`` opens
the same storage.
"""
from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import yaml

from .config import TrainConfig

SAMPLERS = ("tpe", "random", "grid")
KINDS = ("float", "int", "categorical")
DEFAULT_SPACE: dict[str, dict[str, Any]] = {
    "lr": {"type": "float", "low": 1e-4, "high": 1.0, "log": True},
    "batch_size": {"type": "categorical", "choices": [16, 32, 64]},
    "weight_decay": {"type": "float", "low": 0.0, "high": 1e-3},
}


def check_space(space: Mapping[str, Any], fields: tuple[str, ...] = TrainConfig.field_names()) -> dict[str, dict]:
    """The search space, checked: every key a config field (dotted into a mapping field), every entry a known type
    with its bounds or choices."""
    if not isinstance(space, Mapping) or not space:
        raise ValueError(f"space: got {space!r:.100}; allowed: a mapping of config field -> {{type, low, high}} or "
                         f"{{type: categorical, choices}}")
    out = {}
    for key, spec in space.items():
        if key.partition(".")[0] not in fields:
            raise ValueError(f"space: unknown field {key!r}; allowed: config fields ({', '.join(fields)}), a dotted "
                             f"key for a mapping field (model_options.width)")
        if not isinstance(spec, Mapping) or spec.get("type") not in KINDS:
            raise ValueError(f"space.{key}: got {spec!r:.100}; allowed: a mapping with type one of {', '.join(KINDS)}")
        if spec["type"] == "categorical":
            if not isinstance(spec.get("choices"), list) or not spec["choices"]:
                raise ValueError(f"space.{key}: a categorical needs choices: [a non-empty list]")
        else:
            low, high = spec.get("low"), spec.get("high")
            if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (low, high)) or low > high:
                raise ValueError(f"space.{key}: got low {low!r}, high {high!r}; allowed: numbers with low <= high")
            if spec.get("log") and low <= 0:
                raise ValueError(f"space.{key}: a log range needs low > 0, got {low!r}")
        out[key] = dict(spec)
    return out


def load_space(path: str | os.PathLike | None) -> dict[str, dict]:
    if path is None:
        return check_space(DEFAULT_SPACE)
    try:
        data = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as e:
        raise ValueError(f"--space {path}: cannot be read ({type(e).__name__}: {e})") from None
    return check_space(data)


def grid_values(spec: Mapping[str, Any]) -> list[Any]:
    """The points a grid search tries for one entry."""
    if spec["type"] == "categorical":
        return list(spec["choices"])
    n = int(spec.get("grid", 3))
    lo, hi = float(spec["low"]), float(spec["high"])
    pts = np.geomspace(lo, hi, n) if spec.get("log") else np.linspace(lo, hi, n)
    return sorted({int(round(p)) for p in pts}) if spec["type"] == "int" else [float(p) for p in pts]


def suggest(trial: Any, space: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    out = {}
    for key, spec in space.items():
        if spec["type"] == "categorical":
            out[key] = trial.suggest_categorical(key, spec["choices"])
        elif spec["type"] == "int":
            out[key] = trial.suggest_int(key, int(spec["low"]), int(spec["high"]), log=bool(spec.get("log")))
        else:
            out[key] = trial.suggest_float(key, float(spec["low"]), float(spec["high"]), log=bool(spec.get("log")))
    return out


def trial_config(base: TrainConfig, params: Mapping[str, Any], run_dir: Path) -> TrainConfig:
    values = base.to_dict()
    for key, value in params.items():
        field, _, sub = key.partition(".")
        values[field] = {**values[field], sub: value} if sub else value
    values.update(run_dir=str(run_dir), name=None)
    return TrainConfig.from_dict(values)


def make_sampler(name: str, space: Mapping[str, Mapping[str, Any]], seed: int | None) -> Any:
    import optuna

    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if name == "grid":
        return optuna.samplers.GridSampler({k: grid_values(s) for k, s in space.items()}, seed=seed)
    raise ValueError(f"sampler: got {name!r}; allowed: {', '.join(SAMPLERS)}")


def default_storage(sweep_dir: Path) -> str:
    return f"sqlite:///{(sweep_dir / 'study.db').resolve()}"


def run_trial(trial: Any, base: TrainConfig, space: Mapping[str, Mapping[str, Any]], sweep_dir: Path) -> float:
    """One trial: a run in ``sweep_dir/trial-NNNN``, reported to the study at every evaluation; pruned by the
    study's pruner or at once on a divergence alert (the reason is the trial's ``prune_reason`` and an event)."""
    import optuna

    from .trainer import Trainer

    params = suggest(trial, space)
    run_dir = sweep_dir / f"trial-{trial.number:04d}"
    trial.set_user_attr("run_dir", str(run_dir))
    tr = Trainer(trial_config(base, params, run_dir))
    monitor, pruned = base.monitor, []

    def prune(reason: str, data: Mapping[str, Any]) -> None:
        if not pruned:
            pruned.append(reason)
            tr.log_event("pruned", "policy", {"trial": trial.number, "reason": reason, **data})
            tr.stop(source="policy")

    def on_eval(ctx: Any) -> None:
        value = ctx.metrics.get(monitor)
        if value is not None and math.isfinite(value):
            trial.report(float(value), ctx.step)
            if trial.should_prune():
                prune("median", {"monitor": monitor, "value": float(value), "step": ctx.step})

    def on_alert(ctx: Any) -> None:
        if ctx.data.get("kind") == "divergence":
            prune("divergence", {"alert": ctx.data.get("id"), "message": ctx.data.get("message"), "step": ctx.step})

    tr.on("eval_end", on_eval)
    tr.on("alert", on_alert)
    tr.run()
    if pruned:
        trial.set_user_attr("prune_reason", pruned[0])
        raise optuna.TrialPruned(pruned[0])
    values = tr.evals[monitor].dropna() if monitor in tr.evals else []
    if not len(values):
        return math.nan
    return float(values.min() if base.monitor_mode == "min" else values.max())


def run_sweep(base: TrainConfig, trials: int, *, sweep_dir: str | os.PathLike | None = None,
              storage: str | None = None, space: Mapping[str, Any] | None = None, sampler: str = "tpe",
              study_name: str | None = None, seed: int | None = None, n_startup_trials: int = 4,
              n_warmup_steps: int = 0) -> Any:
    """Run ``trials`` trials of a study (made, or joined when the storage holds it); returns the study."""
    import optuna

    space = check_space(space or DEFAULT_SPACE)
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler: got {sampler!r}; allowed: {', '.join(SAMPLERS)}")
    name = study_name or base.name or "sweep"
    folder = Path(sweep_dir) if sweep_dir is not None else Path(base.runs_root) / f"sweep-{name}"
    folder.mkdir(parents=True, exist_ok=True)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = _create_study(
        study_name=name, storage=storage or default_storage(folder), load_if_exists=True,
        direction="minimize" if base.monitor_mode == "min" else "maximize", sampler=make_sampler(sampler, space, seed),
        pruner=optuna.pruners.MedianPruner(n_startup_trials=n_startup_trials, n_warmup_steps=n_warmup_steps))
    study.set_user_attr("sweep_dir", str(folder.resolve()))
    study.optimize(lambda t: run_trial(t, base, space, folder), n_trials=trials, catch=(RuntimeError,))
    return study


def _create_study(**kw: Any) -> Any:
    """``optuna.create_study``, tried again when another sweep process was creating the same storage's tables at
    the same moment (its ``CREATE TABLE`` wins, this one's fails; the second try finds them)."""
    import optuna
    from sqlalchemy.exc import IntegrityError, OperationalError

    for attempt in range(5):
        try:
            return optuna.create_study(**kw)
        except (OperationalError, IntegrityError):
            if attempt == 4:
                raise
            time.sleep(0.2 * (attempt + 1))
    raise AssertionError("unreachable")


def trials_table(study: Any) -> Any:
    """One row per trial: number, state, value, params, run_dir, prune_reason (a pandas DataFrame)."""
    df = study.trials_dataframe(attrs=("number", "state", "value", "params", "user_attrs"))
    return df.rename(columns=lambda c: c.replace("params_", "").replace("user_attrs_", ""))


def open_study(storage: str, study_name: str | None = None) -> Any:
    """A study read from its storage (the only one there when no name is given)."""
    import optuna

    if study_name is None:
        names = optuna.get_all_study_names(storage)
        if len(names) != 1:
            raise ValueError(f"study_name: the storage holds {len(names)} studies ({', '.join(names)}); name one")
        study_name = names[0]
    return optuna.load_study(study_name=study_name, storage=storage)


def find_sweeps(root: str | os.PathLike) -> list[dict[str, str]]:
    """The sweeps under ``root`` (a folder holding ``study.db``: ``root`` itself or one level down): name, folder,
    storage URL, one per study."""
    import optuna

    base = Path(root)
    folders = [base] + (sorted(p for p in base.iterdir() if p.is_dir()) if base.is_dir() else [])
    out = []
    for folder in folders:
        if (folder / "study.db").is_file():
            storage = default_storage(folder)
            out += [{"name": n, "folder": str(folder), "storage": storage}
                    for n in optuna.get_all_study_names(storage)]
    return out


def sweep_figures(study: Any) -> dict[str, Any]:
    """Plotly figures of a study: parallel coordinates of its finished trials, and parameter importances (once
    two trials have finished)."""
    import optuna

    vis = optuna.visualization
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    figs = {"parallel": vis.plot_parallel_coordinate(study)}
    if len(done) >= 2 and study.trials[0].params:
        try:
            figs["importances"] = vis.plot_param_importances(study)
        except (RuntimeError, ValueError):  # a parameter that never varied has no importance to show
            pass
    return figs
