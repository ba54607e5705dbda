"""Command-line interface: ``workbench train | resume | sweep | runs | scenarios | dashboard``.

The run/progress/summary logic lives in plain functions that take a ``Trainer`` (``run_trainer``,
``summary``) so tests and scripts can call them without going through argparse. The main thread only
ever reads ``trainer.snapshot()`` and the alerts; the model is
touched by the trainer thread alone.
"""
from __future__ import annotations

import argparse
import math
import os
import shlex
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, Sequence, TextIO

import pandas as pd
import yaml

from .version import __version__
from .config import TrainConfig, parse_override
from .rundir import list_runs
from .trainer import Trainer, TrainingFailed

POLL_SECONDS = 0.2  # ~5 snapshots a second
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_DIVERGED, EXIT_INTERRUPTED = 0, 1, 2, 3, 130


_sleep = time.sleep  # the polling pause (tests replace it to simulate Ctrl-C)


class UsageError(ValueError):
    """A bad command line or config (exit code 2)."""


# ============================================================================ config
def build_config(config_path: str | None = None, overrides: Sequence[str] = (), *, run_dir: str | None = None,
                 runs_root: str | None = None, scenario: str | None = None) -> TrainConfig:
    """The run's config: the YAML file (or the defaults), then each ``key=value`` override, then the paths.

    Overrides are merged first and validated together, so their order never matters. A dotted key
    (``model_options.depth=3``) updates one entry of a mapping field. Raises ValueError/TypeError.
    """
    if scenario is not None and config_path:
        raise UsageError("train: give either --scenario or --config, not both")
    if scenario is not None:
        from .scenarios import scenario_config

        base = scenario_config(scenario)
    else:
        base = TrainConfig.from_yaml(config_path) if config_path else TrainConfig()
    values = base.to_dict()
    fields = TrainConfig.field_names()
    for text in overrides:
        key, value = parse_override(text)
        if key not in fields:
            raise UsageError(f"--set {text!r}: unknown key {key!r}; valid keys: {', '.join(fields)}")
        if "." in text.partition("=")[0]:
            current = values[key]
            if not isinstance(current, dict):
                mappings = [f for f in fields if isinstance(values[f], dict)]
                raise UsageError(f"--set {text!r}: {key!r} is not a mapping, so it takes no dotted key; "
                                 f"dotted keys work for: {', '.join(mappings)}")
            values[key] = {**current, **value}
        else:
            values[key] = value
    if run_dir is not None:
        values["run_dir"] = run_dir
    if runs_root is not None:
        values["runs_root"] = runs_root
    return TrainConfig.from_dict(values)


# ============================================================================ progress and summary
def _finite(x: Any) -> float | None:
    """``x`` as a float when it is a finite number, else None."""
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def _postfix(snap: dict[str, Any]) -> dict[str, str]:
    """The progress bar's postfix: loss, the lr of the last step, samples/s, FLOP/s (those known so far); the bar
    itself shows the time left to the planned end."""
    out: dict[str, str] = {}
    loss, lr, sps = _finite(snap.get("train_loss")), _finite(snap.get("lr")), _finite(snap.get("samples_per_s"))
    if loss is not None:
        out["loss"] = f"{loss:.4f}"
    if lr is not None:
        out["lr"] = f"{lr:.2e}"
    if sps is not None:
        out["samples/s"] = f"{sps:,.0f}"
    flop_s = _finite(snap.get("flop_s"))
    if flop_s is not None:  # a Transformer-like model's 6·N·D estimate (workbench.cost)
        out["FLOP/s"] = f"{flop_s:.2e}"
    return out


def _quote(path: Any) -> str:
    return shlex.quote(str(path))


def diverged(trainer: Trainer) -> Any:
    """The divergence alert a run ended with (open, not dismissed), or None: a run that a divergence policy
    paused or stopped, or that kept training with its loss blown up, ended diverged whatever its status."""
    return next((a for a in reversed(trainer.alerts) if a.kind == "divergence" and a.open), None)


