"""Activation geometry: how far a module's outputs moved from the pretrained ones (DESIGN.md §3).

``X0`` and ``X1`` are ``n × d`` outputs of one module on the same probe tokens (rows are
tokens), for the pretrained model and the current one. Per module:

* ``cosine``: mean over rows of ``1 - cos(x0_i, x1_i)``.
* ``norm``: mean over rows of ``|log(‖x1_i‖ / ‖x0_i‖)|``.
* ``raw``: ``‖X1c - X0c‖_F / ‖X0c‖_F`` with columns centred.
* ``procrustes``: ``‖X1 R* - X0‖_F / ‖X0‖_F`` with ``R* = U Vᵀ`` from ``svd(X1ᵀ X0)``
  (uncentred): the part of the change no rotation explains. Zero for any rotation of X0.
* ``gram``: rows L2-normalised to Z; ``‖Z1 Z1ᵀ - Z0 Z0ᵀ‖_F / ‖Z0 Z0ᵀ‖_F`` (angle distortion).
* ``cka``: linear CKA with columns centred, ``‖X0ᵀX1‖_F² / (‖X0ᵀX0‖_F ‖X1ᵀX1‖_F)``; a
  similarity (1 = same up to rotation and scale), every other metric is a distance (0 = same).

Cost scales with ``min(n, d)``: every ``n × n`` or ``d × d`` form is chosen by whichever is
smaller, and Procrustes needs only the singular values of a ``min(n, d)``-square matrix. With
``d <= n`` one product ``C1ᵀC0`` serves both CKA and Procrustes, and a fixed reference's own
products come from :func:`reference_stats` once, so a step forms four ``d × d`` products and
one SVD.
Where a formula takes a difference of large sums (Procrustes, and Gram when ``d < n``), a
distance that is truly zero reads as up to about ``1e-7`` (the square root of rounding error).

:func:`aggregate` turns per-module results into ``geometry/<metric>/<module>`` keys plus
``geometry/<metric>/mean`` and ``geometry/<metric>/max``.

Example:
    >>> x0 = torch.randn(256, 64, dtype=torch.float64)
    >>> q, _ = torch.linalg.qr(torch.randn(64, 64, dtype=torch.float64))
    >>> m = geometry_metrics(x0, x0 @ q)
    >>> m["procrustes"] < 1e-6 and abs(m["cka"] - 1) < 1e-12
    True
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch

__all__ = ["METRICS", "ReferenceStats", "aggregate", "geometry_metrics", "reference_stats"]

#: Metric names, in the order :func:`geometry_metrics` returns them.
METRICS: tuple[str, ...] = ("cosine", "norm", "raw", "procrustes", "gram", "cka")

# Each row gets one extra constant coordinate eps, relative to the typical row norm so that
# every metric stays invariant to scaling both inputs. 1e-8 moves an ordinary row's cosine by
# ~1e-16 yet gives zero rows a defined direction.
_ROW_EPS_REL = 1e-8

# Aggregate names under geometry/<metric>/; a module so named would collide with them.
_RESERVED_NAMES = ("mean", "max", "min")


@dataclass(frozen=True)
class ReferenceStats:
    """What the geometry needs from the reference ``x0`` alone, computed once by :func:`reference_stats`.

    The reference is the same at every probe step (cached activations, or the adapters switched
    off), so its own ``d × d`` (or ``n × n``) products need not be formed again: passing these
    to :func:`geometry_metrics` saves two of its six matrix products.

    Attributes:
        shape: ``(n, d)`` of the ``x0`` they came from.
        gram_rows: the ``gram_rows`` they were computed for.
        sum_sq: ``‖X0‖_F²``, compared with the ``x0`` given later to catch a mismatched reference.
        cka_norm: ``‖C0ᵀC0‖_F`` (columns centred).
        gram_norm: ``‖Z0 Z0ᵀ‖_F`` over the (subsampled) Gram rows.
    """

    shape: tuple[int, int]
    gram_rows: int
    sum_sq: torch.Tensor
    cka_norm: torch.Tensor
    gram_norm: torch.Tensor


@torch.no_grad()
def reference_stats(x0: torch.Tensor, *, gram_rows: int = 1024) -> ReferenceStats:
    """Precompute the reference-only parts of :func:`geometry_metrics` for a fixed ``x0``.

    Args:
        x0: ``n × d`` activations of the pretrained model, as later given to
            :func:`geometry_metrics`.
        gram_rows: as for :func:`geometry_metrics` (must match there).

    Raises:
        TypeError, ValueError: as :func:`geometry_metrics` for a bad ``x0`` or ``gram_rows``.
    """
    _validate(x0, x0, gram_rows)
    x0 = x0.detach().to(_compute_dtype(x0.device))
    c0 = x0 - x0.mean(dim=0)
    z0 = _unit_rows(_gram_rows(x0, gram_rows))
    return ReferenceStats(
        shape=(int(x0.shape[0]), int(x0.shape[1])),
        gram_rows=gram_rows,
        sum_sq=x0.square().sum(),
        cka_norm=_self_product_norm(c0),
        gram_norm=_self_product_norm(z0),
    )


@torch.no_grad()
def geometry_metrics(
    x0: torch.Tensor, x1: torch.Tensor, *, gram_rows: int = 1024, reference: ReferenceStats | None = None
) -> dict[str, float]:
    """Geometry of one module's activations, pretrained ``x0`` against current ``x1``.

    Computed in float64 on the inputs' device, whatever their dtype (bfloat16 and float32
    upcast exactly); only a device without float64 (Apple MPS) computes in float32. On CUDA
    the Procrustes nuclear norm comes from ``eigvalsh`` rather than an SVD (see
    :func:`_nuclear_norm` for the speed and the accuracy given up).

    Zero rows: each row is extended by a constant coordinate ``eps = 1e-8 × RMS row norm``
    before ``cosine`` and ``norm``. Two zero rows then count as unchanged (cos 1, norm drift
    0); a zero row against a non-zero one reads as orthogonal (cos ≈ 0) with a large finite
    norm drift (``≈ |log(‖x‖/eps)|``, about 18 for a typical row). Zero references: a distance
    whose denominator is zero is 0 when its numerator is too, else ``inf``; ``cka`` is 1 when
    both centred inputs are zero and 0 when only one is.

    Args:
        x0: ``n × d`` activations of the pretrained model (rows are tokens).
        x1: ``n × d`` activations of the current model on the same tokens.
        gram_rows: most rows used for ``gram``; a larger ``n`` is subsampled deterministically
            to ``m = gram_rows`` evenly spaced rows ``i * (n - 1) // (m - 1)``, ``i < m``.
        reference: :func:`reference_stats` of this ``x0``, when the same reference is measured
            against many ``x1`` (saves two matrix products; the values are the same).

    Returns:
        ``{metric: value}`` for every name in :data:`METRICS`, as Python floats. If either
        input holds a NaN or an infinity, every value is NaN: a broken probe then breaches
        any budget on these keys instead of crashing the run.

    Raises:
        TypeError: an input is not a tensor.
        ValueError: inputs not 2-D, of different shapes, devices or non-float dtypes, fewer
            than 2 rows or no columns, ``gram_rows < 2``, or ``reference`` computed from
            another ``x0`` (shape, ``gram_rows`` or values differ).
    """
    _validate(x0, x1, gram_rows)
    if not (bool(torch.isfinite(x0).all()) and bool(torch.isfinite(x1).all())):
        return dict.fromkeys(METRICS, math.nan)
    dtype = _compute_dtype(x0.device)
    x0, x1 = x0.detach().to(dtype), x1.detach().to(dtype)
    n, d = x0.shape
    mu0, mu1 = x0.mean(dim=0), x1.mean(dim=0)
    c0, c1 = x0 - mu0, x1 - mu1
    sq0 = x0.square().sum()
    if reference is not None:
        _check_reference(reference, x0, gram_rows, sq0)
    # With d <= n, one d × d product serves CKA (C1ᵀC0) and Procrustes: X1ᵀX0 = C1ᵀC0 + n μ1 μ0ᵀ
    # exactly (centred columns sum to zero), and as accurately as forming X1ᵀX0 directly.
    cross = c1.T @ c0 if d <= n else None
    cosine, norm = _row_drift(x0, x1)
    values = torch.stack(
        [
            cosine,
            norm,
            _raw(c0, c1),
            _procrustes(x0, x1, sq0, None if cross is None else cross + n * torch.outer(mu1, mu0)),
            _gram(x0, x1, gram_rows, None if reference is None else reference.gram_norm),
            _cka(c0, c1, cross, None if reference is None else reference.cka_norm),
        ]
    )
    return dict(zip(METRICS, values.tolist()))  # one device sync for all six


def aggregate(per_module: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    """Namespaced keys for per-module metrics, with the mean and max across modules.

    A NaN in any module makes that metric's ``mean`` and ``max`` NaN, so that a failed
    measurement is never hidden by the healthy ones.

    Args:
        per_module: ``{module name: geometry_metrics(...)}``. Each must hold every name in
            :data:`METRICS`; other entries are ignored.

    Returns:
        For each metric, ``geometry/<metric>/<module>`` per module (in the given order), then
        ``geometry/<metric>/mean``, ``geometry/<metric>/max`` and ``geometry/<metric>/min``.
        Empty for no modules.

    Raises:
        ValueError: a module name is empty or ``"mean"``/``"max"``/``"min"``, or a module lacks a metric.
    """
    for name, metrics in per_module.items():
        if not name or name in _RESERVED_NAMES:
            raise ValueError(f"module name {name!r} is not allowed: it is empty or collides with {_RESERVED_NAMES}")
        missing = [m for m in METRICS if m not in metrics]
        if missing:
            raise ValueError(f"module {name!r} lacks metrics {missing}; it has {sorted(metrics)}")
    out: dict[str, float] = {}
    if not per_module:
        return out
    for metric in METRICS:
        values = [float(metrics[metric]) for metrics in per_module.values()]
        out.update({f"geometry/{metric}/{name}": v for name, v in zip(per_module, values)})
        out[f"geometry/{metric}/mean"] = sum(values) / len(values)  # NaN propagates through sum
        # max() with a NaN depends on the order of its arguments; make NaN win explicitly.
        out[f"geometry/{metric}/max"] = math.nan if any(math.isnan(v) for v in values) else max(values)
        # CKA is a similarity (lower is worse): its budget wants the smallest module value.
        out[f"geometry/{metric}/min"] = math.nan if any(math.isnan(v) for v in values) else min(values)
    return out


def _validate(x0: object, x1: object, gram_rows: int) -> None:
    if not isinstance(x0, torch.Tensor) or not isinstance(x1, torch.Tensor):
        raise TypeError(f"x0 and x1 must be torch.Tensor; got {type(x0).__name__} and {type(x1).__name__}")
    shapes = f"x0 {tuple(x0.shape)}, x1 {tuple(x1.shape)}"
    if x0.ndim != 2 or x1.ndim != 2:
        raise ValueError(f"x0 and x1 must be 2-D (tokens × features); got {shapes}")
    if x0.shape != x1.shape:
        raise ValueError(f"x0 and x1 must have the same shape (same module, same tokens); got {shapes}")
    if x0.shape[0] < 2 or x0.shape[1] < 1:
        raise ValueError(f"x0 and x1 need at least 2 rows and 1 column; got {shapes}")
    if not (x0.is_floating_point() and x1.is_floating_point()):
        raise ValueError(f"x0 and x1 must be real floating point; got {x0.dtype} and {x1.dtype}")
    if x0.device != x1.device:
        raise ValueError(f"x0 and x1 must be on one device; got {x0.device} and {x1.device}")
    if isinstance(gram_rows, bool) or not isinstance(gram_rows, int) or gram_rows < 2:
        raise ValueError(f"gram_rows must be an int >= 2; got {gram_rows!r}")


def _check_reference(ref: ReferenceStats, x0: torch.Tensor, gram_rows: int, sum_sq: torch.Tensor) -> None:
    if not isinstance(ref, ReferenceStats):
        raise TypeError(f"reference must be a ReferenceStats from reference_stats(x0); got {type(ref).__name__}")
    if ref.shape != tuple(x0.shape) or ref.gram_rows != gram_rows:
        raise ValueError(
            f"reference was computed for x0 of shape {ref.shape} with gram_rows={ref.gram_rows}; "
            f"got x0 {tuple(x0.shape)} with gram_rows={gram_rows}"
        )
    if ref.sum_sq.device != sum_sq.device:
        raise ValueError(f"reference is on {ref.sum_sq.device} but x0 is on {sum_sq.device}")
    want, got = float(ref.sum_sq), float(sum_sq)
    if abs(want - got) > 1e-9 * max(abs(want), abs(got)):
        raise ValueError(
            f"reference was computed from another x0 (‖x0‖² {want:.6g} there, {got:.6g} here); "
            "call reference_stats on the x0 you pass"
        )


def _compute_dtype(device: torch.device) -> torch.dtype:
    # MPS has no float64; everywhere else float64 keeps the differences of large sums exact enough.
    return torch.float32 if device.type == "mps" else torch.float64


def _row_drift(x0: torch.Tensor, x1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean ``1 - cos`` and mean ``|log norm ratio|`` over rows, on eps-extended rows."""
    sq0, sq1 = x0.square().sum(dim=1), x1.square().sum(dim=1)
    dot = (x0 * x1).sum(dim=1)
    eps2 = _ROW_EPS_REL**2 * (sq0.mean() + sq1.mean()) / 2
    eps2 = torch.where(eps2 > 0, eps2, torch.ones_like(eps2))  # all rows zero: any eps says "unchanged"
    cos = (dot + eps2) / (torch.sqrt(sq0 + eps2) * torch.sqrt(sq1 + eps2))
    cosine = (1 - cos.clamp(-1.0, 1.0)).mean()
    norm = 0.5 * torch.log((sq1 + eps2) / (sq0 + eps2)).abs().mean()
    return cosine, norm


