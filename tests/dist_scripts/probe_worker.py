"""One rank of a 2-process (gloo) probe pass; started by tests/test_distributed.py.

Environment: RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT (as torchrun sets them).
Usage: probe_worker.py OUT_DIR

Writes OUT_DIR/rank<r>.json with what this rank saw:

* ``clean``: results of ProbeRunner.run on helpers.make_model(seed=0), the sequences this
  rank's forwards carried and how many forwards it ran;
* ``decision``: evaluate_budgets on the baseline and on a perturbed copy of the model;
* ``faults``: for a fault injected on rank 1 (first forward) and on rank 0 (second forward),
  the exception each rank got and how long the pass took;
* ``after_faults``: a clean pass after the faults (the ranks are still in step).
"""

from __future__ import annotations

import os
import sys
import time
from datetime import timedelta

import dist_common as C  # noqa: N812  (this folder is sys.path[0])
import torch.distributed as dist
from helpers import make_model, make_tokenizer


def main(out_dir: str) -> None:
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=60))
    assert dist.get_world_size() == 2, dist.get_world_size()
    assert dist.get_rank() == rank

    from arena_callbacks import Snapshot, evaluate_budgets
    from arena_callbacks.config import BudgetConfig
    from arena_callbacks.distributed import current_context
    from arena_callbacks.measurements import build_snapshot
    from arena_callbacks.probes import ProbeFailure

    ctx = current_context()
    assert (ctx.rank, ctx.world_size, ctx.active) == (rank, 2, True), ctx
    report: dict = {"rank": dist.get_rank(), "world_size": dist.get_world_size(), "pid": os.getpid()}

    tok = make_tokenizer()
    runner = C.build_runner(tok)
    model = make_model(seed=0, vocab_size=len(tok))
    model.train()  # the runner must switch to eval and back

    # Every forward the probe pass makes, with the real (unpadded) rows it carried.
    seen: list[list[list[int]]] = []
    handle = model.register_forward_pre_hook(lambda m, a, kw: seen.append(C.real_sequences(kw)), with_kwargs=True)
    clean = runner.run(model, ctx)
    handle.remove()
    report["clean"] = {
        "results": C.results_json(clean),
        "forwards": len(seen),
        "sequences": [s for batch in seen for s in batch],
        "train_mode_restored": model.training,
    }

    # Budgets: the same pure function on the same all-reduced numbers.
    budgets = [BudgetConfig(**b) for b in C.BUDGETS]
    base = Snapshot(0, build_snapshot(clean, clean, runner.probes), trigger="baseline")
    C.perturb(model)
    damaged = runner.run(model, ctx)
    snap = Snapshot(10, build_snapshot(damaged, clean, runner.probes))
    decision = evaluate_budgets(budgets, snap, [base])
    report["damaged"] = C.results_json(damaged)
    report["decision"] = {"json": decision.to_json(), "should_stop": decision.should_stop, "step": decision.step}
    # What every rank would act on: the callback also ORs should_stop over ranks.
    report["decision"]["any_stop"] = ctx.any(decision.should_stop)

    # Fault path: one rank's forward raises; every rank must get ProbeFailure, nobody waits.
    report["faults"] = []
    for bad_rank, on_call in ((1, 1), (0, 2)):
        calls = {"n": 0}

        def fault(m, a, kw, bad_rank=bad_rank, on_call=on_call, calls=calls):
            calls["n"] += 1
            if rank == bad_rank and calls["n"] == on_call:
                raise RuntimeError(f"injected fault on rank {rank}")

        handle = model.register_forward_pre_hook(fault, with_kwargs=True)
        start = time.perf_counter()
        entry: dict = {"bad_rank": bad_rank}
        try:
            runner.run(model, ctx)
            entry["raised"] = None
        except ProbeFailure as e:
            entry["raised"] = "ProbeFailure"
            entry["message"] = str(e)
            entry["cause"] = repr(e.__cause__) if e.__cause__ is not None else None
        except Exception as e:  # noqa: BLE001 - reported to the test, which fails on it
            entry["raised"] = type(e).__name__
            entry["message"] = str(e)
        finally:
            handle.remove()
        entry["seconds"] = time.perf_counter() - start
        entry["forwards"] = calls["n"]
        entry["train_mode_restored"] = model.training
        report["faults"].append(entry)

    # The process group is still usable and in step: a clean pass gives the damaged results again.
    report["after_faults"] = C.results_json(runner.run(model, ctx))

    dist.barrier()
    dist.destroy_process_group()
    C.dump(os.path.join(out_dir, f"rank{rank}.json"), report)
    print(f"rank {rank} of {world}: done", flush=True)


if __name__ == "__main__":
    C.run_main(main, sys.argv[1])
