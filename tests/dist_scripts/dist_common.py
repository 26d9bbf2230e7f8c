"""Probe data, settings and small utilities shared by the multi-process scripts and their test.

Imported both by ``tests/test_distributed.py`` (single-process reference) and by the worker
scripts in this folder (one copy per rank), so every side probes exactly the same rows.
"""

from __future__ import annotations

import json
import math
import os
import sys
import traceback
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
TESTS = HERE.parent
if str(TESTS) not in sys.path:  # for ``helpers`` when a script runs on its own
    sys.path.insert(0, str(TESTS))

from helpers import corpus  # noqa: E402

# Odd row counts everywhere: with two ranks (row i on rank i % 2) every split is uneven.
TEXT = [{"text": s} for s in corpus(5, seed=11)]
MC = [
    {"context": "the cat", "choices": [" runs.", " sings into the river.", " is"], "answer": 0},
    {"question": "one two three", "choices": [" four", " five six"], "label": 1},
    {"context": "red blue", "choices": [" green", " dog"], "answer": 0},
]
COMP = [
    {"prompt": "one two three", "completion": " four five"},
    {"prompt": "the dog", "completion": " jumps."},
    {"prompt": "seven eight", "completion": " nine ten."},
]
# batch_size 2: rank 0 holds 3 text / 5 multiple-choice / 2 completion sequences (2+2+1 = 5
# batches: two short choices share a row), rank 1 holds 2 / 2 / 1 (1+1+1 = 3 batches), so rank 1
# runs 2 filler batches.
PROBE_SETTINGS = {"batch_size": 2, "max_length": 64}

# A budget on the perturbed model (see perturb) that breaches, one that stays within budget and
# one in breach with patience left.
BUDGETS = [
    {"key": "retention/general", "max_drop": 0.1},
    {"key": "delta_nll/facts", "max_rise": 1000.0, "name": "loose"},
    {"key": "sp/stability", "max_drop": 0.01, "patience": 3, "name": "patient"},
]

# ---- end-to-end training run (train_ddp.py) ----
TRAIN_GENERAL = [{"text": s} for s in corpus(15, seed=7)]
TRAIN_FACTS = [
    {"context": "red blue", "choices": [" green", " dog."], "answer": 0},
    {"context": "one two", "choices": [" three", " fish"], "answer": 0},
    {"context": "the cat", "choices": [" runs.", " nine"], "answer": 0},
]
TRAIN_TARGET = [{"prompt": "one two three", "completion": " four five six"}]
TRAIN_MONITOR = {
    "cadence": {"every_n_steps": 2},
    "probe": {"batch_size": 4, "max_length": 64},
    "budgets": [{"key": "retention/general", "max_drop": 0.2, "patience": 2}],
}
# The same run with path-wise rewinds that let training continue (train_ddp.py ... rewind).
TRAIN_MONITOR_REWIND = {
    **TRAIN_MONITOR,
    "budgets": [{"key": "retention/general", "max_drop": 0.2, "action": "rewind"}],
    "operating_point": {"weight": 1.0},
    "rewind": {"mode": "path", "then": "continue", "max_rewinds": 2, "alphas": [0.3, 0.6]},
}


def generative_probes() -> dict[str, Any]:
    """Two generative probes with different answer lengths (3 and 7 tokens) and a text probe: over
    2 ranks with batch size 2, a rank decodes one probe while the other decodes the other, or
    nothing, so decode steps with nothing of one's own happen on both sides."""
    from arena_callbacks import Probe

    short = [{"prompt": t["text"][:20], "answer": "the"} for t in TEXT]  # 5 rows: 3 + 2
    long = [{"prompt": p["prompt"], "answer": p["completion"].split()[0]} for p in COMP]  # 3 rows: 2 + 1
    return {"general": TEXT, "short": Probe(short, scorer="contains", max_new_tokens=3),
            "long": Probe(long, scorer="contains", max_new_tokens=7, stop=["."])}


