"""Rewinds under DeepSpeed ZeRO-3 in 2 CPU processes: rewind, save, resume, rewind again.

Run as users do (2 processes, gloo):

    accelerate launch --config_file integrations/accelerate/deepspeed_zero3.yaml --num_processes 2 \
        tests/dist_scripts/zero3_rewind.py OUT

For full finetuning and for LoRA, in turn (the same two processes):

* run A: the briefly pretrained tiny model trains 2 steps with a ``rewind`` budget that breaches
  at step 2 (path mode, ``then: continue``); the Trainer saves ``checkpoint-2`` after the rewind;
* run B: a new model, monitor and Trainer resume from ``checkpoint-2`` and train to step 4,
  where the budget breaches again and the second rewind runs.

Around each rewind the trainable parameters are gathered whole (a collective; every rank is in
the rewind): the fp32 master weights before it (``θ1``) and after it, and the weights the forward
uses after it (``ds_tensor`` partitions gathered). Rank 0 saves them with the step-0 state
(``θ0``) to ``OUT/<kind>/rewinds.pt`` for the test's float64 reference. Each rank writes
``OUT/<kind>/rank<r>.json``: world size, ZeRO stage, partitioning, the rewinds, and whether the
kept states came back from the checkpoint equal to what run A held (and ``θ0``'s partition equal
to this rank's slice of the step-0 weights).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # dist_common, helpers

import dist_common as C  # noqa: E402,N812
from helpers import TARGET_TEXT, corpus, make_tokenizer, pretrained_model  # noqa: E402

GENERAL = [{"text": s} for s in corpus(9, seed=7)]
LR = {"full": 1e-2, "lora": 1e-1}
MAX_RISE = {"full": 0.1, "lora": 0.03}


def monitor_config(kind: str) -> dict:
    return {
        "cadence": {"every_n_steps": 2},
        "probe": {"batch_size": 4, "max_length": 64},
        "logging": {"tensorboard": False},
        "plasticity": "nll_reduction",  # continuous: the rule can prefer an interior α
        "budgets": [{"key": "delta_nll/general", "max_rise": MAX_RISE[kind], "action": "rewind"}],
        "rewind": {"mode": "path", "then": "continue", "max_rewinds": 3, "alphas": [0.5], "refine": 1},
    }


def _skip_shm_op_build() -> None:
    import importlib

    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None


def build_model(kind: str) -> torch.nn.Module:
    model = pretrained_model()
    if kind == "lora":
        import peft

        torch.manual_seed(1)
        model = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["q_proj", "down_proj", "o_proj"]))
    return model


def full_master(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The fp32 master weights of every trainable parameter, gathered whole (a collective)."""
    from deepspeed.utils import safe_get_full_fp32_param

    from arena_callbacks.shards import trainable_parameters

    return {n: safe_get_full_fp32_param(p).detach().cpu().clone() for n, p in trainable_parameters(model).items()}


def full_forward_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The weights a forward uses (the ``ds_tensor`` partitions gathered), trainable ones only."""
    import deepspeed

    from arena_callbacks.shards import trainable_parameters

    params = trainable_parameters(model)
    with deepspeed.zero.GatheredParameters(list(params.values()), modifier_rank=None):
        return {n: p.detach().cpu().clone() for n, p in params.items()}


def my_slice(full: torch.Tensor, numel: int, rank: int) -> torch.Tensor:
    """This rank's ZeRO-3 partition of ``full``: a flat slice, zero-padded at the end."""
    flat = torch.nn.functional.pad(full.flatten(), (0, numel * 2 - full.numel()))
    return flat[rank * numel:(rank + 1) * numel]


