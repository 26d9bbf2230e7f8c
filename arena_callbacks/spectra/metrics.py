"""Spectral metrics of one weight update, from its factors or from the dense weights.

The metrics and their formulas are in the package's docstring (:mod:`arena_callbacks.spectra`).
How the decompositions are computed is a :class:`Solver`: :data:`EXACT` (float64, full SVDs:
the reference) or, as the monitor runs by default, :data:`FAST` (float32 where the weight lives,
the top of a spectrum from a randomized subspace iteration). :func:`_host` makes the working
copies (gathering a sharded tensor whole first).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
from torch import nn

__all__ = [
    "EXACT",
    "FAST",
    "SPECTRAL_METRICS",
    "PretrainedSVD",
    "Solver",
    "dense_update_metrics",
    "lowrank_update_metrics",
    "moving_average",
    "pretrained_svd",
    "smoothness",
    "top_singular",
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

_F64 = torch.float64
_CPU = torch.device("cpu")


class Solver(NamedTuple):
    """How the spectra's decompositions are computed.

    Attributes:
        dtype: Working precision (``torch.float64`` or ``torch.float32``).
        randomized: Take the top of a spectrum (W_ft's top-``k`` singular vectors for intruders,
            a dense ΔW's largest singular value) from a randomized subspace iteration
            (:func:`top_singular`) instead of a full SVD. W0's thin SVD is always exact.
        power_iterations: Subspace iterations of :func:`top_singular`.
        oversample: Extra columns of its subspace (at least this many, and at least ``k``).
        on_host: Compute on the CPU (the reference) rather than where the weight lives.
    """

    dtype: torch.dtype = torch.float64
    randomized: bool = False
    power_iterations: int = 8
    oversample: int = 10
    on_host: bool = True


#: The reference: float64 on the CPU, full SVDs (the results before randomized spectra existed).
EXACT = Solver()
#: The monitor's default: float32 where the weight lives, randomized top singular vectors.
FAST = Solver(dtype=torch.float32, randomized=True, on_host=False)
#: Exact float64 copies where the weight lives: how :mod:`.updates` builds W0 and W_ft.
_WIDE = Solver(on_host=False)


class PretrainedSVD(NamedTuple):
    """Thin SVD ``W0 = u · diag(s) · vᵀ`` (float64): ``u`` is ``d_out × n``, ``v`` is ``d_in × n``."""

    u: torch.Tensor
    s: torch.Tensor
    v: torch.Tensor


def pretrained_svd(w0: torch.Tensor, solver: Solver = EXACT) -> PretrainedSVD:
    """The exact thin SVD of a pretrained weight, in the solver's precision (cache it per layer).

    On the CPU under ``OMP_WAIT_POLICY=PASSIVE`` a matrix up to 768 on its short side runs on one
    thread, for the reason :func:`arena_callbacks.geometry._nuclear_norm` gives.
    """
    from ..geometry import _svd_threads

    w = _host(w0, solver)
    with _svd_threads(w):
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
    return PretrainedSVD(u, s, vh.mT)


@torch.no_grad()
def top_singular(m: torch.Tensor, q: int, solver: Solver = FAST, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The top ``q`` singular values and left singular vectors of ``m``: ``(u, s)``, ``u`` is ``d_out × q``.

    Exact (a full SVD) where the solver is not randomized or where that is cheap anyway
    (``q + oversample ≥ min(m.shape) / 2``). Otherwise Halko, Martinsson & Tropp (2011),
    Algorithm 4.4: a Gaussian sketch of ``q + max(q, oversample)`` columns from a private
    generator seeded with ``seed`` (the global RNG is untouched, so the training run's random
    stream is the same with or without spectra), ``power_iterations`` rounds of subspace
    iteration re-orthonormalised by QR, then the exact SVD of the projection. Each computed
    value is a lower bound on the true one (``σ̂_i ≤ σ_i``), and the error of the ``i``-th value and
    vector shrinks as ``(σ_{l+1} / σ_i)^(2·power_iterations + 1)`` with ``l`` the sketch's width.
    """
    n = min(m.shape)
    q = min(q, n)
    width = q + max(q, solver.oversample)
    if not solver.randomized or width >= n / 2:
        u, s, _ = torch.linalg.svd(m, full_matrices=False)
        return u[:, :q], s[:q]
    gen = torch.Generator(device=m.device).manual_seed(seed)
    omega = torch.randn(m.shape[1], width, generator=gen, device=m.device, dtype=m.dtype)
    basis = torch.linalg.qr(m @ omega).Q
    for _ in range(solver.power_iterations):
        basis = torch.linalg.qr(m.mT @ basis).Q
        basis = torch.linalg.qr(m @ basis).Q
    ub, s, _ = torch.linalg.svd(basis.mT @ m, full_matrices=False)
    return basis @ ub[:, :q], s[:q]


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
    solver: Solver = EXACT,
) -> dict[str, float]:
    """Spectral metrics of a LoRA update ``ΔW = scaling · B @ A`` on top of ``w0``.

    The norms come from thin QR factors ``B = Q_B R_B`` and ``Aᵀ = Q_A R_A``:
    ``ΔW = s · Q_B (R_B R_Aᵀ) Q_Aᵀ``, so ΔW has the singular values of the ``r × r`` core. The
    profiles use ``u_iᵀ ΔW v_i = s (u_iᵀ B)(A v_i)`` and ``‖ΔW v_i‖ = |s| ‖R_B (A v_i)‖``.
    ``intruders`` (skipped for ``k = 0`` and for ``ΔW = 0``) needs W_ft's top-``k`` left singular
    vectors: the :data:`EXACT` solver takes a full SVD of ``W_ft = w0 + ΔW``; a randomized one
    never forms W_ft and finds them from W0's SVD and the factors (:func:`_lowrank_top_left`).

    Args:
        w0: Pretrained weight, ``d_out × d_in``.
        B: ``d_out × r`` factor (peft's ``lora_B.weight``).
        A: ``r × d_in`` factor (peft's ``lora_A.weight``).
        scaling: ``s`` (peft's ``scaling[adapter]``, ``lora_alpha / r`` or the rsLoRA value).
        k: Top singular vectors of W_ft checked for intruders (0 turns the check off).
        eps: An intruder's best |cosine| with W0's left singular vectors is below this.
        w0_svd: :func:`pretrained_svd` of ``w0``, if already known.
        solver: How the decompositions are computed (:data:`EXACT`: float64 on the CPU).

    Returns:
        ``{metric: value}`` for every name in :data:`SPECTRAL_METRICS`; every value is NaN if
        an input holds a NaN or an infinity.

    Raises:
        ValueError: shapes that do not fit, or a bad ``k`` / ``eps``.
    """
    w0, B, A = _host(w0, solver), _host(B, solver), _host(A, solver)
    _check_lowrank(w0, B, A)
    _check_k_eps(k, eps)
    if not _all_finite(B, A) or not math.isfinite(scaling) or (w0_svd is None and not _all_finite(w0)):
        return dict.fromkeys(SPECTRAL_METRICS, math.nan)  # a given w0_svd vouches for w0 (the cache checks it)
    svd = _checked_svd(w0, w0_svd, solver)
    r_b = torch.linalg.qr(B, mode="r").R
    r_a = torch.linalg.qr(A.T, mode="r").R
    sv = torch.linalg.svdvals(r_b @ r_a.T) * abs(scaling)
    fro, spec = float(torch.linalg.vector_norm(sv)), float(sv.max()) if sv.numel() else 0.0
    a_v = A @ svd.v  # r × n: A v_i in column i
    u_b = svd.u.T @ B  # n × r
    retention = (scaling * (u_b * a_v.T).sum(dim=1)).abs()
    adaptation = abs(scaling) * torch.linalg.vector_norm(r_b @ a_v, dim=0)
    if spec == 0 or k == 0:
        intruders = 0.0
    elif solver.randomized:
        coords = _lowrank_top_left(svd, B, A, u_b, a_v, scaling, k, solver)[: svd.s.numel()]
        intruders = float((coords.abs().amax(dim=0) < eps).sum())
    else:
        intruders = _intruders(lambda: w0 + scaling * (B @ A), svd.u, k, eps, solver)
    return _assemble(svd, fro, spec, retention, adaptation, intruders)


