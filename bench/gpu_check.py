"""The GPU check: every CUDA path of the engine, measured in a few minutes, each figure written to a file.

    python bench/gpu_check.py --out DIR           # on a machine with a CUDA GPU (bench/gpu_check.sh runs it)
    python bench/gpu_check.py --out DIR --dry     # anywhere: the same steps on the CPU, small, no figures kept

Sections (each one's figures, or its error, go to DIR/gpu_check.json as soon as it ends, and a readable
summary to DIR/gpu_check.md, so a run cut short still leaves what it measured):

* ``syncs``: host syncs per non-logging step. A Trainer (AMP-recipe MLP, ``sync_every`` 10) runs steps under
  ``torch.cuda.set_sync_debug_mode("warn")``; every synchronizing call is sorted by where it came from, one
  of the loop's read-back boundaries or elsewhere (bench/_common.READ_BACK). Target: 0 elsewhere, in fp32 and
  bf16. fp16 is listed too: GradScaler.step reads its inf check back every step, in a hand loop as well.
* ``overhead``: workbench / hand-written loop on the PyTorch AMP recipe's network (3 x Linear 4096 + ReLU,
  MSE, batch 512, Adam), in fp32, bf16 and fp16, interleaved chunks; the mean step (chunk wall time / steps,
  each chunk ending with a device sync) is the headline, the median over rounds beside it. Target <= 1.02.
  ``bf16/fp32``: the workbench's bf16 mean step over its fp32 one (target <= 0.6 on an H100-class GPU).
* ``switch``: the first chunk after a live ``set(precision=p)`` on an fp32 run, over a chunk of a run that
  started at p (both warm).
* ``checkpoint``: a run that saves every K steps against one that never does, interleaved chunks of K steps
  (one save each): the mean step of a saving chunk over the control's, the time a save costs training, and
  each side's longest step.
* ``batch_size``: a live change 512 -> 1024 mid-epoch sees every sample of the epoch once; samples/s before
  and after.
* ``find_batch_size``: with the GPU's memory filled to leave ~2 GiB, ``find_batch_size(start=65536)`` meets
  real CUDA OOMs and halves until a step fits (the sizes tried are reported).

Exact resume, the checkpoint's device-to-host copy, fp16 with a GradScaler, the device-side good-state ring
and the zero-sync rule are pass/fail tests in tests/test_gpu.py, which bench/gpu_check.sh runs first.

The view libraries (streamlit, ipywidgets, plotly, anywidget) are blocked from import here: the lent GPU
machine has none of them, and the engine must train without them.
"""
from __future__ import annotations

import argparse
import importlib.abc
import json
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

VIEW_LIBRARIES = ("streamlit", "ipywidgets", "plotly", "anywidget")


class _BlockViews(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):  # noqa: ANN001 - the finder protocol
        if name.split(".")[0] in VIEW_LIBRARIES:
            raise ImportError(f"{name} is a view library; the engine must train without it (bench/gpu_check.py)")
        return None


sys.meta_path.insert(0, _BlockViews())

import torch  # noqa: E402

from _common import HandLoop, Trainer, env_line, host_syncs, read_back_missing, runs_dir, trainer_step_times  # noqa: E402

PRECISIONS = ("fp32", "bf16", "fp16")
AMP = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class Check:
    """Sizes and lengths for a real GPU run, or for the dry run on a CPU."""

    def __init__(self, dry: bool) -> None:
        self.dry = dry
        self.device = "cpu" if dry else "cuda"
        self.width = 256 if dry else 4096
        self.bs = 32 if dry else 512
        self.n = 1024 if dry else 8192
        self.rounds = 2 if dry else 6          # the first is warm-up
        self.chunk = 5 if dry else 50
        self.every = 10 if dry else 25         # checkpoint_every of the saving run

    def trainer(self, precision: str = "fp32", n: int | None = None, **cfg: Any) -> Trainer:
        torch.manual_seed(0)
        layers: list[torch.nn.Module] = []
        for _ in range(3):
            layers += [torch.nn.Linear(self.width, self.width), torch.nn.ReLU()]
        net = torch.nn.Sequential(*layers[:-1])
        g = torch.Generator().manual_seed(0)
        n = n or self.n
        data = torch.utils.data.TensorDataset(torch.randn(n, self.width, generator=g),
                                              torch.randn(n, self.width, generator=g))
        opts = dict(lr=1e-4, batch_size=self.bs, max_steps=None, max_epochs=None, seed=0, eval_every=0,
                    runs_root=runs_dir(), device=self.device, precision=precision, tensorboard=False)
        opts.update(cfg)
        return Trainer(model=net, train_data=data, loss_fn=torch.nn.MSELoss(), **opts)

    def hand(self, tr: Trainer, precision: str) -> HandLoop:
        x, y = (t.to(tr.device) for t in tr.train_data.tensors)
        return HandLoop(tr.model, x, y, seed=0, batch_size=self.bs, lr=1e-4, loss_fn=tr.loss_fn, device=tr.device,
                        amp_dtype=AMP[precision])

    def sync(self) -> None:
        if not self.dry:
            torch.cuda.synchronize()


