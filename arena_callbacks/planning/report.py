"""A plan as a readable table (the JSON holds every number; this is the part a person reads)."""

from __future__ import annotations

from typing import Any

__all__ = ["format_plan", "human_bytes", "human_flops", "human_seconds"]


def human_bytes(n: float) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n:.0f} B"


def human_flops(n: float) -> str:
    for unit, size in (("PFLOP", 1e15), ("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n:.0f} FLOP"


def human_seconds(s: float | None) -> str:
    if s is None:
        return "-"
    if s >= 3600:
        return f"{s / 3600:.1f} h"
    if s >= 60:
        return f"{s / 60:.1f} min"
    if s >= 1:
        return f"{s:.2f} s"
    return f"{s * 1000:.1f} ms"


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x:.2%}"


def plan_rows(plan: dict[str, Any]) -> list[tuple[str, str]]:
    """``(what, value)`` rows of a plan, in reading order."""
    m, hw, p, g, s, r, t, c = (plan[k] for k in ("model", "accelerator", "probes", "geometry", "spectra", "rewind",
                                                  "training", "schedule"))
    timing = hw["timing"]
    if "peak" in hw or "bf16_flops" in hw:
        speed = (f"{hw['count']} × {hw['name']} ({hw['sharding']}, {hw['dtype']}); assumed efficiency: train "
                 f"{hw['efficiency']['train']:.0%}, probes {hw['efficiency']['probe']:.0%}, spectra "
                 f"{hw['efficiency']['spectra']:.0%} of peak")
    else:
        speed = (f"{hw['count']} × cpu ({hw['sharding']}, {hw['dtype']}); matmul measured "
                 f"{hw['measured_matmul_flops'] / 1e9:.1f} GFLOP/s; probe pass and step: {timing['probe']}")
    rows = [
        ("model", f"{m['model_type']}, {m['layers']} layers, hidden {m['hidden']}, {m['params'] / 1e9:.3g} B "
                  f"parameters; {m['finetuning']}: {m['trainable'] / 1e6:.3g} M trainable"),
        ("accelerators", speed),
        ("tokenizer", plan["tokenizer"]),
        ("probe rows", ", ".join(f"{n} {k}" for n, k in p["rows"].items()) + f" ({p['sequences']} sequences)"),
        ("probe pass, per rank", f"{p['per_rank']['forwards']} forwards, {p['per_rank']['positions']:,} positions "
                                 f"({p['per_rank']['tokens']:,} tokens, {p['per_rank']['scored']:,} scored), "
                                 f"{human_flops(p['flops_per_rank'])}"),
        ("probe pass time", human_seconds(p["seconds"])),
    ]
    if g["enabled"]:
        rows += [("geometry", f"{len(g['modules'])} modules × {g['tokens']} tokens, reference {g['reference']}; "
                              f"cache {human_bytes(g['cache_bytes_per_rank'])} per rank; metrics "
                              f"{human_seconds(g['metric_seconds'])} ({g['metric_timing']}), reference pass "
                              f"{human_seconds(g['reference_pass_seconds'])}")]
    else:
        rows += [("geometry", "off")]
    if s["enabled"]:
        rows += [("spectra", f"{s['layers']} layers every {s['every_n_steps']} steps: first pass "
                             f"{human_flops(s['first_flop'])} ({human_seconds(s['first_seconds'])}), later "
                             f"{human_flops(s['later_flop'])} ({human_seconds(s['later_seconds'])}); W0 SVD cache "
                             f"{human_bytes(s['w0_cache_bytes'])} host memory")]
    else:
        rows += [("spectra", "off")]
    rows += [
        ("rewind states", f"{r['states']} × {human_bytes(r['bytes_per_state'])} = {human_bytes(r['bytes_per_rank'])} "
                          f"per rank, {human_bytes(r['peak_bytes_per_rank'])} at a rewind's peak "
                          f"({r['mode']}{'' if r['budget_present'] else ', no rewind budget in the file'})"),
        ("training step", f"{t['tokens_per_step']:,} tokens, {human_flops(t['flops_per_step_per_accelerator'])} per "
                          f"accelerator, {human_seconds(t['step_seconds'])} ({timing['train']})"),
        ("probe step cost", f"{human_seconds(c['probe_step_seconds'])} (baseline "
                            f"{human_seconds(c['baseline_seconds'])})"),
        ("probe interval", "-" if c["interval"] is None else f"{c['interval']} steps ({c['cadence']}"
         + (f" {c['overhead_budget']:g})" if c["overhead_budget"] else ")")),
        ("share of training", f"probes add {_pct(c['added_time'])} to training time ({_pct(c['share_of_run'])} of "
                              "the monitored run)"
         + (f"; spectra add {_pct(c['spectra_added_time'])}" if c["spectra_added_time"] is not None else "")),
    ]
    return rows


def format_plan(plan: dict[str, Any]) -> str:
    rows = plan_rows(plan)
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)
