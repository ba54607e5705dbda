"""Run every teaching scenario and measure the diagnosis: per-kind precision and recall.

    .venv/bin/python scripts/diagnosis_report.py [--seeds 0 1 2] [--markdown]

Counting (warning and critical alerts only; info alerts are advice):
- true positive: a scenario's expected kind fired within its stated number of steps;
- false negative: it did not;
- false positive: a kind fired in a run where it is neither expected nor listed as a related symptom
  (``Scenario.also``), e.g. any warning in a healthy run.
"""
from __future__ import annotations

import argparse
import collections
import sys
import tempfile
import time

from workbench import Trainer
from workbench.scenarios import SCENARIOS, scenario_config


def run_scenario(name: str, seed: int, root: str) -> tuple[list, Trainer]:
    cfg = scenario_config(name, seed=seed, runs_root=root, tensorboard=False, on_divergence="stop")
    tr = Trainer(cfg)
    tr.run()
    return [a for a in tr.alerts if a.severity in ("warning", "critical")], tr


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--only", nargs="*", default=None)
    ap.add_argument("--markdown", action="store_true")
    args = ap.parse_args(argv)
    tp, fn, fp = collections.Counter(), collections.Counter(), collections.Counter()
    rows = []
    with tempfile.TemporaryDirectory() as root:
        for name, sc in SCENARIOS.items():
            if args.only and name not in args.only:
                continue
            for seed in args.seeds:
                t = time.time()
                alerts, tr = run_scenario(name, seed, root)
                kinds: dict = {}
                for a in alerts:
                    kinds.setdefault(a.kind, a)   # the first alert of each kind
                hit = sc.expect is not None and sc.expect in kinds and kinds[sc.expect].step <= (sc.within or 0)
                if sc.expect:
                    (tp if hit else fn)[sc.expect] += 1
                for k in kinds:
                    if k != sc.expect and k not in sc.also:
                        fp[k] += 1
                fired = ", ".join(f"{a.kind}@{a.step}" for a in kinds.values()) or "-"
                rows.append((name, seed, sc.expect or "(healthy)", "yes" if hit or not sc.expect and not alerts
                             else "NO", fired, tr.step_count, time.time() - t))
                print(f"{name:22s} seed {seed}: expect {sc.expect or 'nothing':20s} fired: {fired}", file=sys.stderr)
    kinds = sorted(set(tp) | set(fn) | set(fp))
    print("\n| kind | expected runs | caught | false alarms | precision | recall |")
    print("|---|---|---|---|---|---|")
    for k in kinds:
        prec = tp[k] / (tp[k] + fp[k]) if tp[k] + fp[k] else float("nan")
        rec = tp[k] / (tp[k] + fn[k]) if tp[k] + fn[k] else float("nan")
        print(f"| {k} | {tp[k] + fn[k]} | {tp[k]} | {fp[k]} | {prec:.2f} | {rec:.2f} |")
    all_tp, all_fp, all_fn = sum(tp.values()), sum(fp.values()), sum(fn.values())
    print(f"| **all** | {all_tp + all_fn} | {all_tp} | {all_fp} | {all_tp / max(1, all_tp + all_fp):.2f} | "
          f"{all_tp / max(1, all_tp + all_fn):.2f} |")
    if args.markdown:
        print("\n| scenario | seed | expected | ok | warning/critical alerts (kind@step) | steps |")
        print("|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r[0]} | {r[1]} | {r[2]} | {r[3]} | {r[4]} | {r[5]} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
