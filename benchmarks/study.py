#!/usr/bin/env python
"""The evidence study of issue 20, as one resumable command: runs, a JSON cache, docs/evidence.md.

    python benchmarks/study.py                     # every run not yet cached, then docs/evidence.md
    python benchmarks/study.py --max-minutes 30    # stop starting new runs after 30 minutes (run it again to go on)
    python benchmarks/study.py --only report       # no training: regenerate docs/evidence.md from the cache
    python benchmarks/study.py --only aggressive   # only the runs of one regime (or a method: lora, oft, full)
    python benchmarks/study.py --quick             # the tiny model of examples/demo.py, for CI (under a minute)

Each finished run is one JSON file in ``benchmarks/results/study/`` (``--quick``: ``.../study/quick/``),
named ``<regime>-<method>-s<seed>.json`` and keyed on the grid's settings: a run whose file exists with
the same settings is skipped, so an interrupted study goes on where it stopped. The report is generated
from whatever the cache holds and says which runs are missing.

The grid (``FULL``): SmolLM2-135M-Instruct (the built-in model), LoRA r8 / OFT b32 / full finetuning,
three regimes (``aggressive``: the learning rates of examples/arena.py; ``gentle``: a tenth of them;
``control``: the gentle rate on held-out-like general text, ``text_passages("train")``, a run that
should not forget), seeds 0, 1, 2. Each run is probed on every row of its capability sets; the
24-row probes and the budgets are evaluated offline from those rows (benchmarks/study_analysis.py).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPO))

from study_run import Grid, execute, run_name  # noqa: E402

# Sized from measured costs on 2 CPU cores (docs/evidence.md, "Cost"): a probe pass over 118 + 48 rows
# plus the 16 target rows takes about 20-30 s, a training step of batch 4 about 2-3 s; 20 steps probed every 5
# (5 passes), and 8 rewind states for the 9 aggressive runs: about 90 minutes for the 27 runs on an idle machine.
FULL = Grid(
    model="smollm2-135m-instruct", methods=("lora", "oft", "full"), regimes=("aggressive", "gentle", "control"),
    seeds=(0, 1, 2), steps=20, batch_size=4, probe_every=5, probe_rows=24, realizations=8,
    full_rows={"general_text": None, "arithmetic": 48}, target_rows=16, geometry_tokens=256,
)
QUICK = Grid(
    model="quick", methods=("lora", "full"), regimes=("aggressive", "control"), seeds=(0,), steps=4,
    batch_size=8, probe_every=2, probe_rows=6, realizations=3, full_rows={"general": 16, "code": 16},
    target_rows=8, geometry_tokens=128, alphas=(0.5,), refine=1, text_set="general", score_set="code",
)


def cache_dir(args) -> Path:
    if args.cache_dir:
        return Path(args.cache_dir)
    return REPO / "benchmarks" / "results" / "study" / ("quick" if args.quick else "")


def load_cache(folder: Path, grid: Grid) -> dict[str, dict]:
    """The cached records of this grid's settings (others are ignored, and redone if in the grid)."""
    out = {}
    for path in sorted(folder.glob("*.json")):
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if isinstance(data, dict) and data.get("grid") == grid.key():
            out[path.stem] = data
    return out


def planned(grid: Grid, only: set[str]) -> list[tuple[str, str, int]]:
    """Runs in order: seed by seed, so that a partial study covers every cell at the first seeds."""
    out = []
    for seed in grid.seeds:
        for regime in grid.regimes:
            for method in grid.methods:
                if only and not ({regime, method, f"s{seed}"} & only):
                    continue
                out.append((method, regime, seed))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="the tiny model, for CI")
    ap.add_argument("--only", default="", help="comma-separated regimes, methods or seeds (s0) to run; "
                    "'report': no runs, only the report")
    ap.add_argument("--max-minutes", type=float, default=None, help="start no new run after this many minutes")
    ap.add_argument("--cache-dir", default=None, help="the JSON cache (default: benchmarks/results/study[/quick])")
    ap.add_argument("--out", default=None, help="the report (default: docs/evidence.md; --quick: <cache>/evidence.md)")
    ap.add_argument("--base-cache", default=None, help="--quick: where the tiny base is cached "
                    "(default: .cache/demo-base-quick)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: cores, at most 4)")
    args = ap.parse_args(argv)
    grid = QUICK if args.quick else FULL
    folder = cache_dir(args)
    folder.mkdir(parents=True, exist_ok=True)
    out = Path(args.out) if args.out else (folder / "evidence.md" if args.quick else REPO / "docs" / "evidence.md")
    only = {x.strip() for x in args.only.split(",") if x.strip()}

    from study_report import write_report

    t0 = time.perf_counter()
    if "report" not in only:
        cached = load_cache(folder, grid)
        todo = planned(grid, only)
        ready = False
        for i, (method, regime, seed) in enumerate(todo, 1):
            name = run_name(method, regime, seed)
            if name in cached:
                print(f"[{i}/{len(todo)}] {name}: cached ({cached[name]['seconds']['total']:.0f} s), skipped",
                      flush=True)
                continue
            elapsed = (time.perf_counter() - t0) / 60
            if args.max_minutes is not None and elapsed >= args.max_minutes:
                print(f"[{i}/{len(todo)}] {name}: not started, --max-minutes {args.max_minutes:g} reached", flush=True)
                break
            if not ready:  # process-wide settings, only where something trains
                _prepare_process(args.threads)
                ready = True
            print(f"[{i}/{len(todo)}] {name}: training ...", flush=True)
            record = execute(grid, method, regime, seed, log=lambda msg: print(msg, flush=True),
                             base_cache=Path(args.base_cache) if args.base_cache else None)
            record["grid"] = grid.key()
            record["name"] = name
            tmp = folder / f".{name}.json.tmp"
            tmp.write_text(json.dumps(record))
            tmp.replace(folder / f"{name}.json")
            s = record["seconds"]
            print(f"[{i}/{len(todo)}] {name}: done in {s['total']:.0f} s (training and probes "
                  f"{s['train_and_probes']:.0f} s, of which probe passes {s['probes']:.0f} s; rewind states "
                  f"{s['rewind']:.0f} s); elapsed {(time.perf_counter() - t0) / 60:.1f} min", flush=True)
            if not args.quick:  # the page follows the cache run by run (a chunk cut short still leaves it)
                write_report(grid, load_cache(folder, grid), out, quick=args.quick)
    write_report(grid, load_cache(folder, grid), out, quick=args.quick)
    print(f"report: {out}", flush=True)
    return 0


def _prepare_process(threads: int | None) -> None:
    """Threads, denormals and quiet logs for training runs (left alone when nothing trains)."""
    import logging

    import torch
    from transformers.utils import logging as hf_logging

    torch.set_num_threads(threads or max(1, min(os.cpu_count() or 1, 4)))
    torch.set_flush_denormal(True)
    hf_logging.disable_progress_bar()
    logging.getLogger("arena_callbacks").setLevel(logging.ERROR)


if __name__ == "__main__":
    sys.exit(main())