def _raw(c0: torch.Tensor, c1: torch.Tensor) -> torch.Tensor:
    return _ratio(torch.linalg.matrix_norm(c1 - c0), torch.linalg.matrix_norm(c0))


def _procrustes(x0: torch.Tensor, x1: torch.Tensor, sq0: torch.Tensor, core: torch.Tensor | None) -> torch.Tensor:
    """``‖X1 R* − X0‖ / ‖X0‖`` without forming R*: ``‖X1R*−X0‖² = ‖X1‖² + ‖X0‖² − 2‖X1ᵀX0‖_*``.

    ``core``: ``X1ᵀX0`` (``d <= n``), or ``None`` for ``n < d``: an ``n × n`` core instead.
    """
    if core is None:
        # X1ᵀ = Q1 R1, X0ᵀ = Q0 R0 (thin QR) give X1ᵀX0 = Q1 (R1 R0ᵀ) Q0ᵀ; the Q's have
        # orthonormal columns, so the n × n core has the same singular values as the d × d C.
        r1 = torch.linalg.qr(x1.T, mode="r").R
        r0 = torch.linalg.qr(x0.T, mode="r").R
        core = r1 @ r0.T
    sq1 = x1.square().sum()
    residual2 = (sq1 + sq0 - 2 * _nuclear_norm(core)).clamp(min=0)  # rounding can dip below 0
    return _ratio(residual2.sqrt(), sq0.sqrt())


