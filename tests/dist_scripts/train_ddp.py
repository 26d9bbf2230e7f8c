"""A real transformers.Trainer DDP run on CPU with the ForgettingMonitor attached.

Run with:  python -m torch.distributed.run --nproc_per_node 2 train_ddp.py WORK_DIR MAX_STEPS LR [rewind]

With ``rewind`` the budget rewinds along the path and training continues (C.TRAIN_MONITOR_REWIND).

Each rank pretrains the tiny model identically (helpers.pretrained_model: deterministic on
CPU), rank 0 saves those weights to WORK_DIR/pretrained.pt, then every rank finetunes on one
repeated target text (the general NLL rises) with ``use_cpu=True`` (docs/design.md §8: without it
torchrun gives unsynchronised replicas). Each rank writes WORK_DIR/rank<r>.json with what it
saw: world size from torch.distributed, the monitor's history and decisions, the stop step,
which of the monitor's writers it held, the probe forwards it ran, and a checksum of its weights.
"""

from __future__ import annotations

import os
import sys

import dist_common as C  # noqa: N812  (this folder is sys.path[0])
import torch
import torch.distributed as dist
from helpers import TARGET_TEXT, make_tokenizer, pretrained_model


def weights_checksum(model: torch.nn.Module) -> list[float]:
    return [float(p.detach().double().sum()) for p in model.parameters()]


def main(work_dir: str, max_steps: int, lr: float, rewind: bool = False) -> None:
    from transformers import DataCollatorForLanguageModeling, Trainer, TrainerCallback, TrainingArguments

    from arena_callbacks import ForgettingMonitor
    from arena_callbacks.tensorboard import TensorBoardSink

    rank = int(os.environ["RANK"])
    tok = make_tokenizer()
    model = pretrained_model()
    if rank == 0:
        torch.save(model.state_dict(), os.path.join(work_dir, "pretrained.pt"))
    pretrained_sum = weights_checksum(model)

    monitor = ForgettingMonitor(
        C.TRAIN_MONITOR_REWIND if rewind else C.TRAIN_MONITOR,
        probes={"general": C.TRAIN_GENERAL, "facts": C.TRAIN_FACTS},
        target=C.TRAIN_TARGET,
    )

    # Probe forwards run under no_grad; training forwards do not. Record the rows of the former.
    probe_rows: list[list[int]] = []
    probe_forwards = {"n": 0}

    def record(m, args, kwargs):
        if not torch.is_grad_enabled():
            probe_forwards["n"] += 1
            probe_rows.extend(C.real_sequences(kwargs))

    model.register_forward_pre_hook(record, with_kwargs=True)

    class WatchWriters(TrainerCallback):
        """Which of the monitor's outputs this rank holds while training runs."""

        writer_dirs: set[str] = set()

        def on_step_end(self, args, state, control, **kwargs):
            for sink in monitor.engine.sinks:
                if isinstance(sink, TensorBoardSink):
                    self.writer_dirs.add(sink.writer.log_dir)

    watch = WatchWriters()
    args = TrainingArguments(
        output_dir=os.path.join(work_dir, "run"),
        max_steps=max_steps,
        per_device_train_batch_size=4,
        learning_rate=lr,
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        use_cpu=True,  # real DDP under torchrun on CPU (docs/design.md §8)
        ddp_timeout=60,  # a hang fails the test instead of blocking it
        seed=0,
        disable_tqdm=True,
    )
    data = [tok(TARGET_TEXT) for _ in range(64)]
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=data,
        processing_class=tok,
        data_collator=DataCollatorForLanguageModeling(tok, mlm=False),
        callbacks=[monitor, watch],
    )
    trainer.train()

    assert dist.is_initialized()
    report = {
        "rank": dist.get_rank(),
        "world_size": dist.get_world_size(),
        "backend": str(dist.get_backend()),
        "pid": os.getpid(),
        "args_world_size": args.world_size,
        "parallel_mode": str(args.parallel_mode),
        "ddp_wrapped": isinstance(trainer.model_wrapped, torch.nn.parallel.DistributedDataParallel),
        "global_step": trainer.state.global_step,
        "epoch": trainer.state.epoch,
        "max_steps": max_steps,
        "stop_step": monitor.stop_decision.step if monitor.stop_decision else None,
        "stop_message": monitor.stop_decision.message if monitor.stop_decision else None,
        "stop_decision": monitor.stop_decision.to_json() if monitor.stop_decision else None,
        "decisions": monitor.history.decisions,
        "history": [s.to_json() for s in monitor.history.snapshots],
        "history_path": str(monitor.history.path) if monitor.history.path is not None else None,
        "writer_dirs": sorted(watch.writer_dirs),
        "probe_forwards": probe_forwards["n"],
        "probe_rows": probe_rows,
        "pretrained_checksum": pretrained_sum,
        "final_checksum": weights_checksum(model),
        "rewinds": monitor.rewinds,
        "base_lrs": list(trainer.lr_scheduler.base_lrs),
    }
    dist.barrier()
    C.dump(os.path.join(work_dir, f"rank{report['rank']}.json"), report)
    print(f"rank {report['rank']}: stopped at step {trainer.state.global_step}", flush=True)


if __name__ == "__main__":
    C.run_main(main, sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), rewind=sys.argv[4:] == ["rewind"])
