"""One run of the study (benchmarks/study.py): a seeded finetune with the monitor attached, every
probe step scored on every row of the study's capability sets, then the rewind candidates.

The monitor (a plain :class:`~arena_callbacks.ForgettingMonitor` attached to ``transformers.Trainer``)
probes the *full* sets (``probe.max_examples: null``) with geometry on and no budgets. The per-row
results of each probe step are kept, so that the analysis (``study_analysis.py``) can rebuild, from
the same rows, the metrics of any 24-row probe the monitor would have drawn (``ProbeSet.build``'s
seeded sample) and evaluate any budget on them offline with the pure ``evaluate_budgets``.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "examples"))

TARGET = "target"


@dataclass(frozen=True)
class Grid:
    """Everything that shapes the study (its cache key is the run name plus :meth:`key`)."""

    model: str  # "smollm2-135m-instruct" or "quick" (the tiny model of examples/demo.py)
    methods: tuple[str, ...]
    regimes: tuple[str, ...]  # aggressive | gentle | control
    seeds: tuple[int, ...]
    steps: int
    batch_size: int
    probe_every: int
    probe_rows: int  # rows of the monitor's probe (a sample of the full set)
    realizations: int  # probe samples per set (probe.seed = 0..realizations-1)
    full_rows: dict[str, int | None] = field(default_factory=dict)  # set -> rows (None: all available)
    target_rows: int = 24
    geometry_tokens: int = 512
    alphas: tuple[float, ...] = (0.25, 0.5, 0.75)
    refine: int = 2
    gentle_factor: float = 0.1
    text_set: str = "general_text"  # the NLL budget's set, geometry's tokens
    score_set: str = "arithmetic"  # the score budget's set

    def key(self) -> dict[str, Any]:
        """The settings a cached run must match (as JSON reads them back)."""
        d = asdict(self)
        for k in ("methods", "regimes", "seeds", "realizations"):
            d.pop(k)  # adding runs or probe samples keeps the finished ones
        return json.loads(json.dumps(d))


def run_name(method: str, regime: str, seed: int) -> str:
    return f"{regime}-{method}-s{seed}"


def learning_rate(grid: Grid, method: str, regime: str) -> float:
    from arena import METHODS  # examples/arena.py: the "aggressive" rates

    lr = METHODS[method][1 if grid.model == "quick" else 0]
    return lr if regime == "aggressive" else lr * grid.gentle_factor


# ------------------------------------------------------------------ data


def load_base(grid: Grid, base_cache: Path | None = None) -> tuple[Any, Any, dict[str, list[dict]], list[dict],
                                                                  list[dict], list[dict]]:
    """(model, tokenizer, full capability sets, target rows, target training rows, control training rows)."""
    from arena import snake_case_rows

    if grid.model == "quick":
        import demo

        model, tok = demo.base_model(demo.QUICK_BASE, base_cache or REPO / ".cache" / "demo-base-quick")
        rng = random.Random(1234)
        text_train, text_held = demo.general_documents()
        code_train, code_held = demo.code_documents(demo.QUICK_BASE.code_files)
        sets = {"general": [{"text": t} for t in text_held], "code": [{"text": c} for c in code_held]}
        sets = {n: rng.sample(rows, min(len(rows), grid.full_rows.get(n) or len(rows))) for n, rows in sets.items()}
        target = demo.kind_examples(grid.target_rows, rng, text_train[::10], code_train[::10])
        train = demo.kind_examples(2000, random.Random(0), [d for i, d in enumerate(text_train) if i % 10],
                                   [d for i, d in enumerate(code_train) if i % 10])
        control = [{"text": t} for t in text_train]
        return model, tok, sets, target, train, control
    from arena_callbacks.capabilities import CAPABILITIES, build_capability, text_passages
    from arena_callbacks.models import load_model_and_tokenizer

    model, tok = load_model_and_tokenizer(grid.model, progress=False)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    sets = {}
    for name, n in grid.full_rows.items():
        available = CAPABILITIES[name].available()
        sets[name] = build_capability(name, n=min(n or available, available), seed=0, tokenizer=tok)
    target = snake_case_rows(grid.target_rows, random.Random(1234))
    train = snake_case_rows(2000, random.Random(0), exclude={r["prompt"][23:-8] for r in target})
    control = [{"text": t} for t in text_passages("train")]
    return model, tok, sets, target, train, control


def tokenize_text(rows: list[dict], tok) -> list[dict[str, list[int]]]:
    out = []
    for r in rows:
        ids = tok(r["text"])["input_ids"][:128] + [tok.eos_token_id]
        out.append({"input_ids": ids, "labels": list(ids)})
    return out


# ------------------------------------------------------------------ one run


def _rows(results: dict[str, Any]) -> dict[str, list[list[float]]]:
    return {name: [[round(x, 6) for x in row] for row in r.rows] for name, r in results.items()}


def execute(grid: Grid, method: str, regime: str, seed: int, log=print, base_cache: Path | None = None
            ) -> dict[str, Any]:
    """Train one run and return its record (JSON-ready)."""
    from arena import wrap
    from demo import tokenize_task
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments, set_seed

    from arena_callbacks import ForgettingMonitor, MonitorConfig
    from arena_callbacks.rewind import capture_state

    t_start = time.perf_counter()
    set_seed(seed)
    model, tok, sets, target, train, control = load_base(grid, base_cache)
    set_seed(seed)  # as examples/arena.py build_model: after the base, before get_peft_model
    model = wrap(method, model, grid.model == "quick")
    lr = learning_rate(grid, method, regime)
    data = tokenize_text(control, tok) if regime == "control" else tokenize_task(train, tok)
    config = MonitorConfig.model_validate({
        "cadence": {"every_n_steps": grid.probe_every, "at_train_end": True},
        "probe": {"batch_size": 16, "max_length": 256, "truncate": True, "max_examples": None, "precision": "fp32",
                  "progress_bar": False},
        "operating_point": {"weight": 1.0},
        "geometry": {"enabled": True, "probes": [grid.text_set], "tokens_per_module": grid.geometry_tokens,
                     "reference": "cache"},
        "logging": {"tensorboard": False, "log_to_trainer": False, "sp_plane_image": False},
    })
    monitor = ForgettingMonitor(config, probes=sets, target=target)
    recorded: list[dict[str, Any]] = []
    measurer = monitor.engine.measurer
    plain_metrics = measurer.metrics

    def metrics(results, seconds):  # one call per probe step (no budgets: no rewinds inside the run)
        recorded.append({"rows": _rows(results), "seconds": seconds})
        return plain_metrics(results, seconds)

    measurer.metrics = metrics
    theta0 = {k: v.detach().clone() for k, v in capture_state(model).items()}
    out = Path(tempfile.mkdtemp(prefix="study-run-"))
    try:
        targs = TrainingArguments(
            output_dir=str(out), max_steps=grid.steps, per_device_train_batch_size=grid.batch_size,
            learning_rate=lr, lr_scheduler_type="constant", weight_decay=0.0, report_to=[], save_strategy="no",
            logging_strategy="no", use_cpu=True, seed=seed, disable_tqdm=True,
        )
        trainer = Trainer(model=model, args=targs, train_dataset=data, processing_class=tok,
                          data_collator=DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=-100),
                          callbacks=[monitor, _Progress(grid, log)])
        t0 = time.perf_counter()
        trainer.train()
        train_s = time.perf_counter() - t0
        snaps = monitor.history.snapshots
        assert len(snaps) == len(recorded), (len(snaps), len(recorded))
        probe_s = sum(r["seconds"] for r in recorded)
        steps = []
        for snap, rec in zip(snaps, recorded):
            geo = {k: v for k, v in snap.metrics.items() if k.startswith("geometry/") and math.isfinite(v)}
            steps.append({"step": snap.step, "rows": rec["rows"], "geometry": geo})
        record: dict[str, Any] = {
            "method": method, "regime": regime, "seed": seed, "learning_rate": lr,
            "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "sets": {n: {"kind": p.kind, "rows": len(p.rows)} for n, p in measurer.probes.items()},
            "steps": steps,
        }
        t1 = time.perf_counter()
        if regime == "aggressive":  # the runs that forget (the rewind states cost as much as the run)
            record["rewind"] = path_candidates(grid, model, measurer.runner, theta0, record, log)
        record["seconds"] = {"train_and_probes": train_s, "probes": probe_s, "rewind": time.perf_counter() - t1,
                             "total": time.perf_counter() - t_start}
        return record
    finally:
        shutil.rmtree(out, ignore_errors=True)


def _Progress(grid: Grid, log):
    """A line per probe step (after the monitor's probe): step, seconds so far."""
    from transformers import TrainerCallback

    class Progress(TrainerCallback):
        t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step % grid.probe_every == 0:
                log(f"      step {state.global_step}/{grid.steps} probed, {time.perf_counter() - self.t0:.0f} s")

    return Progress()


def path_candidates(grid: Grid, model, runner, theta0, record, log) -> dict[str, Any]:
    """Score the states on the path θ0 → θ_final: the α grid (uniform and layer-wise), then the
    ``refine`` midpoints the uniform path search would probe next (chosen, as the monitor does, on
    the seed-0 probe sample: study_analysis.path_choice)."""
    import study_analysis as sa

    from arena_callbacks.distributed import DistContext
    from arena_callbacks.rewind import alphas_for, capture_state, interpolate, load_state, next_alpha, path_rules

    theta1 = {k: v.detach().clone() for k, v in capture_state(model).items()}
    rules, names = path_rules(theta0), list(theta1)
    points: list[dict[str, Any]] = []

    def probe(alpha: float, layerwise: bool, why: str) -> None:
        t = time.perf_counter()
        load_state(model, interpolate(theta0, theta1, alphas_for(names, alpha, layerwise), rules))
        rows = _rows(runner.run(model, DistContext(), desc="study rewind"))
        points.append({"alpha": alpha, "layerwise": layerwise, "why": why, "rows": rows,
                       "seconds": time.perf_counter() - t})

    for a in grid.alphas:
        probe(a, False, "grid")
    for a in grid.alphas:
        probe(a, True, "grid")
    for _ in range(grid.refine):
        chosen = sa.path_choice(grid, record, points, refine=True)
        nxt = next_alpha([0.0, 1.0, *(p["alpha"] for p in points if not p["layerwise"])], chosen)
        if nxt is None:
            break
        probe(nxt, False, "refine")
    load_state(model, theta1)
    log(f"      rewind candidates: {len(points)} states probed")
    return {"points": points}
