"""Training overhead of the monitor: the same finetune with and without it, side by side.

Two setups, each run in one process with the variants interleaved (fresh model per run):

* ``smollm2``: SmolLM2-135M-Instruct + LoRA r=16 (``q_proj``, ``v_proj``), batch 8 of 64-token
  pydoc passages, 100 steps on the CPU; probes: built-in ``general_text`` and
  ``world_knowledge`` (16 rows each: a probe costs about two training steps, so that the 3%
  budget probes about once every 60-70 steps).
* ``tiny``: the 2-layer Llama and tokenizer of ``tests/helpers.py``, briefly pretrained, on
  the test target text, 300 steps; one text probe of 32 rows.

Variants: ``plain`` (no monitor) and ``monitor@b`` with the scheduler's ``cadence.overhead_budget``
``b`` (0.03, the default; the tiny setup also 0.1; ``--budgets``), with ``at_train_end`` off so
that only budgeted probes count. Reported per variant: wall and process CPU time of
``trainer.train()``, the one-time baseline pass (the monitor's own ``summary.json``
``overhead.baseline_seconds``) apart, the overhead excluding it, ``(monitored − baseline −
plain) / plain`` paired by repetition (target ≤ the budget) and the same split into the optimizer
steps' own time (a callback before the monitor times each step) and the time around them, where
the probes run (the steps' time moves between runs of the same finetune; the rest is the
monitor's), the monitor's own share of the
wall time after the baseline (``overhead.fraction``, measured inside one run and so immune to
the machine's speed drifting between runs), and the floor: probe forward FLOPs over training
FLOPs for the probes the cadence ran (forward ≈ 2 FLOPs per parameter per token, vocabulary
projection only at scored positions; a LoRA training step ≈ 2 forwards' worth: forward plus
activation gradients).

    python benchmarks/overhead.py
    python benchmarks/overhead.py --setups tiny --steps 100 --repeats 1
    python benchmarks/overhead.py --device cuda
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, model_label, set_threads, write_json  # noqa: E402

MODEL = "smollm2-135m-instruct"


# --------------------------------------------------------------------------------------
# Setups: model, data, probes
# --------------------------------------------------------------------------------------


def smollm2_setup(device: str, spec: str = MODEL) -> dict[str, Any]:
    import peft

    from arena_callbacks.capabilities import build_capabilities, text_passages
    from arena_callbacks.models import load_model_and_tokenizer

    _, tok = load_model_and_tokenizer(spec, progress=False)
    data = [tok(t, truncation=True, max_length=64) for t in text_passages("train")]

    def model() -> Any:
        m, _ = load_model_and_tokenizer(spec, progress=False)
        return peft.get_peft_model(
            m.to(device), peft.LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "v_proj"])
        )

    return {
        "tok": tok,
        "data": data,
        "model": model,
        "lr": 2e-3,
        "trainable": "lora",
        "steps": 100,
        "repeats": 2,
        "budgets": (0.03,),
        "probes": build_capabilities(["general_text", "world_knowledge"], n=16),
    }


def tiny_setup(device: str, spec: str | None = None) -> dict[str, Any]:  # spec: the smollm2 setup's only
    from helpers import TARGET_TEXT, corpus, make_tokenizer, pretrained_model

    tok = make_tokenizer()
    return {
        "tok": tok,
        "data": [tok(TARGET_TEXT) for _ in range(64)],
        "lr": 1e-2,
        "trainable": "full",
        "steps": 300,
        "repeats": 20,
        "budgets": (0.03, 0.1),
        "model": lambda: pretrained_model().to(device),
        "probes": {"general": [{"text": s} for s in corpus(32, seed=1)]},
    }


SETUPS = {"smollm2": smollm2_setup, "tiny": tiny_setup}


# --------------------------------------------------------------------------------------
# One run
# --------------------------------------------------------------------------------------


def make_trainer(setup: dict[str, Any], steps: int, out: str, device: str, cadence: dict[str, Any] | None,
                 callbacks: list[Any] | None = None) -> tuple[Any, Any]:
    """A quiet Trainer for ``setup`` writing under ``out``, with the monitor when ``cadence`` is
    given (its ``cadence`` section; probes as in every overhead run); returns (trainer, monitor)."""
    from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments
    from transformers.trainer_callback import PrinterCallback

    from arena_callbacks import ForgettingMonitor

    tok, monitor = setup["tok"], None
    callbacks = list(callbacks or [])
    if cadence is not None:
        config = {"cadence": cadence,
                  "probe": {"batch_size": 16, "max_length": 128, "max_examples": 32, "progress_bar": False},
                  "logging": {"output_dir": f"{out}/arena", "tensorboard": False}}
        monitor = ForgettingMonitor(config, probes=setup["probes"], tokenizer=tok)
        callbacks.append(monitor)
    args = TrainingArguments(output_dir=out, max_steps=steps, per_device_train_batch_size=8, learning_rate=setup["lr"],
                             report_to=[], save_strategy="no", logging_steps=10**6, seed=0, disable_tqdm=True,
                             use_cpu=device == "cpu")
    trainer = Trainer(model=setup["model"](), args=args, train_dataset=setup["data"], processing_class=tok,
                      data_collator=DataCollatorForLanguageModeling(tok, mlm=False), callbacks=callbacks)
    trainer.remove_callback(PrinterCallback)  # no log lines on stdout (they would time the terminal)
    return trainer, monitor


def step_timer() -> Any:
    """A callback recording when each optimizer step begins and ends; placed before the monitor,
    so that its probe passes fall between steps, not in them."""
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self) -> None:
            self.begin: list[float] = []
            self.end: list[float] = []

        def on_step_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            self.begin.append(time.perf_counter())

        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            self.end.append(time.perf_counter())

        def step_seconds(self) -> list[float]:
            return [e - b for b, e in zip(self.begin, self.end)]

    return StepTimer()


def train(setup: dict[str, Any], steps: int, budget: float | None, device: str) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as out:
        cadence = None if budget is None else {"overhead_budget": budget, "at_train_end": False}
        timer = step_timer()
        trainer, monitor = make_trainer(setup, steps, out, device, cadence, callbacks=[timer])
        model = trainer.model
        t, c = time.perf_counter(), time.process_time()
        trainer.train()
        seconds, cpu = time.perf_counter() - t, time.process_time() - c
        # The run splits into its optimizer steps and everything around them (data loading,
        # callbacks, the monitor's probe steps and baseline pass).
        result: dict[str, Any] = {"seconds": seconds, "cpu_seconds": cpu, "steps_seconds": sum(timer.step_seconds())}
        if monitor is not None:
            summary = json.loads(Path(out, "arena", "summary.json").read_text())
            result["overhead"] = summary.get("overhead")
            result["probe_steps"] = [s.step for s in monitor.history]
            result["flops"] = flops(model, monitor, steps, setup)
    del model, trainer
    gc.collect()
    return result


def flops(model: Any, monitor: Any, steps: int, setup: dict[str, Any]) -> dict[str, float]:
    """Probe forward FLOPs per pass and training FLOPs per step, ≈ 2 per parameter per token."""
    from arena_callbacks.distributed import DistContext

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = base.get_output_embeddings().weight
    embed = base.get_input_embeddings().weight
    params = {id(p): p for n, p in base.named_parameters() if "lora_" not in n}
    n_params = sum(p.numel() for p in params.values())
    # Embedding lookups cost no FLOPs; the head is counted where logits are computed.
    body = n_params - embed.numel() - (0 if head is embed else head.numel())
    runner = monitor.runner
    probe_tokens = 0
    for batch in runner._batches(DistContext()):
        if batch.conts:
            probe_tokens += sum(len(c.seq.ids) - 1 - c.prefix for c in batch.conts)
        else:  # a tree row also carries its other choices' tokens after the context
            probe_tokens += sum(batch.row_lengths())
    scored = sum(len(s.ids) - s.start for name in runner.probes for s in runner.sequences(name))
    probe = 2 * body * probe_tokens + 2 * head.numel() * scored
    train_tokens = 8 * statistics.mean(len(x["input_ids"]) for x in setup["data"])  # batch × mean row length
    factor = 2 if setup["trainable"] == "lora" else 3  # forward + activation grads (+ weight grads)
    step = factor * 2 * (body + head.numel()) * train_tokens
    return {"probe_pass": float(probe), "train_step": float(step), "probe_tokens": probe_tokens,
            "scored_positions": scored, "params": n_params}


# --------------------------------------------------------------------------------------


def excess_per_pair(monitored: list[float], baseline: list[float], plain: list[float]) -> list[float]:
    """``(monitored − baseline − plain) / plain`` for each monitored run and the plain run of its
    repetition (adjacent in time)."""
    return [(m - b - p) / p for m, b, p in zip(monitored, baseline, plain)]


def bench_setup(name: str, args: argparse.Namespace) -> dict[str, Any]:
    setup = SETUPS[name](args.device, args.model)
    budgets = [float(b) for b in args.budgets.split(",")] if args.budgets else list(setup["budgets"])
    steps = args.steps or setup["steps"]
    repeats = args.repeats or setup["repeats"]
    variants: dict[str, float | None] = {"plain": None, **{f"monitor@{b:g}": b for b in budgets}}
    runs: dict[str, list[dict[str, Any]]] = {v: [] for v in variants}
    names = list(variants)
    if args.device != "cpu":
        # The first run on a GPU also pays for CUDA's and cuBLAS's start-up: warm up untimed.
        train(setup, min(steps, 10), None, args.device)
    for rep in range(repeats):
        for v in names if rep % 2 == 0 else names[::-1]:
            runs[v].append(train(setup, steps, variants[v], args.device))
            print(f"  {name} {v}: {runs[v][-1]['seconds']:.1f} s", flush=True)
    plain = [r["seconds"] for r in runs["plain"]]
    plain_cpu = [r["cpu_seconds"] for r in runs["plain"]]
    out: dict[str, Any] = {
        "steps": steps,
        "repeats": repeats,
        "plain_s": statistics.median(plain),
        "plain_times_s": plain,
        "plain_steps_s": [r["steps_seconds"] for r in runs["plain"]],
        "plain_cpu_s": plain_cpu,
        "variants": {},
    }
    for v in names[1:]:
        rs = runs[v]
        base = [r["overhead"]["baseline_seconds"] for r in rs]
        extra = excess_per_pair([r["seconds"] for r in rs], base, plain)
        # The same excess split in two: the optimizer steps' own time, which the machine's drift
        # moves by several percent between runs, and the rest, the time around the steps less the
        # baseline pass, where the monitor's probe steps fall.
        in_steps = [(r["steps_seconds"] - p["steps_seconds"]) / p["seconds"] for r, p in zip(rs, runs["plain"])]
        outside = [e - s for e, s in zip(extra, in_steps)]
        f = rs[-1]["flops"]
        probes = len(rs[-1]["probe_steps"]) - 1  # after the baseline
        floor = probes * f["probe_pass"] / (steps * f["train_step"])
        # CPU time of the baseline pass, scaled from its wall time by the run's CPU/wall ratio.
        extra_cpu = [(r["cpu_seconds"] * (1 - b / r["seconds"]) - p) / p for r, b, p in zip(rs, base, plain_cpu)]
        share = [r["overhead"]["fraction"] for r in rs if r["overhead"] and r["overhead"].get("fraction") is not None]
        budget = variants[v]
        out["variants"][v] = {
            "budget": budget,
            "seconds": [r["seconds"] for r in rs],
            "baseline_seconds": base,
            "cpu_seconds": [r["cpu_seconds"] for r in rs],
            "overhead_excluding_baseline": statistics.median(extra),
            "in_steps_per_pair": in_steps,
            "outside_steps_per_pair": outside,
            "in_steps": statistics.median(in_steps),
            "outside_steps": statistics.median(outside),
            "overhead_excluding_baseline_cpu": statistics.median(extra_cpu),
            "monitor_share": statistics.median(share) if share else None,
            "overhead_including_baseline": statistics.median((r["seconds"] - p) / p for r, p in zip(rs, plain)),
            "monitor_accounting": rs[-1]["overhead"],
            "probe_steps": rs[-1]["probe_steps"],
            "flops": f,
            "flops_floor": floor,
            "baseline_flops_over_run": f["probe_pass"] / (steps * f["train_step"]),
            "meets_target": statistics.median(extra) <= budget,
        }
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--setups", default="smollm2,tiny")
    ap.add_argument("--steps", type=int, default=None, help="training steps (default: smollm2 100, tiny 300)")
    ap.add_argument("--budgets", default=None,
                    help="cadence.overhead_budget values, comma-separated (default: smollm2 0.03, tiny 0.03,0.1)")
    ap.add_argument(
        "--repeats",
        type=int,
        default=None,
        help="interleaved repetitions of every variant (default: smollm2 2, tiny 20: its runs are short and noisy)",
    )
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--model", default=MODEL, help="the smollm2 setup's model spec (built-in name or folder)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    set_threads(args.threads)
    import logging

    logging.getLogger("arena_callbacks").setLevel(logging.WARNING)
    results = {name: bench_setup(name, args) for name in args.setups.split(",")}
    report = {
        "benchmark": "overhead",
        "model": model_label(args.model),
        "machine": machine(args.device),
        "results": results,
        "note": "cadence.overhead_budget schedules probes; at_train_end is off so that only budgeted probes count",
    }
    path = write_json("overhead" if args.device == "cpu" else f"overhead_{args.device}", report, args.out)
    for name, r in results.items():
        for v, x in r["variants"].items():
            print(
                f"{name:<8} {v:<14} plain {r['plain_s']:6.1f} s; "
                f"baseline pass {statistics.median(x['baseline_seconds']):5.1f} s "
                f"(once); overhead excl. baseline {x['overhead_excluding_baseline']:+.1%} wall, "
                f"{x['overhead_excluding_baseline_cpu']:+.1%} CPU time (in the steps {x['in_steps']:+.1%}, "
                f"around them {x['outside_steps']:+.1%}), monitor's share "
                f"{x['monitor_share'] if x['monitor_share'] is None else format(x['monitor_share'], '.1%')} "
                f"(budget {x['budget']:.0%}); "
                f"probes at {x['probe_steps']}; FLOPs floor {x['flops_floor']:.2%}"
            )
    print(f"written to {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
