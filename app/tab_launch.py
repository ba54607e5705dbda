"""The Launch tab: start a run from the built-in data sets and models, a YAML config or a teaching scenario.
What it offers comes from the engine's own lists (data sets, models, optimizers, schedules, precisions)."""
from __future__ import annotations

from pathlib import Path

import streamlit as st

from workbench import handle, registry
from workbench.config import OPTIMIZERS, PRECISIONS, SCHEDULES, TrainConfig
from workbench.data import DATASETS as BUILTIN_DATASETS
from workbench.models import MODELS
from workbench.scenarios import SCENARIOS

from . import actions
from .ui import attempt, cb_demo, flash, message, root, select_run, show_flash, ss

DATASETS = (*BUILTIN_DATASETS, "csv")
LAUNCH_KINDS = ("Built-in data and model", "YAML config", "Scenario")
FORM_FIELDS = ("optimizer", "lr", "schedule", "batch_size", "precision", "max_epochs", "max_steps", "seed")


def cb_launch() -> None:
    def go() -> None:
        kind = ss["launch_source"]
        base = actions.base_config(kind, ss.get("launch_yaml"), ss.get("launch_scenario"))
        fields = {k: ss.get(f"launch_{k}") for k in FORM_FIELDS}
        fields["name"] = (ss.get("launch_name") or "").strip() or None
        if kind == LAUNCH_KINDS[0]:
            ds = ss.get("launch_dataset", "digits")
            if ds == "csv":
                path = (ss.get("launch_csv") or "").strip()
                if not path:
                    raise ValueError("dataset: csv needs a file; allowed: the path of a CSV file")
                ds = f"csv:{path}"
                target = (ss.get("launch_csv_target") or "").strip()
                fields["dataset_options"] = {"target": target} if target else {}
            fields["dataset"], fields["model"] = ds, ss.get("launch_model", "mlp")
        if fields["name"] is None:  # a name that says what the run is (its folder), not a time stamp
            fields["name"] = run_name(kind, fields.get("dataset") or base.dataset, fields.get("model") or base.model,
                                      ss.get("launch_yaml"), ss.get("launch_scenario"))
        cfg = actions.build_config(base, fields, ss.get("launch_overrides", ""), runs_root=root())
        tr = handle.launch(cfg, paused=bool(ss.get("launch_paused")))
        select_run(registry.key(tr.run_dir))
        flash("launch", "success", f"Started run {tr.run_dir.name} ({cfg.dataset}, {cfg.model}, {cfg.optimizer}, "
                                   f"lr {cfg.lr:g}): watch it in the Live tab.")

    attempt("launch", go)


def run_name(kind: str, dataset: str | None, model: str | None, yaml_path: str | None, scenario: str | None) -> str:
    """The folder name of a launched run when none is given: the scenario, the YAML file, or data-model
    (``digits-mlp``); the run folder gets -2, -3, ... when it exists."""
    if kind == "Scenario" and scenario:
        return scenario
    if kind == "YAML config" and yaml_path:
        return Path(yaml_path).stem
    data = Path(dataset.partition(":")[2]).stem if (dataset or "").startswith("csv:") else dataset
    return "-".join(str(p) for p in (data, model) if p) or "run"


def sync_launch_form(sig: tuple, base: TrainConfig) -> None:
    """Load the chosen starting config into the launch form when the choice changes."""
    if ss.get("_launch_sig") == sig:
        return
    ss["_launch_sig"] = sig
    ss["launch_optimizer"] = base.optimizer
    ss["launch_lr"] = f"{base.lr:g}"
    ss["launch_schedule"] = base.schedule
    ss["launch_batch_size"] = int(base.batch_size)
    ss["launch_precision"] = base.precision
    ss["launch_max_epochs"] = "" if base.max_epochs is None else str(base.max_epochs)
    ss["launch_max_steps"] = "" if base.max_steps is None else str(base.max_steps)
    ss["launch_seed"] = "" if base.seed is None else str(base.seed)
    ss["launch_name"] = base.name or ""
    if base.dataset in DATASETS:
        ss["launch_dataset"] = base.dataset
    if base.model in MODELS:
        ss["launch_model"] = base.model


def launch_ui() -> None:
    st.button("Start the demo run (one click)", key="launch_demo", on_click=cb_demo, icon=":material/play_arrow:",
              help="configs/demo.yaml: an MLP on the 8x8 digits that trains for a few minutes (stop it any time)")
    show_flash("demo")
    st.markdown("**Or set up a run**")
    ss.setdefault("launch_source", LAUNCH_KINDS[0])
    ss.setdefault("launch_yaml", "configs/demo.yaml")
    kind = st.radio("Start from", LAUNCH_KINDS, key="launch_source", horizontal=True)
    yaml_path = scenario = None
    if kind == "YAML config":
        yaml_path = st.text_input("YAML config file", key="launch_yaml")
    elif kind == "Scenario":
        scenario = st.selectbox("Teaching scenario", list(SCENARIOS), key="launch_scenario",
                                format_func=lambda n: f"{n} — {SCENARIOS[n].title}")
        sc = SCENARIOS[scenario]
        st.caption(f"Watch for: {sc.watch} Expected alert: {sc.expect or 'none (healthy)'}.")
    try:
        base = actions.base_config(kind, yaml_path, scenario)
    except Exception as e:  # noqa: BLE001 - bad YAML path or file: say so inline
        st.error(message(e))
        return
    sync_launch_form((kind, yaml_path, scenario), base)
    if kind == LAUNCH_KINDS[0]:
        c1, c2 = st.columns(2)
        ds = c1.selectbox("Data set", DATASETS, key="launch_dataset")
        c2.selectbox("Model", MODELS, key="launch_model")
        if ds == "csv":
            c1.text_input("CSV file", key="launch_csv")
            c2.text_input("Target column (empty: the last)", key="launch_csv_target")
    else:
        st.caption(f"Data set {base.dataset}, model {base.model} {base.model_options or ''}")
    c1, c2, c3, c4 = st.columns(4)
    c1.selectbox("Optimizer", OPTIMIZERS, key="launch_optimizer")
    c2.text_input("Learning rate", key="launch_lr")
    c3.selectbox("Schedule", SCHEDULES, key="launch_schedule")
    c4.number_input("Batch size", key="launch_batch_size", step=1)
    c1, c2, c3, c4 = st.columns(4)
    c1.selectbox("Precision", PRECISIONS, key="launch_precision")
    c2.text_input("Epochs (empty: no limit)", key="launch_max_epochs")
    c3.text_input("Steps (empty: no limit)", key="launch_max_steps")
    c4.text_input("Seed (empty: random)", key="launch_seed")
    c1, c2 = st.columns([1, 3])
    c1.text_input("Run name (optional)", key="launch_name")
    c2.text_area("More fields, one key=value per line (as --set)", key="launch_overrides", height=68,
                 placeholder="model_options.depth=3\nweight_decay=1e-4")
    st.checkbox("Start paused", key="launch_paused")
    st.button("Start", key="launch_start", on_click=cb_launch, type="primary")
    show_flash("launch")
