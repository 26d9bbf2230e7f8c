"""Activation geometry: how far a module's outputs moved from the pretrained ones.

One of the measurements of a probe step (docs/design.md §3): forgetting follows non-isometric
distortion of the activations more than their raw movement (docs/design.md §1).

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
products come from :func:`reference_stats` once, so a step forms four ``d × d`` products (two
of them only as norms, from their upper block triangle) and one SVD.
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

import contextlib
import itertools
import math
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import torch

from .aggregation import namespaced_metrics

__all__ = ["METRICS", "ReferenceStats", "aggregate", "geometry_metrics", "reference_stats"]

#: Metric names, in the order :func:`geometry_metrics` returns them.
METRICS: tuple[str, ...] = ("cosine", "norm", "raw", "procrustes", "gram", "cka")

# Each row gets one extra constant coordinate eps, relative to the typical row norm so that
# every metric stays invariant to scaling both inputs. 1e-8 moves an ordinary row's cosine by
# ~1e-16 yet gives zero rows a defined direction.
_ROW_EPS_REL = 1e-8


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
    x0 = x0.detach().to(_compute_dtype(x0.device), copy=True)
    row_sq = torch.linalg.vector_norm(x0, dim=1).square()
    z0 = _unit_rows(*_gram_rows(x0, row_sq, gram_rows))
    gram_norm = _self_product_norm(z0)
    del z0
    x0.sub_(x0.mean(dim=0))
    return ReferenceStats(
        shape=(int(x0.shape[0]), int(x0.shape[1])),
        gram_rows=gram_rows,
        sum_sq=row_sq.sum(),
        cka_norm=_self_product_norm(x0),
        gram_norm=gram_norm,
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
    if reference is not None and not isinstance(reference, ReferenceStats):
        raise TypeError(f"reference must be a ReferenceStats from reference_stats(x0); got {type(reference).__name__}")
    dtype = _compute_dtype(x0.device)
    # Private float64 copies, worked on in place: each step makes four n × d temporaries where
    # a straightforward version makes a dozen (this runs for every tracked module at every probe).
    x0, x1 = x0.detach().to(dtype, copy=True), x1.detach().to(dtype, copy=True)
    row_sq0 = torch.linalg.vector_norm(x0, dim=1).square()
    row_sq1 = torch.linalg.vector_norm(x1, dim=1).square()
    sq0, sq1 = row_sq0.sum(), row_sq1.sum()
    # A NaN or an inf anywhere makes these sums non-finite. (So would a float64 input beyond ~1e154,
    # whose squares overflow; float32 and narrower inputs cannot get there.)
    if not bool(torch.isfinite(sq0 + sq1)):
        return dict.fromkeys(METRICS, math.nan)
    if reference is not None:
        _check_reference(reference, x0, gram_rows, sq0)
    values = _metric_values(x0, x1, row_sq0, row_sq1, sq0, sq1, gram_rows=gram_rows, reference=reference)
    return dict(zip(METRICS, values.tolist()))  # one device sync for all six


def _metric_values(
    x0: torch.Tensor,
    x1: torch.Tensor,
    row_sq0: torch.Tensor,
    row_sq1: torch.Tensor,
    sq0: torch.Tensor,
    sq1: torch.Tensor,
    *,
    gram_rows: int,
    reference: ReferenceStats | None,
) -> torch.Tensor:
    """The six metrics, in :data:`METRICS` order, as one tensor on the inputs' device.

    ``x0`` and ``x1`` are private copies in the compute dtype (centred in place here), with their
    squared row norms ``row_sq0`` / ``row_sq1`` and the (finite) sums of those ``sq0`` / ``sq1``.
    """
    n, d = x0.shape
    mu0, mu1 = x0.mean(dim=0), x1.mean(dim=0)

    diff = x1 - x0
    cosine, norm = _row_drift(row_sq0, row_sq1, torch.linalg.vector_norm(diff, dim=1).square())
    raw_num = torch.linalg.vector_norm(diff.sub_(mu1 - mu0))  # C1 − C0 = (X1 − X0) − (μ1 − μ0)
    del diff
    gram = _gram(x0, x1, row_sq0, row_sq1, gram_rows, None if reference is None else reference.gram_norm)
    # The n × n Procrustes core needs the uncentred inputs; take it before centring them.
    core = _qr_core(x0, x1) if n < d else None

    c0, c1 = x0.sub_(mu0), x1.sub_(mu1)  # centred in place: x0 and x1 are not used again
    # With d <= n, one d × d product serves CKA (C1ᵀC0) and Procrustes: X1ᵀX0 = C1ᵀC0 + n μ1 μ0ᵀ
    # exactly (centred columns sum to zero), and as accurately as forming X1ᵀX0 directly.
    cross = c1.T @ c0 if d <= n else None
    if cross is not None:
        core = cross + n * torch.outer(mu1, mu0)
    assert core is not None
    return torch.stack(
        [
            cosine,
            norm,
            _ratio(raw_num, torch.linalg.vector_norm(c0)),
            _procrustes(sq0, sq1, core),
            gram,
            _cka(c0, c1, cross, None if reference is None else reference.cka_norm),
        ]
    )


def aggregate(per_module: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    """Namespaced keys for per-module metrics, with the mean, max and min across modules.

    A NaN in any module makes that metric's ``mean``, ``max`` and ``min`` NaN, so that a failed
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
    # CKA is a similarity (lower is worse): its budget wants the smallest module value.
    return namespaced_metrics("geometry", per_module, METRICS, noun="module", with_min=True)


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


