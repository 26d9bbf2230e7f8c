"""Activation geometry against plain float64 numpy/scipy references (docs/design.md §3)."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch
from scipy.linalg import orthogonal_procrustes
from scipy.stats import ortho_group

from arena_callbacks.geometry import (
    METRICS,
    ReferenceStats,
    _nuclear_norm,
    _self_product_norm,
    aggregate,
    geometry_metrics,
    reference_stats,
)

# n < d and n > d: each metric takes a different (n × n or d × d) route in the two.
SHAPES = [(40, 64), (200, 16)]

# Procrustes (always) and Gram (when d < rows) are differences of large sums: a distance that is
# exactly zero comes out as the square root of rounding error, ~1e-8 in float64.
ZERO_BY_CANCELLATION = 1e-6


def reference(x0: np.ndarray, x1: np.ndarray) -> dict[str, float]:
    """Every metric straight from its definition, in float64, forming every matrix."""
    n0, n1 = np.linalg.norm(x0, axis=1), np.linalg.norm(x1, axis=1)
    cos = np.sum(x0 * x1, axis=1) / (n0 * n1)
    c0, c1 = x0 - x0.mean(axis=0), x1 - x1.mean(axis=0)
    rot, _ = orthogonal_procrustes(x1, x0)  # argmin_R ‖X1 R − X0‖ over orthogonal R
    z0, z1 = x0 / n0[:, None], x1 / n1[:, None]
    return {
        "cosine": float(np.mean(1 - cos)),
        "norm": float(np.mean(np.abs(np.log(n1 / n0)))),
        "raw": float(np.linalg.norm(c1 - c0) / np.linalg.norm(c0)),
        "procrustes": float(np.linalg.norm(x1 @ rot - x0) / np.linalg.norm(x0)),
        "gram": float(np.linalg.norm(z1 @ z1.T - z0 @ z0.T) / np.linalg.norm(z0 @ z0.T)),
        "cka": float(
            np.linalg.norm(c0.T @ c1) ** 2 / (np.linalg.norm(c0.T @ c0) * np.linalg.norm(c1.T @ c1))
        ),
    }


def pair(n: int, d: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Anisotropic activations with an offset, and a drifted copy (linear map + noise + shift)."""
    rng = np.random.default_rng(seed)
    x0 = rng.standard_normal((n, d)) * np.geomspace(3.0, 0.1, d) + 0.5
    mix = np.eye(d) + 0.3 * rng.standard_normal((d, d)) / np.sqrt(d)
    x1 = x0 @ mix + 0.2 * rng.standard_normal((n, d)) + 0.1
    return x0, x1


def metrics(x0: np.ndarray, x1: np.ndarray, *, stats: bool = False, **kwargs: int) -> dict[str, float]:
    """``stats``: pass the reference's precomputed products (the monitor's cache mode)."""
    t0, t1 = torch.from_numpy(x0), torch.from_numpy(x1)
    ref = reference_stats(t0, **kwargs) if stats else None
    return geometry_metrics(t0, t1, reference=ref, **kwargs)


# The tests of values run both ways: every product formed, and the reference's taken from
# reference_stats (as the monitor does with a cached reference).
WITH_STATS = pytest.mark.parametrize("stats", [False, True], ids=["formed", "stats"])


@pytest.mark.parametrize(("n", "d"), SHAPES)
@WITH_STATS
def test_every_metric_matches_reference(n: int, d: int, stats: bool) -> None:
    x0, x1 = pair(n, d)
    got, want = metrics(x0, x1, stats=stats), reference(x0, x1)
    assert list(got) == list(METRICS)
    for key in METRICS:
        assert got[key] == pytest.approx(want[key], rel=1e-9), key
    assert all(0.01 < got[k] < 1 for k in METRICS)  # a real drift, not a degenerate case


@pytest.mark.parametrize(("n", "d"), [(600, 400), (300, 700)])
def test_wide_modules_match_reference(n: int, d: int) -> None:
    # Widths of a few hundred: the self-products come from column blocks (see the next test).
    x0, x1 = pair(n, d, seed=2)
    want = reference(x0, x1)
    for stats in (False, True):
        got = metrics(x0, x1, stats=stats)
        for key in METRICS:
            assert got[key] == pytest.approx(want[key], rel=1e-9), (stats, key)


