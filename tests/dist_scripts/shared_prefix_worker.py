"""One rank of a 2-process gloo group: multiple-choice probes with shared contexts.

Writes ``rank<r>.json`` with the results, this rank's per-sequence log-likelihoods and the
rows of every forward it ran (contexts are long enough to be shared: tree rows, one forward per batch).
Run by ``tests/test_probes_fast.py``.
"""

from __future__ import annotations

import json
import os
import sys
from datetime import timedelta
from pathlib import Path

import torch.distributed as dist

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from helpers import make_model, make_tokenizer  # noqa: E402
from test_probes_fast import MULTI, SINGLE, build, real_tokens  # noqa: E402

from arena_callbacks import ProbeSettings  # noqa: E402
from arena_callbacks.distributed import current_context  # noqa: E402


def main(out_dir: str) -> None:
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=60))
    tok = make_tokenizer()
    runner = build(tok, ProbeSettings(batch_size=3), mc=MULTI, one=SINGLE)
    model = make_model(vocab_size=len(tok))
    seen: list[list[int]] = []
    handle = model.register_forward_pre_hook(lambda m, a, kw: seen.append(real_tokens(kw)), with_kwargs=True)
    results = runner.run(model, current_context())
    handle.remove()
    report = {
        "rank": rank,
        "forwards": len(seen),
        "planned": len(runner._batches(current_context())),
        "results": {n: [r.nll, r.score, r.examples, r.tokens] for n, r in results.items()},
        "scores": [[*k, v] for k, v in runner.last_scores.items()],
    }
    (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(report))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