def _lowrank_top_left(svd: PretrainedSVD, B: torch.Tensor, A: torch.Tensor, u_b: torch.Tensor, a_v: torch.Tensor,
                      scaling: float, k: int, solver: Solver) -> torch.Tensor:
    """W_ft's top-``k`` left singular vectors for ``W_ft = W0 + s·B A``, in the basis ``[U0, Q⊥]``.

    With ``B = U0 (U0ᵀB) + Q⊥ R⊥`` (``Q⊥`` the part of B's columns outside W0's column space, empty
    when ``d_out ≤ d_in``), ``W_ft = [U0, Q⊥] M`` with ``M = [Σ0 V0ᵀ + C A; D A]``, ``C = s U0ᵀB``,
    ``D = s R⊥``. Its left singular vectors are ``[U0, Q⊥] y`` with ``y`` the eigenvectors of
    ``M Mᵀ = Λ + F Eᵀ + E Fᵀ + E G Eᵀ`` (``Λ = diag(Σ0², 0)``, ``E = [C; D]``, ``F = [Σ0 (A V0)ᵀ; 0]``,
    ``G = A Aᵀ``): a diagonal plus a rank ``≤ 2r`` term, whose product with a block costs
    ``O((n + r) r)`` a column. So block subspace iteration with Rayleigh–Ritz runs to convergence
    for less than forming W_ft would cost: until every residual ``‖MMᵀy_i − λ_i y_i‖`` is below
    ``1e-3·λ_1`` in float32 (``1e-8`` in float64), so that each vector's angle error is below
    that over its eigengap, or 500 rounds. The first ``n`` rows of the result are the cosines with
    W0's left singular vectors.
    """
    n, r = svd.s.numel(), B.shape[1]
    c = scaling * u_b  # n × r
    parts_e, parts_f = [c], [svd.s.unsqueeze(1) * a_v.T]
    lam = svd.s.square()
    if svd.u.shape[0] > n:  # W0's columns do not span R^d_out: B may leave that space
        r_perp = torch.linalg.qr(B - svd.u @ u_b, mode="r").R
        parts_e.append(scaling * r_perp)
        parts_f.append(a_v.new_zeros(r, r))
        lam = torch.cat([lam, lam.new_zeros(r)])
    e, f, g = torch.cat(parts_e), torch.cat(parts_f), A @ A.T

    def times(x: torch.Tensor) -> torch.Tensor:
        ex = e.T @ x
        return lam.unsqueeze(1) * x + f @ ex + e @ (f.T @ x) + e @ (g @ ex)

    # Start from where the answer nearly lies: W0's top directions (Λ's first coordinates) and the
    # directions the update writes into (E) or reads from (F).
    size = lam.numel()
    lead = min(size, k + max(k, solver.oversample))
    start = torch.cat([torch.eye(size, lead, device=lam.device, dtype=lam.dtype), e, f], dim=1)
    x = torch.linalg.qr(start[:, : min(size, start.shape[1])]).Q
    tol = _TOL[lam.dtype]
    for _ in range(500):
        y = times(x)  # one product a round: Rayleigh–Ritz on x, then x ← orth(S x)
        values, rot = torch.linalg.eigh(x.T @ y)
        x, y, values = x @ rot.flip(1), y @ rot.flip(1), values.flip(0)
        residual = torch.linalg.vector_norm(y[:, :k] - x[:, :k] * values[:k], dim=0)
        if float(residual.max()) <= tol * float(values[0]):
            break
        x = torch.linalg.qr(y).Q
    return x[:, :k]


