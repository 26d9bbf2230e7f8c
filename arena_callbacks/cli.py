"""Command line: ``arena-callbacks report <output_dir>``, ``compare <run>...`` and ``rewind <output_dir>``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="arena-callbacks",
        description="Reports, comparisons and after-the-fact rewinds of saved forgetting-monitor runs.",
    )
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("report", help="plots and report.md for one run")
    r.add_argument("run_dir", help="a trainer output_dir holding arena/, or the monitor folder holding history.jsonl")
    r.add_argument("--out", help="output folder (default: <run_dir>/report)")
    c = sub.add_parser("compare", help="several runs on one stability-plasticity plane")
    c.add_argument("run_dirs", nargs="+", help="run folders (as for report)")
    c.add_argument("--out", default="arena-compare", help="output folder (default: ./arena-compare)")
    c.add_argument("--names", nargs="+", help="a label per run (default: folder names)")
    w = sub.add_parser(
        "rewind",
        help="pick the best operating point of a finished run (saved states and the path from the pretrained "
        "weights) and write it as a loadable model or adapter",
    )
    w.add_argument("run_dir", help="the trainer output_dir (holding arena/ and checkpoint-<step> folders)")
    w.add_argument("--out", help="output folder (default: <run_dir>/rewound)")
    w.add_argument("--base-model", help="pretrained model folder or hub id (default: from the adapter config or run)")
    w.add_argument("--alphas", nargs="+", type=float, help="interior α values on the path (default: the run's "
                   "rewind.alphas)")
    w.add_argument("--layerwise", action="store_true", help="scale layers separately: α_l = α + (1 − α)·depth")
    w.add_argument("--device", default="cpu", help="where the probes run (default: cpu)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status (0 ok, 2 usage or missing run)."""
    from .exceptions import ArenaError
    from .runs import RunNotFoundError, load_run

    parser = _parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "rewind":
            from .posthoc import rewind_run

            path = rewind_run(args.run_dir, args.out, base_model=args.base_model, alphas=args.alphas,
                              layerwise=args.layerwise, device=args.device) / "rewind.md"
        elif args.command == "report":
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
    except (RunNotFoundError, ArenaError) as e:
        print(f"arena-callbacks {args.command}: error: {e}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
