"""The training loop: what the trainer thread does, from the first step to the last.

``Loop.run`` is the thread: a look at the data, then turns until the run ends. Between two turns,
``boundary`` applies the queued requests (workbench.requests) and waits while the run is paused. One turn,
in causal order, is ``Loop.turn``:

    lr        every param group's learning rate for this step (workbench.optim)
    batches   the step's micro-batches from the data source (workbench.loaders), on the device
    step      workbench.step.train_step: forward/backward, unscale, grad norm, clip, step, zero; the
              user's LR scheduler steps after it
    record    the step's values queued on the device; read back every ``sync_every`` steps
    evaluate  every ``eval_every`` steps: val loss/acc, plateau schedule, early stopping, best checkpoint
    save      every ``checkpoint_every`` steps (copied on this thread, written by another)
    watch     the detectors, at read-back boundaries; a good state for rollback when due
"""
from __future__ import annotations

import math
import threading
import time
import traceback
import warnings
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch

from . import cputhreads
from .checkpointing import finite_params
from .controls import CONTROL_NAMES, CONTROLS, SPECS, same_value
from .hooks import HookContext, frozen
from .requests import ACTIONS, ENDED, SOURCES, Request, RequestQueue, make_request
from .runlog import PRECISION_CODES
from .loaders import eval_batches
from .step import AMP_DTYPES, evaluate, train_step


