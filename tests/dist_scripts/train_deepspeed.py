"""A small Trainer finetune under DeepSpeed ZeRO on CPU processes, with the ForgettingMonitor
measuring probes, geometry (baseline activation cache) and weight spectra.

Run as users do, with either launcher (2 processes, gloo):

    accelerate launch --config_file integrations/accelerate/deepspeed_zero3.yaml --num_processes 2 \
        tests/dist_scripts/train_deepspeed.py --output_dir OUT --max_steps 4 --use_cpu true
    python -m torch.distributed.run --nproc_per_node 2 tests/dist_scripts/train_deepspeed.py \
        --output_dir OUT --max_steps 4 --use_cpu true --deepspeed ds_config.json

Any ``TrainingArguments`` field is a flag (``HfArgumentParser``). The model is the tiny Llama of
``tests/helpers.py`` (seed 0: the same on every rank); rank 0 saves its step-0 weights to
``OUT/initial.pt`` and the final weights, gathered whole from the ZeRO-3 partitions, to
``OUT/final.pt``. With ``ARENA_TEST_REWIND_DIR`` set, the same processes then run
``zero3_rewind.py``'s rewind, resume and rewind scenario into that folder. Each rank writes
``OUT/rank<r>.json``: its process group, the DeepSpeed engine
and ZeRO stage it ran under, whether its parameters were partitioned, the monitor's history and
decisions, and what happened when a monitor with a ``rewind`` budget was started on the same
(partitioned) model, and, under ZeRO-1/2, whether a rewind's ``load_state`` reached the
optimizer's master weights.

DeepSpeed's shared-memory all-reduce op (``deepspeed_shm_comm``) is kept from being JIT-compiled
here (about 2 minutes of C++ on the first run): it serves only ``inference_all_reduce``
(DeepSpeed-Inference tensor parallelism), never ZeRO training, whose collectives go to gloo.
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
MONITOR = {
    "cadence": {"every_n_steps": 2, "at_train_end": True},
    "probe": {"batch_size": 4, "max_length": 64},
    "logging": {"tensorboard": False},
    # Full finetuning: geometry against activations cached at step 0, spectra against the
    # step-0 weights (both gathered from ZeRO-3 partitions by the monitor).
    "geometry": {"enabled": True, "tokens_per_module": 64, "reference": "cache", "cache_dtype": "fp32"},
    "spectra": {"enabled": True, "every_n_steps": 2, "modules": ["layers.{0,1}.mlp.down_proj", "o_proj"]},
    "budgets": [{"key": "delta_nll/general", "max_rise": 0.0, "action": "log", "name": "any_rise"}],
}
PROBES = {"general": GENERAL, "facts": C.TRAIN_FACTS}


def _skip_shm_op_build() -> None:
    import importlib

    # By module name: the attribute ``deepspeed.comm.torch`` is the torch package itself.
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None


def full_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter whole on every rank (ZeRO-3 partitions gathered: a collective)."""
    params = list(model.parameters())
    if any(hasattr(p, "ds_id") for p in params):
        import deepspeed

        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            return {n: p.detach().clone() for n, p in model.named_parameters()}
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def rewind_start(trainer, tok) -> dict:
    """Start a monitor whose budget rewinds on this (trained, maybe partitioned) model: it must
    start (and probe its baseline) under every ZeRO stage."""
    from transformers import TrainerControl, TrainerState

    from arena_callbacks import ForgettingMonitor

    cfg = {**MONITOR, "geometry": {"enabled": False}, "spectra": {"enabled": False},
           "logging": {"tensorboard": False, "output_dir": os.path.join(trainer.args.output_dir, "rewind_check")},
           "budgets": [{"key": "retention/general", "max_drop": 0.1, "action": "rewind"}]}
    monitor = ForgettingMonitor(cfg, probes={"general": GENERAL})
    try:
        monitor.on_train_begin(trainer.args, TrainerState(), TrainerControl(), model=trainer.model,
                               processing_class=tok)
    except ValueError as e:
        return {"raised": "ValueError", "message": str(e), "probed": bool(monitor.history.snapshots)}
    return {"raised": None, "message": None, "probed": bool(monitor.history.snapshots)}


