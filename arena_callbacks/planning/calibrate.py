"""Timing on this CPU at the plan's own shapes: the probe pass and the training step.

A CPU's speed depends on shapes, threads and per-forward overheads far more than a GPU's peak
does, so a ``cpu`` plan measures instead of dividing FLOPs by a peak: it builds the model from
its config with random weights (and the LoRA adapter of the plan), runs the monitor's real probe
pass over the planned rows (the slowest rank's) and training steps of the planned batch on it,
interleaved, and takes the medians. A model above :data:`MAX_WHOLE_PARAMS` parameters is timed
on slices of ``1`` and ``4`` decoder layers instead, extrapolated as
``t(L) = fixed + L · per_layer`` (on a busy machine the extrapolation multiplies the noise of
the difference, which is why small models are timed whole). Nothing is downloaded; random
weights cost the same.
"""

from __future__ import annotations

import copy
import math
import statistics
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch

__all__ = ["fit_layers", "time_on_slices"]

#: Seconds of timed work below which more rounds are timed.
MIN_SECONDS = 3.0
#: Models up to this many parameters are timed whole.
MAX_WHOLE_PARAMS = 400_000_000
#: Slices bigger than this (parameters) are not built: the plan falls back to FLOPs.
MAX_SLICE_PARAMS = 1_500_000_000


def _slice(config: Any, layers: int, lora: tuple[int, tuple[str, ...]] | None, dtype: torch.dtype) -> Any:
    from transformers import AutoModelForCausalLM

    cfg = copy.deepcopy(config)
    cfg.num_hidden_layers = layers
    if isinstance(getattr(cfg, "layer_types", None), list):
        cfg.layer_types = cfg.layer_types[:layers]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
        if lora is not None:
            import peft

            rank, targets = lora
            chosen: Any = list(targets) if targets != ("all-linear",) else targets[0]
            model = peft.get_peft_model(model, peft.LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=chosen))
    return model


def time_on_slices(config: Any, depths: tuple[int, ...], lora: tuple[int, tuple[str, ...]] | None, dtype: torch.dtype,
                   work: dict[str, Callable[[Any], Any]], repeats: int = 3) -> dict[str, dict[int, float]]:
    """Median seconds of each ``work`` (a function of the model) on each slice depth, the
    repetitions interleaved across work and depths so the machine's load hits all alike; at
    least ``repeats`` rounds, more (up to 50) while a round is short of :data:`MIN_SECONDS`: a
    few short timings on a shared machine are mostly its scheduler's noise."""
    models = {d: _slice(config, d, lora, dtype) for d in depths}
    start = time.perf_counter()
    for m in models.values():  # warm-up (allocations, first-call paths), timed as one round
        for fn in work.values():
            fn(m)
    round_s = time.perf_counter() - start
    rounds = max(repeats, min(50, math.ceil(MIN_SECONDS / max(round_s, 1e-6))))
    times: dict[str, dict[int, list[float]]] = {w: {d: [] for d in depths} for w in work}
    for rep in range(rounds):
        order = [(w, d) for w in work for d in depths]
        for w, d in order if rep % 2 == 0 else order[::-1]:
            t = time.perf_counter()
            work[w](models[d])
            times[w][d].append(time.perf_counter() - t)
    return {w: {d: statistics.median(v) for d, v in by_depth.items()} for w, by_depth in times.items()}


def fit_layers(by_depth: dict[int, float], layers: int) -> dict[str, float | None]:
    """``fixed + layers · per_layer`` through the timed depths (the model itself if it was timed:
    ``fixed`` and ``per_layer`` are then ``None``)."""
    if layers in by_depth:
        return {"seconds": by_depth[layers], "fixed": None, "per_layer": None}
    lo, hi = min(by_depth), max(by_depth)
    per_layer = max((by_depth[hi] - by_depth[lo]) / (hi - lo), 0.0)
    fixed = max(by_depth[lo] - lo * per_layer, 0.0)
    return {"seconds": fixed + layers * per_layer, "fixed": fixed, "per_layer": per_layer}


def probe_work(runner: Any) -> Callable[[Any], Any]:
    from ..distributed import DistContext

    return lambda model: runner.run(model, DistContext())


def train_work(batch: int, seq: int, vocab: int) -> Callable[[Any], Any]:
    """One optimizer step (forward, backward, AdamW) on a ``batch × seq`` batch of random ids."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (batch, seq), generator=g)
    optimizers: dict[int, Any] = {}

    def step(model: Any) -> None:
        opt = optimizers.get(id(model))
        if opt is None:
            opt = optimizers[id(model)] = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad],
                                                            lr=1e-6)
        model.train()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step
