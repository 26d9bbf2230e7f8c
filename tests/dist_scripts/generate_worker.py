"""One rank of a 2-process gloo group: a generative probe pass on a model sharded with FSDP2.

Rows are split unevenly (rank 0 decodes 3 prompts in 2 batches, rank 1 decodes 2 in 1 batch and
idles through the other), and answers end at different steps, so ranks spend decode steps with
nothing of their own to do: they must still take part in every sharded forward.

Usage: python generate_worker.py <out_dir>   (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT set)
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
tok = make_tokenizer()
runner = C.build_runner(tok, probes=C.generative_probes(), settings={"batch_size": 2, "max_length": 64})
model = C.sharded_tiny_model(tok)
results = runner.run(model, current_context())
record = {
    "rank": rank, "world_size": dist.get_world_size(),
    "results": C.results_json(results),
    "answers": {f"{p}/{r}": [list(g.ids), g.text, g.stopped] for (p, r), g in runner.last_generations.items()},
}
(out / f"rank{rank}.json").write_text(json.dumps(record))
dist.barrier()
dist.destroy_process_group()