def summary(trainer: Trainer, error: str | None = None) -> str:
    """One paragraph on how the run ended: status (diverged, where it did), steps, losses, run dir, and the
    resume/TensorBoard commands."""
    snap = trainer.snapshot()
    status, step = snap["status"], snap["step"]
    total = snap.get("total_steps")
    div = diverged(trainer) if status != "failed" else None
    where = f"at step {step}" + (f" of {total}" if total else "")
    parts = [f"Run diverged at step {div.step} ({status} {where}, epoch {snap['epoch']})." if div is not None
             else f"Run {status} {where} (epoch {snap['epoch']})."]
    if error:
        parts.append(f"Error: {error}.")
    loss = _finite(snap.get("train_loss"))
    if loss is not None:
        parts.append(f"Final train loss {loss:.4f}.")
    evals = trainer.evals
    if len(evals):
        vl = evals.dropna(subset=["val_loss"])
        if len(vl):
            best = vl.loc[vl["val_loss"].idxmin()]
            parts.append(f"Best val loss {best['val_loss']:.4f} (step {int(best['step'])}).")
        va = evals.dropna(subset=["val_acc"])
        if len(va):
            best = va.loc[va["val_acc"].idxmax()]
            parts.append(f"Best val acc {best['val_acc']:.2%} (step {int(best['step'])}).")
    run_dir = trainer.run_dir
    parts.append(f"Run dir: {run_dir}.")
    if status == "failed":
        parts.append(f"The traceback is in the run's event log ({run_dir / 'run.db'}).")
    parts.append(f"Resume with `workbench resume {_quote(run_dir)}`; "
                 f"look at it in the dashboard with `workbench dashboard --runs {_quote(run_dir.parent)}`; "
                 f"open TensorBoard with `tensorboard --logdir {_quote(run_dir / 'tb')}`.")
    return " ".join(parts)


def _failure_message(e: TrainingFailed, trainer: Trainer) -> str:
    """The user's error without the traceback (that one is in the event log)."""
    cause = e.__cause__
    if cause is not None:
        return f"{type(cause).__name__}: {cause}"
    return str(e).split("\n", 1)[0]