@pytest.mark.parametrize(("rows", "cols"), [(50, 20), (1000, 300), (500, 576), (700, 1000), (3, 2000)])
def test_self_product_norm_from_blocks(rows: int, cols: int) -> None:
    # ‖XᵀX‖_F from the upper block triangle (1, 2, 3 or 5 column blocks) against the full product.
    x = np.random.default_rng(rows).standard_normal((rows, cols)) + 0.3
    want = np.linalg.norm(x.T @ x)
    assert _self_product_norm(torch.from_numpy(x)).item() == pytest.approx(want, rel=1e-12)


def test_cosine_of_rows_that_barely_moved() -> None:
    # Every row turned by 1e-6 rad in a plane it lies in: 1 − cos = 2 sin²(θ/2) ≈ 5e-13 exactly,
    # which 1 − x0·x1/(‖x0‖‖x1‖) would get only to ~1e-4 (two numbers near 1 cancelling).
    theta = 1e-6
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal(64), rng.standard_normal(64)
    a /= np.linalg.norm(a)
    b -= (b @ a) * a
    b /= np.linalg.norm(b)
    scale = rng.uniform(0.5, 2.0, size=(40, 1))
    x0 = scale * a
    x1 = scale * (np.cos(theta) * a + np.sin(theta) * b)
    assert metrics(x0, x1)["cosine"] == pytest.approx(2 * np.sin(theta / 2) ** 2, rel=1e-6, abs=0)


