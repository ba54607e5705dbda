"""Measure the diagnosis: per-kind precision and recall, alerts per 1,000 steps, the most alerts of one kind
in a run, and whether each alert's advice points the right way — over the teaching scenarios and over runs
the detectors were not written against (``workbench.diagnosis.casebook``: a healthy run three times its
scenario's length, a cosine schedule to its end, unbounded runs stopped at 20,000 steps, user-built models),
for several seeds, under one or more CPU kernel families.

    .venv/bin/python scripts/diagnosis_report.py [--seeds 0 1 2 3 4] [--long-seeds 0 1]
        [--families native default avx2] [--jobs 2] [--only NAME ...] [--out FILE.md] [--json FILE.json]
    .venv/bin/python scripts/diagnosis_report.py --from-json A.json B.json [--out FILE.md]

``--long-seeds`` runs the unbounded 20,000-step runs on fewer seeds than the rest (each is minutes on a
busy 2-core machine); ``--from-json`` writes the report again from saved results.

Counting (warning and critical alerts; info alerts are advice):
- true positive: a run's expected kind opened within its stated number of steps;
- false negative: it did not;
- false positive: a kind opened in a run where it is neither expected nor listed as a related symptom
  (``also``), e.g. a warning in a healthy run that its case does not allow (counted once per kind and run);
- wrong advice: an alert whose first lr action raises the lr in a run whose loss blew up (expected
  divergence or lr_too_high), or lowers it in a run expected to be lr_too_low.
A family runs its runs in ``--jobs`` worker processes started with that family's kernel settings.
"""
from __future__ import annotations

import argparse
import collections
import concurrent.futures as cf
import json
import multiprocessing
import os
import sys
import tempfile
import time
from typing import Any

FAMILIES = {
    "native": {},
    "default": {"ATEN_CPU_CAPABILITY": "default", "MKL_ENABLE_INSTRUCTIONS": "SSE4_2", "ONEDNN_MAX_CPU_ISA": "SSE41"},
    "avx2": {"ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"},
}
LOUD = ("warning", "critical")
LOWERS = ("divergence", "lr_too_high")   # runs whose right advice lowers the lr


def plan(only: list[str] | None) -> list[tuple[str, str]]:
    """(source, name) of every run: the teaching scenarios, then the casebook's."""
    from workbench.diagnosis.casebook import CASES
    from workbench.scenarios import SCENARIOS
    runs = [("scenario", n) for n in SCENARIOS] + [("case", n) for n in CASES]
    return [r for r in runs if not only or r[1] in only]


def expectation(source: str, name: str) -> tuple[str | None, int, tuple[str, ...]]:
    from workbench.diagnosis.casebook import CASES
    from workbench.scenarios import SCENARIOS
    spec = SCENARIOS[name] if source == "scenario" else CASES[name]
    return spec.expect, spec.within or 0, tuple(spec.also)


def run_one(source: str, name: str, seed: int, family: str) -> dict[str, Any]:
    """Train one run in this (worker) process; return what the report counts."""
    import torch

    from workbench import Trainer
    from workbench.diagnosis.casebook import CASES
    from workbench.scenarios import scenario_config
    t0 = time.time()
    with tempfile.TemporaryDirectory() as root:
        common = dict(seed=seed, runs_root=root, tensorboard=False, on_divergence="stop")
        stop_at = None
        if source == "scenario":
            tr = Trainer(scenario_config(name, **common))
        else:
            case = CASES[name]
            stop_at = case.stop_at
            tr = Trainer(**{**case.build(seed), **common})
        if stop_at:
            tr.on("step_end", lambda ctx: tr.stop(source="api") if ctx.step == stop_at else None)
        tr.run()
        ev = tr.events
        alerts = [a.to_dict() for a in tr.alerts]
        lifecycle = int(ev["kind"].isin(["alert", "alert_update", "alert_closed"]).sum())
    return {"source": source, "name": name, "seed": seed, "family": family, "steps": tr.step_count,
            "status": tr.status, "alerts": alerts, "alert_events": lifecycle, "seconds": time.time() - t0,
            "capability": torch.backends.cpu.get_cpu_capability()}


def is_long(source: str, name: str) -> bool:
    from workbench.diagnosis.casebook import CASES
    return source == "case" and CASES[name].stop_at is not None


def lr_direction(alert: dict[str, Any]) -> int:
    """+1 when the alert's first lr action raises the lr, -1 when it lowers it, 0 without one."""
    for act in alert.get("actions") or []:
        lr = (act.get("controls") or {}).get("lr")
        if lr is not None:
            label = act.get("label", "").lower()
            return 1 if "raise" in label else -1 if "lower" in label else 0
    return 0


