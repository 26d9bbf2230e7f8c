"""Per-step timing of a finetune with and without the monitor: where does extra wall time land?

The overhead benchmark compares whole runs; where the step time itself moves between runs by
more than the budget (a host-bound GPU loop), that comparison cannot see a small cost. This
script times every optimizer step (a callback placed before the monitor, so probe passes are
not in the step) for a plain run, a run with the budgeted monitor (per ``--budgets``) and one with a baseline-only
monitor, repetitions interleaved, and prints each run's total, step sum, median and mean step,
process and main-thread CPU time, and the wall time outside the steps that the monitor did not
account for as its own.

    python benchmarks/overhead_steps.py --device cuda --model DIR --steps 60 --repeats 2
    python benchmarks/overhead_steps.py --setup tiny --steps 300 --repeats 6 --budgets 0.03,0.1
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import set_threads  # noqa: E402


def variants(budgets: list[float]) -> dict[str, dict[str, Any] | None]:
    """The monitor's cadence section per variant; None: no monitor."""
    return {"plain": None,
            **{f"budget@{b:g}": {"overhead_budget": b, "at_train_end": False} for b in budgets},
            "baseline_only": {"every_n_steps": 10**6, "at_train_end": False}}


def run(setup: dict[str, Any], cadence: dict[str, Any] | None, steps: int, device: str) -> dict[str, Any]:
    from overhead import make_trainer, step_timer

    timer = step_timer()
    with tempfile.TemporaryDirectory() as out:
        trainer, monitor = make_trainer(setup, steps, out, device, cadence, callbacks=[timer])  # timer first
        t, c, m = time.perf_counter(), time.process_time(), time.thread_time()
        trainer.train()
        total, cpu, main_cpu = time.perf_counter() - t, time.process_time() - c, time.thread_time() - m
    steps_s = timer.step_seconds()
    accounted = sum(monitor.overhead[k] for k in ("baseline_seconds", "monitor_seconds")) if monitor else 0.0
    return {"total_s": round(total, 3), "steps_sum_s": round(sum(steps_s), 3),
            # wall time outside the timed steps that the monitor did not account for as its own
            "unaccounted_between_s": round(total - sum(steps_s) - accounted, 3),
            "cpu_s": round(cpu, 3), "main_thread_cpu_s": round(main_cpu, 3),
            "median_step_ms": round(1e3 * statistics.median(steps_s), 1),
            "mean_step_ms": round(1e3 * statistics.fmean(steps_s), 2),
            "probe_steps": [s.step for s in monitor.history] if monitor else [],
            "monitor_accounting": getattr(monitor, "overhead", None)}


def main(argv: list[str] | None = None) -> int:
    import overhead

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--setup", default="smollm2", choices=sorted(overhead.SETUPS))
    ap.add_argument("--model", default=overhead.MODEL)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--budgets", default="0.03", help="cadence.overhead_budget values, comma-separated")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2, help="torch threads (0: leave as is)")
    ap.add_argument("--out", default=None, help="also write the rows here as JSON lines")
    args = ap.parse_args(argv)
    set_threads(args.threads)
    setup = overhead.SETUPS[args.setup](args.device, args.model)
    run(setup, None, min(args.steps, 10), args.device)  # warm-up
    cadences = variants([float(b) for b in args.budgets.split(",")])
    rows = []
    for rep in range(args.repeats):
        names = list(cadences) if rep % 2 == 0 else list(cadences)[::-1]
        for name in names:
            r = {"variant": name, "repetition": rep, **run(setup, cadences[name], args.steps, args.device)}
            rows.append(r)
            print(json.dumps(r), flush=True)
    if args.out:
        Path(args.out).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