@pytest.mark.parametrize(("n", "d"), SHAPES)
@WITH_STATS
def test_gram_subsamples_evenly_spaced_rows(n: int, d: int, stats: bool) -> None:
    x0, x1 = pair(n, d, seed=1)
    for rows in (7, 30):  # 7 < d (n × n route) and 30 > 16 (d × d route when d = 16)
        idx = [i * (n - 1) // (rows - 1) for i in range(rows)]
        got = metrics(x0, x1, gram_rows=rows, stats=stats)["gram"]
        assert got == pytest.approx(reference(x0[idx], x1[idx])["gram"], rel=1e-9)
    assert metrics(x0, x1, gram_rows=n, stats=stats)["gram"] == pytest.approx(reference(x0, x1)["gram"], rel=1e-9)


@pytest.mark.parametrize(("n", "d"), SHAPES)
@WITH_STATS
def test_rotation_is_isometric(n: int, d: int, stats: bool) -> None:
    x0, _ = pair(n, d)
    q = ortho_group.rvs(d, random_state=3)
    got = metrics(x0, x0 @ q, stats=stats)
    assert got["procrustes"] < ZERO_BY_CANCELLATION
    assert got["gram"] < ZERO_BY_CANCELLATION
    assert got["cka"] == pytest.approx(1.0, abs=1e-12)
    assert got["norm"] < 1e-12  # rotations keep row norms
    assert got["cosine"] > 0.1  # ... but turn the rows


@pytest.mark.parametrize(("n", "d"), SHAPES)
@pytest.mark.parametrize("c", [0.25, 2.5])
@WITH_STATS
def test_scaling(n: int, d: int, c: float, stats: bool) -> None:
    x0, _ = pair(n, d)
    got = metrics(x0, c * x0, stats=stats)
    assert got["norm"] == pytest.approx(abs(math.log(c)), rel=1e-12)
    assert got["cosine"] == pytest.approx(0.0, abs=1e-12)
    assert got["cka"] == pytest.approx(1.0, abs=1e-12)
    assert got["gram"] < ZERO_BY_CANCELLATION
    # ‖cX0‖² + ‖X0‖² − 2‖cX0ᵀX0‖_* = (c² + 1 − 2c)‖X0‖², so the residual is |c − 1|.
    assert got["procrustes"] == pytest.approx(abs(c - 1), rel=1e-10)
    assert got["raw"] == pytest.approx(abs(c - 1), rel=1e-10)


@pytest.mark.parametrize(("n", "d"), SHAPES)
def test_anisotropic_stretch_is_not_a_rotation(n: int, d: int) -> None:
    x0, _ = pair(n, d)
    x1 = x0.copy()
    x1[:, 0] *= 3  # column 0 carries the largest variance
    got, want = metrics(x0, x1), reference(x0, x1)
    assert got["procrustes"] > 0.1
    assert got["cka"] < 0.99
    assert got["procrustes"] == pytest.approx(want["procrustes"], rel=1e-9)
    assert got["cka"] == pytest.approx(want["cka"], rel=1e-9)


def test_metrics_are_scale_invariant() -> None:
    x0, x1 = pair(200, 16)
    base = metrics(x0, x1)
    for s in (1e-30, 1e30):
        for key, value in metrics(s * x0, s * x1).items():
            assert value == pytest.approx(base[key], rel=1e-9), (s, key)


@pytest.mark.parametrize(("dtype", "rel"), [(torch.float32, 1e-4), (torch.bfloat16, 0.05)])
@pytest.mark.parametrize(("n", "d"), SHAPES)
def test_low_precision_inputs(dtype: torch.dtype, rel: float, n: int, d: int) -> None:
    x0, x1 = pair(n, d)
    t0, t1 = torch.from_numpy(x0).to(dtype), torch.from_numpy(x1).to(dtype)
    got = geometry_metrics(t0, t1)
    # The arithmetic is float64 whatever comes in: identical to the upcast inputs ...
    exact = geometry_metrics(t0.double(), t1.double())
    assert got == pytest.approx(exact, rel=1e-12)
    # ... and off the float64 originals only by the input rounding.
    assert got == pytest.approx(metrics(x0, x1), rel=rel)


def test_inputs_that_require_grad() -> None:
    x0, x1 = pair(40, 64)
    t0 = torch.from_numpy(x0).requires_grad_()
    assert geometry_metrics(t0, torch.from_numpy(x1)) == pytest.approx(metrics(x0, x1), rel=1e-12)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("side", [0, 1])
def test_non_finite_input_gives_all_nan(bad: float, side: int) -> None:
    xs = list(pair(40, 64))
    xs[side] = xs[side].copy()
    xs[side][3, 5] = bad
    got = metrics(*xs)
    assert list(got) == list(METRICS)
    assert all(math.isnan(v) for v in got.values())


def test_zero_rows() -> None:
    x0, x1 = pair(200, 16)
    both = x0.copy(), x1.copy()
    both[0][:5] = 0
    both[1][:5] = 0
    got, rest = metrics(*both), reference(x0[5:], x1[5:])
    # Rows that are zero on both sides count as unchanged.
    assert got["cosine"] == pytest.approx(rest["cosine"] * 195 / 200, rel=1e-9)
    assert got["norm"] == pytest.approx(rest["norm"] * 195 / 200, rel=1e-9)
    # A row that vanished on one side reads as orthogonal with a large, finite norm drift.
    one = x1.copy()
    one[0] = 0
    got = metrics(x0, one)
    assert all(math.isfinite(v) for v in got.values())
    assert got["cosine"] == pytest.approx((reference(x0[1:], x1[1:])["cosine"] * 199 + 1) / 200, rel=1e-6)
    assert got["norm"] > 10 / 200


@WITH_STATS
def test_degenerate_references(stats: bool) -> None:
    def metrics(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
        return globals()["metrics"](a, b, stats=stats)

    ones = np.ones((10, 4))
    same = metrics(ones, ones)  # constant columns: centred matrices are zero
    assert same["raw"] == 0.0 and same["cka"] == 1.0
    # Constants that are not exact in binary, n > d, and two different ones: still exactly
    # "both constant" (CKA from centred products, never from uncentred ones minus n·μμᵀ).
    row = 0.1 + 0.37 * np.arange(8)
    assert metrics(np.tile(row, (64, 1)), np.tile(row + 0.3, (64, 1)))["cka"] == 1.0
    zeros = np.zeros((10, 4))
    got = metrics(zeros, np.random.default_rng(0).standard_normal((10, 4)))
    assert got["raw"] == math.inf and got["procrustes"] == math.inf and got["cka"] == 0.0
    allzero = metrics(zeros, zeros)
    assert allzero == {"cosine": 0.0, "norm": 0.0, "raw": 0.0, "procrustes": 0.0, "gram": 0.0, "cka": 1.0}


@pytest.mark.parametrize(("n", "d"), SHAPES)
def test_reference_stats_give_the_same_values_and_catch_another_reference(n: int, d: int) -> None:
    x0, x1 = pair(n, d)
    t0, t1 = torch.from_numpy(x0), torch.from_numpy(x1)
    ref = reference_stats(t0, gram_rows=30)
    assert isinstance(ref, ReferenceStats) and ref.shape == (n, d) and ref.gram_rows == 30
    z0 = x0 / np.linalg.norm(x0, axis=1, keepdims=True)
    c0 = x0 - x0.mean(axis=0)
    assert ref.cka_norm.item() == pytest.approx(np.linalg.norm(c0.T @ c0), rel=1e-12)
    idx = [i * (n - 1) // 29 for i in range(30)] if n > 30 else list(range(n))
    assert ref.gram_norm.item() == pytest.approx(np.linalg.norm(z0[idx] @ z0[idx].T), rel=1e-12)
    assert geometry_metrics(t0, t1, gram_rows=30, reference=ref) == pytest.approx(
        geometry_metrics(t0, t1, gram_rows=30), rel=1e-12
    )
    shape = rf"computed for x0 of shape \({n}, {d}\) with gram_rows=30; .* gram_rows=1024"
    with pytest.raises(ValueError, match=shape):
        geometry_metrics(t0, t1, reference=ref)
    with pytest.raises(ValueError, match=r"computed from another x0"):
        geometry_metrics(t0 * 1.001, t1, gram_rows=30, reference=ref)
    with pytest.raises(ValueError, match=rf"got x0 \({n - 1}, {d}\)"):
        geometry_metrics(t0[1:], t1[1:], gram_rows=30, reference=ref)
    with pytest.raises(TypeError, match=r"ReferenceStats from reference_stats\(x0\); got dict"):
        geometry_metrics(t0, t1, reference={"cka_norm": 1.0})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"gram_rows must be an int >= 2; got 1"):
        reference_stats(t0, gram_rows=1)


@pytest.mark.parametrize(
    ("a", "b", "message"),
    [
        ((40, 64), (40, 63), "x0 (40, 64), x1 (40, 63)"),
        ((40, 64), (39, 64), "x0 (40, 64), x1 (39, 64)"),
        ((40,), (40,), "x0 (40,), x1 (40,)"),
        ((2, 40, 64), (2, 40, 64), "x0 (2, 40, 64), x1 (2, 40, 64)"),
        ((1, 64), (1, 64), "x0 (1, 64), x1 (1, 64)"),
        ((40, 0), (40, 0), "x0 (40, 0), x1 (40, 0)"),
    ],
)
def test_bad_shapes_raise_with_the_shapes(a: tuple[int, ...], b: tuple[int, ...], message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        geometry_metrics(torch.zeros(a), torch.zeros(b))


def test_other_bad_inputs() -> None:
    x = torch.zeros(8, 4)
    with pytest.raises(ValueError, match=r"floating point; got torch.int64 and torch.float32"):
        geometry_metrics(torch.zeros(8, 4, dtype=torch.long), x)
    with pytest.raises(ValueError, match=r"gram_rows must be an int >= 2; got 1"):
        geometry_metrics(x, x, gram_rows=1)
    with pytest.raises(TypeError, match=r"got ndarray and Tensor"):
        geometry_metrics(np.zeros((8, 4)), x)  # type: ignore[arg-type]


@pytest.mark.parametrize(("n", "d"), SHAPES)
def test_nuclear_norm_methods_agree(n: int, d: int) -> None:
    # "eig" is the CUDA default; check it here against svdvals and numpy.
    x0, x1 = pair(n, d)
    m = min(n, d)
    core = x1[:m, :m].T @ x0[:m, :m]  # full rank, as the Procrustes core is for generic activations
    want = np.linalg.norm(core, ord="nuc")
    assert _nuclear_norm(torch.from_numpy(core), "svd").item() == pytest.approx(want, rel=1e-12)
    assert _nuclear_norm(torch.from_numpy(core), "eig").item() == pytest.approx(want, rel=1e-10)


def test_eig_nuclear_norm_on_rank_deficient_matrix() -> None:
    # 64 × 64 of rank 40: "eig" reads each zero singular value as up to ~1e-8·σ_max.
    x0, x1 = pair(40, 64)
    c = x1.T @ x0
    want = np.linalg.norm(c, ord="nuc")
    assert _nuclear_norm(torch.from_numpy(c), "svd").item() == pytest.approx(want, rel=1e-12)
    assert _nuclear_norm(torch.from_numpy(c), "eig").item() == pytest.approx(want, rel=1e-7)
    with pytest.raises(ValueError, match="method must be 'svd' or 'eig'"):
        _nuclear_norm(torch.from_numpy(c), "qr")


@pytest.mark.parametrize(
    ("policy", "size", "threads_inside"),
    [("PASSIVE", 40, 1), ("passive", 40, 1), ("", 40, None), ("PASSIVE", 800, None)],
)
def test_small_cpu_svd_on_one_thread_under_passive_omp_wait(monkeypatch, policy, size, threads_inside) -> None:
    # Under OMP_WAIT_POLICY=PASSIVE a small SVD runs on one thread (the caller's count is kept
    # otherwise and restored after, also when the SVD fails); the value does not change.
    monkeypatch.setenv("OMP_WAIT_POLICY", policy)
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads[-1])
    threads = [3]
    monkeypatch.setattr(torch, "set_num_threads", threads.append)
    seen = []
    svdvals = torch.linalg.svdvals

    def spy(m: torch.Tensor) -> torch.Tensor:
        seen.append(threads[-1])
        return svdvals(m)

    monkeypatch.setattr(torch.linalg, "svdvals", spy)
    m = np.random.default_rng(size).standard_normal((size, size))
    assert _nuclear_norm(torch.from_numpy(m)).item() == pytest.approx(np.linalg.norm(m, ord="nuc"), rel=1e-12)
    assert seen == [threads_inside or 3] and threads[-1] == 3
    monkeypatch.setattr(torch.linalg, "svdvals", lambda m: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        _nuclear_norm(torch.from_numpy(m))
    assert threads[-1] == 3


# --- aggregate ---------------------------------------------------------------------------------


def per_module(**values: float) -> dict[str, float]:
    return {m: values.get(m, 0.0) for m in METRICS}


def test_aggregate_keys_and_values() -> None:
    out = aggregate(
        {
            "model.norm": per_module(procrustes=0.4, cka=0.9),
            "layers.5.mlp": per_module(procrustes=0.1, cka=0.7),
            "layers.15": per_module(procrustes=0.1, cka=1.0),
        }
    )
    modules = ["model.norm", "layers.5.mlp", "layers.15", "mean", "max", "min"]
    assert list(out) == [f"geometry/{m}/{name}" for m in METRICS for name in modules]
    assert out["geometry/procrustes/model.norm"] == 0.4
    assert out["geometry/procrustes/mean"] == pytest.approx(0.2)
    assert out["geometry/procrustes/max"] == 0.4
    assert out["geometry/cka/mean"] == pytest.approx(0.8667, abs=1e-4)
    assert out["geometry/cka/max"] == 1.0
    assert out["geometry/cka/min"] == 0.7 and out["geometry/procrustes/min"] == 0.1
    assert out["geometry/gram/mean"] == 0.0


@pytest.mark.parametrize("position", [0, 1, 2])
def test_aggregate_propagates_nan(position: int) -> None:
    names = ["a", "b", "c"]
    modules = {name: per_module(raw=float(i)) for i, name in enumerate(names)}
    modules[names[position]] = dict.fromkeys(METRICS, math.nan)
    out = aggregate(modules)
    for metric in METRICS:
        assert math.isnan(out[f"geometry/{metric}/mean"])
        assert math.isnan(out[f"geometry/{metric}/max"])
        assert math.isnan(out[f"geometry/{metric}/min"])
        assert math.isnan(out[f"geometry/{metric}/{names[position]}"])


def test_aggregate_of_real_metrics_and_empty() -> None:
    x0, x1 = pair(40, 64)
    m = metrics(x0, x1)
    out = aggregate({"only": m})
    assert out["geometry/procrustes/mean"] == out["geometry/procrustes/max"] == m["procrustes"]
    assert aggregate({}) == {}


def test_aggregate_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match=r"module 'x' lacks metrics \['cka'\]; it has \['cosine'"):
        aggregate({"x": {m: 0.0 for m in METRICS if m != "cka"}})
    for name in ("mean", "max", "min", ""):
        with pytest.raises(ValueError, match="is not allowed"):
            aggregate({name: per_module()})
