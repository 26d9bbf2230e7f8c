"""Command line: ``arena-callbacks report <output_dir>``, ``compare <run>...``, ``rewind <output_dir>``,
``run --config monitor.yaml -- <command>``, ``plan --model ... --monitor ...`` and ``hook install|uninstall|status``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="arena-callbacks",
        description="Reports, comparisons and after-the-fact rewinds of saved forgetting-monitor runs; "
        "a monitor attached to any Trainer-based command without editing it; a config's cost planned before a run.",
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
    _plan_parser(sub)
    h = sub.add_parser("hook", help="the .pth file behind `run` and ARENA_CALLBACKS_CONFIG (inert while unset)")
    h.add_argument("action", choices=["install", "uninstall", "status"])
    return p


def _plan_parser(sub: Any) -> None:
    from .planning.build import DTYPES, SHARDINGS
    from .planning.hardware import CHOICES

    q = sub.add_parser("plan", help="what a monitor config will cost on a model and training setup, before the run "
                       "(docs/plan.md)")
    q.add_argument("--model", required=True, help="a model folder, a config.json, or a hub id (its config only)")
    q.add_argument("--monitor", required=True, help="the monitor YAML/JSON file (as for run --config)")
    q.add_argument("--tokens-per-step", type=int, required=True, help="tokens per optimizer step, all accelerators")
    q.add_argument("--seq-length", type=int, default=2048, help="tokens per training row (default 2048)")
    q.add_argument("--accelerator", default="h100", help=f"one of {', '.join(CHOICES)} (default h100)")
    q.add_argument("--num-accelerators", type=int, default=1)
    q.add_argument("--sharding", default="ddp", help=f"one of {', '.join(SHARDINGS)} (default ddp)")
    q.add_argument("--dtype", default=None, help=f"training weights: one of {', '.join(DTYPES)} (default bf16; "
                   "fp32 on cpu)")
    q.add_argument("--lora-rank", type=int, default=None, help="a LoRA finetune of this rank (default: full)")
    q.add_argument("--lora-targets", nargs="+", default=["q_proj", "v_proj"],
                   help="LoRA target modules (default q_proj v_proj; 'all-linear' for every linear)")
    q.add_argument("--adapter-config", default=None, help="a PEFT adapter_config.json giving the LoRA rank and targets")
    q.add_argument("--tokenizer", default=None, help="a local tokenizer folder (default: the model folder's)")
    q.add_argument("--step-seconds", type=float, default=None, help="a measured training step, used as given")
    q.add_argument("--no-calibrate", action="store_true", help="cpu: FLOPs over the measured matmul rate instead "
                   "of timing slices of the model")
    q.add_argument("--out", default=None, help="write the plan as JSON here")


def _plan(args: argparse.Namespace) -> int:
    import json

    from .planning import PlanInputs, format_plan, make_plan

    plan = make_plan(PlanInputs(
        model=args.model, monitor=args.monitor, tokens_per_step=args.tokens_per_step, seq_length=args.seq_length,
        accelerator=args.accelerator, num_accelerators=args.num_accelerators, sharding=args.sharding,
        dtype=args.dtype, lora_rank=args.lora_rank, lora_targets=tuple(args.lora_targets),
        adapter_config=args.adapter_config, tokenizer=args.tokenizer, step_seconds=args.step_seconds,
        calibrate=not args.no_calibrate))
    print(format_plan(plan))
    if args.out:
        Path(args.out).write_text(json.dumps(plan, indent=2) + "\n", encoding="utf-8")
        print(f"written {args.out}")
    return 0


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
        if args.command == "plan":
            return _plan(args)
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
