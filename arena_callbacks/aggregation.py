"""Per-module metrics as namespaced keys, with statistics across the modules.

One rule for :func:`arena_callbacks.geometry.aggregate` (``geometry/``, per module) and
:func:`arena_callbacks.spectra.aggregate_spectra` (``spectral/``, per layer): a NaN in any
module makes every statistic of that metric NaN, so that a failed measurement is never hidden
by the healthy ones.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

__all__ = ["namespaced_metrics"]


def namespaced_metrics(
    namespace: str,
    per_name: Mapping[str, Mapping[str, float]],
    metrics: Sequence[str],
    *,
    noun: str,
    with_min: bool = False,
) -> dict[str, float]:
    """``{namespace}/<metric>/<name>`` for every name, then ``/mean``, ``/max`` (and ``/min``).

    Args:
        namespace: The key prefix (``geometry``, ``spectral``).
        per_name: ``{name: metrics}``; each must hold every name in ``metrics`` (others are
            ignored).
        metrics: The metric names, in the order of the keys.
        noun: What a name names (``module``, ``layer``), for the error messages.
        with_min: Add ``/min`` (for a similarity, whose budget wants the smallest value).

    Returns:
        For each metric, its per-name keys (in the given order), then its statistics. Empty for
        no names.

    Raises:
        ValueError: a name is empty or one of the statistics' names, or it lacks a metric.
    """
    reserved = ("mean", "max", "min") if with_min else ("mean", "max")
    for name, values in per_name.items():
        if not name or name in reserved:
            raise ValueError(f"{noun} name {name!r} is not allowed: it is empty or collides with {reserved}")
        missing = [m for m in metrics if m not in values]
        if missing:
            raise ValueError(f"{noun} {name!r} lacks metrics {missing}; it has {sorted(values)}")
    out: dict[str, float] = {}
    if not per_name:
        return out
    for metric in metrics:
        values = [float(per_name[name][metric]) for name in per_name]
        out.update({f"{namespace}/{metric}/{name}": v for name, v in zip(per_name, values)})
        out[f"{namespace}/{metric}/mean"] = sum(values) / len(values)  # NaN propagates through sum
        # max() and min() with a NaN depend on the order of their arguments; make NaN win explicitly.
        has_nan = any(math.isnan(v) for v in values)
        out[f"{namespace}/{metric}/max"] = math.nan if has_nan else max(values)
        if with_min:
            out[f"{namespace}/{metric}/min"] = math.nan if has_nan else min(values)
    return out