def main(out: Path) -> None:
    _skip_shm_op_build()
    import torch.distributed as dist
    from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments

    from arena_callbacks import ForgettingMonitor
    from arena_callbacks.rewinder import Rewinder
    from arena_callbacks.shards import trainable_parameters

    records: list[dict] = []
    original = Rewinder.rewind

    def traced(self, model, *args, **kwargs):
        theta1 = full_master(model)
        info, metrics = original(self, model, *args, **kwargs)
        records.append({"info": info, "theta1": theta1, "after_master": full_master(model),
                        "after_forward": full_forward_weights(model)})
        return info, metrics

    Rewinder.rewind = traced
    tok = make_tokenizer()
    for kind in ("full", "lora"):
        folder = out / kind
        folder.mkdir(parents=True, exist_ok=True)
        records.clear()
        theta0 = {n: p.detach().clone() for n, p in trainable_parameters(build_model(kind)).items()}

        def trainer_for(max_steps: int, kind=kind, folder=folder):
            args = TrainingArguments(
                output_dir=str(folder), max_steps=max_steps, per_device_train_batch_size=4, learning_rate=LR[kind],
                seed=0, logging_steps=1, save_strategy="steps", save_steps=2, report_to=[], disable_tqdm=True,
                use_cpu=True, ddp_timeout=60,
            )
            monitor = ForgettingMonitor(monitor_config(kind), probes={"general": GENERAL}, target=C.TRAIN_TARGET)
            trainer = Trainer(
                model=build_model(kind), args=args, train_dataset=[tok(TARGET_TEXT) for _ in range(64)],
                processing_class=tok, data_collator=DataCollatorForLanguageModeling(tok, mlm=False),
                callbacks=[monitor],
            )
            return trainer, monitor

        trainer_a, monitor_a = trainer_for(2)
        trainer_a.train()
        rewinder_a = monitor_a.engine.rewinder
        kept_a = {"best": rewinder_a.best.get(), "theta0": rewinder_a.theta0.get(), "best_step": rewinder_a.best.step}
        rank = dist.get_rank()
        engine = trainer_a.model_wrapped
        params = trainable_parameters(trainer_a.model)

        trainer_b, monitor_b = trainer_for(4)
        # The kept states as restored at train start, before anything else can move them.
        restored: dict = {}
        begin = monitor_b.on_train_begin

        def on_train_begin(*a, begin=begin, monitor=monitor_b, restored=restored, **k):
            result = begin(*a, **k)
            r = monitor.engine.rewinder
            restored.update(best=r.best.get(), theta0=r.theta0.get(), best_step=r.best.step,
                            rewinds=len(r.rewinds))
            return result

        monitor_b.on_train_begin = on_train_begin
        trainer_b.train(resume_from_checkpoint=str(folder / "checkpoint-2"))

        numel = {n: int(p.ds_tensor.numel()) for n, p in params.items()}
        report = {
            "rank": rank,
            "world_size": dist.get_world_size(),
            "backend": str(dist.get_backend()),
            "engine_zero_stage": engine.zero_optimization_stage(),
            "partitioned": all(hasattr(p, "ds_id") for p in params.values()),
            "local_numel": sum(numel.values()),
            "full_numel": sum(t.numel() for t in theta0.values()),
            "trainable": sorted(theta0),
            "rewinds_a": monitor_a.engine.rewinds,
            "rewinds_b": monitor_b.engine.rewinds,
            "global_step_a": trainer_a.state.global_step,
            "global_step_b": trainer_b.state.global_step,
            "restored_rewinds": restored["rewinds"],
            "best_step": [kept_a["best_step"], restored["best_step"]],
            "best_round_trip": all(torch.equal(kept_a["best"][n], restored["best"][n]) for n in kept_a["best"]),
            "theta0_round_trip": all(torch.equal(kept_a["theta0"][n], restored["theta0"][n]) for n in theta0),
            "theta0_is_my_slice": all(torch.equal(restored["theta0"][n], my_slice(theta0[n], numel[n], rank))
                                      for n in theta0),
            "history_b": [s.to_json() for s in monitor_b.history.snapshots],
        }
        if rank == 0:
            torch.save({"theta0": theta0, "rewinds": [{k: v for k, v in r.items() if k != "info"} for r in records]},
                       folder / "rewinds.pt")
        dist.barrier()
        C.dump(os.path.join(folder, f"rank{rank}.json"), report)
        print(f"rank {rank} {kind}: rewinds {len(report['rewinds_a'])} + {len(report['rewinds_b'])}", flush=True)


if __name__ == "__main__":
    C.run_main(main, Path(sys.argv[1]))
