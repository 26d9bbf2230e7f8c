#!/usr/bin/env python
"""A plain PyTorch training loop with the forgetting monitor: no Trainer, no framework.

The monitor's lines are marked ``ARENA``: ``begin`` before the first update, ``after_step`` after
every optimizer step (stop, or go on from rewound weights), ``save`` with the loop's own
checkpoints (``begin(resume_from=...)`` restores), and ``end``.

    python examples/custom_loop.py --output_dir runs/loop --max_steps 40 --save_every 10
    python examples/custom_loop.py --output_dir runs/loop --max_steps 40 --resume runs/loop/checkpoint-20
    python examples/custom_loop.py --output_dir runs/loop --monitor monitor.yaml   # probes from one file
    torchrun --nproc_per_node 2 examples/custom_loop.py --output_dir runs/loop_ddp --max_steps 40 --cpu

``--model``: a local causal-LM folder, a ``.gguf`` file or a built-in name (``arena_callbacks.models``);
the default ``tiny`` is the test suite's small random Llama (``tests/helpers.py``): no download.
Under ``torchrun`` every rank runs this loop (DDP: gloo on the CPU, NCCL on GPUs) and makes every
monitor call: the probe rows are split across the ranks and their sums all-reduced.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from arena_callbacks.engine import ForgettingEngine  # noqa: E402  (after the path for a plain checkout)

TASK = ["one two three four five six seven eight nine ten."]  # what this finetune teaches
GENERAL = [{"text": t} for t in (  # held out: what it should not forget
    "the cat runs over the red bridge and the dog reads.", "a bird sings with the fish under the blue river.",
    "the model learns a fact and keeps the answer.", "two green mountains and one city was not red.",
    "the question is what the dog writes into the river.", "a fish jumps from the water but the cat sings.",
)]
TARGET = [{"prompt": "one two three", "completion": " four five six"}]  # the task, as a probe
MONITOR = {
    "cadence": {"every_n_steps": 5},
    "probe": {"batch_size": 8, "max_length": 64},
    "budgets": [{"key": "delta_nll/general", "max_rise": 1.0, "action": "rewind"}],
    "rewind": {"mode": "checkpoint", "then": "continue", "max_rewinds": 2},
}


@dataclass
class LoopResult:
    step: int  # the last optimizer step taken
    stopped: bool  # the monitor stopped the run before max_steps
    engine: ForgettingEngine  # engine.history, engine.rewinds, engine.stop_decision
    model: torch.nn.Module  # the trained model (not the DDP wrapper)
    lr: float  # the learning rate at the end (each continued rewind lowers it)
    world_size: int


def train(model: torch.nn.Module, tokenizer: Any, *, output_dir: str | Path, config: Any = None,
          probes: dict[str, Any] | None = None, target: Any = TARGET, texts: list[str] = TASK, max_steps: int = 40,
          lr: float = 1e-2, batch_size: int = 8, save_every: int = 0, resume: str | Path | None = None,
          seed: int = 0, device: str = "cpu", monitor: str | Path | None = None) -> LoopResult:
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    model.to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 5))  # warm-up, then constant
    step = 0
    if resume is not None:  # the loop's own checkpoint: weights, optimizer, scheduler, step
        saved = torch.load(Path(resume) / "loop.pt", map_location=device)
        model.load_state_dict(saved["model"])
        opt.load_state_dict(saved["optimizer"])
        sched.load_state_dict(saved["scheduler"])
        step = saved["step"]
    ddp = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    enc = tokenizer(list(texts), padding=True, return_tensors="pt")
    ids, mask = enc["input_ids"], enc["attention_mask"]
    labels = ids.masked_fill(mask == 0, -100)

    # ARENA (1/4): probes and budgets; measures the baseline (resuming: restores the saved state).
    # Every rank makes every call; the engine is given the model itself, not the DDP wrapper.
    # `monitor`: one file with the settings, probes and target (docs/probes.md), as for the other tools.
    if monitor is not None:
        engine = ForgettingEngine.from_config(monitor, tokenizer=tokenizer)
    else:
        engine = ForgettingEngine(config or MONITOR, probes or {"general": GENERAL}, target=target, tokenizer=tokenizer)
    engine.begin(model, step=step, output_dir=output_dir, resume_from=resume, log=_print if rank == 0 else None)

    stopped = False
    while step < max_steps and not stopped:
        # Each step's rows depend on the step alone, so a resumed run sees the same batches.
        g = torch.Generator().manual_seed(seed * 1_000_003 + step)
        rows = torch.randint(len(texts), (batch_size * world,), generator=g)[rank::world]
        loss = ddp(input_ids=ids[rows].to(device), attention_mask=mask[rows].to(device),
                   labels=labels[rows].to(device)).loss
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        step += 1

        # ARENA (2/4): after every optimizer step; probes when the cadence says so.
        outcome = engine.after_step(model, step, optimizer=opt, lr_scheduler=sched)
        stopped = outcome.stop  # a budget said stop (or a rewind ended the run): same step on every rank
        # outcome.rewound: the model already holds the rewound weights; if training goes on, the
        # engine has also cleared the optimizer's moments and lowered the learning rate (and the
        # scheduler's base rates). Saving now makes the newest checkpoint hold what was loaded.
        if save_every and (step % save_every == 0 or outcome.rewound):
            save_checkpoint(Path(output_dir) / f"checkpoint-{step}", model, opt, sched, step, engine)

    engine.end(model, step)  # ARENA (4/4): a last probe if the cadence asks for one; summary.json
    return LoopResult(step, stopped, engine, model, opt.param_groups[0]["lr"], world)


def save_checkpoint(folder: Path, model: torch.nn.Module, opt: Any, sched: Any, step: int,
                    engine: ForgettingEngine) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    if not dist.is_initialized() or dist.get_rank() == 0:
        state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                 "step": step}
        torch.save(state, folder / "loop.pt")
    engine.save(folder)  # ARENA (3/4): the monitor's state and kept tensors (every rank its own)
    if dist.is_initialized():
        dist.barrier()  # the checkpoint is complete before any rank goes on


def _print(metrics: dict[str, float], step: int) -> None:
    shown = {k: v for k, v in metrics.items() if k.startswith("delta_nll/") or k in ("sp/stability", "sp/plasticity")}
    print(f"[arena] step {step}: " + ", ".join(f"{k}={v:.3f}" for k, v in sorted(shown.items())), flush=True)


def load_model(spec: str) -> tuple[torch.nn.Module, Any]:
    if spec == "tiny":
        sys.path.insert(0, str(ROOT / "tests"))
        from helpers import make_model, make_tokenizer

        tok = make_tokenizer()
        return make_model(seed=0, vocab_size=len(tok)), tok
    from arena_callbacks.models import load_model_and_tokenizer

    model, tok = load_model_and_tokenizer(spec)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return model, tok


def main(argv: list[str] | None = None) -> LoopResult:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="tiny", help="'tiny', a local model folder, a .gguf file or a built-in name")
    p.add_argument("--output_dir", required=True)
    p.add_argument("--config", default=None, help="the monitor's settings (YAML/JSON file); default: MONITOR")
    p.add_argument("--monitor", default=None,
                   help="a monitor file: settings, probes and target in one (docs/probes.md); replaces --config")
    p.add_argument("--max_steps", type=int, default=40)
    p.add_argument("--lr", type=float, default=None, help="default: 1e-2 for 'tiny', else 2e-5")
    p.add_argument("--batch_size", type=int, default=8, help="rows per rank and step")
    p.add_argument("--save_every", type=int, default=0, help="save checkpoint-<step> every N steps (0: never)")
    p.add_argument("--resume", default=None, help="a checkpoint-<step> folder to resume from")
    p.add_argument("--cpu", action="store_true", help="train on the CPU even with GPUs (gloo under torchrun)")
    args = p.parse_args(argv)
    cuda = torch.cuda.is_available() and not args.cpu
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    model, tok = load_model(args.model)
    result = train(model, tok, output_dir=args.output_dir, config=args.config, max_steps=args.max_steps,
                   lr=args.lr or (1e-2 if args.model == "tiny" else 2e-5), batch_size=args.batch_size,
                   save_every=args.save_every, resume=args.resume, device="cuda" if cuda else "cpu",
                   monitor=args.monitor)
    if result.engine.ctx.is_main:
        print(f"{'stopped' if result.stopped else 'finished'} at step {result.step}; history: "
              f"{result.engine.output_dir}/history.jsonl", flush=True)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
    if dist.is_initialized():
        dist.destroy_process_group()
