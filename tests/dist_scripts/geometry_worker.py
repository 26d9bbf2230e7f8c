"""One rank of a 2-process gloo group: geometry capture on rows split across ranks.

Writes ``rank<r>.json`` with the geometry metrics of a LoRA model (reference through
``disable_adapter()``) and of a plain model (reference cached at the baseline).
Usage: python geometry_worker.py <out_dir>   (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT set)
"""

import json
import os
import sys
from datetime import timedelta
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]

import dist_common as C  # noqa: E402,N812
import torch.distributed as dist  # noqa: E402
from helpers import make_tokenizer  # noqa: E402

from arena_callbacks.distributed import current_context  # noqa: E402

out = Path(sys.argv[1])
rank = int(os.environ["RANK"])
dist.init_process_group("gloo", timeout=timedelta(seconds=60))
assert dist.get_world_size() == 2
tok = make_tokenizer()
runner = C.build_runner(tok)
record = {"rank": rank, "world_size": dist.get_world_size()}
for mode in ("disable_adapter", "cache"):
    record[mode] = C.geometry_metrics_for(runner, current_context(), mode)
(out / f"rank{rank}.json").write_text(json.dumps(record))
dist.barrier()
dist.destroy_process_group()
