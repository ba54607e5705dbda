"""The notebook panel: one widget to watch and steer a Trainer from Jupyter.

``panel(tr)`` (or ``tr.panel()``) returns a :class:`Panel`, an ``ipywidgets.VBox`` holding

* controls: lr (log slider + text box), batch size, precision, grad clip, accumulation, weight decay; each
  change goes through ``Trainer.set(..., source="notebook")`` and a refused value is shown in the panel;
* buttons start / pause / resume / step n / stop / save checkpoint, a status line (status, step, epoch,
  samples/s, ETA, losses, health), a progress bar and a request line: each request posted from the panel
  shows as pending at once, then as applied (at which step) or refused (and why) once the trainer decided;
* live plotly FigureWidgets in a two-column grid (see :mod:`.charts`): loss (log y by default, as in the
  dashboard, with a toggle), lr, grad norm, val accuracy,
  a per-layer gradient-norm heatmap and the update/weight ratio per layer, with markers at live changes,
  checkpoints and alerts;
* the diagnosis: open alerts with message, evidence and one button per suggested action, plus dismiss;
* a checkpoint browser (step, monitored metric, tag) with "resume from" and "fork with changes".

Threads: hooks run on the trainer thread and never touch a widget. One poller (:mod:`.poller`) calls
:meth:`Panel.refresh` at most 5 times a second; a refresh that finds nothing new (same step, status,
event count, alerts) returns at once. Each refresh reads the metric store's downsampled series
(:class:`.charts.LiveSource`, an incremental ``chartdata.chart_data``), so its cost does not grow with the
length of the run. Widgets are only created on the caller's thread; the poller only assigns values.

Without a widget frontend (nbconvert to HTML, a plain console) the panel's display bundle also carries a
static version: the shared figures as plotly HTML plus a status text (``static_html``).
"""
from __future__ import annotations

import html
import math
import threading
import time
from typing import Any, Callable

import ipywidgets as widgets

from ..chartdata import chart_data
from ..controls import CONTROLS, SPECS, ControlSpec
from .charts import CHART_WIDTH, LiveCharts, LiveSource, static_figures
from .poller import Poller
from .sections import SEVERITY_COLORS, AlertsBox, CheckpointsBox, _fmt

Trainer = Any  # a workbench.Trainer (not imported: the trainer imports this module for Trainer.panel)
REQUESTS_SHOWN = 3          # requests in the request line (newest first)
STATUS_STYLES = {"running": "info", "paused": "warning", "finished": "success", "stopped": "success",
                 "failed": "danger", "idle": ""}
_WIDE = {"description_width": "initial"}


def _control_widget(spec: ControlSpec, value: Any) -> widgets.Widget:
    """The input of one live control, by its kind (an optional number shows 0 for off)."""
    label = spec.label.lower() + (" (0 = off)" if spec.kind == "optional number" else "")
    if spec.kind == "integer":
        return widgets.IntText(value=value, description=label, tooltip=spec.help, style=_WIDE,
                               layout=widgets.Layout(width="170px"))
    if spec.kind == "choice":
        return widgets.Dropdown(options=spec.choices, value=value, description=label, tooltip=spec.help,
                                style=_WIDE, layout=widgets.Layout(width="170px"))
    return widgets.FloatText(value=value or 0.0, description=label, tooltip=spec.help, style=_WIDE,
                             layout=widgets.Layout(width="200px"))


