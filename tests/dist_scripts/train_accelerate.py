"""A small Trainer finetune with the ForgettingMonitor, for ``accelerate launch`` recipes.

Run with (the recipe of integrations/accelerate/README.md):

    accelerate launch --config_file integrations/accelerate/ddp_cpu.yaml \
        tests/dist_scripts/train_accelerate.py --output_dir OUT --max_steps 8 --use_cpu true

Any ``TrainingArguments`` field is a command-line flag (``HfArgumentParser``), as in TRL's
example scripts. The model is the tiny Llama of ``tests/helpers.py`` (random weights, seed 0:
identical on every rank); the target is one repeated text. Each rank writes
``OUT/rank<r>.json`` with what it saw: its process group (or none), the monitor's history and
decisions, the stop step, where it wrote history, and a checksum of its final weights.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # dist_common, helpers

import dist_common as C  # noqa: E402,N812
from helpers import TARGET_TEXT, corpus, make_model, make_tokenizer  # noqa: E402

GENERAL = [{"text": s} for s in corpus(9, seed=7)]
# The target is learned within a few steps: this budget stops the run, and every rank must agree.
MONITOR = {
    "cadence": {"every_n_steps": 2},
    "probe": {"batch_size": 4, "max_length": 64},
    "logging": {"tensorboard": False},
    "budgets": [
        {"key": "delta_nll/general", "max_rise": 0.0, "action": "log", "name": "any_rise"},
        {"key": "target/nll", "max_drop": 1.5, "action": "stop", "name": "target_learned"},
    ],
}


def main(argv: list[str]) -> None:
    import torch.distributed as dist
    from transformers import DataCollatorForLanguageModeling, HfArgumentParser, Trainer, TrainingArguments

    from arena_callbacks import ForgettingMonitor

    (args,) = HfArgumentParser(TrainingArguments).parse_args_into_dataclasses(argv)
    args.report_to, args.save_strategy, args.disable_tqdm = [], "no", True
    tok = make_tokenizer()
    model = make_model(seed=0, vocab_size=len(tok))
    monitor = ForgettingMonitor(MONITOR, probes={"general": GENERAL, "facts": C.TRAIN_FACTS}, target=C.TRAIN_TARGET)
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=[tok(TARGET_TEXT) for _ in range(64)],
        processing_class=tok,
        data_collator=DataCollatorForLanguageModeling(tok, mlm=False),
        callbacks=[monitor],
    )
    trainer.train()

    grouped = dist.is_available() and dist.is_initialized()
    rank = dist.get_rank() if grouped else 0
    report = {
        "rank": rank,
        "world_size": dist.get_world_size() if grouped else 1,
        "backend": str(dist.get_backend()) if grouped else None,
        "env_world_size": os.environ.get("WORLD_SIZE"),
        "args_world_size": args.world_size,
        "device": str(args.device),
        "ddp_wrapped": isinstance(trainer.model_wrapped, torch.nn.parallel.DistributedDataParallel),
        "pid": os.getpid(),
        "global_step": trainer.state.global_step,
        "epoch": trainer.state.epoch,
        "train_loss": [h["loss"] for h in trainer.state.log_history if "loss" in h],
        "stop_step": monitor.stop_decision.step if monitor.stop_decision else None,
        "decisions": monitor.history.decisions,
        "history": [s.to_json() for s in monitor.history.snapshots],
        "history_path": str(monitor.history.path) if monitor.history.path is not None else None,
        "final_checksum": [float(p.detach().double().sum()) for p in model.parameters()],
    }
    if grouped:
        dist.barrier()
    C.dump(os.path.join(args.output_dir, f"rank{rank}.json"), report)
    print(f"rank {rank}/{report['world_size']}: {trainer.state.global_step} steps", flush=True)


if __name__ == "__main__":
    C.run_main(main, sys.argv[1:])
