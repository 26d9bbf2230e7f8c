"""The fast spectra solver (float32 where the weights live, randomized top of the spectrum) against
the float64 reference of tests/test_spectra.py: same intruder counts, values within the stated bounds,
and the training run's random stream untouched."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from helpers import make_model

from arena_callbacks.config import MonitorConfig, SpectraConfig
from arena_callbacks.spectra import (
    EXACT,
    FAST,
    SPECTRAL_METRICS,
    Solver,
    dense_update_metrics,
    lowrank_update_metrics,
    snapshot_weights,
    spectra_layer_names,
    top_singular,
    weight_spectra,
)

peft = pytest.importorskip("peft")
from peft import LoraConfig, OFTConfig, get_peft_model  # noqa: E402

# The bounds docs/geometry.md states for the fast solver against the float64 reference.
REL = 1e-4  # every metric but intruders (float32 arithmetic, 8 subspace iterations)
ABS = 1e-6
NORM_REL = 1e-3  # a dense update's ‖ΔW‖_2 (so rel_update_spec, stable_rank) when its spectrum is flat (noise)


def rand(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).standard_normal(shape))


def weight_like(d_out: int, d_in: int, seed: int, decay: float = 0.5) -> torch.Tensor:
    """A matrix with a slowly decaying spectrum σ_i = (1 + i)^(−decay), as trained weights have."""
    n = min(d_out, d_in)
    u = torch.linalg.qr(rand(d_out, n, seed=seed)).Q
    v = torch.linalg.qr(rand(d_in, n, seed=seed + 1)).Q
    s = (1.0 + torch.arange(n, dtype=torch.float64)) ** -decay
    return u @ torch.diag(s) @ v.T


def close(got: dict[str, float], want: dict[str, float], norm_rel: float = REL) -> None:
    assert list(got) == list(SPECTRAL_METRICS)
    assert got["intruders"] == want["intruders"]
    for key in SPECTRAL_METRICS:
        rel = norm_rel if key in ("rel_update_spec", "stable_rank") else REL
        assert got[key] == pytest.approx(want[key], rel=rel, abs=ABS), key


@pytest.mark.parametrize(("d_out", "d_in"), [(300, 200), (200, 300)])
def test_top_singular_against_full_svd(d_out: int, d_in: int) -> None:
    m = weight_like(d_out, d_in, seed=1)
    u_ref, s_ref, _ = torch.linalg.svd(m, full_matrices=False)
    u, s = top_singular(m, 10, FAST._replace(dtype=torch.float64))
    assert u.shape == (d_out, 10)
    # Every value is a lower bound (a Rayleigh quotient of the sketch), and close.
    assert bool((s <= s_ref[:10] * (1 + 1e-12)).all())
    assert s.numpy() == pytest.approx(s_ref[:10].numpy(), rel=1e-5)
    cos = (u * u_ref[:, :10]).sum(dim=0).abs()
    assert float(cos.min()) > 1 - 1e-4
    # float32 keeps the values to float32 accuracy; no iterations at all is visibly worse.
    s32 = top_singular(m.float(), 10, FAST)[1].double()
    assert s32.numpy() == pytest.approx(s_ref[:10].numpy(), rel=1e-5)
    s0 = top_singular(m, 10, FAST._replace(dtype=torch.float64, power_iterations=0))[1]
    assert float((s_ref[:10] - s0).max()) > 100 * float((s_ref[:10] - s).abs().max())


def test_top_singular_is_exact_where_that_is_cheap_and_leaves_the_global_rng_alone() -> None:
    m = weight_like(40, 36, seed=3)
    exact = torch.linalg.svd(m, full_matrices=False)
    u, s = top_singular(m, 10, FAST._replace(dtype=torch.float64))  # a sketch of 20 columns >= 36 / 2: a full SVD
    assert torch.allclose(s, exact.S[:10], rtol=1e-12, atol=0)
    assert torch.allclose((u * exact.U[:, :10]).sum(dim=0).abs(), torch.ones(10, dtype=torch.float64), atol=1e-10)
    big = weight_like(400, 300, seed=4).float()
    state = torch.get_rng_state()
    first = top_singular(big, 5, FAST)
    assert torch.equal(torch.get_rng_state(), state)
    second = top_singular(big, 5, FAST)
    assert torch.equal(first[1], second[1])  # its own seeded generator: the same answer every call


def _intruder_case(n: int, seed: int, strength: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    w0 = weight_like(n, n + 40, seed=seed)
    u0 = torch.linalg.svd(w0, full_matrices=False).U
    x = u0[:, n // 2 :].sum(dim=1) / math.sqrt(n - n // 2)  # |cos| with every u_j is small: a new direction
    y = rand(n + 40, seed=seed + 7)
    return w0, (strength * x).unsqueeze(1), (y / y.norm()).unsqueeze(0)


@pytest.mark.parametrize("strength", [0.0, 0.05, 0.5, 3.0])
def test_same_intruder_counts_and_metrics_as_the_float64_reference(strength: float) -> None:
    w0, b, a = _intruder_case(160, seed=5, strength=strength)
    ref = lowrank_update_metrics(w0, b, a, 1.0, k=10, solver=EXACT)
    close(lowrank_update_metrics(w0.float(), b.float(), a.float(), 1.0, k=10, solver=FAST), ref)
    dense_ref = dense_update_metrics(w0, w0 + b @ a, k=10, solver=EXACT)
    close(dense_update_metrics(w0.float(), (w0 + b @ a).float(), k=10, solver=FAST), dense_ref)
    if strength >= 0.5:  # strong enough to be among W_ft's top 10 directions
        assert ref["intruders"] == 1


@pytest.mark.parametrize("outside", [False, True])
def test_tall_layer_update_outside_w0s_column_space(outside: bool) -> None:
    # d_out > d_in (an MLP up-projection): W0's 120 left singular vectors leave 80 directions of R^200
    # free, and a LoRA B can write into them; the fast path must see those as new directions too.
    w0 = weight_like(200, 120, seed=10)
    u0 = torch.linalg.svd(w0, full_matrices=False).U
    x = rand(200, seed=11)
    x = x - u0 @ (u0.T @ x) if outside else u0[:, 60:].sum(dim=1)
    b = torch.stack([x / x.norm(), rand(200, seed=12) / 20], dim=1)
    a = torch.stack([rand(120, seed=13), rand(120, seed=14)]) / math.sqrt(120)
    ref = lowrank_update_metrics(w0, b, a, 2.0, k=8, solver=EXACT)
    assert ref["intruders"] >= 1
    close(lowrank_update_metrics(w0.float(), b.float(), a.float(), 2.0, k=8, solver=FAST), ref)


def test_small_dense_update_is_not_lost_to_float32_rounding() -> None:
    w0 = weight_like(120, 90, seed=8) * 50  # large weights, a tiny update: float32 rounding of w0 is ~3e-6
    dw = 1e-4 * rand(120, 90, seed=9)  # noise: a flat spectrum, the randomized norm's worst case
    ref = dense_update_metrics(w0, w0 + dw, k=4, solver=EXACT)
    close(dense_update_metrics(w0, w0 + dw, k=4, solver=FAST), ref, norm_rel=NORM_REL)


def _trained(config, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = get_peft_model(make_model(seed=seed, vocab_size=96), config).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model


@pytest.mark.parametrize("method", ["lora", "oft", "full"])
def test_model_spectra_fast_equal_reference_within_bounds(method: str) -> None:
    targets = ["q_proj", "v_proj", "up_proj", "down_proj"]  # n = 32 (randomized at k = 4), 16 (exact), 32, 32
    if method == "full":
        model = make_model(seed=2, vocab_size=96)
        names = spectra_layer_names(model, targets)
        reference = snapshot_weights(model, names)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if any(t in n for t in targets):
                    p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(3)) * 0.05)
    else:
        config = (LoraConfig(r=4, lora_alpha=8, target_modules=targets) if method == "lora"
                  else OFTConfig(r=0, oft_block_size=8, target_modules=targets))
        model, reference = _trained(config), None
        names = None
    ref = weight_spectra(model, reference, names=names, k=4, solver=EXACT)
    cache: dict = {}
    state = torch.get_rng_state()
    fast = weight_spectra(model, reference, names=names, k=4, solver=FAST, cache=cache, progress=True)
    assert torch.equal(torch.get_rng_state(), state)
    assert list(fast) == list(ref)
    for name in ref:
        close(fast[name], ref[name], norm_rel=NORM_REL)
    entry = next(iter(cache.values()))[1]  # kept in host memory, in the working precision
    assert all(t.device.type == "cpu" and t.dtype == torch.float32 for t in entry)
    assert weight_spectra(model, reference, names=names, k=4, solver=FAST, cache=cache) == fast


def test_config_chooses_the_solver_and_names_bad_values() -> None:
    assert SpectraConfig().solver() == FAST
    reference = SpectraConfig(precision="fp64", exact=True).solver()
    assert reference == Solver(dtype=torch.float64, randomized=False, on_host=False)
    assert SpectraConfig(power_iterations=3).solver().power_iterations == 3
    with pytest.raises(ValueError, match=r"spectra\.precision[\s\S]*'fp32' or 'fp64'"):
        MonitorConfig.model_validate({"spectra": {"precision": "fp16"}})
    with pytest.raises(ValueError, match=r"spectra\.power_iterations"):
        MonitorConfig.model_validate({"spectra": {"power_iterations": -1}})