def run_trainer(trainer: Trainer, *, progress: bool = True, out: TextIO | None = None, err: TextIO | None = None,
                poll: float = POLL_SECONDS) -> int:
    """Start ``trainer`` (unless started), show progress on ``err`` until it ends, print the summary on ``out``.

    Ctrl-C asks the trainer to stop cleanly (it saves a checkpoint) and waits for it; a second Ctrl-C
    gives up waiting. Returns the exit code: 0 finished/stopped, 1 failed, 3 diverged (the run ended with an
    open divergence alert, whatever stopped it), 130 abandoned.
    """
    from tqdm import tqdm

    out = out if out is not None else sys.stdout
    err = err if err is not None else sys.stderr
    if not trainer.is_alive and trainer.status == "idle":
        trainer.start()
    snap = trainer.snapshot()
    bar = tqdm(total=snap.get("total_steps"), initial=snap["step"], unit="step", file=err, dynamic_ncols=True,
               disable=not progress, leave=True)

    def refresh() -> None:
        s = trainer.snapshot()
        if s.get("total_steps") != bar.total:
            bar.total = s.get("total_steps")
        if s["step"] > bar.n:
            bar.update(s["step"] - bar.n)
        bar.set_description("paused" if s["status"] == "paused" else "", refresh=False)
        bar.set_postfix(_postfix(s), refresh=False)
        bar.refresh()

    interrupted = False
    shown: set[int] = set()
    stopping: list[int] = []

    def report_alerts() -> None:
        """Print each new alert above the bar; a run paused by the divergence policy is stopped (no live
        controls here: use on_divergence=rollback to recover automatically)."""
        for a in trainer.alerts:
            if a.id not in shown:
                shown.add(a.id)
                bar.write(f"[{a.severity}] {a.kind} at step {a.step}: {a.message}\n    evidence: {a.evidence}",
                          file=err)
        if trainer.paused_by_policy and not stopping:
            stopping.append(trainer.step_count)
            bar.write("The divergence policy paused the run; stopping it here (set on_divergence=rollback to roll "
                      "back and lower the lr automatically).", file=err)
            trainer.stop(source="cli")

    # The first Ctrl-C only sets a flag, read between two polls: raised as KeyboardInterrupt it could land
    # inside the progress bar's lock, and the bar would then wait for itself while the run stopped.
    ctrl_c: list[float] = []

    def on_sigint(signum: int, frame: Any) -> None:
        ctrl_c.append(time.monotonic())
        if len(ctrl_c) > 1:
            raise KeyboardInterrupt  # the second one: stop waiting

    terminated: list[int] = []

    def on_sigterm(signum: int, frame: Any) -> None:
        # what schedulers, container runtimes and `kill` send: stop at the next boundary with a checkpoint, as
        # the first Ctrl-C does (never the second: a grace period ends in SIGKILL anyway)
        if not ctrl_c:
            ctrl_c.append(time.monotonic())
            terminated.append(signum)

    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGINT, on_sigint) if main_thread else None
    previous_term = signal.signal(signal.SIGTERM, on_sigterm) if main_thread else None
    try:
        try:
            while trainer.is_alive and not ctrl_c:
                refresh()
                report_alerts()
                _sleep(poll)
        except KeyboardInterrupt:
            ctrl_c.append(time.monotonic())
        if ctrl_c and trainer.is_alive:
            interrupted = True
            trainer.stop(source="cli")
            print(f"\n{'SIGTERM' if terminated else 'Ctrl-C'}: stopping after the current step and saving a "
                  f"checkpoint (press Ctrl-C again to quit without waiting)...", file=err, flush=True)
            try:
                while trainer.is_alive:
                    _sleep(poll)
            except KeyboardInterrupt:
                print(f"Quit without waiting; the newest complete checkpoint is in {trainer.checkpoint_dir}. "
                      f"Resume with: workbench resume {_quote(trainer.run_dir)}", file=err, flush=True)
                return EXIT_INTERRUPTED
        refresh()
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
        if previous_term is not None:
            signal.signal(signal.SIGTERM, previous_term)
        bar.close()

    try:
        status = trainer.join()
    except TrainingFailed as e:
        msg = _failure_message(e, trainer)
        print(f"error: training failed: {msg}", file=err, flush=True)
        print(summary(trainer, error=msg), file=out, flush=True)
        return EXIT_FAILED
    if interrupted and status == "stopped":
        print(f"Run stopped at step {trainer.step_count}. Resume it with: workbench resume {_quote(trainer.run_dir)}",
              file=err, flush=True)
    print(summary(trainer), file=out, flush=True)
    if diverged(trainer) is not None:
        return EXIT_DIVERGED
    return EXIT_OK if status in ("finished", "stopped") else EXIT_FAILED


# ============================================================================ runs table
def runs_table(root: str = "runs") -> str:
    """The runs under ``root`` as a text table (run, status, step, best val loss, started), or a 'no runs' line."""
    df = list_runs(root)
    if df.empty:
        return f"no runs under {root}"
    started = [time.strftime("%Y-%m-%d %H:%M", time.localtime(t)) if _finite(t) is not None else "-"
               for t in df["started"]]
    table = pd.DataFrame({
        "run": df["run"],
        "status": df["status"],
        "step": ["-" if pd.isna(s) else str(int(s)) for s in df["step"]],
        "best val loss": [f"{v:.4f}" if _finite(v) is not None else "-" for v in df["best_val_loss"]],
        "started": started,
    })
    return table.to_string(index=False)


