"""examples/custom_loop.py on one rank of a 2-process gloo group (DDP on the CPU).

Run with:  python -m torch.distributed.run --nproc_per_node 2 custom_loop_worker.py WORK_DIR CONFIG MAX_STEPS

Each rank runs the example's ``main`` (the tiny model, ``--cpu``) with the monitor config in the
JSON file CONFIG, and writes WORK_DIR/rank<r>.json with its process group, the monitor's history
and decisions, where the loop stopped, and a checksum of its final weights.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import dist_common as C
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))

import custom_loop


def main(work_dir: str, config: str, max_steps: str) -> None:
    out = os.path.join(work_dir, "out")
    result = custom_loop.main(["--output_dir", out, "--config", config, "--max_steps", max_steps, "--cpu"])
    engine = result.engine
    assert dist.is_initialized()
    rank = dist.get_rank()
    report = {
        "rank": rank,
        "world_size": dist.get_world_size(),
        "backend": str(dist.get_backend()),
        "loop_world_size": result.world_size,
        "engine_world_size": engine.ctx.world_size,
        "step": result.step,
        "stopped": result.stopped,
        "stop_step": engine.stop_decision.step if engine.stop_decision else None,
        "decisions": engine.history.decisions,
        "history": [s.to_json() for s in engine.history.snapshots],
        "history_path": str(engine.history.path) if engine.history.path is not None else None,
        "final_checksum": [float(p.detach().double().sum()) for p in result.model.parameters()],
    }
    dist.barrier()
    C.dump(os.path.join(work_dir, f"rank{rank}.json"), report)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    C.run_main(main, *sys.argv[1:4])
