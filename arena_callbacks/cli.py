"""Command line: ``arena-callbacks report <output_dir>``, ``compare <run>...``, ``rewind <output_dir>``,
``run --config monitor.yaml -- <command>`` and ``hook install|uninstall|status``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="arena-callbacks",
        description="Reports, comparisons and after-the-fact rewinds of saved forgetting-monitor runs; "
        "a monitor attached to any Trainer-based command without editing it.",
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
    w.add_argument("--refine", type=int, default=None, help="extra probe passes refining α around the choice "
                   "(default: the run's rewind.refine; 0: the grid only)")
    w.add_argument("--device", default="cpu", help="where the probes run (default: cpu)")
    x = sub.add_parser(
        "run",
        help="run a command with a monitor (built from --config) added to every transformers Trainer it builds",
    )
    x.add_argument("--config", required=True, help="the monitor YAML/JSON file (settings, probes, target)")
    x.add_argument("cmd", nargs=argparse.REMAINDER, help="the command, after --")
    h = sub.add_parser("hook", help="the .pth file behind `run` and ARENA_CALLBACKS_CONFIG (inert while unset)")
    h.add_argument("action", choices=["install", "uninstall", "status"])
    return p


def _run(config: str, cmd: list[str]) -> int:
    """Check the file, make sure the hook is installed, and run ``cmd`` with the variable set."""
    import os
    import subprocess

    from .autoattach import ENV, install_hook
    from .monitor_file import load_monitor_file

    cmd = cmd[1:] if cmd[:1] == ["--"] else cmd
    if not cmd:
        print("arena-callbacks run: error: give the command after --", file=sys.stderr)
        return 2
    path = Path(config).expanduser().resolve()
    load_monitor_file(path)  # a bad file fails here, before the command starts
    install_hook()
    return subprocess.call(cmd, env={**os.environ, ENV: str(path)})


def _hook(action: str) -> int:
    from .autoattach import hook_path, install_hook, uninstall_hook

    if action == "install":
        print(install_hook())
    elif action == "uninstall":
        print(f"removed {hook_path()}" if uninstall_hook() else f"not installed ({hook_path()})")
    else:
        print(f"installed: {hook_path()}" if hook_path().is_file() else f"not installed ({hook_path()})")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status (0 ok, 2 usage or missing run)."""
    from .exceptions import ArenaError
    from .runs import RunNotFoundError, load_run

    parser = _parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "run":
            return _run(args.config, args.cmd)
        if args.command == "hook":
            return _hook(args.action)
        if args.command == "rewind":
            from .posthoc import rewind_run

            path = rewind_run(args.run_dir, args.out, base_model=args.base_model, alphas=args.alphas,
                              layerwise=args.layerwise, refine=args.refine, device=args.device) / "rewind.md"
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
