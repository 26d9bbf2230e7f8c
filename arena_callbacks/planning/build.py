"""The plan: inputs checked up front, then every cost from the model, the monitor file and the hardware."""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from ..config import Action
from .costs import (
    geometry_cache_bytes,
    geometry_metric_flops,
    probe_interval,
    rewind_bytes,
    spectra_layer_cost,
    training_share,
)
from .hardware import CHOICES, EFFICIENCY, HOST_FLOOR, HOST_FP64_FLOPS, accelerator, measure_cpu_flops
from .model import PlanError, build_meta_model, load_config, model_facts
from .probes import ApproxTokenizer, pass_counts, probe_runner

__all__ = ["PLAN_VERSION", "PlanInputs", "make_plan"]

PLAN_VERSION = 1
SHARDINGS = ("none", "ddp", "fsdp", "zero2", "zero3")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass(frozen=True)
class PlanInputs:
    """What a plan is for (the command's options; docs/plan.md).

    ``tokens_per_step``: tokens of one optimizer step over all accelerators; ``seq_length``:
    tokens per training row; ``dtype``: the weights' dtype in training (default ``bf16`` on a GPU,
    ``fp32`` on ``cpu``); ``lora_rank``/``lora_targets``: a LoRA finetune (else full), or
    ``adapter_config``: a PEFT ``adapter_config.json`` to read them from; ``tokenizer``: a local
    tokenizer folder (default: the model folder's, else 4 characters per token);
    ``step_seconds``: a measured training step, instead of the predicted one; ``calibrate``: time
    slices of the model on this CPU (``cpu`` only; else FLOPs over the measured matmul rate).
    """

    model: str
    monitor: str
    tokens_per_step: int
    accelerator: str = "h100"
    num_accelerators: int = 1
    sharding: str = "ddp"
    lora_rank: int | None = None
    lora_targets: tuple[str, ...] = ("q_proj", "v_proj")
    adapter_config: str | None = None
    seq_length: int = 2048
    dtype: str | None = None
    tokenizer: str | None = None
    step_seconds: float | None = None
    calibrate: bool = True
    repeats: int = 3

    def checked(self) -> PlanInputs:
        """These inputs with the adapter config read in; :class:`PlanError` names a bad one."""
        if self.accelerator.strip().lower() not in CHOICES:
            raise PlanError(f"--accelerator: {self.accelerator!r} is not one of {list(CHOICES)}")
        if self.sharding not in SHARDINGS:
            raise PlanError(f"--sharding: {self.sharding!r} is not one of {list(SHARDINGS)}")
        if self.dtype is not None and self.dtype not in DTYPES:
            raise PlanError(f"--dtype: {self.dtype!r} is not one of {list(DTYPES)}")
        for name, value in (("--tokens-per-step", self.tokens_per_step), ("--num-accelerators", self.num_accelerators),
                            ("--seq-length", self.seq_length), ("--repeats", self.repeats)):
            if not isinstance(value, int) or value < 1:
                raise PlanError(f"{name}: {value!r} must be a positive integer")
        if self.tokens_per_step < self.num_accelerators:
            raise PlanError(f"--tokens-per-step: {self.tokens_per_step} is fewer than one token per accelerator "
                            f"({self.num_accelerators})")
        if self.lora_rank is not None and self.lora_rank < 1:
            raise PlanError(f"--lora-rank: {self.lora_rank} must be a positive integer (omit it for full finetuning)")
        if self.step_seconds is not None and not self.step_seconds > 0:
            raise PlanError(f"--step-seconds: {self.step_seconds} must be positive")
        if not Path(self.monitor).expanduser().is_file():
            raise PlanError(f"--monitor: file {self.monitor} not found")
        if self.adapter_config is None:
            return self
        path = Path(self.adapter_config).expanduser()
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            rank, targets = int(data["r"]), data["target_modules"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise PlanError(f"--adapter-config: {path} is not a PEFT LoRA adapter_config.json with r and "
                            f"target_modules ({e!r})") from None
        targets = (targets,) if isinstance(targets, str) else tuple(targets)
        return PlanInputs(**{**asdict(self), "lora_rank": rank, "lora_targets": targets, "adapter_config": None})

    @property
    def on_cpu(self) -> bool:
        return self.accelerator.strip().lower() == "cpu"


def make_plan(inputs: PlanInputs) -> dict[str, Any]:
    """The plan of ``inputs`` as a JSON-ready dict (see docs/plan.md for every field)."""
    from ..capture import GeometryTracker
    from ..monitor_file import load_monitor_file

    inputs = inputs.checked()
    acc = accelerator(inputs.accelerator)
    world = inputs.num_accelerators
    config = load_config(inputs.model)
    dtype_name = inputs.dtype or ("fp32" if acc is None else "bf16")
    tokenizer, tokenizer_label = _tokenizer(inputs)
    spec = load_monitor_file(Path(inputs.monitor).expanduser(), tokenizer=None if tokenizer_label.startswith(
        "approximate") else tokenizer)
    cfg = spec.config
    lora = inputs.lora_rank is not None
    meta = build_meta_model(config, inputs.lora_rank, inputs.lora_targets, DTYPES[dtype_name])
    runner = probe_runner(cfg, spec.probes, spec.target, tokenizer)
    geometry = None
    if cfg.geometry.enabled:
        geometry = GeometryTracker(cfg.geometry, runner)
        try:
            geometry.setup(meta)
        except ValueError as e:
            raise PlanError(f"{inputs.monitor}: {e}") from None
    facts = model_facts(meta, config, cfg.geometry.modules if geometry else None, cfg.spectra.modules,
                        cfg.spectra.enabled)
    reference_pass = geometry is not None and geometry.reference_mode == "disable_adapter"
    counts = pass_counts(runner, meta, world, geometry.probe_names if geometry else None, reference_pass)
    slowest = counts["ranks"][counts["slowest"]]
    flops_of = lambda c: c.flops(facts.body, facts.head, facts.layers, facts.attention_width)  # noqa: E731
    compute = "bf16" if cfg.probe.precision in ("bf16", "fp16") or dtype_name != "fp32" else "fp32"

    # Training step: FLOPs per accelerator, and seconds.
    factor = 4 if lora else 6  # forward 2, activation gradients 2, weight gradients 2 (full only)
    attention = facts.layers * facts.attention_width * min(inputs.seq_length, inputs.tokens_per_step)
    train_flops = factor * (facts.body + facts.head + attention) * inputs.tokens_per_step / world
    given = {**asdict(inputs), "lora_targets": list(inputs.lora_targets)}
    plan: dict[str, Any] = {"version": PLAN_VERSION, "inputs": given, "tokenizer": tokenizer_label}
    hw: dict[str, Any] = {"name": inputs.accelerator.lower(), "count": world, "sharding": inputs.sharding,
                          "dtype": dtype_name, "probe_compute_dtype": compute}
    if acc is not None:
        hw.update(acc.as_dict(), efficiency=dict(EFFICIENCY), host_floor_per_layer=dict(HOST_FLOOR),
                  method="max(FLOPs / (peak × efficiency), layers × host floor), forward by forward")
        probe_rate = acc.peak(compute) * EFFICIENCY["probe"]
        train_rate = acc.peak(dtype_name) * EFFICIENCY["train"]
        spectra_rate = acc.fp32_flops * EFFICIENCY["spectra"]
    else:
        width = min(max(slowest.largest_forward, 64), 4096)
        rate = measure_cpu_flops(width, facts.hidden, max(facts.hidden, 64))
        hw.update(measured_matmul_flops=rate, matmul_shape=[width, facts.hidden, facts.hidden],
                  efficiency={"spectra": EFFICIENCY["spectra"]})
        probe_rate = train_rate = rate
        spectra_rate = rate * EFFICIENCY["spectra"]
    floor = facts.layers * HOST_FLOOR["forward"] if acc is not None else 0.0
    seconds_of = lambda c: sum(max(f / probe_rate, floor) for f in c.forward_flops(  # noqa: E731
        facts.body, facts.head, facts.layers, facts.attention_width))
    probe_s = seconds_of(slowest)
    ref_s = max(seconds_of(c) for c in counts["reference"]) if counts["reference"] else 0.0
    step_s = max(train_flops / train_rate, facts.layers * HOST_FLOOR["train"] if acc is not None else 0.0)
    method = {"probe": "flops", "train": "flops"}
    if acc is None and inputs.calibrate:
        timed = _calibrate(config, inputs, _rank_runner(runner, tokenizer, counts["slowest"], world), facts,
                           dtype_name)
        if timed is not None:
            probe_fit, train_fit = timed
            if ref_s:
                ref_s *= probe_fit["seconds"] / probe_s
            probe_s, step_s = probe_fit["seconds"], train_fit["seconds"]
            how = "timed whole, random weights" if probe_fit["per_layer"] is None else "timed on slices"
            method = {"probe": how, "train": how, "probe_fit": probe_fit, "train_fit": train_fit}
    if inputs.step_seconds is not None:
        step_s, method["train"] = inputs.step_seconds, "given (--step-seconds)"
    hw["timing"] = method
    plan["accelerator"] = hw
    plan["model"] = {**{k: v for k, v in asdict(facts).items() if k not in ("linears", "module_widths")},
                     "finetuning": f"lora r{inputs.lora_rank} on {list(inputs.lora_targets)}" if lora else "full"}
    plan["probes"] = {
        "rows": {n: len(p.rows) for n, p in runner.probes.items()},
        "sequences": sum(len(runner.sequences(n)) for n in runner.probes),
        "shared_contexts": counts["share"], "packed_rows": counts["pack"],
        "slowest_rank": counts["slowest"], "per_rank": slowest.as_dict(),
        "all_ranks": {k: sum(getattr(c, k) for c in counts["ranks"]) for k in ("forwards", "positions", "tokens",
                                                                               "scored")},
        "flops_per_rank": flops_of(slowest), "flops_all_ranks": sum(flops_of(c) for c in counts["ranks"]),
        "seconds": probe_s,
    }
    plan["geometry"] = _geometry(geometry, facts, cfg, counts, flops_of, ref_s, acc is None)
    plan["spectra"] = _spectra(facts, cfg, inputs.lora_rank, spectra_rate, DTYPES[dtype_name].itemsize)
    has_rewind = any(b.action is Action.REWIND for b in cfg.budgets)
    plan["rewind"] = {"budget_present": has_rewind, "mode": cfg.rewind.mode, "trainable_bytes": facts.trainable_bytes,
                      **rewind_bytes(facts.trainable_bytes, cfg.rewind.mode, inputs.sharding, world,
                                     facts.trainable)}
    plan["training"] = {"tokens_per_step": inputs.tokens_per_step, "seq_length": inputs.seq_length,
                        "flops_per_step_per_accelerator": train_flops, "step_seconds": step_s}
    pass_s = probe_s + plan["geometry"].get("seconds", 0.0)
    spectra_every = plan["spectra"].get("later_seconds", 0.0)
    interval = probe_interval(cfg.cadence, pass_s, step_s)
    share = training_share(pass_s, interval, step_s)
    plan["schedule"] = {
        "probe_step_seconds": pass_s,
        "baseline_seconds": pass_s + plan["spectra"].get("first_seconds", 0.0),
        "cadence": "every_n_steps" if cfg.cadence.every_n_steps else ("overhead_budget" if cfg.cadence.budgeted
                                                                      else "on_evaluate"),
        "overhead_budget": cfg.cadence.overhead_budget if cfg.cadence.budgeted else None,
        "interval": interval, "added_time": share["added"], "share_of_run": share["share"],
        "spectra_every_n_steps": cfg.spectra.every_n_steps if cfg.spectra.enabled else None,
        "spectra_added_time": (spectra_every / (cfg.spectra.every_n_steps * step_s)) if cfg.spectra.enabled else None,
    }
    return plan


def _tokenizer(inputs: PlanInputs) -> tuple[Any, str]:
    """The real tokenizer where one is local (``--tokenizer``, else the model folder's); else the stand-in."""
    from transformers import AutoTokenizer

    folder = Path(inputs.tokenizer or inputs.model).expanduser()
    if folder.is_file():
        folder = folder.parent
    has = folder.is_dir() and any((folder / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json",
                                                                    "tokenizer.model"))
    if inputs.tokenizer is not None and not has:
        raise PlanError(f"--tokenizer: {inputs.tokenizer} is not a folder holding a tokenizer")
    if not has:
        return ApproxTokenizer(), ApproxTokenizer.name_or_path
    try:
        return AutoTokenizer.from_pretrained(str(folder)), str(folder)
    except (OSError, ValueError) as e:
        raise PlanError(f"--tokenizer: could not load the tokenizer in {folder} ({e})") from None


def _calibrate(config: Any, inputs: PlanInputs, runner: Any, facts: Any,
               dtype: str) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """Probe pass and training step timed on this CPU, on the model or its slices (see :mod:`.calibrate`)."""
    from .calibrate import MAX_SLICE_PARAMS, MAX_WHOLE_PARAMS, fit_layers, probe_work, time_on_slices, train_work

    per_layer = facts.body / max(facts.layers, 1)
    depths = (facts.layers,) if facts.layers <= 4 or facts.params <= MAX_WHOLE_PARAMS else (1, 4)
    if facts.params - facts.body + max(depths) * per_layer > MAX_SLICE_PARAMS:
        return None
    rows = max(1, inputs.tokens_per_step // inputs.num_accelerators // inputs.seq_length)
    lora = (inputs.lora_rank, inputs.lora_targets) if inputs.lora_rank is not None else None
    timed = time_on_slices(config, depths, lora, DTYPES[dtype],
                           {"probe": probe_work(runner),
                            "train": train_work(rows, min(inputs.seq_length, inputs.tokens_per_step), facts.vocab)},
                           repeats=inputs.repeats)
    return fit_layers(timed["probe"], facts.layers), fit_layers(timed["train"], facts.layers)


def _rank_runner(runner: Any, tokenizer: Any, rank: int, world: int) -> Any:
    """A runner over one rank's rows (every ``world``-th), which it plans as that rank does."""
    from ..probes import ProbeRunner

    if world == 1:
        return runner
    sets = {n: dataclasses.replace(p, rows=p.rows[rank::world], row_ids=p.row_ids[rank::world])
            for n, p in runner.probes.items() if p.rows[rank::world]}
    sub = ProbeRunner(sets, runner.settings)
    sub.prepare(tokenizer)
    return sub


def _geometry(geometry: Any, facts: Any, cfg: Any, counts: dict[str, Any], flops_of: Any,
              ref_s: float, on_cpu: bool) -> dict[str, Any]:
    if geometry is None:
        return {"enabled": False}
    assert geometry.capture is not None
    tokens = geometry.capture.n_tokens
    widths = facts.module_widths
    cache = geometry.reference_mode == "cache"
    if on_cpu:  # timed here, at the real shapes
        per_width = {w: _geometry_metric_seconds(tokens, w, cached=cache) for w in set(widths.values())}
    else:  # the metrics run on the training machine's host CPU: on paper
        per_width = {w: geometry_metric_flops(tokens, w) / HOST_FP64_FLOPS for w in set(widths.values())}
    metric_s = sum(per_width[w] for w in widths.values())
    out = {
        "enabled": True, "modules": widths, "tokens": tokens, "probes": geometry.probe_names,
        "reference": geometry.reference_mode,
        "cache_bytes_per_rank": geometry_cache_bytes(widths, tokens, cfg.geometry.cache_dtype) if cache else 0,
        "capture_bytes_per_pass": sum(tokens * w * 4 for w in widths.values()),
        "metric_flops": sum(geometry_metric_flops(tokens, w) for w in widths.values()),
        "metric_seconds": metric_s, "metric_timing": "timed on this CPU" if on_cpu else
        f"on paper, host CPU at {HOST_FP64_FLOPS / 1e9:g} GFLOP/s float64", "reference_pass_seconds": ref_s,
        "seconds": metric_s + ref_s,
    }
    if counts["reference"]:
        ref = max(counts["reference"], key=lambda c: c.positions)
        out["reference_pass_per_rank"] = {**ref.as_dict(), "flops": flops_of(ref)}
    return out


def _geometry_metric_seconds(tokens: int, width: int, cached: bool) -> float:
    """The geometry metrics of one module at its real shape, timed on this CPU as the monitor runs
    them (against the cache's stored products, or a fresh reference); above 4096 features timed at
    4096 and scaled linearly (tokens < features: the thin QRs dominate)."""
    from ..geometry import geometry_metrics, reference_stats

    timed = min(width, 4096)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(tokens, timed, generator=g)
    x1 = x0 + 0.1 * torch.randn(tokens, timed, generator=g)
    geometry_metrics(x0[:32, :16], x1[:32, :16])  # first-call paths
    t = time.perf_counter()
    geometry_metrics(x0.to(torch.bfloat16) if cached else x0, x1,
                     reference=reference_stats(x0.to(torch.bfloat16)) if cached else None)
    return (time.perf_counter() - t) * width / timed


def _spectra(facts: Any, cfg: Any, rank: int | None, rate: float, dtype_bytes: int) -> dict[str, Any]:
    if not cfg.spectra.enabled:
        return {"enabled": False}
    sc = cfg.spectra
    per = [spectra_layer_cost(o, i, rank, sc.top_k, sc.power_iterations) for o, i in facts.linears.values()]
    total = {k: sum(p[k] for p in per) for k in per[0]} if per else {}
    later = total.get("lora_pass_flop" if rank is not None else "dense_pass_flop", 0.0)
    return {
        "enabled": True, "layers": len(per), "every_n_steps": sc.every_n_steps, **total,
        "first_flop": total.get("w0_svd_flop", 0.0) + later, "later_flop": later,
        "first_seconds": (total.get("w0_svd_flop", 0.0) + later) / rate, "later_seconds": later / rate,
        "w0_cache_bytes": total.get("cache_bytes", 0.0),
        "reference_bytes": 0 if rank is not None else sum(o * i * dtype_bytes for o, i in facts.linears.values()),
        "rate_flops": rate, "method": "on paper: FLOPs / (fp32 peak × spectra efficiency)",
    }

