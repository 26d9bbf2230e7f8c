"""Weight-space spectra (docs/design.md §3) against plain float64 numpy references, and the dense
finetuned weights of LoRA, DoRA and OFT layers against what the layers actually compute."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from helpers import make_model

from arena_callbacks.spectra import (
    SPECTRAL_METRICS,
    DenseUpdate,
    LowRankUpdate,
    aggregate_spectra,
    dense_update_metrics,
    layer_updates,
    lowrank_update_metrics,
    moving_average,
    pretrained_svd,
    smoothness,
    snapshot_weights,
    spectra_layer_names,
    weight_spectra,
)

peft = pytest.importorskip("peft")
from peft import LoraConfig, OFTConfig, get_peft_model  # noqa: E402

VOCAB = 96
LLAMA_TARGETS = ["q_proj", "v_proj", "down_proj"]  # 32×32, 16×32, 32×64
GPT2_TARGETS = ["c_attn", "c_fc"]  # Conv1D: 96×32, 128×32 as d_out × d_in


# ------------------------------------------------------------------------------ references


def np_moving_average(x: np.ndarray, window: int = 5) -> np.ndarray:
    half = window // 2
    return np.array([x[max(0, i - half) : i + half + 1].mean() for i in range(len(x))])


def np_smoothness(x: np.ndarray) -> float:
    return float(np.mean(np.abs(x - np_moving_average(x)))) if len(x) else 0.0


def reference_metrics(w0, w_ft, k: int = 10, eps: float = 0.5) -> dict[str, float]:
    """Every metric straight from its definition, with numpy in float64."""
    w0, w_ft = np.asarray(w0, dtype=np.float64), np.asarray(w_ft, dtype=np.float64)
    dw = w_ft - w0
    u, s, vt = np.linalg.svd(w0, full_matrices=False)
    dw_s = np.linalg.svd(dw, compute_uv=False)
    fro, spec = np.sqrt((dw**2).sum()), dw_s[0]
    retention = np.array([abs(u[:, i] @ w_ft @ vt[i] - s[i]) for i in range(len(s))])
    adaptation = np.array([np.linalg.norm(dw @ vt[i]) for i in range(len(s))])
    if spec > 0:
        u_ft = np.linalg.svd(w_ft, full_matrices=False)[0][:, :k]
        intruders = float(sum(np.max(np.abs(u_ft[:, j] @ u)) < eps for j in range(u_ft.shape[1])))
    else:
        intruders = 0.0
    return {
        "rel_update_fro": fro / np.sqrt((w0**2).sum()),
        "rel_update_spec": spec / s[0],
        "stable_rank": fro**2 / spec**2 if spec > 0 else 0.0,
        "intruders": intruders,
        "retention_dev": retention.mean() / s[0],
        "retention_smooth": np_smoothness(retention),
        "adaptation_smooth": np_smoothness(adaptation),
    }


def assert_metrics(got: dict[str, float], want: dict[str, float], rel: float = 1e-9, abs_: float = 1e-12) -> None:
    assert list(got) == list(SPECTRAL_METRICS)
    for key in SPECTRAL_METRICS:
        assert got[key] == pytest.approx(want[key], rel=rel, abs=abs_), key


def rand(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).standard_normal(shape))


# ------------------------------------------------------------------------------ pure functions


@pytest.mark.parametrize(("d_out", "d_in", "r"), [(48, 40, 4), (40, 48, 6), (24, 5, 8), (30, 30, 1)])
def test_lowrank_factor_norms_equal_dense_ones(d_out: int, d_in: int, r: int) -> None:
    w0, b, a, s = rand(d_out, d_in, seed=1), rand(d_out, r, seed=2), rand(r, d_in, seed=3), 0.07
    dw = s * b @ a  # materialised here only
    got = lowrank_update_metrics(w0, b, a, s, k=10)
    fro, spec = torch.linalg.matrix_norm(dw).item(), torch.linalg.matrix_norm(dw, ord=2).item()
    w0_fro, w0_spec = torch.linalg.matrix_norm(w0).item(), torch.linalg.matrix_norm(w0, ord=2).item()
    assert got["rel_update_fro"] == pytest.approx(fro / w0_fro, rel=1e-9)
    assert got["rel_update_spec"] == pytest.approx(spec / w0_spec, rel=1e-9)
    assert got["stable_rank"] == pytest.approx(fro**2 / spec**2, rel=1e-9)
    assert_metrics(got, dense_update_metrics(w0, w0 + dw, k=10))
    assert_metrics(got, reference_metrics(w0.numpy(), (w0 + dw).numpy(), k=10))


def test_negative_scaling_and_precomputed_svd() -> None:
    w0, b, a = rand(20, 16, seed=4), rand(20, 3, seed=5), rand(3, 16, seed=6)
    svd = pretrained_svd(w0)
    got = lowrank_update_metrics(w0, b, a, -0.3, k=5, w0_svd=svd)
    assert_metrics(got, reference_metrics(w0.numpy(), (w0 - 0.3 * b @ a).numpy(), k=5))
    assert_metrics(lowrank_update_metrics(w0, b, a, -0.3, k=5), got, rel=0, abs_=0)


@pytest.mark.parametrize("k", [1, 3, 10, 1000])
@pytest.mark.parametrize(("d_out", "d_in"), [(36, 28), (28, 36)])
def test_dense_metrics_match_numpy_reference(k: int, d_out: int, d_in: int) -> None:
    w0 = rand(d_out, d_in, seed=7)
    w_ft = w0 + 0.4 * rand(d_out, d_in, seed=8)
    assert_metrics(dense_update_metrics(w0, w_ft, k=k, eps=0.6), reference_metrics(w0, w_ft, k=k, eps=0.6))


def test_float32_inputs_are_measured_in_float64() -> None:
    w0, w_ft = rand(16, 12, seed=9), rand(16, 12, seed=10)
    got = dense_update_metrics(w0.float(), w_ft.float())
    assert_metrics(got, reference_metrics(w0.float().double(), w_ft.float().double()))


def test_zero_update_reads_zero() -> None:
    w0 = rand(24, 20, seed=11)
    zero = dict.fromkeys(SPECTRAL_METRICS, 0.0)
    assert dense_update_metrics(w0, w0.clone()) == zero
    assert lowrank_update_metrics(w0, torch.zeros(24, 4), rand(4, 20, seed=12), 2.0) == zero
    assert lowrank_update_metrics(w0, rand(24, 4, seed=13), rand(4, 20, seed=14), 0.0) == zero


def _spectrum(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    u = torch.linalg.qr(rand(n, n, seed=seed)).Q
    v = torch.linalg.qr(rand(n, n, seed=seed + 1)).Q
    s = torch.logspace(1, -1, n, dtype=torch.float64)
    return u, s, v


def test_new_direction_away_from_pretrained_ones_is_an_intruder() -> None:
    n = 24
    u, s, v = _spectrum(n, seed=15)
    w0 = u @ torch.diag(s) @ v.T
    x = u[:, n // 2 :].sum(dim=1) / math.sqrt(n // 2)  # |cos| with every u_j is 1/sqrt(12) < 0.5
    y = rand(n, seed=17)
    y = y / y.norm()
    b, a = (3 * s[0] * x).unsqueeze(1), y.unsqueeze(0)
    got = lowrank_update_metrics(w0, b, a, 1.0, k=10, eps=0.5)
    assert got["intruders"] >= 1
    assert_metrics(got, reference_metrics(w0, w0 + b @ a, k=10))
    assert dense_update_metrics(w0, w0 + b @ a)["intruders"] == got["intruders"]
    # The same strength along the top pretrained pair only rescales it: no intruder.
    aligned = lowrank_update_metrics(w0, (3 * s[0] * u[:, 0]).unsqueeze(1), v[:, 0].unsqueeze(0), 1.0)
    assert aligned["intruders"] == 0
    assert aligned["stable_rank"] == pytest.approx(1.0)
    assert aligned["retention_dev"] == pytest.approx(3 / n)  # only direction 1 moved, by 3 σ_1


def test_moving_average_and_smoothness_by_hand() -> None:
    x = torch.tensor([1.0, 2.0, 6.0, 2.0, 1.0, 0.0])
    # Truncated windows: [x0..x2], [x0..x3], [x0..x4], [x1..x5], [x2..x5], [x3..x5].
    want = [3.0, 11 / 4, 12 / 5, 11 / 5, 9 / 4, 1.0]
    assert moving_average(x).tolist() == pytest.approx(want, rel=1e-15)
    assert smoothness(x) == pytest.approx((2 + 0.75 + 3.6 + 0.2 + 1.25 + 1) / 6, rel=1e-15)
    assert smoothness(torch.arange(10.0)) == pytest.approx((1 + 0.5 + 0 * 6 + 0.5 + 1) / 10)  # only the ends
    assert smoothness([4.0] * 7) == 0.0
    assert smoothness([3.0]) == 0.0
    assert smoothness([]) == 0.0
    assert moving_average(x, window=3).tolist() == pytest.approx(np_moving_average(x.numpy(), 3).tolist())
    for bad in (0, 4, -1, 2.0, True):
        with pytest.raises(ValueError, match="window must be an odd int"):
            moving_average(x, window=bad)


def test_nonfinite_inputs_give_nan() -> None:
    w0 = rand(8, 6, seed=18)
    bad = w0.clone()
    bad[1, 2] = math.nan
    for got in (
        dense_update_metrics(w0, bad),
        dense_update_metrics(bad, w0),
        lowrank_update_metrics(w0, torch.full((8, 2), math.inf), rand(2, 6, seed=19), 1.0),
    ):
        assert list(got) == list(SPECTRAL_METRICS) and all(math.isnan(v) for v in got.values())


def test_metric_argument_errors() -> None:
    w0 = rand(8, 6, seed=20)
    with pytest.raises(ValueError, match=r"w_ft must have w0's shape \(8, 6\); got \(6, 8\)"):
        dense_update_metrics(w0, w0.T)
    with pytest.raises(ValueError, match="B must be d_out × r and A r × d_in"):
        lowrank_update_metrics(w0, torch.zeros(8, 2), torch.zeros(3, 6), 1.0)
    with pytest.raises(ValueError, match="k must be an int >= 0; got -1"):
        dense_update_metrics(w0, w0, k=-1)
    with pytest.raises(ValueError, match=r"eps must be in \(0, 1\]; got 0"):
        dense_update_metrics(w0, w0, eps=0)
    with pytest.raises(ValueError, match="w0_svd does not fit w0"):
        dense_update_metrics(w0, w0, w0_svd=pretrained_svd(w0.T))
    with pytest.raises(ValueError, match="non-empty 2-D matrix"):
        dense_update_metrics(w0[0], w0[0])


def test_k_zero_skips_intruders() -> None:
    w0 = rand(12, 10, seed=21)
    w_ft = w0 + rand(12, 10, seed=22)
    got, want = dense_update_metrics(w0, w_ft, k=0), reference_metrics(w0, w_ft)
    assert got["intruders"] == 0.0
    assert_metrics({**got, "intruders": want["intruders"]}, want)


def test_aggregate_keys_mean_and_max() -> None:
    per_layer = {
        "a.q_proj": dict(zip(SPECTRAL_METRICS, [1.0, 2.0, 3.0, 0.0, 5.0, 6.0, 7.0])),
        "b.v_proj": dict(zip(SPECTRAL_METRICS, [3.0, 0.0, 1.0, 2.0, 1.0, 2.0, 3.0])),
    }
    out = aggregate_spectra(per_layer)
    names = ["a.q_proj", "b.v_proj", "mean", "max"]
    assert set(out) == {f"spectral/{m}/{n}" for m in SPECTRAL_METRICS for n in names}
    assert out["spectral/rel_update_fro/mean"] == 2.0 and out["spectral/rel_update_fro/max"] == 3.0
    assert out["spectral/intruders/b.v_proj"] == 2.0 and out["spectral/intruders/max"] == 2.0
    per_layer["b.v_proj"]["stable_rank"] = math.nan
    out = aggregate_spectra(per_layer)
    assert math.isnan(out["spectral/stable_rank/mean"]) and math.isnan(out["spectral/stable_rank/max"])
    assert aggregate_spectra({}) == {}
    with pytest.raises(ValueError, match="'mean' is not allowed"):
        aggregate_spectra({"mean": per_layer["a.q_proj"]})
    with pytest.raises(ValueError, match=r"lacks metrics \['intruders'"):
        aggregate_spectra({"x": {m: 0.0 for m in SPECTRAL_METRICS if m != "intruders"}})


# ------------------------------------------------------------------------------ real PEFT layers


def _peft(config, kind: str = "llama", seed: int = 0):
    torch.manual_seed(seed)
    return get_peft_model(make_model(seed=seed, vocab_size=VOCAB, kind=kind), config).eval()


def _perturb(model: torch.nn.Module, std: float, seed: int = 1) -> None:
    """Trained-like adapter parameters: B off zero, OFT generators off zero, magnitudes rescaled."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not p.requires_grad:
                continue
            noise = torch.randn(p.shape, generator=g) * std
            p.mul_(1 + noise) if "lora_magnitude_vector" in name else p.add_(noise)


