"""Does ``arena-callbacks plan`` predict a real run here? Its probe pass, step time and interval against a run.

Two setups, the ones of ``benchmarks/overhead.py`` (the same ``Trainer``, data and monitor
settings), on this CPU:

* ``smollm2``: SmolLM2-135M-Instruct + LoRA r16 (q_proj, v_proj), batch 8 of 64-token rows;
  probes ``general_text`` and ``world_knowledge``, 16 rows each;
* ``tiny``: the 2-layer Llama of ``tests/helpers.py``, full finetuning; one text probe of 32 rows.

Per repetition, side by side in one process: the plan (``accelerator: cpu``: the probe pass
and the training step timed on the model built from its config with random weights, see
docs/plan.md), then the real run with the budgeted cadence, stopped after its second probe step
(the tiny model: its eighth). Compared, as medians over the run's probe steps: the plan's probe
pass against the run's ``probe/seconds`` (the baseline pass apart: its first forwards pay
one-time costs), its training step against the step time the schedule measured, and its probe
interval against the intervals the schedule set after each probe step. Target: the probe pass
and the interval within 25% (0.75-1.25), as the median of the repetitions' ratios.

    python benchmarks/plan_check.py
    python benchmarks/plan_check.py --setups tiny --repeats 1
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, set_threads, write_json  # noqa: E402

TOLERANCE = 0.25
BUDGETS = {"smollm2": 0.1, "tiny": 0.1}
#: Probe steps after the baseline each run goes on to: the tiny model's 20-ms passes are noisy
#: one by one, SmolLM2's take seconds each.
PROBES = {"smollm2": 2, "tiny": 8}
#: Plan + run pairs per setup (``--repeats`` overrides): a SmolLM2 pair takes minutes.
REPEATS = {"smollm2": 2, "tiny": 3}


def files_for(name: str, folder: Path, setup: dict[str, Any], budget: float) -> dict[str, Any]:
    """The model folder, the monitor file (the overhead run's monitor settings) and the plan's inputs."""
    from helpers import corpus, make_model

    monitor: dict[str, Any] = {
        "cadence": {"overhead_budget": budget, "at_train_end": False},
        "probe": {"batch_size": 16, "max_length": 128, "max_examples": 32, "progress_bar": False},
        "logging": {"tensorboard": False},
    }
    if name == "smollm2":
        from arena_callbacks.models import resolve_model

        model = str(resolve_model("smollm2-135m-instruct"))
        monitor["probes"] = {n: {"capability": n, "n": 16} for n in ("general_text", "world_knowledge")}
        lora = {"lora_rank": 16, "lora_targets": ("q_proj", "v_proj")}
    else:
        model = str(folder / "tiny")
        make_model().config.save_pretrained(model)
        setup["tok"].save_pretrained(model)
        (folder / "general.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in corpus(32, seed=1)))
        monitor["probes"] = {"general": "general.jsonl"}
        lora = {}
    (folder / "monitor.yaml").write_text(json.dumps(monitor))
    # The collator pads a batch to its longest row: the model computes 8 × that width per step.
    rows = [len(x["input_ids"]) for x in setup["data"]]
    rng = random.Random(0)
    seq = round(statistics.mean(max(rng.sample(rows, 8)) for _ in range(1000)))
    return {"model": model, "monitor": str(folder / "monitor.yaml"), "tokens_per_step": 8 * seq, "seq_length": seq,
            "accelerator": "cpu", **lora}


def real_run(setup: dict[str, Any], budget: float, device: str, probes: int) -> dict[str, Any]:
    """The finetune with the monitor until its ``probes``-th probe step after the baseline; what
    the schedule measured and set along the way."""
    from overhead import make_trainer
    from transformers import TrainerCallback

    with tempfile.TemporaryDirectory() as out:
        cadence = {"overhead_budget": budget, "at_train_end": False}
        trainer, monitor = make_trainer(setup, 2000, out, device, cadence)
        schedule = monitor.engine.schedule
        set_by: list[dict[str, Any]] = []
        reschedule = schedule.reschedule

        def watched(step: int, last_step: int, probed: bool = False) -> dict[str, float]:
            values = reschedule(step, last_step, probed)
            set_by.append({"step": step, "probed": probed, **values})
            return values

        schedule.reschedule = watched

        class StopAfterProbes(TrainerCallback):
            def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
                if len(monitor.history) > probes:
                    control.should_training_stop = True

        trainer.add_callback(StopAfterProbes())  # after the monitor, so it sees this step's probe
        trainer.train()
        records = [(s.step, s.metrics["probe/seconds"]) for s in monitor.history]
    after_probe = [s for s in set_by if s["probed"]]
    return {
        "probe_steps": [r[0] for r in records],
        "baseline_seconds": records[0][1],
        "probe_seconds": [r[1] for r in records[1:]],
        "schedule": set_by,
        "intervals": [s["arena/probe_interval"] for s in after_probe],
        "interval": statistics.median(s["arena/probe_interval"] for s in after_probe),
        "step_seconds": statistics.median(s["arena/step_seconds"] for s in after_probe),
        "interval_from_baseline": set_by[0]["arena/probe_interval"],
    }


def check_setup(name: str, args: argparse.Namespace) -> dict[str, Any]:
    import overhead

    from arena_callbacks.planning import PlanInputs, make_plan

    setup = overhead.SETUPS[name](args.device)
    reps: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        inputs = files_for(name, Path(tmp), setup, BUDGETS[name])
        for rep in range(args.repeats or REPEATS[name]):
            plan = make_plan(PlanInputs(**inputs, repeats=args.plan_repeats))
            real = real_run(setup, BUDGETS[name], args.device, PROBES[name])
            measured_probe = statistics.median(real["probe_seconds"])
            row = {
                "plan": {"probe_seconds": plan["probes"]["seconds"], "step_seconds": plan["training"]["step_seconds"],
                         "interval": plan["schedule"]["interval"], "probe_fit": plan["accelerator"]["timing"].get(
                             "probe_fit"), "train_fit": plan["accelerator"]["timing"].get("train_fit"),
                         "per_rank": plan["probes"]["per_rank"]},
                "real": real,
                "probe_ratio": plan["probes"]["seconds"] / measured_probe,
                "step_ratio": plan["training"]["step_seconds"] / real["step_seconds"],
                "interval_ratio": plan["schedule"]["interval"] / real["interval"],
            }
            reps.append(row)
            print(f"  {name} #{rep}: probe pass {plan['probes']['seconds']:.3f} s planned / {measured_probe:.3f} s run "
                  f"= {row['probe_ratio']:.2f}; step {plan['training']['step_seconds']:.4f} / "
                  f"{real['step_seconds']:.4f} s = {row['step_ratio']:.2f}; interval {plan['schedule']['interval']} / "
                  f"{real['interval']:.0f} = {row['interval_ratio']:.2f}", flush=True)
    out: dict[str, Any] = {"budget": BUDGETS[name], "inputs": inputs, "repeats": reps}
    for key in ("probe_ratio", "step_ratio", "interval_ratio"):
        out[key] = statistics.median(r[key] for r in reps)
    out["meets_target"] = all(abs(out[k] - 1) <= TOLERANCE for k in ("probe_ratio", "interval_ratio"))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--setups", default="tiny,smollm2")
    ap.add_argument("--repeats", type=int, default=None, help="plan + run pairs per setup (default: tiny 3, "
                    "smollm2 2)")
    ap.add_argument("--plan-repeats", type=int, default=3, help="timed repetitions of each slice in the plan")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    set_threads(args.threads)
    import logging

    logging.getLogger("arena_callbacks").setLevel(logging.WARNING)
    results = {name: check_setup(name, args) for name in args.setups.split(",")}
    report = {"benchmark": "plan_check", "machine": machine(args.device), "tolerance": TOLERANCE, "results": results,
              "note": "ratios are planned / measured, the median over repetitions; each plan timed right before "
                      "its run, in the same process"}
    for name, r in results.items():
        print(f"{name}: probe pass {r['probe_ratio']:.2f}, step {r['step_ratio']:.2f}, interval "
              f"{r['interval_ratio']:.2f} (planned / measured; target within {TOLERANCE:.0%}): "
              f"{'PASS' if r['meets_target'] else 'FAIL'}")
    print(f"written {write_json('plan_check', report, args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