def build_runner(tokenizer: Any, probes: dict[str, Any] | None = None, settings: dict[str, Any] | None = None):
    from arena_callbacks import ProbeRunner, ProbeSet, ProbeSettings

    cfg = ProbeSettings(**(settings or PROBE_SETTINGS))
    probes = probes or {"general": TEXT, "facts": MC, "answers": COMP}
    runner = ProbeRunner({n: ProbeSet.build(n, d, cfg) for n, d in probes.items()}, cfg)
    runner.prepare(tokenizer)
    return runner


def perturb(model: Any, seed: int = 1234, scale: float = 1.0) -> None:
    """Deterministic damage to the output head (identical on every rank): the NLL rises sharply."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        w = model.get_output_embeddings().weight
        w.add_(torch.randn(w.shape, generator=g) * scale)


def results_json(results: dict[str, Any]) -> dict[str, dict[str, Any]]:
    from dataclasses import asdict

    return {name: asdict(r) for name, r in results.items()}


def real_sequences(kwargs: dict[str, Any]) -> list[list[int]]:
    """The unpadded token ids of each sequence of a forward's batch.

    With a 2D padding mask, one per row. With a 4D mask (rows holding several sequences), the
    tokens of a row grouped by the first key each attends to (its sequence's start); padding
    sees only itself, and every sequence here feeds at least two tokens.
    """
    import torch

    ids, mask = kwargs["input_ids"], kwargs["attention_mask"]
    if mask.dim() == 2:
        return [row[m.bool()].tolist() for row, m in zip(ids, mask)]
    allowed = mask[:, 0] if mask.dtype == torch.bool else mask[:, 0] == 0
    out = []
    for row, a in zip(ids, allowed):
        starts = a.int().argmax(-1).tolist()  # first allowed key of each query
        groups: dict[int, list[int]] = {}
        for col, start in enumerate(starts):
            groups.setdefault(start, []).append(int(row[col]))
        out += [g for g in groups.values() if len(g) > 1]
    return out


def run_main(main: Any, *args: Any, **kwargs: Any) -> None:
    """A worker's entry point: any failure prints its traceback and exits at once with 1, without
    waiting for the other rank in atexit handlers (a failed rank must never hang the test)."""
    try:
        main(*args, **kwargs)
    except BaseException:
        traceback.print_exc()
        sys.stdout.flush()
        os._exit(1)


def dump(path: str | os.PathLike[str], data: dict[str, Any]) -> None:
    def clean(v: Any) -> Any:
        if isinstance(v, float) and not math.isfinite(v):
            return str(v)
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        return v

    tmp = Path(str(path) + ".tmp")
    tmp.write_text(json.dumps(clean(data), indent=1), encoding="utf-8")
    tmp.replace(path)


def geometry_metrics_for(runner: Any, ctx: Any, mode: str) -> dict[str, float]:
    """Geometry keys after a deterministic change to the model (same on every rank).

    ``disable_adapter``: a LoRA model whose adapter weights are moved; ``cache``: a plain model
    measured at baseline, then changed.
    """
    import peft
    import torch
    from helpers import make_model, make_tokenizer

    from arena_callbacks.capture import GeometryTracker
    from arena_callbacks.config import GeometryConfig

    model = make_model(seed=0, vocab_size=len(make_tokenizer()))
    if mode == "disable_adapter":
        model = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["down_proj", "o_proj"]))
    tracker = GeometryTracker(GeometryConfig(enabled=True, tokens_per_module=64, reference=mode, cache_dtype="fp32"),
                              runner)
    tracker.setup(model)

    def measure(baseline: bool) -> dict[str, float]:
        with tracker.capturing() as cap:
            runner.run(model, ctx, observer=cap)
        return tracker.measure(model, ctx, baseline=baseline)

    measure(True)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if mode == "cache" or "lora_B" in name:
                p.add_(0.2 * torch.randn(p.shape, generator=g))
    return measure(False)


def sharded_tiny_model(tokenizer: Any) -> Any:
    """The tiny test model with each decoder layer and the root sharded by FSDP2 over 2 CPU ranks."""
    from helpers import make_model
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (2,))
    model = make_model(seed=0, vocab_size=len(tokenizer))
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model
