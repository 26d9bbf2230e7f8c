"""A model's spectra: every measured layer's metrics (with a cache of the W0 SVDs), and their keys."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ..aggregation import namespaced_metrics
from .metrics import SPECTRAL_METRICS, PretrainedSVD, _all_finite, _check_k_eps, pretrained_svd
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
        cache: A dict owned by the caller that keeps each layer's W0 SVD between calls; an
            entry is recomputed when W0's shape, sum or sum of squares changes.

    Returns:
        ``{layer name: {metric: value}}`` in the order of ``names``.

    Raises:
        ValueError: an unknown or unsupported layer, a plain layer without a reference, a
            merged adapter, or a bad ``k`` / ``eps``.
    """
    _check_k_eps(k, eps)
    out: dict[str, dict[str, float]] = {}
    for name, update in layer_updates(model, reference, names=names):
        svd = _cached_svd(cache, name, update.w0)
        out[name] = update.metrics(k=k, eps=eps, w0_svd=svd)
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


def _cached_svd(cache: dict[str, Any] | None, name: str, w0: torch.Tensor) -> PretrainedSVD | None:
    if not _all_finite(w0):
        return None  # the metric functions answer NaN before they need it
    if cache is None:
        return pretrained_svd(w0)
    # Cheap guard against a stale entry: the base weight of an adapter never changes, but a
    # name may be reused for another model or another reference.
    key = (tuple(w0.shape), float(w0.sum()), float(w0.square().sum()))
    entry = cache.get(name)
    if entry is None or entry[0] != key:
        entry = cache[name] = (key, pretrained_svd(w0))
    return entry[1]