def chunk_seconds(tr: Trainer, n: int) -> float:
    """Wall seconds of ``step(n)`` on a paused trainer; the request ends with the chunk's read-back, so the
    time holds all of its device work."""
    t0 = time.perf_counter()
    req = tr.step(n).wait(600)
    if req.status != "applied":
        raise RuntimeError(f"step({n}) was {req.status}: {req.message}")
    return time.perf_counter() - t0


def finish(*trainers: Trainer) -> None:
    for t in trainers:
        t.stop().wait(120)
        t.join()


# ---------------------------------------------------------------------------------------------- sections
def syncs(c: Check) -> dict[str, Any]:
    missing = read_back_missing()
    if missing:
        raise AssertionError(f"bench/_common.READ_BACK names loop functions that no longer exist: {missing}")
    out: dict[str, Any] = {}
    for p in PRECISIONS[:1] if c.dry else PRECISIONS:
        tr = c.trainer(p, sync_every=10)
        tr.start(paused=True)
        chunk_seconds(tr, 20)  # warm-up: allocator, autocast caches, the first read-backs
        got = host_syncs(tr, 20 if c.dry else 100, debug=not c.dry)
        got["other_per_step"] = got["other_syncs"] / got["steps"]
        out[p] = got
        finish(tr)
    return out


