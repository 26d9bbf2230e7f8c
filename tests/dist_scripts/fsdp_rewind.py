"""One rank of a 2-process gloo group: rewind primitives on a model sharded with FSDP2.

Each rank keeps its own shard (``capture_state`` of ``DTensor`` locals), the weights are moved
("training"), and then (1) the kept state is restored in place and (2) the path at α = 0 and
α = 1 is loaded; every rank runs the probes after each (sharded forwards need all ranks).

Usage: python fsdp_rewind.py <out_dir>   (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT set)
"""

import json
import os
import sys
from datetime import timedelta
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]

import dist_common as C  # noqa: E402,N812
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from helpers import make_tokenizer  # noqa: E402

from arena_callbacks.distributed import current_context  # noqa: E402
from arena_callbacks.rewind import capture_state, interpolate, load_state, path_rules  # noqa: E402

out = Path(sys.argv[1])
rank = int(os.environ["RANK"])
dist.init_process_group("gloo", timeout=timedelta(seconds=60))
tok = make_tokenizer()
runner = C.build_runner(tok)
model = C.sharded_tiny_model(tok)
ctx = current_context()

theta0 = capture_state(model)
local_numel = sum(t.numel() for t in theta0.values())
base = C.results_json(runner.run(model, ctx))
model.reshard()  # the root stays unsharded after a forward
with torch.no_grad():  # "training": a move of every rank's shard, seeded by rank
    g = torch.Generator().manual_seed(100 + rank)
    for p in model.parameters():
        local = p.to_local()
        local.add_(0.2 * torch.randn(local.shape, generator=g))
moved = C.results_json(runner.run(model, ctx))
theta1 = capture_state(model)
load_state(model, theta0)
restored = C.results_json(runner.run(model, ctx))
exact = all(torch.equal(capture_state(model)[k], theta0[k]) for k in theta0)
rules = path_rules(theta0)
load_state(model, interpolate(theta0, theta1, 1.0, rules))
at_one = C.results_json(runner.run(model, ctx))
load_state(model, interpolate(theta0, theta1, 0.0, rules))
at_zero = C.results_json(runner.run(model, ctx))
record = {
    "rank": rank, "world_size": dist.get_world_size(), "local_numel": local_numel,
    "full_numel": sum(p.numel() for p in model.parameters()),
    "base": base, "moved": moved, "restored": restored, "exact": exact, "at_one": at_one, "at_zero": at_zero,
}
(out / f"rank{rank}.json").write_text(json.dumps(record))
dist.barrier()
dist.destroy_process_group()