def judge(r: dict[str, Any]) -> dict[str, Any]:
    expect, within, also = expectation(r["source"], r["name"])
    loud = [a for a in r["alerts"] if a["severity"] in LOUD]
    first: dict[str, dict] = {}
    per_kind = collections.Counter(a["kind"] for a in loud)
    for a in loud:
        first.setdefault(a["kind"], a)
    hit = expect is not None and expect in first and first[expect]["step"] <= within
    wrong = []
    for a in loud:
        d = lr_direction(a)
        if (expect in LOWERS and d > 0) or (expect == "lr_too_low" and d < 0):
            wrong.append(f"{a['kind']}@{a['step']}")
    false = sorted(k for k in first if k != expect and k not in also)
    return {**r, "expect": expect, "hit": hit, "false": false, "per_kind": dict(per_kind), "wrong": wrong,
            "fired": ", ".join(f"{a['kind']}@{a['step']}" + (f"-{a['closed_step']}" if a.get("closed_step") else "")
                               + (f" x{per_kind[a['kind']]}" if per_kind[a["kind"]] > 1 else "")
                               for a in first.values()) or "-"}


def run_family(family: str, runs: list[tuple[str, str]], seeds: list[int], jobs: int,
               long_seeds: list[int] | None = None) -> list[dict[str, Any]]:
    saved = {k: os.environ.get(k) for k in FAMILIES["default"]}
    os.environ.update(FAMILIES[family])
    ctx = multiprocessing.get_context("spawn")   # each worker starts torch under the family's settings
    out = []
    try:
        with cf.ProcessPoolExecutor(max_workers=jobs, mp_context=ctx) as pool:
            # longest first, so the 20k-step runs do not finish last on one worker
            work = sorted(((s, n, seed) for s, n in runs
                           for seed in (long_seeds if long_seeds is not None and is_long(s, n) else seeds)),
                          key=lambda w: not is_long(w[0], w[1]))
            futures = {pool.submit(run_one, s, n, seed, family): (n, seed) for s, n, seed in work}
            for f in cf.as_completed(futures):
                r = judge(f.result())
                out.append(r)
                print(f"[{family}/{r['capability']}] {r['name']:22s} seed {r['seed']}: expect "
                      f"{r['expect'] or 'nothing':20s} {'ok ' if r['hit'] or not r['expect'] else 'MISS'} "
                      f"fired: {r['fired']} ({r['steps']} steps, {r['seconds']:.0f} s)", file=sys.stderr, flush=True)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return out


def per_1000(results: list[dict[str, Any]]) -> float:
    """Warning/critical alerts opened per 1,000 steps over ``results``."""
    return 1000 * sum(sum(r["per_kind"].values()) for r in results) / max(1, sum(r["steps"] for r in results))