def _nuclear_norm(m: torch.Tensor, method: str | None = None) -> torch.Tensor:
    """Sum of singular values of a square matrix.

    ``method="svd"`` (default off CUDA): ``svdvals``, each value accurate to ~eps·σ_max.
    ``method="eig"`` (default on CUDA): square roots of ``eigvalsh(MᵀM)``, several times faster
    than an SVD on a GPU (DESIGN.md §7: 71 ms against 330 ms for eight 896² matrices on an
    H100). Squaring costs accuracy at the bottom of the spectrum: a singular value below
    ~1e-8·σ_max reads as up to ~1e-8·σ_max. Only a numerically rank-deficient M has many of
    those (the n × n core of the ``n < d`` route is generically full rank); there a near-zero
    Procrustes residual may read as up to ~1e-4.
    """
    if method is None:
        method = "eig" if m.device.type == "cuda" else "svd"
    if method == "svd":
        return torch.linalg.svdvals(m).sum()
    if method == "eig":
        return torch.linalg.eigvalsh(m.T @ m).clamp(min=0).sqrt().sum()
    raise ValueError(f"method must be 'svd' or 'eig'; got {method!r}")


def _gram_rows(x: torch.Tensor, max_rows: int) -> torch.Tensor:
    n = x.shape[0]
    if n <= max_rows:
        return x
    idx = torch.arange(max_rows, device=x.device) * (n - 1) // (max_rows - 1)
    return x[idx]


