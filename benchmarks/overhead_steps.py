"""Per-step timing of a finetune with and without the monitor: where does extra wall time land?

The overhead benchmark compares whole runs; where the step time itself moves between runs by
more than the budget (a host-bound GPU loop), that comparison cannot see a small cost. This
script times every optimizer step (a callback placed before the monitor, so probe passes are
not in the step) for a plain run, a run with the budgeted monitor and one with a baseline-only
monitor, repetitions interleaved, and prints each run's total, step sum and median step.

    python benchmarks/overhead_steps.py --device cuda --model DIR --steps 60 --repeats 2
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

VARIANTS: dict[str, dict[str, Any] | None] = {  # the monitor's cadence section, None: no monitor
    "plain": None,
    "budget": {"overhead_budget": 0.03, "at_train_end": False},
    "baseline_only": {"every_n_steps": 10**6, "at_train_end": False},
}


def run(setup: dict[str, Any], cadence: dict[str, Any] | None, steps: int, device: str) -> dict[str, Any]:
    from transformers import TrainerCallback

    from overhead import make_trainer

    class StepTimer(TrainerCallback):
        def __init__(self) -> None:
            self.begin: list[float] = []
            self.end: list[float] = []

        def on_step_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            self.begin.append(time.perf_counter())

        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            self.end.append(time.perf_counter())

    timer = StepTimer()
    with tempfile.TemporaryDirectory() as out:
        trainer, monitor = make_trainer(setup, steps, out, device, cadence, callbacks=[timer])  # timer first
        t = time.perf_counter()
        trainer.train()
        total = time.perf_counter() - t
    steps_s = [e - b for b, e in zip(timer.begin, timer.end)]
    return {"total_s": round(total, 3), "steps_sum_s": round(sum(steps_s), 3),
            "median_step_ms": round(1e3 * statistics.median(steps_s), 1),
            "probe_steps": [s.step for s in monitor.history] if monitor else [],
            "monitor_accounting": getattr(monitor, "overhead", None)}


def main(argv: list[str] | None = None) -> int:
    import overhead

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--model", default=overhead.MODEL)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2, help="torch threads (0: leave as is)")
    ap.add_argument("--out", default=None, help="also write the rows here as JSON lines")
    args = ap.parse_args(argv)
    set_threads(args.threads)
    setup = overhead.smollm2_setup(args.device, args.model)
    run(setup, None, min(args.steps, 10), args.device)  # warm-up
    rows = []
    for rep in range(args.repeats):
        names = list(VARIANTS) if rep % 2 == 0 else list(VARIANTS)[::-1]
        for name in names:
            r = {"variant": name, "repetition": rep, **run(setup, VARIANTS[name], args.steps, args.device)}
            rows.append(r)
            print(json.dumps(r), flush=True)
    if args.out:
        Path(args.out).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
