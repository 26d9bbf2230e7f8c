"""What a monitor config costs beyond the probe forwards: memory it keeps, spectra, the cadence.

Pure functions of counts and settings; the cadence is the schedule's own code driven by a fake
clock, so the plan's interval is the one :class:`~arena_callbacks.schedule.ProbeSchedule` gives.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from ..config import CadenceConfig

__all__ = ["geometry_cache_bytes", "geometry_metric_flops", "probe_interval", "rewind_bytes", "spectra_layer_cost",
           "training_share"]

_DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}


def spectra_layer_cost(d_out: int, d_in: int, rank: int | None, k: int = 10,
                       power_iterations: int = 8) -> dict[str, float]:
    """FLOPs and host bytes of one layer's spectra (the monitor's float32 solver), on paper.

    ``w0_svd_flop``: W0's thin SVD with U and V, once per run (Golub–Van Loan
    ``4·m·n² + 8·n³``, ``n = min``, ``m = max``); ``lora_pass_flop``: a later LoRA pass, where
    ``U0ᵀB`` and ``A V0`` dominate (``4·n·(d_out + d_in)·r``); ``dense_pass_flop``: the randomized
    top-``k`` of a dense update (a sketch of ``2k`` columns, ``2·power_iterations + 2`` products
    with the ``d_out × d_in`` matrix); ``cache_bytes``: W0's U, Σ, V kept in float32 host memory.
    """
    n, m = min(d_out, d_in), max(d_out, d_in)
    return {
        "w0_svd_flop": float(4 * m * n**2 + 8 * n**3),
        "lora_pass_flop": float(2 * 2 * n * (d_out + d_in) * (rank or 0)),
        "dense_pass_flop": float(2 * d_out * d_in * 2 * k * (2 * power_iterations + 2)),
        "cache_bytes": float(4 * n * (d_out + d_in)),
    }


def geometry_metric_flops(tokens: int, width: int) -> float:
    """The geometry metrics of one module on paper: a few ``n × d`` by ``min(n, d)`` products (the
    cross product, or the thin QRs when tokens are fewer than features; CKA; Gram) and one
    ``min(n, d)``-square SVD: ``8·n·d·m + 10·m³``, ``m = min(n, d)``, in float64."""
    m = min(tokens, width)
    return float(8 * tokens * width * m + 10 * m**3)


def geometry_cache_bytes(widths: dict[str, int], tokens: int, cache_dtype: str) -> int:
    """The baseline activation cache every rank holds (``reference: cache``): tokens × width per
    module in ``cache_dtype`` (rows are gathered to every rank)."""
    return sum(tokens * w for w in widths.values()) * _DTYPE_BYTES[cache_dtype]


def rewind_bytes(trainable_bytes: int, mode: str, sharding: str, world_size: int,
                 trainable_numel: int | None = None) -> dict[str, Any]:
    """Kept rewind states per rank: the best in-budget state, plus θ0 for path rewinds; each this
    rank's part of the trainable parameters (``arena_callbacks/shards.py``): a full copy in their
    dtype under DDP and ZeRO-2, the shard under FSDP, the fp32 master partition under ZeRO-3
    (4 bytes per parameter over the ranks). ``peak_bytes_per_rank`` adds the working copies of a
    rewind, the rule the monitor checks at train start (``arena_callbacks/resources.py``)."""
    from ..config import RewindConfig
    from ..resources import rewind_plan

    states = 2 if mode in ("path", "layerwise") else 1
    if sharding == "zero3":  # fp32 masters; without a count, the parameters' own dtype
        kept = 4 * trainable_numel if trainable_numel is not None else trainable_bytes
        per_state = math.ceil(kept / world_size)
    else:
        per_state = math.ceil(trainable_bytes / (world_size if sharding == "fsdp" else 1))
    plan = rewind_plan(per_state, RewindConfig(mode=mode, storage="memory"), Path("."), ranks=1,
                       memory_available=2**62, disk_available=2**62)
    return {"states": states, "bytes_per_state": per_state, "bytes_per_rank": states * per_state,
            "working_copies": plan.working, "peak_bytes_per_rank": plan.memory_bytes}


def probe_interval(cadence: CadenceConfig, probe_cost: float, step_seconds: float) -> int | None:
    """Steps between probes: ``every_n_steps``, or what the schedule's budget rule gives for a probe
    step of ``probe_cost`` seconds and training steps of ``step_seconds`` (``None``: probes only
    on evaluation)."""
    from ..schedule import ProbeSchedule

    if cadence.every_n_steps is not None:
        return cadence.every_n_steps
    if not cadence.budgeted:
        return None
    now = [0.0]
    schedule = ProbeSchedule(cadence, clock=lambda: now[0])
    schedule.baseline_done(probe_cost)
    schedule.start()
    step = 0
    while schedule.next_probe_step is None:
        now[0] += step_seconds
        step += 1
        schedule.step_ended(step, last_step=0)
        schedule.start()  # as the engine does after every step
    # The first probe comes one interval after the baseline (step 0), once calibrated.
    schedule.probed(step, probe_cost)  # later intervals: from the probe step's own cost
    assert schedule.next_probe_step is not None
    return schedule.next_probe_step - step


def training_share(probe_cost: float, interval: int | None, step_seconds: float) -> dict[str, float | None]:
    """The probes' cost against training: ``added`` = cost / (interval · step) (what they add to
    the training time) and ``share`` = cost / (cost + interval · step) (their part of the run)."""
    if interval is None or step_seconds <= 0:
        return {"added": None, "share": None}
    train = interval * step_seconds
    return {"added": probe_cost / train, "share": probe_cost / (probe_cost + train)}