class Loop:
    """The trainer thread's side of a run (``tr``: its Trainer, whose parts it drives)."""

    def __init__(self, tr: Any) -> None:
        self.tr = tr
        self.step_count = 0            # optimizer steps completed
        self.status = "idle"
        self.paused = False
        self.paused_by: str | None = None   # the source of the pause in force
        self.requests = RequestQueue()
        self.thread: threading.Thread | None = None
        self.error: BaseException | None = None
        self.traceback: str | None = None
        self.failed_in = ""                # where the user's code raised: "step N" or "the evaluation after step N"
        self._evaluating = False
        self.default_threads: int | None = None   # the intra-op count of the thread that started the run
        self.steps_allowed, self._step_requests = 0, []
        self._stop: Request | None = None
        self._last_time: float | None = None
        self._sync_every = 1 if tr.device.type == "cpu" else tr.cfg.sync_every
        self._is_matrix = np.asarray([q.dim() >= 2 for q in tr.params])
        self._layer_scratch: list[torch.Tensor] = []   # pre-step parameter copy for layer stats, reused
        self._n_params = sum(q.numel() for q in tr.params)

    # ================================================================= the thread
    def run(self) -> None:
        tr = self.tr
        self.set_status("paused" if self.paused else "running", "api")
        if tr.device.type == "cpu":
            self.choose_threads(log=True)
        reason, source = "finished", "api"
        try:
            tr.watch.preflight(tr.source.dataset, tr.val_data if tr.val_fetcher is not None else None, tr.task)
            while self.boundary():
                if self.done() or self.turn():
                    break
            else:
                reason, source = "stopped", self._stop.source
            tr.runlog.flush()
            last_eval = tr.runlog.evals_store.last()
            if reason == "finished" and tr.val_data is not None and last_eval is not None \
                    and int(last_eval["step"]) != self.step_count:
                self.evaluate()
            tr.checkpointer.save(tag=None, reason=reason, source=source)
            tr.checkpointer.wait()
            if self._stop is not None:
                self._stop.resolve("applied", self.step_count)
        except BaseException as e:  # noqa: BLE001 - user code may raise anything; it ends the run as failed
            self.error, self.traceback, reason = e, traceback.format_exc(), "failed"
            self.failed_in = (f"the evaluation after step {self.step_count}" if self._evaluating
                              else f"step {self.step_count + 1}")
            self.log_event("error", "trainer", {"error": f"{type(e).__name__}: {e}", "traceback": self.traceback})
        finally:
            self._wind_down(reason)
            if tr.dist:
                tr.dist.end(tr.run_dir)

    def turn(self) -> bool:
        """One training turn, in causal order; True when the run should finish now."""
        tr = self.tr
        cfg, c, log = tr.cfg, tr.controls, tr.runlog
        lr = tr.lr_control.before_step(self.step_count, c.lr)          # lr
        epoch, src = tr.epoch, tr.source
        micro, ids = [], []                                             # batches
        for _ in range(c.accumulate):
            got = src.next(c.batch_size)
            if got is None:
                break  # a loader's last epoch is over
            micro.append(got[0])
            ids.append(got[1])
            if src.epoch_done:
                break  # one optimizer step never crosses an epoch boundary
        if not micro:
            return True
        stats = cfg.layer_every > 0 and (self.step_count + 1) % cfg.layer_every == 0
        result = train_step(tr.train_model, tr.optimizer, tr.contract, micro, params=tr.params,  # step
                            device_type=tr.device.type, amp_dtype=AMP_DTYPES[c.precision],
                            scaler=tr.scaler.scaler, grad_clip=c.grad_clip, layer_stats=stats,
                            scratch=self._layer_scratch)
        tr.lr_control.after_step()
        if tr.dist:  # the log, the detectors and the policy read the mean over ranks, the same on every rank
            result.loss, result.samples = tr.dist.mean(result.loss), result.samples * tr.dist.world
        self.step_count = step = self.step_count + 1
        now = time.perf_counter()                                       # record
        sps = result.samples / (now - self._last_time) if self._last_time is not None else math.nan
        self._last_time = now
        queued = log.queue_step((step, epoch, result.loss, lr, c.batch_size, PRECISION_CODES[c.precision],
                                 result.grad_norm, sps, time.time()))
        if stats:
            log.record_layers(step, result.layer_grad_norms, result.layer_param_norms, result.layer_update_norms,
                              self._is_matrix)
        if queued >= self._sync_every:
            log.flush()
        if tr.hooks.has("step_end"):
            sample_ids = tuple(torch.cat(ids).tolist()) if ids[0] is not None else None
            log.flush()
            tr.hooks.fire("step_end", lambda: self.context("step_end", log.steps.last() or {}, sample_ids=sample_ids))
        self._count_requested_steps(step)
        tr.watch.tick(step)
        finish = busy = False
        if tr.val_data is not None and ((cfg.eval_every and step % cfg.eval_every == 0)  # evaluate
                                        or (not cfg.eval_every and src.epoch_done)):
            finish, busy = self.evaluate(), True
        if cfg.checkpoint_every and step % cfg.checkpoint_every == 0:  # save
            tr.checkpointer.save(tag=None, reason="periodic", source="trainer",
                                 checked=finite_params(log.latest_layers, step, tr.params))
            busy = True
        tr.watch.check_if_due(busy)                                     # watch
        if cfg.on_divergence == "rollback" and step % cfg.good_state_every == 0:
            last = log.steps.last()
            tr.good_states.keep(step, None if last is None or tr.watch.divergence_open() else last["train_loss"])
        return finish

    def evaluate(self) -> bool:
        """Run validation; update plateau schedule, early stopping, best-k. True when patience ran out."""
        tr = self.tr
        tr.runlog.flush()
        self._evaluating = True  # left set if the user's code raises: the failure is named as the evaluation's
        batches = eval_batches(tr.val_data, tr.device, tr.cfg.eval_batch_size, tr.collate_fn, tr.val_fetcher)
        loss, acc, extra = evaluate(tr.model, tr.contract, batches, tr.eval_metrics, device=tr.device,
                                    amp_dtype=AMP_DTYPES[tr.controls.precision])
        self._evaluating = False
        tr.runlog.record_eval(self.step_count, loss, acc, extra)
        tr.eval_metrics.check_measured(tr.cfg.monitor, tr.last_eval)
        metric = tr.last_eval.get(tr.cfg.monitor, math.nan)
        changed = tr.lr_control.observe(metric)
        if changed:
            self.log_event("schedule", "trainer", changed)
        early = tr.early_stopping
        improved = early.improved(metric)
        patience_out = early.update(metric, self.step_count)
        if improved and tr.cfg.keep_best > 0:
            tr.checkpointer.save(tag="best", reason="best", source="trainer", metric=metric)
        tr.hooks.fire("eval_end", lambda: self.context("eval_end", tr.last_eval))
        tr.watch.check(after_eval=True)
        if patience_out:
            self.log_event("early_stop", "trainer", {"monitor": tr.cfg.monitor, "best": early.best,
                                                     "best_step": early.best_step,
                                                     "patience": tr.cfg.early_stopping_patience})
        return patience_out

    def done(self) -> bool:
        cfg, sampler = self.tr.cfg, self.tr.source
        if cfg.max_steps is not None and self.step_count >= cfg.max_steps:
            return True
        return cfg.max_epochs is not None and sampler.epoch_done and sampler.epoch + 1 >= cfg.max_epochs

    # ================================================================= the boundary: requests
    def post(self, req: Request) -> Request:
        """Queue a checked request for the next boundary. With no loop to apply it (the run has not started,
        or has ended), an action allowed then (a checkpoint) takes effect at once on the caller's thread."""
        after_end = ACTIONS[req.action].after_end
        if self.status in ENDED and not after_end:
            req.resolve("refused", self.step_count, f"the run has ended (status {self.status}); fork() it to "
                                                    f"continue with other controls")
            return req
        if after_end and (self.thread is None or self.status in ENDED):
            if self.thread is not None:
                self.thread.join()  # the loop is winding down: let it finish its own last writes first
            self._apply(req)
            self.tr.checkpointer.wait()
            self.tr.runlog.recorder.flush()  # no loop left to write what the action logged
            return req
        return self.requests.put(req)

    def boundary(self) -> bool:
        """Apply queued requests; block while paused. False when the run must stop."""
        while True:
            self.tr.checkpointer.check()  # a save the disk could not take ends the run (raised here: failed)
            self.tr.runlog.recorder.check()
            for req in self._boundary_requests():
                self._apply(req)
            if self._stop is not None:
                return False
            if not self.paused or self.steps_allowed > 0:
                return True
            self.tr.runlog.flush()
            self._last_time = None  # samples/s restarts after a pause
            if self.tr.device.type == "cpu":
                cputhreads.release_idle_workers()  # idle: leave the cores to the thread that steers us
            self.requests.wait(0.2)

    def _boundary_requests(self) -> list[Request]:
        """The requests this boundary applies: the queue's; under torchrun, rank 0's on every rank."""
        reqs = []
        while self.requests:
            reqs.append(self.requests.pop())
        dist = self.tr.dist
        return dist.share(reqs, lambda r, why: r.resolve("refused", self.step_count, why)) if dist else reqs

    def _apply(self, req: Request) -> None:
        """The one place where requests take effect (trainer thread, between steps)."""
        try:
            out = ACTIONS[req.action].apply(self, req)
            if out is not None:
                message, step, result = out
                req.resolve("applied", step, message, result=result)
        except Exception as e:  # noqa: BLE001 - a refused request never harms the run
            req.resolve("refused", self.step_count + 1, f"{type(e).__name__}: {e}")
            self.log_event("refused", req.source, {"action": req.action, "args": req.args, "reason": str(e)},
                           step=self.step_count + 1)

    def inbox_request(self, item: dict) -> None:
        """A request from another process (recorder thread): checked as this process's are, then queued, or
        refused; its outcome is written back to the SQLite inbox."""
        outcomes, source = self.tr.runlog.recorder.outcomes, item.get("source", "dashboard")
        try:
            req = make_request(item.get("action", "set"), item.get("controls"), self.facts, source)
        except (ValueError, TypeError) as e:
            outcomes.append((item["id"], "refused", self.step_count, str(e)))
            self.log_event("refused", source if source in SOURCES else "dashboard",
                           {"action": item.get("action"), "args": item.get("controls"), "reason": str(e)})
            return
        req.inbox_id, req.on_done = item["id"], lambda r: outcomes.append((item["id"], r.status, r.step, r.message))
        self.post(req)

    # what the request handlers and the divergence policy do (requests.Boundary, watch.Policed)
    @property
    def facts(self) -> Any:
        return self.tr.facts

    def apply_controls(self, new: Mapping[str, Any], source: str) -> dict[str, tuple[Any, Any]]:
        """Apply checked controls; log and return {field: (old, new)} for what actually changed."""
        tr = self.tr
        c, changes = tr.controls, {}
        for name in CONTROL_NAMES:
            if name in new and not same_value(getattr(c, name), new[name]):
                changes[name] = (getattr(c, name), new[name])
        if "batch_size" in changes and tr.cfg.linear_scaling and "lr" not in changes:
            old_bs, new_bs = changes["batch_size"]
            changes["lr"] = (c.lr, c.lr * new_bs / old_bs)  # Goyal et al. 2017: lr proportional to batch size
        for name, (_, value) in changes.items():
            setattr(c, name, value)
            if SPECS[name].apply is not None:
                SPECS[name].apply(tr, value)
        if changes and tr.device.type == "cpu" and threading.current_thread() is self.thread:
            self.choose_threads()  # the thread count follows the work of a step (batch size)
        for name, (old, value) in changes.items():
            self.log_event("control", source, {"field": name, "old": old, "new": value}, step=self.step_count + 1)
        if changes:
            tr.runlog.recorder.meta.append({"controls": c.state_dict(), "total_steps": tr.planned_steps})
        return changes

    def hold(self, paused: bool, source: str) -> None:
        """Pause (or resume) at this boundary; a step(n) in progress is cancelled."""
        if self.paused != paused:
            self.paused, self.steps_allowed = paused, 0
            self.paused_by = source if paused else None
            self.set_status("paused" if paused else "running", source)

    def allow_steps(self, req: Request) -> None:
        self.steps_allowed += req.args["n"]
        self._step_requests.append(req)
        self.log_event("command", req.source, {"action": "step", "n": req.args["n"]}, step=self.step_count + 1)

    def _count_requested_steps(self, step: int) -> None:
        if self.steps_allowed > 0:
            self.steps_allowed -= 1
            if self.steps_allowed == 0:
                self.tr.runlog.flush()
                for r in self._step_requests:
                    r.resolve("applied", step)
                self._step_requests = []

    def request_stop(self, req: Request) -> None:
        self._stop = req
        self.log_event("command", req.source, {"action": "stop"})

    def stop_by_policy(self) -> bool:
        """The divergence policy ends the run; False when a stop is already on its way."""
        if self._stop is not None:
            return False
        self._stop = Request("stop", source="policy")
        return True

    def save_now(self, tag: str, source: str) -> Path | None:
        return self.tr.checkpointer.save(tag=tag, reason="manual", source=source)

    def rollback(self, source: str, lr: float | None) -> bool:
        return self.tr.good_states.rollback(self.step_count, source, lr)

    @property
    def rollbacks(self) -> int:
        return self.tr.good_states.rollbacks

    def dismiss_alert(self, alert_id: int, source: str) -> None:
        self.tr.watch.dismiss(alert_id, source)

    # ================================================================= helpers
    def _wind_down(self, reason: str) -> None:
        tr = self.tr
        if reason == "failed":
            tr.run_lock.free_reserve()  # room for the run's last rows and status if the disk is full
        for wind in (tr.checkpointer.wait, tr.checkpointer.writer.close, tr.runlog.flush):  # close: the kept buffers
            try:
                wind()
            except BaseException:  # noqa: BLE001 - already failing; keep the first error
                pass
        why = f"the run ended ({reason})"
        self.requests.refuse_all(self.step_count, why)
        for r in self._step_requests:
            r.resolve("refused", self.step_count, why)
        if tr.device.type == "cpu" and self.default_threads:
            torch.set_num_threads(self.default_threads)  # threads started later begin with this count
        self.set_status(reason, "trainer")
        try:
            tr.runlog.recorder.close()
        except Exception as e:  # noqa: BLE001 - the disk refuses even the last rows: say so, end anyway
            warnings.warn(f"{tr.run_dir}: the run's last records could not be written ({type(e).__name__}: {e})",
                          stacklevel=1)
        finally:
            tr.run_lock.release()

    def hand_over(self) -> None:
        """Before the trainer thread runs torch work, the calling thread gives back its idle OpenMP
        workers: two OpenMP teams on few cores make libgomp stop spinning, and every parallel region
        then pays a futex wake-up (workbench.cputhreads). CPU runs only."""
        if self.tr.device.type == "cpu" and threading.current_thread() is not self.thread:
            cputhreads.release_idle_workers()

    def choose_threads(self, log: bool = False) -> None:
        """This (trainer) thread's intra-op thread count for the current batch size; a ``cpu_threads`` event
        says which and why (always with ``log``, else when the count changed). Threads started later begin
        with the count last set anywhere, so it is always set here, and set back when the run ends."""
        before = torch.get_num_threads()
        n, why = cputhreads.choose_threads(self.tr.cfg.cpu_threads, self._n_params, self.tr.controls.batch_size,
                                           self.default_threads or before)
        torch.set_num_threads(n)
        if log or n != before:
            self.log_event("cpu_threads", "trainer", {**cputhreads.describe(), "why": why})

    def set_status(self, status: str, source: str) -> None:
        self.status = status
        self.log_event("status", source, {"status": status})
        self.tr.runlog.recorder.meta.append({"status": status, "step": self.step_count})
        self.tr.hooks.fire("status", lambda: self.context("status", {}))

    def log_event(self, kind: str, source: str, data: Mapping[str, Any] | None = None,
                  step: int | None = None) -> None:
        self.tr.runlog.event(kind, source, data, self.step_count if step is None else step)

    def context(self, event: str, metrics: Mapping[str, Any], sample_ids: tuple[int, ...] | None = None,
                data: Mapping[str, Any] | None = None) -> HookContext:
        return HookContext(event=event, step=self.step_count, epoch=self.tr.epoch, status=self.status,
                           metrics=frozen(metrics), sample_ids=sample_ids, data=frozen(data or {}))

    def saved(self, path: Path, reason: str, metric: float | None) -> None:
        self.tr.hooks.fire("checkpoint", lambda: self.context("checkpoint", {"metric": metric},
                                                              data={"path": str(path), "reason": reason}))

    def after_load(self) -> None:
        """After a rollback loaded older states: what the controls in force do (the scaler, the optimizer's
        weight decay) is done again over them."""
        tr = self.tr
        for spec in CONTROLS:
            if spec.apply is not None:
                spec.apply(tr, getattr(tr.controls, spec.name))

    def hook_failed(self, event: str, fn: Callable, e: BaseException, tb: str) -> None:
        name = getattr(fn, "__qualname__", repr(fn))
        warnings.warn(f"hook {name} on {event!r} raised {type(e).__name__}: {e}; it has been disabled", stacklevel=2)
        self.log_event("hook_error", "trainer", {"hook": name, "event": event, "error": f"{type(e).__name__}: {e}",
                                                 "traceback": tb})

    def recorder_failed(self, e: BaseException, tb: str) -> None:
        self.tr.runlog.note_error("recorder_error", self.step_count, {"error": f"{type(e).__name__}: {e}"})
