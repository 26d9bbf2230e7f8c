"""The observer-effect runs (tests/observer.py) on one rank of a 2-process gloo group.

Run with:  python -m torch.distributed.run --nproc_per_node 2 observer_worker.py WORK_DIR

Each rank trains the same seeded runs without and with the monitor (Trainer, LoRA and full
finetuning, ``use_cpu=True`` for real DDP on the CPU) and writes WORK_DIR/rank<r>.json with both
records per case.
"""

from __future__ import annotations

import os
import sys

import dist_common as C
import observer
import torch.distributed as dist

CASES = (("trainer", "lora"), ("trainer", "full"))


def main(work_dir: str) -> None:
    rank = int(os.environ["RANK"])
    records = {}
    for kind, method in CASES:
        name = f"{kind}-{method}"
        # Tensorboard left out: every rank but 0 skips it anyway, and the records must be alike.
        extra = {"ddp_timeout": 60}  # a hang fails the test instead of blocking it
        plain = observer.run(os.path.join(work_dir, name, "plain"), trainer_kind=kind, method=method,
                             monitored=False, report_to=(), extra_args=extra)
        watched = observer.run(os.path.join(work_dir, name, "watched"), trainer_kind=kind, method=method,
                               monitored=True, report_to=(), extra_args=extra)
        records[name] = {"plain": plain, "watched": watched}
    assert dist.is_initialized()
    report = {"rank": dist.get_rank(), "world_size": dist.get_world_size(), "backend": str(dist.get_backend()),
              "records": records}
    dist.barrier()
    C.dump(os.path.join(work_dir, f"rank{rank}.json"), report)


if __name__ == "__main__":
    C.run_main(main, sys.argv[1])