# ============================================================================ argparse
def build_parser() -> argparse.ArgumentParser:
    """The ``workbench`` argument parser."""
    parser = argparse.ArgumentParser(prog="workbench", description="Training Workbench: train a PyTorch model and "
                                                                   "see and steer the run while it happens.")
    parser.add_argument("--version", action="version", version=f"workbench {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    train = sub.add_parser("train", help="start a new run", description="Start a new training run.")
    train.add_argument("--config", metavar="FILE", help="YAML file of config fields (default: the built-in defaults)")
    train.add_argument("--scenario", metavar="NAME", help="start from a teaching scenario's config "
                                                          "(see `workbench scenarios`)")
    train.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config field (repeatable); the value is YAML, e.g. lr=3e-4, "
                            "max_steps=null, model_options.depth=3")
    train.add_argument("--run-dir", metavar="DIR", help="write the run into DIR (default: a new folder under --runs)")
    train.add_argument("--runs", metavar="ROOT", help="folder for new run directories (default: the config's runs_root)")
    train.add_argument("--no-progress", action="store_true", help="do not show the progress bar")

    resume = sub.add_parser("resume", help="continue a run from its newest checkpoint",
                            description="Continue a run from its newest intact checkpoint, in the same directory.")
    resume.add_argument("run_dir", metavar="DIR", help="the run directory (or a checkpoint file)")
    resume.add_argument("--no-progress", action="store_true", help="do not show the progress bar")

    sweep = sub.add_parser("sweep", help="search hyperparameters with Optuna (each trial a run)",
                           description="Run Optuna trials of a config; each trial is a run directory under the sweep "
                                       "directory, pruned by the median pruner and on divergence.")
    sweep.add_argument("--config", metavar="FILE", help="YAML file of config fields (default: the built-in defaults)")
    sweep.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config field (repeatable)")
    sweep.add_argument("--trials", type=int, required=True, metavar="N", help="trials this process runs")
    sweep.add_argument("--space", metavar="FILE", help="YAML search space (default: lr, batch_size, weight_decay)")
    sweep.add_argument("--sampler", default="tpe", choices=["tpe", "random", "grid"], help="default: tpe")
    sweep.add_argument("--storage", metavar="URL", help="Optuna RDB URL shared by several sweep processes "
                                                        "(default: sqlite under the sweep directory)")
    sweep.add_argument("--sweep-dir", metavar="DIR", help="folder of the trials' runs (default: RUNS/sweep-NAME)")
    sweep.add_argument("--study", metavar="NAME", help="study name (default: the config's name, or 'sweep')")
    sweep.add_argument("--seed", type=int, default=None, help="the sampler's seed")

    sub.add_parser("scenarios", help="list the teaching scenarios",
                   description="List the teaching scenarios: what each shows and which alert it should raise.")

    runs = sub.add_parser("runs", help="list runs", description="List the runs under a folder, newest first.")
    runs.add_argument("root", nargs="?", default="runs", metavar="ROOT", help="folder holding run directories "
                                                                              "(default: runs)")

    dash = sub.add_parser("dashboard", help="open the Streamlit dashboard",
                          description="Start the Streamlit dashboard (app/dashboard.py) on 127.0.0.1.")
    dash.add_argument("--runs", default="runs", metavar="ROOT", help="folder holding run directories (default: runs)")
    dash.add_argument("--port", type=int, default=None, metavar="P", help="port (default: 8501, or the next free one)")
    dash.add_argument("--address", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    dash.add_argument("--demo", action="store_true", help="start the demo run (configs/demo.yaml) on launch")
    dash.add_argument("--allow", action="append", default=[], metavar="DIR",
                      help="a folder (besides --runs and the app's configs/) whose files the page may read or "
                           "write: YAML configs, CSV data, runs folders (repeatable)")
    return parser


def dashboard_argv(args: argparse.Namespace) -> list[str]:
    """The ``streamlit run app/dashboard.py ...`` command line for ``workbench dashboard`` (app found next to
    the package, i.e. in the source checkout it is installed from)."""
    import socket

    app = Path(__file__).resolve().parents[1] / "app" / "dashboard.py"
    if not app.is_file():
        raise UsageError(f"dashboard: {app} not found; the dashboard runs from a source checkout of the workbench")
    port = args.port
    if port is None:
        for port in range(8501, 8601):
            with socket.socket() as s:
                if s.connect_ex((args.address, port)) != 0:
                    break
    # Only this machine's names may open the page's WebSocket (a DNS-rebinding site cannot: its Host is its own),
    # only pages of this origin (CORS), and every form post carries the XSRF token.
    hosts = ["localhost", "127.0.0.1", "[::1]", "::1"]
    if args.address not in ("0.0.0.0", "::", "") and args.address not in hosts:
        hosts.append(args.address)
    argv = [sys.executable, "-m", "streamlit", "run", str(app), "--server.address", args.address,
            "--server.port", str(port), "--server.headless", "true", "--browser.gatherUsageStats", "false",
            "--client.toolbarMode", "viewer", "--server.enableXsrfProtection", "true", "--server.enableCORS", "true"]
    for host in hosts:
        argv += ["--server.allowedHosts", host]
    argv += ["--", "--runs", str(Path(args.runs).expanduser().resolve())]
    for folder in getattr(args, "allow", None) or []:
        argv += ["--allow", str(Path(folder).expanduser().resolve())]
    return argv + (["--demo"] if args.demo else [])


def _cmd_train(args: argparse.Namespace) -> Trainer:
    cfg = build_config(args.config, args.overrides, run_dir=args.run_dir, runs_root=args.runs,
                       scenario=args.scenario)
    if args.scenario:
        from .scenarios import get

        sc = get(args.scenario)
        print(f"Scenario {sc.name}: {sc.title}.\nWatch for: {sc.watch}"
              + (f"\nExpected alert: {sc.expect}." if sc.expect else "\nExpected: no warnings."), file=sys.stderr)
    return Trainer(cfg)


def scenarios_table() -> str:
    """The teaching scenarios as text: name, expected alert, title."""
    from .scenarios import SCENARIOS

    rows = [f"{s.name:22s} {s.expect or '(healthy)':22s} {s.title}" for s in SCENARIOS.values()]
    return "\n".join([f"{'scenario':22s} {'expected alert':22s} what it shows"] + rows)


def _cmd_resume(args: argparse.Namespace) -> Trainer:
    path = Path(args.run_dir)
    if not path.exists():
        raise UsageError(f"resume: got {args.run_dir!r}, which does not exist; allowed: a run directory "
                         f"(see `workbench runs`) or a checkpoint file")
    return Trainer.from_checkpoint(path)


def _cmd_sweep(args: argparse.Namespace) -> int:
    from .sweep import load_space, run_sweep, trials_table

    try:
        if args.trials < 1:
            raise UsageError(f"--trials: got {args.trials}; allowed: 1 or more")
        cfg = build_config(args.config, args.overrides)
        study = run_sweep(cfg, args.trials, sweep_dir=args.sweep_dir, storage=args.storage,
                          space=load_space(args.space), sampler=args.sampler, study_name=args.study, seed=args.seed)
    except (ValueError, TypeError, yaml.YAMLError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    table = trials_table(study)
    print(table.to_string(index=False))
    done = [t for t in study.trials if t.value is not None]
    if done:
        best = study.best_trial
        print(f"Best trial {best.number}: {cfg.monitor} {best.value:.4f} with {best.params} "
              f"(run {best.user_attrs.get('run_dir')}). Watch it with `workbench dashboard --runs "
              f"{_quote(study.user_attrs.get('sweep_dir', '.'))}`.")
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``workbench`` command; returns the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, --version, usage errors: argparse has printed its message
        return e.code if isinstance(e.code, int) else (0 if e.code is None else EXIT_USAGE)
    if args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    if args.command == "runs":
        print(runs_table(args.root))
        return EXIT_OK
    if args.command == "scenarios":
        print(scenarios_table())
        return EXIT_OK
    if args.command == "dashboard":
        try:
            argv = dashboard_argv(args)
        except UsageError as e:
            print(f"error: {e}", file=sys.stderr)
            return EXIT_USAGE
        print(f"Training Workbench dashboard on http://{args.address}:{argv[argv.index('--server.port') + 1]} "
              f"(runs: {argv[argv.index('--runs') + 1]}); Ctrl-C to quit.", file=sys.stderr, flush=True)
        os.execv(argv[0], argv)
    if args.command == "sweep":
        return _cmd_sweep(args)
    try:
        trainer = _cmd_train(args) if args.command == "train" else _cmd_resume(args)
    except (ValueError, TypeError, yaml.YAMLError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except FileNotFoundError as e:
        print(f"error: {e.filename or e}: file not found", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("interrupted before the run started", file=sys.stderr)
        return EXIT_INTERRUPTED
    from .distributed import rank

    quiet = rank() > 0  # under torchrun, rank 0 speaks for the run (its directory); the others train quietly
    return run_trainer(trainer, progress=not (args.no_progress or quiet), out=open(os.devnull, "w") if quiet else None)


if __name__ == "__main__":
    raise SystemExit(main())