def overhead_and_switch(c: Check) -> dict[str, Any]:
    precisions = [p for p in PRECISIONS if c.dry or p != "bf16" or torch.cuda.is_bf16_supported()]
    trs = {p: c.trainer(p) for p in precisions}
    hands = {p: c.hand(trs[p], p) for p in precisions}
    switcher = c.trainer("fp32")
    for t in (*trs.values(), switcher):
        t.start(paused=True)
    wb: dict[str, list[float]] = {p: [] for p in precisions}
    hl: dict[str, list[float]] = {p: [] for p in precisions}
    switched: dict[str, list[float]] = {p: [] for p in precisions if p != "fp32"}
    for r in range(c.rounds):
        for p in precisions:
            a, b = chunk_seconds(trs[p], c.chunk), hands[p].run_chunk(c.chunk)
            if r:
                wb[p].append(a / c.chunk)
                hl[p].append(b / c.chunk)
        chunk_seconds(switcher, c.chunk)
        for p in switched:
            switcher.set(precision=p).wait(60)
            s, f = chunk_seconds(switcher, c.chunk), chunk_seconds(trs[p], c.chunk)
            if r:
                switched[p].append(s / f)
            switcher.set(precision="fp32").wait(60)
            chunk_seconds(switcher, max(1, c.chunk // 5))
    finish(*trs.values(), switcher)
    mean_ms = {p: 1e3 * statistics.fmean(v) for p, v in wb.items()}
    out: dict[str, Any] = {"chunk": c.chunk, "timed_rounds": c.rounds - 1, "precisions": {}}
    for p in precisions:
        out["precisions"][p] = {
            "workbench_mean_ms": mean_ms[p], "hand_mean_ms": 1e3 * statistics.fmean(hl[p]),
            "mean_ratio": statistics.fmean(wb[p]) / statistics.fmean(hl[p]),
            "median_round_ratio": statistics.median(a / b for a, b in zip(wb[p], hl[p]))}
    if "bf16" in mean_ms:
        out["bf16_over_fp32"] = mean_ms["bf16"] / mean_ms["fp32"]
    out["switch_over_fresh"] = {p: statistics.median(v) for p, v in switched.items()}
    return out


def checkpoint(c: Check) -> dict[str, Any]:
    saving = c.trainer(checkpoint_every=c.every, keep_checkpoints=2)
    control = c.trainer()
    for t in (saving, control):
        t.start(paused=True)
    for t in (saving, control):
        chunk_seconds(t, c.every)  # warm-up, and the first save's host buffers
    sides: dict[str, list[float]] = {"saving": [], "control": []}
    longest: dict[str, float] = {"saving": 0.0, "control": 0.0}
    for _ in range(c.rounds * 2):
        for name, t in (("saving", saving), ("control", control)):
            first = t.step_count
            sides[name].append(chunk_seconds(t, c.every) / c.every)
            steps = trainer_step_times(t, first + 2, t.step_count)  # host time between step ends
            longest[name] = max(longest[name], max(steps, default=0.0))
    saves = int((saving.events["kind"] == "checkpoint").sum())
    finish(saving, control)
    s, b = statistics.fmean(sides["saving"]), statistics.fmean(sides["control"])
    return {"every": c.every, "chunks": len(sides["saving"]), "saves": saves, "mean_step_ratio": s / b,
            "ms_lost_per_save": 1e3 * (s - b) * c.every,
            "longest_step_ms": {k: 1e3 * v for k, v in longest.items()},
            "median_step_ms": {k: 1e3 * statistics.median(v) for k, v in sides.items()}}


def batch_size(c: Check) -> dict[str, Any]:
    tr = c.trainer()
    per_epoch = c.n // c.bs
    ids: list[tuple[int, tuple[int, ...]]] = []
    tr.on("step_end", lambda ctx: ids.append((int(ctx.metrics["epoch"]), ctx.sample_ids)))
    tr.start(paused=True)
    chunk_seconds(tr, per_epoch // 2)
    tr.set(batch_size=2 * c.bs).wait(60)
    chunk_seconds(tr, per_epoch // 4 + 1)   # the rest of epoch 0 at the doubled size, and into epoch 1
    finish(tr)
    seen = [i for epoch, batch in ids if epoch == 0 for i in batch]
    once = sorted(seen) == list(range(c.n))
    # throughput before and after, on a run without the hook (a hook reads every step back)
    tr = c.trainer()
    tr.start(paused=True)
    chunk_seconds(tr, c.chunk)
    before = c.bs * c.chunk / chunk_seconds(tr, c.chunk)
    tr.set(batch_size=2 * c.bs).wait(60)
    chunk_seconds(tr, 2)
    after = 2 * c.bs * c.chunk / chunk_seconds(tr, c.chunk)
    finish(tr)
    if not once:
        raise AssertionError(f"epoch 0 saw {len(seen)} samples, {len(set(seen))} distinct, of {c.n}")
    return {"every_sample_once": once, "samples_per_s": {str(c.bs): before, str(2 * c.bs): after}}


def find_batch_size(c: Check) -> dict[str, Any]:
    n = 4096 if c.dry else 65536
    tr = c.trainer(n=n)
    hog = None
    try:
        if c.dry:  # no OOM to meet on a CPU: a memory budget below the first size makes the same halving run
            found = tr.find_batch_size(start=n, memory_budget_mb=8)
        else:
            free, _ = torch.cuda.mem_get_info()
            hog = torch.empty(max(0, free - 2 * 2**30), dtype=torch.uint8, device="cuda")
            found = tr.find_batch_size(start=n)
    finally:
        del hog
        if not c.dry:
            torch.cuda.empty_cache()
    ev = tr.events
    tried = ev.loc[ev["kind"] == "batch_size_find", "data"].iloc[-1].get("tried", [])
    if not any(not t["fits"] for t in tried):
        raise AssertionError(f"no size was refused, so the halving never ran: {tried}")
    return {"found": found, "tried": [(t["batch_size"], t["fits"], t["why"]) for t in tried]}


SECTIONS: dict[str, Callable[[Check], dict[str, Any]]] = {
    "syncs": syncs, "overhead": overhead_and_switch, "checkpoint": checkpoint, "batch_size": batch_size,
    "find_batch_size": find_batch_size}


# ---------------------------------------------------------------------------------------------- report
def summary(results: dict[str, Any]) -> str:
    """The figures a reader checks against the targets, one line each."""
    lines = [f"# GPU check, {results['date']} — {results['env']}", ""]
    if results.get("dry"):
        lines += ["Dry run on the CPU: it proves the script and the engine's paths run, at sizes too small to "
                  "mean anything; none of these figures is a measurement against a target.", ""]
    for name, r in results["sections"].items():
        if not r.get("ok"):
            lines.append(f"- **{name}: FAILED** — {r.get('error', '?').splitlines()[-1]}")
            continue
        v = r["value"]
        if name == "syncs":
            for p, s in v.items():
                lines.append(f"- syncs {p}: {s['other_syncs']} outside the read-back boundaries in {s['steps']} "
                             f"steps ({s['other_per_step']:.3f}/step; target 0), {s['read_back_syncs']} at them"
                             + (f"; sites {s['other_sites']}" if s["other_sites"] else ""))
        elif name == "overhead":
            for p, s in v["precisions"].items():
                lines.append(f"- overhead {p}: workbench {s['workbench_mean_ms']:.3f} ms, hand loop "
                             f"{s['hand_mean_ms']:.3f} ms mean step: **{s['mean_ratio']:.3f}x** (median over "
                             f"rounds {s['median_round_ratio']:.3f}; target <= 1.02)")
            if "bf16_over_fp32" in v:
                lines.append(f"- bf16/fp32 mean step: **{v['bf16_over_fp32']:.3f}** (target <= 0.6, H100 class)")
            lines.append("- right after a live precision switch / fresh run: "
                         + ", ".join(f"{p} {x:.3f}" for p, x in v["switch_over_fresh"].items()))
        elif name == "checkpoint":
            lines.append(f"- checkpoint every {v['every']}: mean step of a saving chunk / control "
                         f"**{v['mean_step_ratio']:.3f}**, {v['ms_lost_per_save']:.2f} ms lost per save; longest "
                         f"step {v['longest_step_ms']['saving']:.2f} ms (control {v['longest_step_ms']['control']:.2f})")
        elif name == "batch_size":
            lines.append(f"- live batch-size change: every sample once {v['every_sample_once']}; samples/s "
                         + ", ".join(f"bs {k}: {x:,.0f}" for k, x in v["samples_per_s"].items()))
        elif name == "find_batch_size":
            lines.append(f"- find_batch_size: {v['found']} (tried {v['tried']})")
        lines.append(f"  ({r['seconds']:.1f} s)")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="folder for gpu_check.json and gpu_check.md")
    ap.add_argument("--dry", action="store_true", help="no CUDA needed: every step on the CPU, small")
    ap.add_argument("--only", nargs="*", choices=list(SECTIONS), default=None)
    a = ap.parse_args(argv)
    if not a.dry and not torch.cuda.is_available():
        print("bench/gpu_check.py: no CUDA device here; run with --dry for the CPU check of the script")
        return 2
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    c = Check(a.dry)
    results: dict[str, Any] = {"env": env_line(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                               "dry": a.dry, "sections": {}}
    failed = 0
    for name, fn in SECTIONS.items():
        if a.only and name not in a.only:
            continue
        t0 = time.perf_counter()
        try:
            results["sections"][name] = {"ok": True, "value": fn(c)}
        except Exception:  # noqa: BLE001 - one section's failure is a figure too; the next one still runs
            failed += 1
            results["sections"][name] = {"ok": False, "error": traceback.format_exc()}
        results["sections"][name]["seconds"] = time.perf_counter() - t0
        (out / "gpu_check.json").write_text(json.dumps(results, indent=1, default=str))
        (out / "gpu_check.md").write_text(summary(results))
        print(f"{name}: {'ok' if results['sections'][name]['ok'] else 'FAILED'} "
              f"({results['sections'][name]['seconds']:.1f} s)", flush=True)
    print(summary(results))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
