#!/usr/bin/env python
"""Write the plans of ``docs/plan.md`` with ``arena-callbacks plan`` itself: Llama-3-8B and
Llama-3-70B on 8 and 64 H100s, LoRA and full finetuning.

Each plan is made from the configs in ``docs/plan/`` (the published Llama-3 values; no network)
and ``docs/plan/monitor.yaml``, written as ``docs/plan/results/<name>.json``, and the page's table
between its markers is rendered from those files.

    .venv/bin/python scripts/gen_plan_docs.py           # make the plans, rewrite the JSON and the page
    .venv/bin/python scripts/gen_plan_docs.py --check   # exit 1 if the page differs from the stored plans

``tests/test_plan.py`` checks that the page renders from the stored plans and that one stored
plan equals a fresh one.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
PAGE = ROOT / "docs" / "plan.md"
FOLDER = ROOT / "docs" / "plan"
RESULTS = FOLDER / "results"
BEGIN, END = "<!-- plans: begin (scripts/gen_plan_docs.py) -->", "<!-- plans: end -->"
TOKENS_PER_GPU = 16 * 2048  # 16 rows of 2048 tokens per accelerator and optimizer step
MODELS = {"llama-3-8b": "Llama-3-8B", "llama-3-70b": "Llama-3-70B"}
GPUS = (8, 64)
METHODS = {"lora": {"lora_rank": 16, "lora_targets": ("all-linear",)}, "full": {}}

if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def setups() -> dict[str, dict[str, Any]]:
    """``name -> PlanInputs fields`` of every plan on the page (paths relative to the repository)."""
    out = {}
    for model in MODELS:
        for n in GPUS:
            for method, extra in METHODS.items():
                out[f"{model}-{n}xh100-{method}"] = {
                    "model": f"docs/plan/{model}", "monitor": "docs/plan/monitor.yaml",
                    "tokens_per_step": TOKENS_PER_GPU * n, "seq_length": 2048, "accelerator": "h100",
                    "num_accelerators": n, "sharding": "fsdp", **extra,
                }
    return out


def make(name: str) -> dict[str, Any]:
    from arena_callbacks.planning import PlanInputs, make_plan

    cwd = os.getcwd()
    os.chdir(ROOT)  # the inputs' paths are relative to the repository
    try:
        return make_plan(PlanInputs(**setups()[name]))
    finally:
        os.chdir(cwd)


def load(name: str) -> dict[str, Any]:
    return json.loads((RESULTS / f"{name}.json").read_text(encoding="utf-8"))


def table(plans: dict[str, dict[str, Any]]) -> str:
    from arena_callbacks.planning.report import human_bytes, human_flops, human_seconds

    head = ("model", "H100s", "finetuning", "probe pass per rank", "probe pass", "geometry metrics + reference pass",
            "geometry cache per rank", "spectra first / later pass", "W0 SVD cache (host)", "rewind states per rank",
            "training step", "probe interval", "probes add")
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for name, p in plans.items():
        model = MODELS[name.split(f"-{p['inputs']['num_accelerators']}xh100")[0]]
        per, g, s, r, c = p["probes"]["per_rank"], p["geometry"], p["spectra"], p["rewind"], p["schedule"]
        cells = (
            model, str(p["inputs"]["num_accelerators"]),
            f"LoRA r{p['inputs']['lora_rank']} all linears" if p["inputs"]["lora_rank"] else "full",
            f"{per['forwards']} forwards, {per['positions']:,} positions, {human_flops(p['probes']['flops_per_rank'])}",
            human_seconds(p["probes"]["seconds"]),
            f"{human_seconds(g['metric_seconds'])} + {human_seconds(g['reference_pass_seconds'])}",
            human_bytes(g["cache_bytes_per_rank"]),
            f"{human_seconds(s['first_seconds'])} / {human_seconds(s['later_seconds'])}",
            human_bytes(s["w0_cache_bytes"]),
            f"{r['states']} × {human_bytes(r['bytes_per_state'])}",
            human_seconds(p["training"]["step_seconds"]),
            f"{c['interval']} steps", f"{c['added_time']:.1%}",
        )
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def render(page: str, plans: dict[str, dict[str, Any]]) -> str:
    if BEGIN not in page or END not in page:
        raise SystemExit(f"{PAGE}: markers {BEGIN!r} and {END!r} not found")
    head, rest = page.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{BEGIN}\n{table(plans)}\n{END}{tail}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="only check the page against the stored plans")
    args = ap.parse_args(argv)
    names = list(setups())
    if not args.check:
        RESULTS.mkdir(parents=True, exist_ok=True)
        for name in names:
            plan = make(name)
            (RESULTS / f"{name}.json").write_text(json.dumps(plan, indent=2) + "\n", encoding="utf-8")
            print(f"written docs/plan/results/{name}.json", flush=True)
    page = PAGE.read_text(encoding="utf-8")
    new = render(page, {n: load(n) for n in names})
    if args.check:
        if new != page:
            print(f"{PAGE} is out of date: run python scripts/gen_plan_docs.py", file=sys.stderr)
            return 1
        return 0
    PAGE.write_text(new, encoding="utf-8")
    print(f"written {PAGE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