def _row_drift(sq0: torch.Tensor, sq1: torch.Tensor, sqd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean ``1 - cos`` and mean ``|log norm ratio|`` over eps-extended rows, from the rows'
    squared norms ``sq0``, ``sq1`` and the squared norms ``sqd`` of their differences.

    ``1 − cos = (‖x1 − x0‖² − (‖x1‖ − ‖x0‖)²) / (2‖x0‖‖x1‖)`` on the extended rows (whose
    difference is ``x1 − x0``): the same value as ``1 − x0·x1/(‖x0‖‖x1‖)``, without cancelling
    two numbers near 1 for rows that barely moved.
    """
    eps2 = _ROW_EPS_REL**2 * (sq0.mean() + sq1.mean()) / 2
    eps2 = torch.where(eps2 > 0, eps2, torch.ones_like(eps2))  # all rows zero: any eps says "unchanged"
    n0, n1 = torch.sqrt(sq0 + eps2), torch.sqrt(sq1 + eps2)
    one_minus_cos = (sqd - (n1 - n0).square()) / (2 * n0 * n1)
    cosine = one_minus_cos.clamp(0.0, 2.0).mean()
    norm = 0.5 * torch.log((sq1 + eps2) / (sq0 + eps2)).abs().mean()
    return cosine, norm


def _qr_core(x0: torch.Tensor, x1: torch.Tensor) -> torch.Tensor:
    """For ``n < d``: an ``n × n`` matrix with the singular values of ``X1ᵀX0``.

    ``X1ᵀ = Q1 R1``, ``X0ᵀ = Q0 R0`` (thin QR) give ``X1ᵀX0 = Q1 (R1 R0ᵀ) Q0ᵀ``; the Q's have
    orthonormal columns, so ``R1 R0ᵀ`` has the same singular values.
    """
    r1 = torch.linalg.qr(x1.T, mode="r").R
    r0 = torch.linalg.qr(x0.T, mode="r").R
    return r1 @ r0.T


def _procrustes(sq0: torch.Tensor, sq1: torch.Tensor, core: torch.Tensor) -> torch.Tensor:
    """``‖X1 R* − X0‖ / ‖X0‖`` without forming R*: ``‖X1R*−X0‖² = ‖X1‖² + ‖X0‖² − 2‖X1ᵀX0‖_*``.

    ``core``: ``X1ᵀX0`` (``d <= n``), or for ``n < d`` the ``n × n`` :func:`_qr_core`.
    """
    residual2 = (sq1 + sq0 - 2 * _nuclear_norm(core)).clamp(min=0)  # rounding can dip below 0
    return _ratio(residual2.sqrt(), sq0.sqrt())


# Where OpenMP threads wait passively (OMP_WAIT_POLICY=PASSIVE, a common setting on shared
# machines, and the benchmarks' own), a CPU SVD up to this size runs on one thread: LAPACK's SVD
# takes many small parallel steps, and waking the sleeping threads for each made a 576² one 2.4x
# slower on two threads than on one (81 against 34 ms). With spinning threads (the default) two
# threads cost about what one does at that size (23–37 ms against 34–36 ms over several runs),
# and from ~1000 rows on two threads pay under either policy (1024²: 129–241 ms against 208 ms).
# Measured on a 2-core AMD EPYC with torch 2.13 (MKL).
_SVD_ONE_THREAD_MAX = 768


def _passive_omp_wait() -> bool:
    return os.environ.get("OMP_WAIT_POLICY", "").strip().upper() == "PASSIVE"


@contextlib.contextmanager
def _intra_op_threads(n: int) -> Iterator[None]:
    """Run torch's CPU ops on ``n`` threads inside the block; the caller's setting is restored."""
    before = torch.get_num_threads()
    if before == n:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _svd_threads(m: torch.Tensor) -> contextlib.AbstractContextManager:
    """Where a CPU SVD of ``m`` should run: on one thread for a small matrix under passive OpenMP
    waiting (see :data:`_SVD_ONE_THREAD_MAX`), else on the caller's threads."""
    if m.device.type == "cpu" and min(m.shape) <= _SVD_ONE_THREAD_MAX and _passive_omp_wait():
        return _intra_op_threads(1)
    return contextlib.nullcontext()


def _nuclear_norm(m: torch.Tensor, method: str | None = None) -> torch.Tensor:
    """Sum of singular values of a square matrix.

    ``method="svd"`` (default off CUDA): ``svdvals``, each value accurate to ~eps·σ_max.
    ``method="eig"`` (default on CUDA): square roots of ``eigvalsh(MᵀM)``, several times faster
    than an SVD on a GPU (71 ms against 330 ms for eight 896² matrices on an H100). Squaring
    costs accuracy at the bottom of the spectrum: a singular value below ~1e-8·σ_max reads as
    up to ~1e-8·σ_max. Only a numerically rank-deficient M has many of those (the n × n core of
    the ``n < d`` route is generically full rank); there a near-zero Procrustes residual may
    read as up to ~1e-4.
    """
    if method is None:
        method = "eig" if m.device.type == "cuda" else "svd"
    if method == "svd":
        with _svd_threads(m):  # m is square
            return torch.linalg.svdvals(m).sum()
    if method == "eig":
        return torch.linalg.eigvalsh(m.T @ m).clamp(min=0).sqrt().sum()
    raise ValueError(f"method must be 'svd' or 'eig'; got {method!r}")


def _gram_rows(x: torch.Tensor, row_sq: torch.Tensor, max_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """At most ``max_rows`` evenly spaced rows of ``x``, with their squared norms."""
    n = x.shape[0]
    if n <= max_rows:
        return x, row_sq
    idx = torch.arange(max_rows, device=x.device) * (n - 1) // (max_rows - 1)
    return x[idx], row_sq[idx]


# Column blocks of about this width when only ‖XᵀX‖ is wanted: the diagonal blocks once, those
# above it twice, skipping the products below it (5.1 ms against 7.6 ms for a 1024 × 576 X).
_SELF_PRODUCT_BLOCK = 192


def _self_product_norm(x: torch.Tensor) -> torch.Tensor:
    """``‖XᵀX‖_F = ‖XXᵀ‖_F``, through whichever product is smaller, from its upper block triangle."""
    a = x if x.shape[1] <= x.shape[0] else x.T  # ‖AᵀA‖ with A's columns the smaller side
    width = a.shape[1]
    blocks = max(1, round(width / _SELF_PRODUCT_BLOCK))
    if blocks == 1:
        return torch.linalg.matrix_norm(a.T @ a)
    edges = [i * width // blocks for i in range(blocks + 1)]
    total = a.new_zeros(())
    for lo, hi in itertools.pairwise(edges):
        rows = a[:, lo:hi].T @ a[:, lo:]  # the blocks (i, j >= i) of AᵀA
        total = total + rows[:, : hi - lo].square().sum() + 2 * rows[:, hi - lo :].square().sum()
    return total.sqrt()


def _gram(
    x0: torch.Tensor, x1: torch.Tensor, row_sq0: torch.Tensor, row_sq1: torch.Tensor, max_rows: int,
    norm0: torch.Tensor | None,
) -> torch.Tensor:
    """``‖Z1Z1ᵀ − Z0Z0ᵀ‖ / ‖Z0Z0ᵀ‖``; ``norm0``: ``‖Z0Z0ᵀ‖_F`` when known (:class:`ReferenceStats`)."""
    z0 = _unit_rows(*_gram_rows(x0, row_sq0, max_rows))
    z1 = _unit_rows(*_gram_rows(x1, row_sq1, max_rows))
    if z0.shape[0] <= z0.shape[1]:
        g0, g1 = z0 @ z0.T, z1 @ z1.T
        return _ratio(torch.linalg.matrix_norm(g1 - g0), torch.linalg.matrix_norm(g0) if norm0 is None else norm0)
    # d < m: ‖Z1Z1ᵀ − Z0Z0ᵀ‖² = ‖Z1ᵀZ1‖² + ‖Z0ᵀZ0‖² − 2‖Z0ᵀZ1‖² and ‖Z0Z0ᵀ‖ = ‖Z0ᵀZ0‖, all d × d.
    if norm0 is None:
        norm0 = _self_product_norm(z0)
    cross2 = (z0.T @ z1).square().sum()
    diff2 = (_self_product_norm(z1).square() + norm0.square() - 2 * cross2).clamp(min=0)
    return _ratio(diff2.sqrt(), norm0)


def _unit_rows(x: torch.Tensor, row_sq: torch.Tensor) -> torch.Tensor:
    """Rows scaled to unit norm (a new tensor); zero rows stay zero."""
    norms = row_sq.sqrt().unsqueeze(1)
    return x / torch.where(norms > 0, norms, torch.ones_like(norms))


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
