"""A model's spectra: every measured layer's metrics (with a cache of the W0 SVDs), and their keys."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ..aggregation import namespaced_metrics
from .metrics import _CPU, EXACT, SPECTRAL_METRICS, PretrainedSVD, Solver, _all_finite, _check_k_eps, pretrained_svd
from .updates import layer_updates

__all__ = ["aggregate_spectra", "weight_spectra"]


def weight_spectra(
    model: nn.Module,
    reference: Mapping[str, torch.Tensor] | None = None,
    *,
    names: Sequence[str] | None = None,
    k: int = 10,
    eps: float = 0.5,
    cache: dict[str, Any] | None = None,
    solver: Solver = EXACT,
    progress: bool = False,
) -> dict[str, dict[str, float]]:
    """Spectral metrics of every measured layer of a model.

    With a sharded model (FSDP2 DTensors, DeepSpeed ZeRO-3 partitions) every rank must call
    this: weights are gathered.

    Args:
        model: A PEFT model (LoRA, DoRA or OFT on linear layers) or a plain model.
        reference: Step-0 weights of plain layers (:func:`~.updates.snapshot_weights`), for full finetuning.
        names: Layers to measure (see :func:`~.updates.layer_updates`); ``None``: every adapted layer and
            every layer in ``reference``.
        k: Top singular vectors of W_ft checked for intruders (0 skips the W_ft SVD).
        eps: Intruder threshold on the best |cosine|.
        cache: A dict owned by the caller that keeps each layer's W0 SVD between calls (in host
            memory, in the solver's precision: ``4·n·(d_out + d_in)`` bytes a layer in float32);
            an entry is recomputed when W0's shape, sum or sum of squares changes.
        solver: How the decompositions are computed (:data:`~.metrics.EXACT`: float64 on the CPU,
            full SVDs; the monitor uses :data:`~.metrics.FAST`).
        progress: Show a progress bar over the layers once the pass has run for 3 seconds.

    Returns:
        ``{layer name: {metric: value}}`` in the order of ``names``.

    Raises:
        ValueError: an unknown or unsupported layer, a plain layer without a reference, a
            merged adapter, or a bad ``k`` / ``eps``.
    """
    _check_k_eps(k, eps)
    from tqdm.auto import tqdm

    out: dict[str, dict[str, float]] = {}
    total = len(names) if names is not None else None
    for name, update in tqdm(layer_updates(model, reference, names=names), desc="spectra", total=total, delay=3,
                             disable=not progress, leave=False, unit="layer"):
        svd = _cached_svd(cache, name, update.w0, solver)
        out[name] = update.metrics(k=k, eps=eps, w0_svd=svd, solver=solver)
    return out


def aggregate_spectra(per_layer: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    """Namespaced keys for per-layer metrics, with the mean and max across layers.

    A NaN in any layer makes that metric's ``mean`` and ``max`` NaN, so that a failed
    measurement is never hidden by the healthy ones.

    Args:
        per_layer: ``{layer name: metrics}`` (:func:`weight_spectra`). Each must hold every name
            in :data:`SPECTRAL_METRICS`; other entries are ignored.

    Returns:
        For each metric, ``spectral/<metric>/<layer>`` per layer (in the given order), then
        ``spectral/<metric>/mean`` and ``spectral/<metric>/max``. Empty for no layers.

    Raises:
        ValueError: a layer name is empty or ``"mean"``/``"max"``, or a layer lacks a metric.
    """
    return namespaced_metrics("spectral", per_layer, SPECTRAL_METRICS, noun="layer")


def _cached_svd(cache: dict[str, Any] | None, name: str, w0: torch.Tensor, solver: Solver) -> PretrainedSVD | None:
    if cache is None:
        return pretrained_svd(w0, solver) if _all_finite(w0) else None
    # Cheap guard against a stale entry: the base weight of an adapter never changes, but a
    # name may be reused for another model, another reference or another solver. The sums
    # double as the finiteness check (a NaN or an infinity makes them non-finite).
    total, squares = float(w0.sum()), float(w0.square().sum())
    if not (math.isfinite(total) and math.isfinite(squares)):
        return None  # the metric functions answer NaN before they need it
    key = (tuple(w0.shape), total, squares, solver)
    entry = cache.get(name)
    if entry is None or entry[0] != key:
        # Kept in host memory (a 7B model's W0 SVDs do not belong on the accelerator); the
        # metric functions move an entry to the weight's device when they use it.
        svd = PretrainedSVD(*(t.to(_CPU) for t in pretrained_svd(w0, solver)))
        entry = cache[name] = (key, svd)
    return entry[1]