def _self_product_norm(x: torch.Tensor) -> torch.Tensor:
    """``‖XᵀX‖_F = ‖XXᵀ‖_F``, through whichever product is smaller."""
    return torch.linalg.matrix_norm(x.T @ x if x.shape[1] <= x.shape[0] else x @ x.T)


def _gram(x0: torch.Tensor, x1: torch.Tensor, max_rows: int, norm0: torch.Tensor | None) -> torch.Tensor:
    """``norm0``: ``‖Z0Z0ᵀ‖_F`` when known (:class:`ReferenceStats`)."""
    z0, z1 = _unit_rows(_gram_rows(x0, max_rows)), _unit_rows(_gram_rows(x1, max_rows))
    if z0.shape[0] <= z0.shape[1]:
        g0, g1 = z0 @ z0.T, z1 @ z1.T
        return _ratio(torch.linalg.matrix_norm(g1 - g0), torch.linalg.matrix_norm(g0) if norm0 is None else norm0)
    # d < m: ‖Z1Z1ᵀ − Z0Z0ᵀ‖² = ‖Z1ᵀZ1‖² + ‖Z0ᵀZ0‖² − 2‖Z0ᵀZ1‖² and ‖Z0Z0ᵀ‖ = ‖Z0ᵀZ0‖, all d × d.
    if norm0 is None:
        norm0 = _self_product_norm(z0)
    a1, cross = z1.T @ z1, z0.T @ z1
    diff2 = (a1.square().sum() + norm0.square() - 2 * cross.square().sum()).clamp(min=0)
    return _ratio(diff2.sqrt(), norm0)