def _duration(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "-"
    s = int(round(seconds))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def status_text(tr: Trainer, snap: dict[str, Any] | None = None, eta: float | None = None) -> str:
    """One plain-text status line: status, step/total, epoch, samples/s, ETA, losses, health."""
    s = snap or tr.snapshot()
    total = s.get("total_steps")
    ev = s.get("last_eval") or {}
    parts = [s["status"], f"step {s['step']}" + (f"/{total}" if total else ""), f"epoch {s['epoch']}",
             f"{_fmt(s.get('samples_per_s'), ',.0f')} samples/s", f"ETA {_duration(eta)}",
             f"loss {_fmt(s.get('train_loss'))}"]
    if ev:
        parts.append(f"val loss {_fmt(ev.get('val_loss'))}")
        if ev.get("val_acc") is not None and math.isfinite(float(ev.get("val_acc", math.nan))):
            parts.append(f"val acc {float(ev['val_acc']):.3f}")
        for name, value in ev.items():   # perplexity, F1/AUC, the user's own metrics
            if name.startswith("val_") and name not in ("val_loss", "val_acc") and value is not None:
                parts.append(f"{name[4:]} {_fmt(value)}")
    world = int(s.get("world_size") or 1)
    if world > 1:
        c = s.get("controls") or {}
        parts.append(f"effective batch {int(c.get('batch_size', 0)) * int(c.get('accumulate', 1)) * world}")
    if s.get("flop_s"):
        parts.append(f"{s['flop_s'] / 1e9:,.2f} GFLOP/s")
    parts.append(f"health {tr.diagnose()['health']}")
    return " · ".join(parts)


def static_html(tr: Trainer, n_out: int = 500, include_plotlyjs: bool | str = "cdn", log_y: bool = True) -> str:
    """The run as static HTML: a status line, the open alerts and the shared figures (no widgets needed).

    ``include_plotlyjs="cdn"`` loads plotly.js from its CDN when the page is viewed (small output);
    ``True`` embeds it (about 4.5 MB, works offline).
    """
    data = chart_data(tr, n_out=n_out)
    parts = [f"<div><b>Training Workbench</b> — {html.escape(str(tr.run_dir))}<br>"
             f"<code>{html.escape(status_text(tr))}</code></div>"]
    for a in tr.diagnose()["alerts"]:
        parts.append(f"<div style='border-left:4px solid {SEVERITY_COLORS.get(a.severity, '#999')};"
                     f"padding:2px 8px;margin:4px 0'><b>{html.escape(a.severity)} · {html.escape(a.kind)}</b> at "
                     f"step {a.step}: {html.escape(a.message)}<br><small>{html.escape(a.evidence)}</small></div>")
    first = True
    for fig in static_figures(data, log_y=log_y).values():
        parts.append(fig.to_html(full_html=False, include_plotlyjs=include_plotlyjs if first else False))
        first = False
    return "\n".join(parts)


class StaticView:
    """A snapshot of the run that needs no widget frontend: static plotly figures + a status text."""

    def __init__(self, tr: Trainer, include_plotlyjs: bool | str = "cdn") -> None:
        self.trainer, self.include_plotlyjs = tr, include_plotlyjs

    def _repr_html_(self) -> str:
        return static_html(self.trainer, include_plotlyjs=self.include_plotlyjs)

    def __repr__(self) -> str:
        return status_text(self.trainer)


class Panel(widgets.VBox):
    """Controls, live charts, diagnosis and checkpoints of one Trainer (see the module docstring).

    ``poll``: "auto" (an asyncio task in a kernel, else a thread), "asyncio", "thread", or None for no
    poller (call :meth:`refresh` yourself). ``interval``: seconds between polls (0.5 = status at most 2 Hz:
    each poll runs in the kernel's process, so it holds the GIL the training thread needs).
    ``chart_interval``: the poller redraws the charts at most this often (six plotly charts redrawn five
    times a second would keep a browser's main thread busy; the browser also acknowledges each chart
    update, and a chart waits for that before it is sent again; every 2 s, as the dashboard's, keeps what
    the browser and the kernel spend on the panel under a tenth of the run's speed: bench/RESULTS.md, 7b).
    ``n_out``: points per downsampled series (two per pixel of a 480 px chart; each one costs the kernel,
    the comm channel and the browser at every redraw).
    """

    def __init__(self, trainer: Trainer, *, poll: str | None = "auto", interval: float = 0.5,
                 chart_interval: float = 2.0, n_out: int = 1000, log_y: bool = True) -> None:
        self.trainer = trainer
        self.trainers: list[Trainer] = [trainer]     # every run this panel has shown (forks, resumes)
        self.n_out = int(n_out)
        self.chart_interval = float(chart_interval)
        self.chart_redraws = 0
        self._charts_at = -math.inf      # monotonic time of the last chart redraw
        self._charts_stale = False       # new data not drawn yet (held back by chart_interval)
        self.refresh_count = 0
        self.last_refresh_s = math.nan
        self.last_request: Any = None
        self.requests: list[tuple[str, Any, str]] = []   # (what, request, note) in the request line, newest last
        self._requests_shown: tuple = ()
        self.last_error: str | None = None
        self._lock = threading.RLock()
        self._local = threading.local()
        self._key: tuple | None = None
        self._data_key: tuple | None = None
        self._alerts_key: tuple | None = None
        self._ckpt_until = 0.0
        self._ckpt_read = 0.0
        self._ckpt_seen = -1
        self._pending: dict[str, Any] = {}
        self._rate: float | None = None
        self._last_obs: tuple[float, int] | None = None
        self._source = LiveSource(trainer, n_out=self.n_out)
        self._build(log_y)
        self.refresh(force=True)
        self.poller = Poller(self._tick, interval=interval, mode=poll) if poll else None
        if self.poller is not None:
            self.poller.start()

    # ================================================================= building
    def _build(self, log_y: bool) -> None:
        c = self.trainer.controls
        self.title = widgets.HTML()
        self.lr_slider = widgets.FloatLogSlider(value=c.lr, base=10, min=-6, max=1, step=0.05, description="lr",
                                                continuous_update=False, readout_format=".2e", style=_WIDE)
        self.lr_text = widgets.FloatText(value=c.lr, description="", layout=widgets.Layout(width="110px"))
        self.controls: dict[str, widgets.Widget] = {"lr": self.lr_slider}
        for spec in CONTROLS:
            if spec.name != "lr":  # one widget per live control of the engine's list, also an attribute
                self.controls[spec.name] = _control_widget(spec, getattr(c, spec.name))
                setattr(self, spec.name, self.controls[spec.name])
        self.fixed = dict(getattr(self.trainer, "fixed_controls", {}))   # controls this run cannot change
        for name, why in self.fixed.items():
            self.controls[name].tooltip = f"fixed: {why}"
        for name, w in self.controls.items():
            w.observe(self._control_handler(name), names="value")
        self.lr_text.observe(self._control_handler("lr"), names="value")

        self.start_button = self.button("start", "play", self._start, "success")
        self.pause_button = self.button("pause", "pause",
                                        lambda: self._post("pause", self.trainer.pause(source="notebook")))
        self.resume_button = self.button("resume", "play", self._resume)
        self.step_n = widgets.BoundedIntText(value=10, min=1, max=10**9, layout=widgets.Layout(width="80px"))
        self.step_button = self.button("step", "step-forward", self._step)
        self.stop_button = self.button("stop", "stop", lambda: self._post("stop", self.trainer.stop(source="notebook")),
                                  "danger")
        self.save_button = self.button("save checkpoint", "save", self._save)
        self.log_y = widgets.Checkbox(value=log_y, description="log y (loss)", indent=False,
                                      layout=widgets.Layout(width="auto"))
        self.log_y.observe(lambda ch: self._guard("log y", lambda: self.charts.set_log_y(ch["new"])), names="value")

        self.status = widgets.HTML()
        self.progress = widgets.IntProgress(value=0, min=0, max=1, layout=widgets.Layout(width="100%"))
        self.message = widgets.HTML()
        self.request_line = widgets.HTML()

        self.charts = LiveCharts(log_y=log_y, layer_names=list(self._source.names))
        self.figures = self.charts.figs
        # two columns of fixed width (a FigureWidget cannot always measure a grid cell, see charts.CHART_WIDTH);
        # a notebook narrower than two charts scrolls sideways rather than stacking six charts in one column
        grid = widgets.GridBox(list(self.figures.values()),
                               layout=widgets.Layout(grid_template_columns=f"repeat(2, {CHART_WIDTH}px)",
                                                     grid_gap="6px 10px", overflow="auto", width="100%"))

        self.alerts = AlertsBox(self)
        self.alert_slots, self.health, self.diagnosis = self.alerts.slots, self.alerts.health, self.alerts
        self.checkpoint_browser = CheckpointsBox(self)
        cb = self.checkpoint_browser
        self.checkpoint_list, self.fork_changes = cb.list, cb.changes
        self.resume_from_button, self.fork_button = cb.resume_button, cb.fork_button

        buttons = widgets.HBox([self.start_button, self.pause_button, self.resume_button, self.step_button,
                                self.step_n, self.stop_button, self.save_button, self.log_y],
                               layout=widgets.Layout(flex_flow="row wrap"))
        controls = widgets.HBox([self.lr_slider, self.lr_text, *(w for n, w in self.controls.items() if n != "lr")],
                                layout=widgets.Layout(flex_flow="row wrap"))
        super().__init__([self.title, controls, buttons, self.status, self.progress, self.request_line, self.message,
                          grid, self.diagnosis, self.checkpoint_browser])

    def button(self, label: str, icon: str, fn: Callable[[], Any], style: str = "") -> widgets.Button:
        """A button whose click runs ``fn``, an error shown in the panel."""
        b = widgets.Button(description=label, icon=icon, button_style=style, layout=widgets.Layout(width="auto"))
        b.on_click(lambda _b: self._guard(label, fn))
        return b

    # ================================================================= refreshing
    @property
    def _syncing(self) -> bool:
        return getattr(self._local, "on", False)

    def _set_quietly(self, w: widgets.Widget, value: Any) -> None:
        """Set a control's value without sending it to the trainer (it came from the trainer)."""
        if w.value == value:
            return
        self._local.on = True
        try:
            w.value = value
        finally:
            self._local.on = False

    def _change_key(self, tr: Trainer) -> tuple:
        alerts = tr.alerts
        return (id(tr), tr.step_count, tr.status, tr.event_count, len(alerts), sum(a.dismissed for a in alerts),
                tr.last_eval.get("step"))

    def _tick(self) -> None:
        """One poll: refresh when something changed; errors are shown in the panel, never raised."""
        try:
            self.refresh(throttle=True)
        except Exception as e:  # noqa: BLE001 - the poller must keep going
            self._say(f"refresh failed: {type(e).__name__}: {e}", error=True)

    def refresh(self, force: bool = False, throttle: bool = False) -> bool:
        """Read the trainer and update what changed (status, controls, charts, alerts, checkpoints).

        Returns True when something was redrawn. Safe to call from any thread (calls are serialised).
        ``throttle`` (the poller's calls): redraw the charts at most every ``chart_interval`` seconds;
        a direct call redraws them whenever the data changed.
        """
        with self._lock:
            tr = self.trainer
            key = self._change_key(tr)
            charts_due = force or not throttle or time.monotonic() - self._charts_at >= self.chart_interval
            changed = (force or key != self._key or (charts_due and (self._charts_stale or self.charts.pending)))
            if changed:
                t0 = time.perf_counter()
                snap = tr.snapshot()
                self._update_status(tr, snap)
                self._sync_controls(snap["controls"])
                self._update_buttons(snap["status"])
                data_key = key[:4] + key[6:]
                if force or data_key != self._data_key or self._charts_stale or self.charts.pending:
                    if charts_due:
                        self.charts.update(self._source.collect())
                        self._charts_at = time.monotonic()
                        self.chart_redraws += 1
                    self._charts_stale = not charts_due
                    self._data_key = data_key
                report = tr.diagnose()
                alerts_key = (key[0], key[5], tuple(a.id for a in report["alerts"]))
                if force or alerts_key != self._alerts_key:
                    self.alerts.update(report)
                    self._alerts_key = alerts_key
                if self._source.checkpoint_events != self._ckpt_seen:
                    self._ckpt_seen = self._source.checkpoint_events
                    self._ckpt_until = time.monotonic() + 3.0   # its table row lands once the file is written
                self._key = key
                self.refresh_count += 1
                self.last_refresh_s = time.perf_counter() - t0
            self._update_requests()
            now = time.monotonic()
            if force or (now < self._ckpt_until and now - self._ckpt_read >= 0.5):
                self._ckpt_read = now
                self.checkpoint_browser.update(tr)
            return changed

    def _update_status(self, tr: Trainer, snap: dict[str, Any]) -> None:
        now = time.monotonic()
        step, status = int(snap["step"]), snap["status"]
        if self._last_obs is not None and status == "running" and step > self._last_obs[1] and now > self._last_obs[0]:
            inst = (step - self._last_obs[1]) / (now - self._last_obs[0])
            self._rate = inst if self._rate is None else 0.7 * self._rate + 0.3 * inst
        self._last_obs = (now, step)
        total = snap.get("total_steps")
        eta = (total - step) / self._rate if status == "running" and total and self._rate else None
        color = {"running": "#1f77b4", "paused": "#ff7f0e", "failed": "#d62728"}.get(status, "#2ca02c")
        self.status.value = (f"<span style='color:{color};font-weight:bold'>{html.escape(status)}</span> "
                             f"<code>{html.escape(status_text(tr, snap, eta).split(' · ', 1)[1])}</code>")
        self.progress.max = max(1, int(total or step or 1))
        self.progress.value = min(step, self.progress.max)
        self.progress.bar_style = STATUS_STYLES.get(status, "")
        lineage = tr.lineage
        extra = (f" — fork of {html.escape(str(lineage.get('parent_run')))} at step {lineage.get('parent_step')}"
                 if lineage else "")
        self.title.value = f"<b>Training Workbench</b> — <code>{html.escape(str(tr.run_dir))}</code>{extra}"

    def _sync_controls(self, controls: dict[str, Any]) -> None:
        for name, w in self.controls.items():
            req = self._pending.get(name)
            if req is not None and req.status == "pending":
                continue  # the user's value is on its way; do not flip the widget back meanwhile
            self._pending.pop(name, None)
            value = controls.get(name)
            if SPECS[name].kind == "optional number":
                value = value or 0.0
            if name == "lr":
                self._set_quietly(self.lr_text, float(value))
                value = min(max(float(value), 10.0 ** self.lr_slider.min), 10.0 ** self.lr_slider.max)
            self._set_quietly(w, value)

    def _update_buttons(self, status: str) -> None:
        enabled = {"start": status == "idle", "pause": status == "running", "resume": status == "paused",
                   "step": status in ("paused", "idle"), "stop": status in ("running", "paused"),
                   "save": status != "failed"}
        for name, on in enabled.items():
            getattr(self, f"{name}_button").disabled = not on
        ended = status in ("finished", "stopped", "failed")
        for name, w in [*self.controls.items(), ("lr", self.lr_text)]:
            w.disabled = ended or name in self.fixed

    # ================================================================= handlers (main thread)
    def _say(self, text: str, error: bool = False) -> None:
        if error:
            self.last_error = text
        color = "#d62728" if error else "#555"
        self.message.value = f"<span style='color:{color}'>{html.escape(text)}</span>"

    def _guard(self, what: str, fn: Callable[[], Any]) -> Any:
        """Run a handler; show any error in the panel (a ValueError from bad input, a refused action...)."""
        try:
            return fn()
        except Exception as e:  # noqa: BLE001 - never raise into the kernel log from a widget callback
            self._say(f"{what}: {type(e).__name__}: {e}", error=True)
            return None

    def _post(self, what: str, req: Any, note: str = "") -> Any:
        """Show a posted request in the request line (pending now; applied or refused once decided)."""
        with self._lock:
            self.last_request = req
            self.message.value = ""           # an older message would read as this request's
            self.requests = [r for r in self.requests if r[1] is not req][-(REQUESTS_SHOWN - 1):] + [(what, req, note)]
            self._update_requests()
        return req

    def _update_requests(self) -> None:
        """Redraw the request line when one of its requests was decided (the poller calls this each tick)."""
        shown = tuple((id(req), req.status) for _, req, _ in self.requests)
        if shown == self._requests_shown:
            return
        self._requests_shown = shown
        parts = []
        for what, req, note in reversed(self.requests):
            if req.status == "applied":
                text, color = f"{what}: applied at step {req.step}", "#2ca02c"
            elif req.status == "refused":
                text, color = f"{what}: refused — {req.message}", "#d62728"
                if req is self.requests[-1][1]:
                    self.last_error = text
            else:
                text, color = f"{what}: pending (applied at the next step boundary)", "#555"
            text += f" — {note}" if note else ""
            parts.append(f"<span style='color:{color}'>{html.escape(text)}</span>")
        self.request_line.value = " · ".join(parts)

    def _control_handler(self, name: str) -> Callable[[dict], None]:
        def handler(change: dict) -> None:
            if self._syncing:
                return
            self._guard(name, lambda: self._set_control(name, change["new"]))
        return handler

    def _set_control(self, name: str, value: Any) -> None:
        tr = self.trainer
        optional = SPECS[name].kind == "optional number"
        if optional and value == 0:
            value = None
        try:
            req = tr.set(source="notebook", **{name: value})
        except Exception:
            current = tr.controls.state_dict()[name]    # put the widget back to the value in force
            if name == "lr":
                self._set_quietly(self.lr_text, float(current))
                self._set_quietly(self.lr_slider, min(max(float(current), 1e-6), 10.0))
            else:
                self._set_quietly(self.controls[name], 0.0 if optional and current is None else current)
            raise
        self._pending[name] = req
        if name == "lr":  # keep the slider and the text box showing the same lr
            self._set_quietly(self.lr_text, float(value))
            self._set_quietly(self.lr_slider, min(max(float(value), 1e-6), 10.0))
        self._post(f"{name} = {value}", req)

    def _start(self) -> None:
        self.trainer.start()
        self._say("started")
        self.refresh()

    def _step(self) -> None:
        tr = self.trainer
        if tr.status == "running":
            raise RuntimeError("step n runs n steps while paused; press pause first")
        if tr.status == "idle":
            tr.start(paused=True)      # step on a run not started yet: start it paused, then step
        self._post(f"step {self.step_n.value}", tr.step(self.step_n.value, source="notebook"))

    def _resume(self) -> None:
        self._post("resume", self.trainer.resume(source="notebook"))

    def _save(self) -> None:
        path = self.trainer.save_checkpoint(source="notebook", timeout=30.0)
        self._say(f"checkpoint saved: {path}")
        self.refresh()
        self.checkpoint_browser.update(self.trainer)

    # ================================================================= public
    def attach(self, trainer: Trainer) -> None:
        """Show another run in this panel (after resume-from or a fork)."""
        with self._lock:
            self.trainer = trainer
            self._source = LiveSource(trainer, n_out=self.n_out)
            if trainer not in self.trainers:
                self.trainers.append(trainer)
            self._key = self._data_key = self._alerts_key = None
            self._pending.clear()
            self.requests, self._requests_shown = [], ()
            self.request_line.value = ""
            self._rate, self._last_obs, self._ckpt_seen = None, None, -1
            self.checkpoint_browser.reset()
            self.charts.reset(list(self._source.names))
            self.refresh(force=True)

    def redraw(self) -> None:
        """Rewrite every chart from the trainer's current data (no cache), then refresh the rest."""
        with self._lock:
            self._source = LiveSource(self.trainer, n_out=self.n_out)
            self.charts.invalidate()
            self.refresh(force=True)

    def points(self) -> int:
        """Most points in any one chart trace (bounded however long the run)."""
        return self.charts.points()

    def static_html(self, include_plotlyjs: bool | str = "cdn") -> str:
        """The static fallback of this panel (see :func:`static_html`)."""
        return static_html(self.trainer, include_plotlyjs=include_plotlyjs, log_y=self.log_y.value)

    def _repr_mimebundle_(self, **kwargs: Any) -> dict[str, Any]:
        """The widget view, plus static HTML for frontends without widgets (nbconvert to HTML)."""
        bundle = super()._repr_mimebundle_(**kwargs)
        try:
            bundle["text/html"] = self.static_html()
        except Exception as e:  # noqa: BLE001 - the live widget still works without its fallback
            bundle["text/html"] = f"<pre>{html.escape(status_text(self.trainer))}\n(static charts failed: {e})</pre>"
        bundle["text/plain"] = f"Training Workbench panel: {status_text(self.trainer)}"
        return bundle

    def close(self) -> None:
        """Stop the poller and close the widgets."""
        if self.poller is not None:
            self.poller.stop()
        for fig in self.figures.values():
            fig.close()
        super().close()


def panel(trainer: Trainer, *, static: bool = False, **options: Any) -> Panel | StaticView:
    """The notebook panel of a run (``static=True``: a widget-free snapshot; options go to :class:`Panel`)."""
    if static:
        return StaticView(trainer, **options)
    return Panel(trainer, **options)
