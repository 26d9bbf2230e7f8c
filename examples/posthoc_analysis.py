#!/usr/bin/env python
"""After a run: its numbers as tables, the report, a comparison and a rewind, from Python.

    python examples/posthoc_analysis.py runs/arena/lora [runs/arena/full ...]

The same from the shell: ``arena-callbacks report <dir>``, ``arena-callbacks compare <dirs>``,
``arena-callbacks rewind <dir>``.
"""

import sys

from arena_callbacks import load_run
from arena_callbacks.report import compare_runs, write_report
from arena_callbacks.sp import frontier, operating_point


def main(paths):
    runs = [load_run(p) for p in paths]
    for run in runs:
        df = run.metrics_frame()  # one row per probe step, one column per key (pandas)
        cols = [c for c in ("step", "trigger", "sp/plasticity", "sp/stability") if c in df]
        print(f"\n{run.name}: {len(df)} probe steps\n{df[cols].to_string(index=False)}")
        pts = run.points()
        op = operating_point(pts, run.config.operating_point)
        print(f"frontier steps: {[p.step for p in frontier(pts)]}; operating point: {op}")
        print(run.decisions_frame().to_string(index=False) or "no budget acted")
        print(f"report: {write_report(run, run.path.parent / 'report')}")
    if len(runs) > 1:
        print(f"comparison: {compare_runs(runs, 'arena-compare')}")
    # To write the operating point as a loadable model or adapter (needs saved checkpoints):
    #   from arena_callbacks.posthoc import rewind_run; rewind_run(paths[0])


if __name__ == "__main__":
    main(sys.argv[1:] or ["runs/arena/lora"])