def _unit_rows(x: torch.Tensor) -> torch.Tensor:
    norms = torch.linalg.vector_norm(x, dim=1, keepdim=True)
    return x / torch.where(norms > 0, norms, torch.ones_like(norms))  # zero rows stay zero


def _cka(c0: torch.Tensor, c1: torch.Tensor, cross: torch.Tensor | None, n0: torch.Tensor | None) -> torch.Tensor:
    """Linear CKA of column-centred inputs, through d × d or n × n products, whichever is smaller.

    ``cross``: ``C1ᵀC0`` (``d <= n``), or ``None`` for ``n < d`` (``n × n`` products instead);
    ``n0``: ``‖C0ᵀC0‖_F`` when known (:class:`ReferenceStats`).
    """
    if cross is not None:
        num = cross.square().sum()
        n1 = _self_product_norm(c1)
        if n0 is None:
            n0 = _self_product_norm(c0)
    else:
        # ‖X0ᵀX1‖² = <X0X0ᵀ, X1X1ᵀ> and ‖XᵀX‖ = ‖XXᵀ‖.
        k0, k1 = c0 @ c0.T, c1 @ c1.T
        num = (k0 * k1).sum()
        n1 = torch.linalg.matrix_norm(k1)
        if n0 is None:
            n0 = torch.linalg.matrix_norm(k0)
    den = n0 * n1
    degenerate = ((n0 == 0) & (n1 == 0)).to(c0.dtype)  # both constant: same; one constant: unrelated
    return torch.where(den > 0, num / torch.where(den > 0, den, torch.ones_like(den)), degenerate)


def _ratio(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """``num / den``; a zero reference gives 0 when ``num`` is zero too, else ``inf``."""
    safe = torch.where(den > 0, den, torch.ones_like(den))
    fallback = torch.where(num > 0, torch.full_like(num, math.inf), torch.zeros_like(num))
    return torch.where(den > 0, num / safe, fallback)