#: Residual tolerance of :func:`_lowrank_top_left`, relative to the largest eigenvalue (on SmolLM2's
#: 210 LoRA layers, 1e-2 to 1e-4 gave the same intruder counts as full float64 SVDs; benchmarks/spectra_scale.py).
_TOL = {torch.float32: 1e-3, torch.float64: 1e-8}


@torch.no_grad()
def dense_update_metrics(
    w0: torch.Tensor,
    w_ft: torch.Tensor,
    *,
    k: int = 10,
    eps: float = 0.5,
    w0_svd: PretrainedSVD | None = None,
    solver: Solver = EXACT,
) -> dict[str, float]:
    """Spectral metrics of any update ``ΔW = w_ft − w0`` (full finetuning, DoRA, OFT).

    Costs ΔW's largest singular value and, for intruders, ``w_ft``'s top-``k`` left singular
    vectors (both :func:`top_singular`; intruders skipped for ``k = 0`` and for ``ΔW = 0``).

    Args:
        w0: Pretrained weight, ``d_out × d_in``.
        w_ft: Finetuned weight, same shape.
        k: Top singular vectors of W_ft checked for intruders (0 turns the check off).
        eps: An intruder's best |cosine| with W0's left singular vectors is below this.
        w0_svd: :func:`pretrained_svd` of ``w0``, if already known.
        solver: How the decompositions are computed (:data:`EXACT`: float64 on the CPU).

    Returns:
        ``{metric: value}`` for every name in :data:`SPECTRAL_METRICS`; every value is NaN if
        an input holds a NaN or an infinity.

    Raises:
        ValueError: shapes that do not fit, or a bad ``k`` / ``eps``.
    """
    w0_in, w_ft_in = _gathered(w0), _gathered(w_ft)
    _check_matrix("w0", w0_in)
    if w_ft_in.shape != w0_in.shape:
        raise ValueError(f"w_ft must have w0's shape {tuple(w0_in.shape)}; got {tuple(w_ft_in.shape)}")
    _check_k_eps(k, eps)
    w0, w_ft = _host(w0_in, solver), _host(w_ft_in, solver)
    if not _all_finite(w0, w_ft):
        return dict.fromkeys(SPECTRAL_METRICS, math.nan)
    svd = _checked_svd(w0, w0_svd, solver)
    # The difference in float64 first: a small update is not lost to the working precision's rounding.
    dw = _host(w_ft_in.to(_F64) - w0_in.to(device=w_ft_in.device, dtype=_F64), solver)
    fro = float(torch.linalg.vector_norm(dw))
    spec = float(top_singular(dw, 1, solver)[1][0]) if fro > 0 else 0.0
    retention = ((svd.u.T @ dw) * svd.v.T).sum(dim=1).abs()  # diag(Uᵀ ΔW V)
    adaptation = torch.linalg.vector_norm(dw @ svd.v, dim=0)
    intruders = _intruders(lambda: w_ft, svd.u, k, eps, solver) if spec > 0 else 0.0
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


