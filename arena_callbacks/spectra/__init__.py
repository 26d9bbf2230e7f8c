"""Weight-space spectra: how a finetune changed each adapted weight matrix (DESIGN.md §4).

``W0 = U Σ Vᵀ`` is a layer's pretrained weight as a ``d_out × d_in`` matrix (thin SVD,
``n = min(d_out, d_in)`` directions, ``σ_1 ≥ σ_2 ≥ …``), ``W_ft`` the weight the finetuned
layer computes with and ``ΔW = W_ft − W0``. Per layer (keys of :data:`SPECTRAL_METRICS`):

* ``rel_update_fro`` = ``‖ΔW‖_F / ‖W0‖_F``; ``rel_update_spec`` = ``‖ΔW‖_2 / ‖W0‖_2``.
* ``stable_rank`` = ``‖ΔW‖_F² / ‖ΔW‖_2²`` of the update (between 1 and ``rank ΔW``); 0 for
  ``ΔW = 0``, where the ratio is undefined.
* ``intruders``: how many of W_ft's top-``k`` left singular vectors have a best |cosine| below
  ``eps`` with every left singular vector of W0 (arXiv 2410.21228; the rule of peft's
  ``reduce_intruder_dimension``), as a float.
* ``retention_dev`` = ``mean_i |u_iᵀ W_ft v_i − σ_i| / σ_1``: how far the gains of the
  pretrained directions moved, relative to the largest one (scale-free across layers).
* ``retention_smooth`` = ``mean_i |x_i − MA5(x)_i|`` of the retention profile
  ``x_i = |u_iᵀ W_ft v_i − σ_i|``; ``adaptation_smooth`` the same of the adaptation profile
  ``x_i = ‖ΔW v_i‖``. Both in weight units (not normalised). ``MA5`` is a centred moving
  average over 5 entries; at the ends the window is truncated to the entries that exist
  (``MA5(x)_0 = mean(x_0, x_1, x_2)``), so the output has the profile's length and a straight
  line is smooth (0) away from the ends.

Where W_ft comes from (:func:`layer_updates`): LoRA ``ΔW = s·B A`` (measured from the factors:
norms and profiles never form ``ΔW``); DoRA ``W_ft = diag(m / ‖W0 + sBA‖_row) (W0 + sBA)``;
OFT ``W_ft = W0 · blockdiag(R)ᵀ``; full finetuning the current weight against a step-0
snapshot (:func:`snapshot_weights`). Everything is computed in float64 on the CPU.

Cost: the SVD of each W0 is cached (``cache``) while W0 is unchanged. Intruders need W_ft's
top left singular vectors; they come from an exact ``torch.linalg.svd`` of W_ft, a
``min(d_out, d_in)³`` step per layer, so spectra run on their own cadence (``k = 0`` skips
it). The cache holds ``U``, ``Σ``, ``V`` in float64: ``8·n·(d_out + d_in)`` bytes per layer.

Example:
    >>> w0 = torch.randn(64, 48, dtype=torch.float64)
    >>> b, a = torch.randn(64, 4, dtype=torch.float64), torch.randn(4, 48, dtype=torch.float64)
    >>> m = lowrank_update_metrics(w0, b, a, 0.01)
    >>> 1 <= m["stable_rank"] <= 4
    True
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import nn

from ..capture import _strip_peft, expand_braces

__all__ = [
    "SPECTRAL_METRICS",
    "DenseUpdate",
    "LayerUpdate",
    "LowRankUpdate",
    "PretrainedSVD",
    "aggregate_spectra",
    "dense_update_metrics",
    "layer_updates",
    "lowrank_update_metrics",
    "moving_average",
    "pretrained_svd",
    "smoothness",
    "snapshot_weights",
    "spectra_layer_names",
    "weight_spectra",
]

#: Metric names, in the order the metric functions return them.
SPECTRAL_METRICS: tuple[str, ...] = (
    "rel_update_fro",
    "rel_update_spec",
    "stable_rank",
    "intruders",
    "retention_dev",
    "retention_smooth",
    "adaptation_smooth",
)

# Aggregate names under spectral/<metric>/; a layer so named would collide with them.
_RESERVED_NAMES = ("mean", "max")
_F64 = torch.float64
_CPU = torch.device("cpu")


class PretrainedSVD(NamedTuple):
    """Thin SVD ``W0 = u · diag(s) · vᵀ`` (float64): ``u`` is ``d_out × n``, ``v`` is ``d_in × n``."""

    u: torch.Tensor
    s: torch.Tensor
    v: torch.Tensor


def pretrained_svd(w0: torch.Tensor) -> PretrainedSVD:
    """The thin SVD of a pretrained weight, in float64 on the CPU (cache it per layer)."""
    u, s, vh = torch.linalg.svd(_host(w0), full_matrices=False)
    return PretrainedSVD(u, s, vh.mT)


# ---------------------------------------------------------------------------------------- metrics


@torch.no_grad()
def lowrank_update_metrics(
    w0: torch.Tensor,
    B: torch.Tensor,
    A: torch.Tensor,
    scaling: float,
    *,
    k: int = 10,
    eps: float = 0.5,
    w0_svd: PretrainedSVD | None = None,
) -> dict[str, float]:
    """Spectral metrics of a LoRA update ``ΔW = scaling · B @ A`` on top of ``w0``.

    The norms come from thin QR factors ``B = Q_B R_B`` and ``Aᵀ = Q_A R_A``:
    ``ΔW = s · Q_B (R_B R_Aᵀ) Q_Aᵀ``, so ΔW has the singular values of the ``r × r`` core. The
    profiles use ``u_iᵀ ΔW v_i = s (u_iᵀ B)(A v_i)`` and ``‖ΔW v_i‖ = |s| ‖R_B (A v_i)‖``. Only
    ``intruders`` forms ``W_ft = w0 + ΔW``: it takes an exact SVD of it (skipped for ``k = 0``
    and for ``ΔW = 0``).

    Args:
        w0: Pretrained weight, ``d_out × d_in``.
        B: ``d_out × r`` factor (peft's ``lora_B.weight``).
        A: ``r × d_in`` factor (peft's ``lora_A.weight``).
        scaling: ``s`` (peft's ``scaling[adapter]``, ``lora_alpha / r`` or the rsLoRA value).
        k: Top singular vectors of W_ft checked for intruders (0 turns the check off).
        eps: An intruder's best |cosine| with W0's left singular vectors is below this.
        w0_svd: :func:`pretrained_svd` of ``w0``, if already known.

    Returns:
        ``{metric: value}`` for every name in :data:`SPECTRAL_METRICS`; every value is NaN if
        an input holds a NaN or an infinity.

    Raises:
        ValueError: shapes that do not fit, or a bad ``k`` / ``eps``.
    """
    w0, B, A = _host(w0), _host(B), _host(A)
    _check_lowrank(w0, B, A)
    _check_k_eps(k, eps)
    if not _all_finite(w0, B, A) or not math.isfinite(scaling):
        return dict.fromkeys(SPECTRAL_METRICS, math.nan)
    svd = _checked_svd(w0, w0_svd)
    r_b = torch.linalg.qr(B, mode="r").R
    r_a = torch.linalg.qr(A.T, mode="r").R
    sv = torch.linalg.svdvals(r_b @ r_a.T) * abs(scaling)
    fro, spec = float(torch.linalg.vector_norm(sv)), float(sv.max()) if sv.numel() else 0.0
    a_v = A @ svd.v  # r × n: A v_i in column i
    retention = (scaling * ((svd.u.T @ B) * a_v.T).sum(dim=1)).abs()
    adaptation = abs(scaling) * torch.linalg.vector_norm(r_b @ a_v, dim=0)
    intruders = _intruders(lambda: w0 + scaling * (B @ A), svd.u, k, eps) if spec > 0 else 0.0
    return _assemble(svd, fro, spec, retention, adaptation, intruders)


@torch.no_grad()
def dense_update_metrics(
    w0: torch.Tensor,
    w_ft: torch.Tensor,
    *,
    k: int = 10,
    eps: float = 0.5,
    w0_svd: PretrainedSVD | None = None,
) -> dict[str, float]:
    """Spectral metrics of any update ``ΔW = w_ft − w0`` (full finetuning, DoRA, OFT).

    Costs the singular values of ΔW and, for intruders, an exact SVD of ``w_ft`` (skipped for
    ``k = 0`` and for ``ΔW = 0``).

    Args:
        w0: Pretrained weight, ``d_out × d_in``.
        w_ft: Finetuned weight, same shape.
        k: Top singular vectors of W_ft checked for intruders (0 turns the check off).
        eps: An intruder's best |cosine| with W0's left singular vectors is below this.
        w0_svd: :func:`pretrained_svd` of ``w0``, if already known.

    Returns:
        ``{metric: value}`` for every name in :data:`SPECTRAL_METRICS`; every value is NaN if
        an input holds a NaN or an infinity.

    Raises:
        ValueError: shapes that do not fit, or a bad ``k`` / ``eps``.
    """
    w0, w_ft = _host(w0), _host(w_ft)
    _check_matrix("w0", w0)
    if w_ft.shape != w0.shape:
        raise ValueError(f"w_ft must have w0's shape {tuple(w0.shape)}; got {tuple(w_ft.shape)}")
    _check_k_eps(k, eps)
    if not _all_finite(w0, w_ft):
        return dict.fromkeys(SPECTRAL_METRICS, math.nan)
    svd = _checked_svd(w0, w0_svd)
    dw = w_ft - w0
    sv = torch.linalg.svdvals(dw)
    fro, spec = float(torch.linalg.vector_norm(sv)), float(sv[0])
    retention = ((svd.u.T @ dw) * svd.v.T).sum(dim=1).abs()  # diag(Uᵀ ΔW V)
    adaptation = torch.linalg.vector_norm(dw @ svd.v, dim=0)
    intruders = _intruders(lambda: w_ft, svd.u, k, eps) if spec > 0 else 0.0
    return _assemble(svd, fro, spec, retention, adaptation, intruders)


def moving_average(x: torch.Tensor, window: int = 5) -> torch.Tensor:
    """Centred moving average with the window truncated at the ends (same length as ``x``).

    ``out_i = mean(x_j for |j − i| ≤ window // 2, 0 ≤ j < len(x))``; ``window`` must be odd.
    """
    if isinstance(window, bool) or not isinstance(window, int) or window < 1 or window % 2 == 0:
        raise ValueError(f"window must be an odd int >= 1; got {window!r}")
    x = torch.as_tensor(x, dtype=_F64).reshape(-1)
    half = window // 2
    sums = nn.functional.pad(x, (half, half)).unfold(0, window, 1).sum(dim=1)
    counts = nn.functional.pad(torch.ones_like(x), (half, half)).unfold(0, window, 1).sum(dim=1)
    return sums / counts


def smoothness(profile: torch.Tensor | Sequence[float], window: int = 5) -> float:
    """``mean_i |x_i − MA(x)_i|`` with :func:`moving_average`; 0.0 for an empty profile."""
    x = torch.as_tensor(profile, dtype=_F64).reshape(-1)
    if x.numel() == 0:
        return 0.0
    return float((x - moving_average(x, window)).abs().mean())


def _assemble(
    svd: PretrainedSVD, fro: float, spec: float, retention: torch.Tensor, adaptation: torch.Tensor, intruders: float
) -> dict[str, float]:
    w0_fro, sigma1 = float(torch.linalg.vector_norm(svd.s)), float(svd.s[0])
    values = (
        _ratio(fro, w0_fro),
        _ratio(spec, sigma1),
        fro**2 / spec**2 if spec > 0 else 0.0,
        intruders,
        _ratio(float(retention.mean()), sigma1),
        smoothness(retention),
        smoothness(adaptation),
    )
    return dict(zip(SPECTRAL_METRICS, values))


def _intruders(w_ft: Callable[[], torch.Tensor], u0: torch.Tensor, k: int, eps: float) -> float:
    """Top-``k`` left singular vectors of ``w_ft()`` whose best |cos| with ``u0``'s columns is < eps."""
    if k == 0:
        return 0.0
    u_ft = torch.linalg.svd(w_ft(), full_matrices=False).U[:, :k]
    best = (u_ft.T @ u0).abs().amax(dim=1)
    return float((best < eps).sum())


def _ratio(num: float, den: float) -> float:
    """``num / den``; a zero reference gives 0 when ``num`` is zero too, else ``inf``."""
    if den > 0:
        return num / den
    return 0.0 if num == 0 else math.inf


def _checked_svd(w0: torch.Tensor, svd: PretrainedSVD | None) -> PretrainedSVD:
    if svd is None:
        return pretrained_svd(w0)
    n = min(w0.shape)
    want = ((w0.shape[0], n), (n,), (w0.shape[1], n))
    got = tuple(tuple(t.shape) for t in svd)
    if got != want:
        raise ValueError(f"w0_svd does not fit w0 {tuple(w0.shape)}: u, s, v shapes {got}, expected {want}")
    return PretrainedSVD(*(_host(t) for t in svd))


def _check_matrix(name: str, t: torch.Tensor) -> None:
    if t.ndim != 2 or t.numel() == 0:
        raise ValueError(f"{name} must be a non-empty 2-D matrix; got shape {tuple(t.shape)}")


def _check_lowrank(w0: torch.Tensor, B: torch.Tensor, A: torch.Tensor) -> None:
    _check_matrix("w0", w0)
    if B.ndim != 2 or A.ndim != 2 or B.shape[0] != w0.shape[0] or A.shape[1] != w0.shape[1] or B.shape[1] != A.shape[0]:
        raise ValueError(
            f"B must be d_out × r and A r × d_in for w0 {tuple(w0.shape)}; got B {tuple(B.shape)}, A {tuple(A.shape)}"
        )


def _check_k_eps(k: int, eps: float) -> None:
    if isinstance(k, bool) or not isinstance(k, int) or k < 0:
        raise ValueError(f"k must be an int >= 0; got {k!r}")
    if not 0 < eps <= 1:
        raise ValueError(f"eps must be in (0, 1]; got {eps!r}")


def _all_finite(*tensors: torch.Tensor) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in tensors)


def _host(t: torch.Tensor) -> torch.Tensor:
    """Detached float64 CPU copy of a tensor (a DTensor is gathered whole first: a collective)."""
    return _gathered(t).to(device=_CPU, dtype=_F64)


# ---------------------------------------------------------------------------------------- layers


@dataclass(frozen=True)
class LowRankUpdate:
    """``W_ft = w0 + scaling · b @ a`` (LoRA; several adapters stacked along the rank)."""

    w0: torch.Tensor
    b: torch.Tensor
    a: torch.Tensor
    scaling: float

    @property
    def w_ft(self) -> torch.Tensor:
        """The dense finetuned weight (materialised: for tests and small layers)."""
        return self.w0 + self.scaling * (self.b @ self.a)

    def metrics(self, *, k: int = 10, eps: float = 0.5, w0_svd: PretrainedSVD | None = None) -> dict[str, float]:
        """:func:`lowrank_update_metrics` of this update."""
        return lowrank_update_metrics(self.w0, self.b, self.a, self.scaling, k=k, eps=eps, w0_svd=w0_svd)


@dataclass(frozen=True)
class DenseUpdate:
    """Pretrained and finetuned weights of one layer, both ``d_out × d_in``."""

    w0: torch.Tensor
    w_ft: torch.Tensor

    def metrics(self, *, k: int = 10, eps: float = 0.5, w0_svd: PretrainedSVD | None = None) -> dict[str, float]:
        """:func:`dense_update_metrics` of this update."""
        return dense_update_metrics(self.w0, self.w_ft, k=k, eps=eps, w0_svd=w0_svd)


#: What :func:`layer_updates` yields per layer.
LayerUpdate = LowRankUpdate | DenseUpdate


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
        reference: Step-0 weights of plain layers (:func:`snapshot_weights`), for full finetuning.
        names: Layers to measure (see :func:`layer_updates`); ``None``: every adapted layer and
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


@torch.no_grad()
def layer_updates(
    model: nn.Module,
    reference: Mapping[str, torch.Tensor] | None = None,
    *,
    names: Sequence[str] | None = None,
) -> Iterator[tuple[str, LayerUpdate]]:
    """What to measure per layer: the pretrained weight and the finetuned one (or its factors).

    Layer names are module names with PEFT's ``base_model.model.`` prefix stripped. Weights are
    ``d_out × d_in`` float64 CPU copies (GPT-2's ``Conv1D`` weights are transposed). Adapters
    count as they compute in eval mode, whether or not they are switched off at the moment:

    * LoRA (``peft.tuners.lora.layer.Linear``), active adapters ``j``:
      ``W_ft = W0 + Σ_j s_j B_j A_j`` → :class:`LowRankUpdate` (factors stacked along the rank).
    * DoRA adapter (``lora_magnitude_vector[j]`` present), as peft's ``DoraLinearLayer.forward``
      in eval mode: ``W ← diag(m_j / ‖W0 + s_j B_j A_j‖_row) (W + s_j B_j A_j)``, row norms
      over the input dimension, applied in adapter order → :class:`DenseUpdate`.
    * OFT (``peft.tuners.oft.layer.Linear``): the input is rotated before the base layer,
      ``x ← x · blockdiag(R_j)``, so ``W_ft = W0 · (Π_j blockdiag(R_j))ᵀ`` with ``R_j`` built
      as ``OFTRotationModule.get_weight`` builds it (COFT projection, truncated Cayley–Neumann
      series or exact Cayley) → :class:`DenseUpdate`.
    * A plain ``nn.Linear`` / ``Conv1D`` named in ``reference``: ``W0 = reference[name]``,
      ``W_ft`` its current weight → :class:`DenseUpdate`.

    Args:
        model: The model, possibly wrapped by PEFT.
        reference: Step-0 weights of plain layers by name (:func:`snapshot_weights`).
        names: Layers to yield, in order; ``None``: every supported adapted layer, then every
            name in ``reference``.

    Yields:
        ``(layer name, update)``.

    Raises:
        ValueError: an unknown name, an adapted layer peft merged or of an unsupported LoRA
            variant, a plain layer missing from ``reference``, or a reference of the wrong shape.
    """
    layers = _measurable_layers(model)
    reference = reference or {}
    if names is None:
        adapted = [n for n, (kind, _) in layers.items() if kind != "linear"]
        names = adapted + [n for n in reference if n not in adapted]
    for name in names:
        if name not in layers:
            raise ValueError(f"layer {name!r} is not a measurable layer of {type(model).__name__}; {_sample(layers)}")
        kind, module = layers[name]
        if kind == "lora":
            yield name, _lora_update(name, module)
        elif kind == "oft":
            yield name, _oft_update(name, module)
        else:
            yield name, _full_update(name, module, reference)


def snapshot_weights(model: nn.Module, names: Sequence[str]) -> dict[str, torch.Tensor]:
    """Step-0 copies of layers' weights on the CPU (``d_out × d_in``, dtype kept), for full finetuning.

    Holds one CPU copy of each named weight. With FSDP2 or ZeRO-3 every rank must call it.

    Raises:
        ValueError: a name that is not a linear layer of the model.
    """
    layers = _measurable_layers(model)
    out: dict[str, torch.Tensor] = {}
    for name in names:
        if name not in layers:
            raise ValueError(f"layer {name!r} is not a measurable layer of {type(model).__name__}; {_sample(layers)}")
        kind, module = layers[name]
        layer = module if kind == "linear" else module.get_base_layer()
        out[name] = _raw_weight(layer, name).to(device=_CPU, copy=True)
    return out


def spectra_layer_names(model: nn.Module, patterns: Sequence[str] | str | None = None) -> list[str]:
    """Names of the layers to measure.

    On a PEFT model the pool is its supported adapted layers (LoRA, DoRA, OFT on linear layers);
    on a plain model its ``nn.Linear`` / ``Conv1D`` layers. ``patterns=None`` takes the whole
    pool, less a plain model's output head. A pattern matches a module whose name equals it or
    ends with ``.<pattern>`` (``*`` and ``{a,b}`` allowed, as for geometry modules) and selects
    the pool's layers at or under it: ``layers.0.mlp`` selects its three projections, while a
    matched module with no layer of the pool (a norm) adds nothing.

    Raises:
        ValueError: a pattern that matches no module, or no layer to measure at all.
    """
    layers = _measurable_layers(model)
    adapters = _has_tuner_layers(model)
    pool = [n for n, (kind, _) in layers.items() if (kind != "linear") == adapters]
    if patterns is None:
        head = _output_head(model)
        names = [n for n in pool if adapters or layers[n][1] is not head]
    else:
        names = _match_patterns(model, pool, [patterns] if isinstance(patterns, str) else list(patterns))
    if not names:
        what = "adapted layer (LoRA, DoRA or OFT on a linear layer)" if adapters else "linear layer"
        raise ValueError(f"spectra.modules: no {what} of {type(model).__name__} to measure (patterns {patterns!r})")
    return names


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
    for name, metrics in per_layer.items():
        if not name or name in _RESERVED_NAMES:
            raise ValueError(f"layer name {name!r} is not allowed: it is empty or collides with {_RESERVED_NAMES}")
        missing = [m for m in SPECTRAL_METRICS if m not in metrics]
        if missing:
            raise ValueError(f"layer {name!r} lacks metrics {missing}; it has {sorted(metrics)}")
    out: dict[str, float] = {}
    if not per_layer:
        return out
    for metric in SPECTRAL_METRICS:
        values = [float(metrics[metric]) for metrics in per_layer.values()]
        out.update({f"spectral/{metric}/{name}": v for name, v in zip(per_layer, values)})
        out[f"spectral/{metric}/mean"] = sum(values) / len(values)  # NaN propagates through sum
        # max() with a NaN depends on the order of its arguments; make NaN win explicitly.
        out[f"spectral/{metric}/max"] = math.nan if any(math.isnan(v) for v in values) else max(values)
    return out


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


_Step = tuple[torch.Tensor, torch.Tensor, float, "torch.Tensor | None"]  # (B, A, scaling, DoRA factor)


def _lora_update(name: str, module: nn.Module) -> LayerUpdate:
    _check_unmerged(name, module)
    w0_raw = _raw_weight(module.get_base_layer(), name)
    w0 = _host(w0_raw)
    active = [adapter for adapter in module.active_adapters if adapter in module.lora_A]  # as forward skips
    steps = [_lora_step(name, module, adapter, w0_raw) for adapter in active]
    if not steps:  # no active adapter here: ΔW = 0
        return LowRankUpdate(w0, w0.new_zeros(w0.shape[0], 1), w0.new_zeros(1, w0.shape[1]), 1.0)
    if any(factor is not None for *_, factor in steps):
        return DenseUpdate(w0, _dora_weight(w0, steps))
    if len(steps) == 1:
        return LowRankUpdate(w0, *steps[0][:3])
    b = torch.cat([s * b for b, _, s, _ in steps], dim=1)
    return LowRankUpdate(w0, b, torch.cat([a for _, a, _, _ in steps], dim=0), 1.0)


def _lora_step(name: str, module: nn.Module, adapter: str, w0_raw: torch.Tensor) -> _Step:
    """One adapter's factors (float64) and, for DoRA, its row factor ``m / ‖W0 + s·BA‖_row``.

    The norm is computed as peft's ``DoraLinearLayer.get_weight_norm`` does, on the layer's
    device in the adapter's dtype, so that the factor is exactly 1 where peft initialised
    ``m`` to that norm (``B = 0``): a float64 norm would differ from the stored ``m`` by
    rounding and show a spurious update of ~1e-8.
    """
    dora = adapter in module.lora_magnitude_vector
    if not dora and getattr(module, "lora_variant", {}).get(adapter) is not None:
        variant = type(module.lora_variant[adapter]).__name__
        raise ValueError(f"layer {name!r}: LoRA variant {variant} of adapter {adapter!r} is not supported")
    b, a = _gathered(module.lora_B[adapter].weight), _gathered(module.lora_A[adapter].weight)
    scaling = float(module.scaling[adapter])
    factor = None
    if dora:
        norm = torch.linalg.norm(w0_raw.to(a.dtype) + scaling * (b @ a), dim=1)
        factor = _host(module.lora_magnitude_vector[adapter].weight) / _host(norm)
    return _host(b), _host(a), scaling, factor


def _dora_weight(w0: torch.Tensor, steps: list[_Step]) -> torch.Tensor:
    """The eval-mode weight of a LoRA layer with DoRA adapters, adapters applied in order.

    peft's ``DoraLinearLayer.forward`` adds ``(m/‖W0 + sBA‖ − 1) · base_result + m/‖·‖ · sBA x``
    to the running result, with ``base_result`` that running result less the bias (eval mode
    or no dropout), so ``W ← diag(m/‖·‖) (W + sBA)``; a plain LoRA adapter adds ``sBA``.
    """
    w = w0
    for b, a, s, factor in steps:
        delta = s * (b @ a)
        w = w + delta if factor is None else factor.unsqueeze(1) * (w + delta)
    return w


def _oft_update(name: str, module: nn.Module) -> DenseUpdate:
    _check_unmerged(name, module)
    w0 = _host(_raw_weight(module.get_base_layer(), name))
    rotation = torch.eye(w0.shape[1], dtype=_F64)
    for adapter in module.active_adapters:
        if adapter in module.oft_R:
            rotation = rotation @ _oft_block_rotation(module.oft_R[adapter])
    return DenseUpdate(w0, w0 @ rotation.T)


def _oft_block_rotation(rot: nn.Module) -> torch.Tensor:
    """``blockdiag(R)`` of peft's ``OFTRotationModule`` in float64, as its ``get_weight`` builds it."""
    b = rot.block_size
    rows, cols = torch.triu_indices(b, b, 1)
    vec = _host(rot.weight)
    q = vec.new_zeros(vec.shape[0], b, b)
    q[:, rows, cols] = vec
    q = q - q.mT
    if rot.coft:  # _project_batch: each block's skew matrix clipped to Frobenius norm eps / sqrt(#rows)
        limit = rot.eps / math.sqrt(q.shape[0])
        norm = torch.linalg.matrix_norm(q, keepdim=True)
        q = torch.where(norm <= limit, q, limit * q / norm)
    r = _cayley_neumann(q, rot.num_cayley_neumann_terms) if rot.use_cayley_neumann else _cayley(q)
    n_blocks = rot.in_features // b if rot.block_share else rot.r
    blocks = [r[0]] * n_blocks if r.shape[0] == 1 else list(r[:n_blocks])
    return torch.block_diag(*blocks)


def _cayley_neumann(q: torch.Tensor, terms: int) -> torch.Tensor:
    """peft's truncated series ``I + 2Q + 2Q² + … + 2Q^(t−2) + Q^(t−1)`` (only nearly orthogonal)."""
    r = torch.eye(q.shape[-1], dtype=q.dtype).expand_as(q).clone()
    if terms > 1:
        r = r + 2 * q
        if terms > 2:
            power = q @ q
            r = r + 2 * power
            for _ in range(3, terms - 1):
                power = power @ q
                r = r + 2 * power
            r = r + power @ q
    return r


def _cayley(q: torch.Tensor) -> torch.Tensor:
    """peft's exact branch ``solve(I + Q, I − Q, left=False) = (I − Q)(I + Q)⁻¹`` (orthogonal)."""
    eye = torch.eye(q.shape[-1], dtype=q.dtype).expand_as(q)
    return torch.linalg.solve(eye + q, eye - q, left=False)


def _full_update(name: str, module: nn.Module, reference: Mapping[str, torch.Tensor]) -> DenseUpdate:
    if name not in reference:
        raise ValueError(
            f"layer {name!r} is a plain linear layer: measuring full finetuning needs its step-0 weight "
            "in reference (take it with snapshot_weights before training)"
        )
    w_ft = _host(_raw_weight(module, name))
    w0 = _host(reference[name])
    if w0.shape != w_ft.shape:
        raise ValueError(f"reference[{name!r}] has shape {tuple(w0.shape)}; the layer's weight is {tuple(w_ft.shape)}")
    return DenseUpdate(w0, w_ft)


def _check_unmerged(name: str, module: nn.Module) -> None:
    if getattr(module, "merged", False):
        raise ValueError(f"layer {name!r}: its adapter is merged into the base weight; unmerge it to measure it")


def _raw_weight(layer: nn.Module, name: str) -> torch.Tensor:
    """A linear layer's weight as ``d_out × d_in``, detached, on its device, in its dtype."""
    w = _gathered(layer.weight)
    if _is_conv1d(layer):
        w = w.T  # Conv1D stores d_in × d_out and computes x @ W
    if w.ndim != 2:
        raise ValueError(
            f"layer {name!r}: weight has shape {tuple(w.shape)}, not 2-D "
            "(a partitioned parameter of a sharding scheme other than FSDP2 or ZeRO-3? gather it first)"
        )
    return w


def _gathered(t: torch.Tensor) -> torch.Tensor:
    """Detached, and gathered whole when sharded: a collective, every rank must call it.

    A DTensor (FSDP2) is gathered with ``full_tensor()``; a DeepSpeed ZeRO-3 parameter (it has
    ``ds_id``; its local data is an empty placeholder) inside ``GatheredParameters`` and copied
    out before it is partitioned again.
    """
    if hasattr(t, "ds_id"):
        import deepspeed

        with deepspeed.zero.GatheredParameters([t], modifier_rank=None):
            return t.detach().clone()
    t = t.detach()
    full = getattr(t, "full_tensor", None)
    return full() if callable(full) else t


# ---------------------------------------------------------------------------------------- model walk


def _measurable_layers(model: nn.Module) -> dict[str, tuple[str, nn.Module]]:
    """``{display name: (kind, module)}``, kind ``lora``, ``oft`` or ``linear``; PEFT internals left out."""
    out: dict[str, tuple[str, nn.Module]] = {}
    for name, module in _walk(model):
        kind = _kind(module)
        if kind is not None:
            out.setdefault(_strip_peft(name), (kind, module))
    return out


def _walk(module: nn.Module, prefix: str = "") -> Iterator[tuple[str, nn.Module]]:
    """Named submodules, not descending into PEFT adapter layers (their base layer is not a layer here)."""
    for child_name, child in module.named_children():
        name = f"{prefix}.{child_name}" if prefix else child_name
        yield name, child
        if not _is_tuner_layer(child):
            yield from _walk(child, name)


def _kind(module: nn.Module) -> str | None:
    lora_linear, oft_linear = _peft_linear_classes()
    if lora_linear is not None and isinstance(module, lora_linear):
        return "lora" if _is_linear(module.get_base_layer()) else None
    if oft_linear is not None and isinstance(module, oft_linear):
        return "oft" if _is_linear(module.get_base_layer()) else None
    if _is_tuner_layer(module):
        return None
    return "linear" if _is_linear(module) else None


def _is_linear(module: nn.Module) -> bool:
    """``nn.Linear`` or ``Conv1D`` with a floating-point weight (quantized layers are not measured)."""
    weight = getattr(module, "weight", None)
    return (isinstance(module, nn.Linear) or _is_conv1d(module)) and weight is not None and weight.is_floating_point()


def _is_conv1d(module: nn.Module) -> bool:
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers is a dependency
        return False
    return isinstance(module, Conv1D)


def _peft_linear_classes() -> tuple[type | None, type | None]:
    try:
        from peft.tuners.lora.layer import Linear as LoraLinear
        from peft.tuners.oft.layer import Linear as OftLinear
    except ImportError:
        return None, None
    return LoraLinear, OftLinear


def _is_tuner_layer(module: nn.Module) -> bool:
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:
        return False
    return isinstance(module, BaseTunerLayer)


def _has_tuner_layers(model: nn.Module) -> bool:
    return any(_is_tuner_layer(m) for m in model.modules())


def _output_head(model: nn.Module) -> nn.Module | None:
    get = getattr(model, "get_output_embeddings", None)
    return get() if callable(get) else None


def _match_patterns(model: nn.Module, pool: list[str], patterns: list[str]) -> list[str]:

    modules = [_strip_peft(n) for n, _ in _walk(model)]
    chosen: list[str] = []
    for pattern in patterns:
        found = [
            m for alt in expand_braces(pattern) for m in modules
            if fnmatch.fnmatchcase(m, alt) or fnmatch.fnmatchcase(m, "*." + alt)
        ]
        if not found:
            sample = ", ".join(pool[:8])
            raise ValueError(
                f"spectra.modules: pattern {pattern!r} matches no module of {type(model).__name__}; "
                f"layers look like: {sample}"
            )
        under = [p for p in pool if any(p == m or p.startswith(m + ".") for m in found)]
        chosen += [p for p in under if p not in chosen]
    return chosen


def _sample(layers: Mapping[str, tuple[str, nn.Module]]) -> str:
    names = list(layers)
    return f"measurable layers look like: {', '.join(names[:8])}" if names else "it has no linear layers"