def _adapted_modules(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return {n.replace("base_model.model.", "", 1): m for n, m in model.named_modules() if isinstance(m, BaseTunerLayer)}


def _probed_weight(module: torch.nn.Module, d_in: int) -> torch.Tensor:
    """``W_ft`` read off the layer itself: its outputs on the identity, less the bias (float32 precision)."""
    with torch.no_grad():
        out = module(torch.eye(d_in)).double()
    bias = module.get_base_layer().bias
    return (out - (0 if bias is None else bias.double())).T


def _check_dense_weights_are_what_layers_compute(model: torch.nn.Module) -> dict[str, LowRankUpdate | DenseUpdate]:
    modules = _adapted_modules(model)
    updates = dict(layer_updates(model))
    assert list(updates) == list(modules)
    for name, update in updates.items():
        module = modules[name]
        x = torch.randn(7, update.w0.shape[1])
        bias = module.get_base_layer().bias
        bias = 0 if bias is None else bias.detach().double()
        with torch.no_grad():
            y, y0 = module(x).double(), module.get_base_layer()(x).double()
        torch.testing.assert_close(y, x.double() @ update.w_ft.T + bias, rtol=1e-5, atol=1e-5, msg=name)
        torch.testing.assert_close(y0, x.double() @ update.w0.double().T + bias, rtol=1e-5, atol=1e-5, msg=name)
    return updates


CONFIGS = {
    "lora": lambda t, f: LoraConfig(r=4, lora_alpha=8, target_modules=t, fan_in_fan_out=f, lora_dropout=0.1),
    "rslora": lambda t, f: LoraConfig(r=4, lora_alpha=8, use_rslora=True, target_modules=t, fan_in_fan_out=f),
    "dora": lambda t, f: LoraConfig(r=4, lora_alpha=8, use_dora=True, target_modules=t, fan_in_fan_out=f),
    "oft": lambda t, f: OFTConfig(r=0, oft_block_size=8, target_modules=t, use_cayley_neumann=False),
    "oft_neumann": lambda t, f: OFTConfig(r=0, oft_block_size=8, target_modules=t),
    "oft_coft_share": lambda t, f: OFTConfig(
        r=0, oft_block_size=8, target_modules=t, coft=True, eps=0.05, block_share=True, use_cayley_neumann=False
    ),
}
WANT_TYPE = {"lora": LowRankUpdate, "rslora": LowRankUpdate}
# peft's OFT wraps nn.Linear only, not GPT-2's Conv1D.
CASES = [(m, k) for m in CONFIGS for k in ("llama", "gpt2") if not (m.startswith("oft") and k == "gpt2")]


@pytest.mark.parametrize(("method", "kind"), CASES)
def test_dense_weight_is_what_the_layer_computes(method: str, kind: str) -> None:
    targets, fan_in_fan_out = (LLAMA_TARGETS, False) if kind == "llama" else (GPT2_TARGETS, True)
    model = _peft(CONFIGS[method](targets, fan_in_fan_out), kind=kind)
    # Fresh adapters are the identity: every metric reads exactly 0.
    for metrics in weight_spectra(model).values():
        assert metrics == dict.fromkeys(SPECTRAL_METRICS, 0.0)
    _perturb(model, std=0.003 if method == "oft_neumann" else 0.05)
    _check_dense_weights_are_what_layers_compute(model)
    # Again: COFT's forward writes its projected generator back into the parameter (float32).
    updates = dict(layer_updates(model))
    assert all(isinstance(u, WANT_TYPE.get(method, DenseUpdate)) for u in updates.values())
    got = weight_spectra(model, k=6)
    for name, update in updates.items():
        assert_metrics(got[name], reference_metrics(update.w0, update.w_ft, k=6), rel=1e-8)
        # Independent of the extraction: W_ft as the layer computes it, to float32 precision.
        probed = reference_metrics(update.w0, _probed_weight(_adapted_modules(model)[name], update.w0.shape[1]), k=6)
        for key in ("rel_update_fro", "rel_update_spec", "stable_rank", "retention_dev", "adaptation_smooth"):
            assert got[name][key] == pytest.approx(probed[key], rel=1e-3, abs=1e-9), (name, key)
        assert got[name]["rel_update_fro"] > 1e-4


def test_oft_keeps_singular_values_and_left_vectors() -> None:
    model = _peft(CONFIGS["oft"](LLAMA_TARGETS, False))
    _perturb(model, std=0.1)
    got = weight_spectra(model)
    for name, update in layer_updates(model):
        assert isinstance(update, DenseUpdate)
        s0, s_ft = torch.linalg.svdvals(update.w0), torch.linalg.svdvals(update.w_ft)
        torch.testing.assert_close(s_ft, s0, rtol=0, atol=1e-6)
        # W_ft W_ftᵀ = W0 R Rᵀ W0ᵀ = W0 W0ᵀ: the left singular vectors stay, so no intruders.
        torch.testing.assert_close(update.w_ft @ update.w_ft.T, update.w0 @ update.w0.T, rtol=0, atol=1e-10)
        assert got[name]["intruders"] == 0
        assert 0 < got[name]["rel_update_spec"] <= 2  # ‖W0 (Rᵀ − I)‖ ≤ 2‖W0‖
        assert_metrics(got[name], reference_metrics(update.w0, update.w_ft), rel=1e-8)


def test_oft_neumann_series_is_only_nearly_orthogonal() -> None:
    model = _peft(CONFIGS["oft_neumann"](LLAMA_TARGETS, False))
    _perturb(model, std=0.003)
    for _, update in layer_updates(model):
        s0, s_ft = torch.linalg.svdvals(update.w0), torch.linalg.svdvals(update.w_ft)
        torch.testing.assert_close(s_ft, s0, rtol=1e-5, atol=0)  # truncation error ~ ‖Q‖⁴


@pytest.mark.parametrize("second", ["lora", "dora"])
def test_several_active_adapters(second: str) -> None:
    model = _peft(CONFIGS["lora"](LLAMA_TARGETS, False))
    model.add_adapter("second", CONFIGS[second](LLAMA_TARGETS, False))
    model.base_model.set_adapter(["default", "second"])
    _perturb(model, std=0.05)
    model.eval()
    updates = _check_dense_weights_are_what_layers_compute(model)
    for update in updates.values():
        if second == "lora":
            assert isinstance(update, LowRankUpdate) and update.b.shape[1] == 8
        else:
            assert isinstance(update, DenseUpdate)


def test_oft_several_active_adapters() -> None:
    model = _peft(CONFIGS["oft"](LLAMA_TARGETS, False))
    model.add_adapter("second", CONFIGS["oft_neumann"](LLAMA_TARGETS, False))
    model.base_model.set_adapter(["default", "second"])
    _perturb(model, std=0.01)
    model.eval()
    _check_dense_weights_are_what_layers_compute(model)


def test_merged_adapter_is_refused() -> None:
    model = _peft(CONFIGS["lora"](LLAMA_TARGETS, False))
    model.merge_adapter()
    with pytest.raises(ValueError, match="'model.layers.0.self_attn.q_proj': its adapter is merged"):
        weight_spectra(model)


# ------------------------------------------------------------------------------ full finetuning


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_full_finetuning_against_reference_snapshot(kind: str) -> None:
    model = make_model(seed=2, vocab_size=VOCAB, kind=kind)
    names = spectra_layer_names(model)
    assert "lm_head" not in names
    reference = snapshot_weights(model, names)
    assert all(w.device.type == "cpu" and w.dtype == torch.float32 for w in reference.values())
    target = names[1]
    module = dict(model.named_modules())[target]
    with torch.no_grad():
        module.weight.add_(0.05 * torch.randn_like(module.weight))
    assert not torch.equal(reference[target], module.weight if kind == "llama" else module.weight.T)  # a copy
    got = weight_spectra(model, reference, names=names, k=4)
    w_ft = module.weight.detach().double()
    w_ft = w_ft if kind == "llama" else w_ft.T  # Conv1D computes x @ W
    assert_metrics(got[target], reference_metrics(reference[target].double(), w_ft, k=4))
    for name in names:
        if name != target:
            assert got[name] == dict.fromkeys(SPECTRAL_METRICS, 0.0)


def test_cache_keeps_svd_while_w0_is_unchanged() -> None:
    model = make_model(seed=3, vocab_size=VOCAB)
    names = spectra_layer_names(model, ["layers.0.self_attn.q_proj"])
    reference = snapshot_weights(model, names)
    cache: dict = {}
    first = weight_spectra(model, reference, names=names, cache=cache)
    entry = cache[names[0]]
    assert weight_spectra(model, reference, names=names, cache=cache) == first
    assert cache[names[0]] is entry
    reference[names[0]] = reference[names[0]] * 2  # another W0 under the same name: recomputed
    again = weight_spectra(model, reference, names=names, cache=cache)
    assert cache[names[0]] is not entry
    assert again[names[0]]["rel_update_fro"] == pytest.approx(0.5)


# ------------------------------------------------------------------------------ names and errors


def test_layer_names_and_patterns() -> None:
    lora = _peft(CONFIGS["lora"](LLAMA_TARGETS, False))
    subs = ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj")
    adapted = [f"model.layers.{i}.{m}" for i in (0, 1) for m in subs]
    assert spectra_layer_names(lora) == adapted
    assert spectra_layer_names(lora, "layers.{0,1}.self_attn") == [n for n in adapted if "self_attn" in n]
    assert spectra_layer_names(lora, ["layers.1.mlp", "model.norm"]) == ["model.layers.1.mlp.down_proj"]
    with pytest.raises(ValueError, match="spectra.modules: pattern 'nope' matches no module"):
        spectra_layer_names(lora, ["nope"])
    with pytest.raises(ValueError, match="no adapted layer"):
        spectra_layer_names(lora, ["model.norm"])
    plain = make_model(vocab_size=VOCAB)
    assert len(spectra_layer_names(plain)) == 14  # 7 projections × 2 layers, no lm_head
    assert spectra_layer_names(plain, "lm_head") == ["lm_head"]
    mlp = [f"model.layers.0.mlp.{p}_proj" for p in ("gate", "up", "down")]
    assert spectra_layer_names(plain, "layers.0.mlp") == mlp


def test_layer_errors() -> None:
    plain = make_model(vocab_size=VOCAB)
    with pytest.raises(ValueError, match="needs its step-0 weight in reference"):
        weight_spectra(plain, names=["model.layers.0.mlp.up_proj"])
    with pytest.raises(ValueError, match="'model.layers.0.mlp' is not a measurable layer"):
        weight_spectra(plain, {}, names=["model.layers.0.mlp"])
    with pytest.raises(ValueError, match="is not a measurable layer"):
        snapshot_weights(plain, ["model.norm"])
    bad = {"model.layers.0.mlp.up_proj": torch.zeros(3, 3)}
    with pytest.raises(ValueError, match=r"reference\['model.layers.0.mlp.up_proj'\] has shape \(3, 3\)"):
        weight_spectra(plain, bad)
    with pytest.raises(ValueError, match="k must be an int"):
        weight_spectra(plain, k=1.5)
    assert weight_spectra(plain) == {}  # nothing adapted, no reference