def _intruders(w_ft: Callable[[], torch.Tensor], u0: torch.Tensor, k: int, eps: float, solver: Solver) -> float:
    """Top-``k`` left singular vectors of ``w_ft()`` whose best |cos| with ``u0``'s columns is < eps."""
    if k == 0:
        return 0.0
    u_ft = top_singular(w_ft(), k, solver)[0]
    best = (u_ft.T @ u0).abs().amax(dim=1)
    return float((best < eps).sum())


def _ratio(num: float, den: float) -> float:
    """``num / den``; a zero reference gives 0 when ``num`` is zero too, else ``inf``."""
    if den > 0:
        return num / den
    return 0.0 if num == 0 else math.inf


def _checked_svd(w0: torch.Tensor, svd: PretrainedSVD | None, solver: Solver) -> PretrainedSVD:
    if svd is None:
        return pretrained_svd(w0, solver)
    n = min(w0.shape)
    want = ((w0.shape[0], n), (n,), (w0.shape[1], n))
    got = tuple(tuple(t.shape) for t in svd)
    if got != want:
        raise ValueError(f"w0_svd does not fit w0 {tuple(w0.shape)}: u, s, v shapes {got}, expected {want}")
    return PretrainedSVD(*(t.to(device=w0.device, dtype=w0.dtype) for t in svd))


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


def _host(t: torch.Tensor, solver: Solver = EXACT) -> torch.Tensor:
    """Detached working copy of a tensor in the solver's precision, on the CPU or where it lives
    (``solver.on_host``); a DTensor or ZeRO-3 parameter is gathered whole first (a collective)."""
    return _gathered(t).to(device=_CPU if solver.on_host else None, dtype=solver.dtype)


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
