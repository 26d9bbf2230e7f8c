"""One rank of a 2-process gloo group: a tiny model sharded with FSDP2 (``fully_shard``); rank 1
fails after its first forward (as an out-of-memory in the log-softmax would). Every rank must
get ProbeFailure quickly instead of waiting inside the next sharded forward.

Usage: python fsdp_fault.py <out_dir>   (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT set)
"""

import json
import os
import sys
import time
from datetime import timedelta
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]

import dist_common as C  # noqa: E402,N812
import torch.distributed as dist  # noqa: E402
from helpers import make_tokenizer  # noqa: E402

from arena_callbacks.distributed import current_context  # noqa: E402
from arena_callbacks.probes import ProbeFailure  # noqa: E402

out = Path(sys.argv[1])
rank = int(os.environ["RANK"])
dist.init_process_group("gloo", timeout=timedelta(seconds=60))
assert dist.get_world_size() == 2
tok = make_tokenizer()
runner = C.build_runner(tok)
model = C.sharded_tiny_model(tok)
ctx = current_context()
clean = C.results_json(runner.run(model, ctx))

calls = {"n": 0}


def fail_after_forward(module, args, output):
    calls["n"] += 1
    if rank == 1 and calls["n"] == 1:
        raise RuntimeError("injected fault after the forward on rank 1")


model.register_forward_hook(fail_after_forward)
start = time.monotonic()
record = {"rank": rank, "world_size": dist.get_world_size(), "clean": clean}
try:
    runner.run(model, ctx)
    record["raised"] = None
except ProbeFailure as e:
    record["raised"] = "ProbeFailure"
    record["message"] = str(e)
except Exception as e:  # anything else is a failure of the test
    record["raised"] = type(e).__name__
    record["message"] = str(e)[:300]
record["seconds"] = time.monotonic() - start
record["forwards"] = calls["n"]
(out / f"rank{rank}.json").write_text(json.dumps(record))
dist.barrier()
dist.destroy_process_group()