def tables(results: list[dict[str, Any]]) -> str:
    tp, fn, fp = collections.Counter(), collections.Counter(), collections.Counter()
    steps = collections.Counter()
    opened = collections.Counter()
    for r in results:
        if r["expect"]:
            (tp if r["hit"] else fn)[r["expect"]] += 1
        for k in r["false"]:
            fp[k] += 1
        for k, n in r["per_kind"].items():
            opened[k] += n
    total_steps = sum(r["steps"] for r in results)
    lines = ["| kind | expected runs | caught | false alarms | precision | recall | opened per 1,000 steps |",
             "|---|---|---|---|---|---|---|"]
    for k in sorted(set(tp) | set(fn) | set(fp) | set(opened)):
        prec = tp[k] / (tp[k] + fp[k]) if tp[k] + fp[k] else float("nan")
        rec = tp[k] / (tp[k] + fn[k]) if tp[k] + fn[k] else float("nan")
        lines.append(f"| {k} | {tp[k] + fn[k]} | {tp[k]} | {fp[k]} | {prec:.2f} | {rec:.2f} | "
                     f"{1000 * opened[k] / max(1, total_steps):.3f} |")
    a_tp, a_fp, a_fn = sum(tp.values()), sum(fp.values()), sum(fn.values())
    lines.append(f"| **all** | {a_tp + a_fn} | {a_tp} | {a_fp} | {a_tp / max(1, a_tp + a_fp):.2f} | "
                 f"{a_tp / max(1, a_tp + a_fn):.2f} | {1000 * sum(opened.values()) / max(1, total_steps):.3f} |")
    healthy = [r for r in results if not r["expect"]]
    loud_healthy = [r for r in healthy if r["false"]]
    allowed = [r for r in healthy if r["per_kind"] and not r["false"]]
    worst = max(results, key=lambda r: max(r["per_kind"].values(), default=0))
    worst_n = max(worst["per_kind"].values(), default=0)
    wrong = [f"{r['name']}/{r['seed']}: {', '.join(r['wrong'])}" for r in results if r["wrong"]]
    long_runs = [r for r in results if r["steps"] >= 5000]
    summary = [
        "", f"- runs: {len(results)} ({total_steps:,} steps); warning/critical alerts opened per 1,000 steps: "
            f"{1000 * sum(opened.values()) / max(1, total_steps):.3f}"
            + (f" (runs of 5,000+ steps: {per_1000(long_runs):.3f})" if long_runs else ""),
        f"- most alerts of one kind opened in one run: {worst_n}"
        + (f" ({worst['name']} seed {worst['seed']}: {worst['per_kind']})" if worst_n else ""),
        f"- healthy runs with a warning or critical alert: {len(loud_healthy)} of {len(healthy)}"
        + "".join(f"\n  - {r['family']} {r['name']} seed {r['seed']}: {r['fired']}" for r in loud_healthy)
        + (f" (and {len(allowed)} that raised only an alert its case allows: "
           + ", ".join(f"{r['family']} {r['name']} seed {r['seed']}: {r['fired']}" for r in allowed) + ")"
           if allowed else ""),
        f"- alerts advising the lr the wrong way: {len(wrong)}" + "".join(f"\n  - {w}" for w in wrong),
        f"- alert events in the run log (open + update + close), most in one run: "
        f"{max((r['alert_events'] for r in results), default=0)}",
    ]
    return "\n".join(lines + summary)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--long-seeds", type=int, nargs="+", default=None, help="seeds of the unbounded runs "
                    "(default: --seeds)")
    ap.add_argument("--from-json", nargs="+", default=None, help="report on saved results instead of running")
    ap.add_argument("--families", nargs="+", default=["native"], choices=list(FAMILIES))
    ap.add_argument("--jobs", type=int, default=2, help="worker processes at a time (default 2)")
    ap.add_argument("--only", nargs="*", default=None, help="run only these scenario/case names")
    ap.add_argument("--out", default=None, help="also write the markdown report here")
    ap.add_argument("--json", default=None, help="write every run's result here (JSON)")
    args = ap.parse_args(argv)
    runs = plan(args.only)
    results: list[dict[str, Any]] = []
    if args.from_json:
        for path in args.from_json:
            with open(path, encoding="utf-8") as f:
                results += [judge(r) for r in json.load(f)]
        args.families = list(dict.fromkeys(r["family"] for r in results))
        args.seeds = sorted({r["seed"] for r in results})
    for family in ([] if args.from_json else args.families):
        results += run_family(family, runs, args.seeds, args.jobs, args.long_seeds)
    order = {n: i for i, (_, n) in enumerate(runs)}
    results.sort(key=lambda r: (r["family"], order[r["name"]], r["seed"]))
    long_seeds = sorted({r["seed"] for r in results if is_long(r["source"], r["name"])})
    parts = [f"Diagnosis report: {len(runs)} runs x seeds {', '.join(map(str, args.seeds))} (unbounded runs: "
             f"{', '.join(map(str, long_seeds)) or '-'}) x kernel families {', '.join(args.families)} "
             f"({time.strftime('%Y-%m-%d')})", ""]
    for family in args.families:
        fam = [r for r in results if r["family"] == family]
        caps = sorted({r["capability"] for r in fam})
        parts += [f"### {family} kernels ({', '.join(caps)})", "", tables(fam), ""]
    if len(args.families) > 1:
        parts += ["### all families together", "", tables(results), ""]
    parts += ["### every run", "", "| family | run | seed | expected | ok | warning/critical alerts "
              "(kind@opened-closed, xN opened) | steps |", "|---|---|---|---|---|---|---|"]
    for r in results:
        ok = "yes" if (r["hit"] or not r["expect"]) and not r["false"] else "NO"
        _, _, also = expectation(r["source"], r["name"])
        want = r["expect"] or ("(healthy" + (f"; may: {', '.join(also)})" if also else ")"))
        parts.append(f"| {r['family']} | {r['name']} | {r['seed']} | {want} | {ok} | "
                     f"{r['fired']} | {r['steps']} |")
    text = "\n".join(parts)
    print(text)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(text + "\n")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(results, f, default=str)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