def rewind_master_sync(trainer, tok) -> bool | None:
    """Under ZeRO-1/2: after ``load_state`` (what a rewind does), the optimizer's master weights,
    which the next step starts from, hold the loaded values too. ``None`` where there are none."""
    from arena_callbacks.rewind import load_state

    params = dict(trainer.model.named_parameters())
    if not all(callable(getattr(p, "set_full_hp_param", None)) for p in params.values()):
        return None
    from deepspeed.utils import safe_get_full_fp32_param

    initial = {n: p.detach() for n, p in make_model(seed=0, vocab_size=len(tok)).named_parameters()}
    load_state(trainer.model, initial)
    return all(torch.equal(safe_get_full_fp32_param(p).cpu(), initial[n]) for n, p in params.items())


def main(argv: list[str]) -> None:
    _skip_shm_op_build()
    import torch.distributed as dist
    from transformers import DataCollatorForLanguageModeling, HfArgumentParser, Trainer, TrainingArguments

    from arena_callbacks import ForgettingMonitor

    (args,) = HfArgumentParser(TrainingArguments).parse_args_into_dataclasses(argv)
    args.report_to, args.save_strategy, args.disable_tqdm = [], "no", True
    tok = make_tokenizer()
    model = make_model(seed=0, vocab_size=len(tok))
    if int(os.environ.get("RANK", "0")) == 0:
        torch.save(model.state_dict(), os.path.join(args.output_dir, "initial.pt"))
    monitor = ForgettingMonitor(MONITOR, probes=PROBES, target=C.TRAIN_TARGET)
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
    engine = trainer.model_wrapped
    plugin = getattr(trainer.accelerator.state, "deepspeed_plugin", None)
    params = list(trainer.model.parameters())
    state = full_state(trainer.model)
    if rank == 0:
        torch.save(state, os.path.join(args.output_dir, "final.pt"))
    report = {
        "rank": rank,
        "world_size": dist.get_world_size() if grouped else 1,
        "backend": str(dist.get_backend()) if grouped else None,
        "args_world_size": args.world_size,
        "device": str(args.device),
        "pid": os.getpid(),
        "engine": f"{type(engine).__module__}.{type(engine).__name__}",
        "engine_zero_stage": engine.zero_optimization_stage() if hasattr(engine, "zero_optimization_stage") else None,
        "plugin_zero_stage": plugin.zero_stage if plugin is not None else None,
        "partitioned": bool(params) and all(hasattr(p, "ds_id") for p in params),
        "local_numel": sum(int(p.ds_tensor.numel()) if hasattr(p, "ds_tensor") else p.numel() for p in params),
        "full_numel": sum(v.numel() for v in state.values()),
        "trainable_parameters": monitor.engine.trainable_parameters,
        "global_step": trainer.state.global_step,
        "epoch": trainer.state.epoch,
        "train_loss": [h["loss"] for h in trainer.state.log_history if "loss" in h],
        "decisions": monitor.history.decisions,
        "history": [s.to_json() for s in monitor.history.snapshots],
        "history_path": str(monitor.history.path) if monitor.history.path is not None else None,
        "final_checksum": [float(v.double().sum()) for v in state.values()],
        "rewind": rewind_start(trainer, tok),
        "master_synced": rewind_master_sync(trainer, tok),  # last: it moves the weights back to step 0
    }
    if grouped:
        dist.barrier()
    C.dump(os.path.join(args.output_dir, f"rank{rank}.json"), report)
    print(f"rank {rank}/{report['world_size']}: {trainer.state.global_step} steps under {report['engine']}", flush=True)
    then = os.environ.get("ARENA_TEST_REWIND_DIR")
    if then:  # the rewind scenario in the same two processes (zero3_rewind.py), saving a launch
        import zero3_rewind

        zero3_rewind.main(Path(then))


if __name__ == "__main__":
    C.run_main(main, sys.argv[1:])
