"""Command line: ``arena-callbacks report <output_dir>`` and ``arena-callbacks compare <run>...``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="arena-callbacks", description="Reports of saved forgetting-monitor runs.")
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("report", help="plots and report.md for one run")
    r.add_argument("run_dir", help="a trainer output_dir holding arena/, or the monitor folder holding history.jsonl")
    r.add_argument("--out", help="output folder (default: <run_dir>/report)")
    c = sub.add_parser("compare", help="several runs on one stability-plasticity plane")
    c.add_argument("run_dirs", nargs="+", help="run folders (as for report)")
    c.add_argument("--out", default="arena-compare", help="output folder (default: ./arena-compare)")
    c.add_argument("--names", nargs="+", help="a label per run (default: folder names)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status (0 ok, 2 usage or missing run)."""
    from .runs import RunNotFoundError, load_run

    parser = _parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "report":
            from .report import write_report

            run = load_run(args.run_dir)
            out = Path(args.out) if args.out else Path(args.run_dir) / "report"
            path = write_report(run, out)
        else:
            from .report import compare_runs

            if args.names is not None and len(args.names) != len(args.run_dirs):
                print(f"arena-callbacks compare: error: {len(args.names)} --names for {len(args.run_dirs)} runs",
                      file=sys.stderr)
                return 2
            names = args.names or [None] * len(args.run_dirs)
            runs = [load_run(d, name=n) for d, n in zip(args.run_dirs, names)]
            path = compare_runs(runs, args.out)
    except RunNotFoundError as e:
        print(f"arena-callbacks {args.command}: error: {e}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
