"""Path-wise rewinding and kept states: exact ends of the path, OFT orthogonality, round trips."""

import pytest
import torch
from helpers import make_model, make_tokenizer

from arena_callbacks.rewind import (
    Slot,
    alphas_for,
    capture_state,
    interpolate,
    is_finite_state,
    layer_depths,
    layerwise_alphas,
    load_state,
    load_state_file,
    path_rules,
    save_state_file,
)

peft = pytest.importorskip("peft")


def adapter_model(method, seed=0):
    model = make_model(seed=seed)
    if method == "lora":
        cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear")
    elif method == "dora":
        cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", use_dora=True)
    else:
        cfg = peft.OFTConfig(r=0, oft_block_size=8, target_modules="all-linear", use_cayley_neumann=False)
    return peft.get_peft_model(model, cfg)


def perturb(model, seed=1, scale=0.3):
    """Pretend training: move every trainable parameter."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(scale * torch.randn(p.shape, generator=g))


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits.double()


@pytest.fixture(scope="module")
def ids():
    tok = make_tokenizer()
    return torch.tensor([tok("one two three four five six seven the cat runs")["input_ids"]])


@pytest.mark.parametrize("method", ["lora", "dora", "oft", "full"])
@pytest.mark.parametrize("layerwise", [False, True])
def test_alpha_zero_is_pretrained_and_alpha_one_is_current(method, layerwise, ids):
    if method == "full":
        model = make_model()
    else:
        model = adapter_model(method)
    model.eval()
    base = logits(model, ids)
    theta0 = capture_state(model)
    perturb(model)
    current = logits(model, ids)
    assert (current - base).abs().max() > 1e-3  # training moved the outputs
    theta1 = capture_state(model)
    names, rules = list(theta1), path_rules(theta0)

    if not layerwise:
        load_state(model, interpolate(theta0, theta1, alphas_for(names, 0.0, layerwise), rules))
        assert torch.equal(logits(model, ids), base)
    else:  # layer-wise α = 0: the first block fully back, the last block (and head) kept
        back = interpolate(theta0, theta1, alphas_for(names, 0.0, layerwise), rules)
        for n in names:
            if rules[n] == "keep":
                continue
            if ".layers.0." in n:
                assert torch.equal(back[n], theta0[n] if rules[n] == "lerp" else torch.zeros_like(theta1[n]))
            elif ".layers.1." in n or "lm_head" in n:
                assert torch.equal(back[n], theta1[n])
    load_state(model, interpolate(theta0, theta1, alphas_for(names, 1.0, layerwise), rules))
    assert torch.equal(logits(model, ids), current)
    load_state(model, interpolate(theta0, theta1, alphas_for(names, 0.5, layerwise), rules))
    mid = logits(model, ids)
    assert (mid - base).abs().max() > 1e-4 and (mid - current).abs().max() > 1e-4


def test_lora_path_is_linear_in_the_weight(ids):
    model = adapter_model("lora")
    theta0 = capture_state(model)
    perturb(model)
    theta1 = capture_state(model)
    rules = path_rules(theta0)
    assert all(rules[n] == "scale" for n in theta0 if "lora_B" in n)
    assert all(rules[n] == "keep" for n in theta0 if "lora_A" in n)
    layer = model.base_model.model.model.layers[0].mlp.down_proj
    full = layer.get_delta_weight("default").double()
    for a in (0.25, 0.6):
        load_state(model, interpolate(theta0, theta1, a, rules))
        torch.testing.assert_close(layer.get_delta_weight("default").double(), a * full, rtol=1e-6, atol=1e-7)


def test_lora_with_nonzero_initial_b_falls_back_to_lerp():
    t0 = {"x.lora_A.default.weight": torch.ones(2, 3), "x.lora_B.default.weight": torch.full((3, 2), 0.1)}
    rules = path_rules(t0)
    assert rules == {"x.lora_A.default.weight": "lerp", "x.lora_B.default.weight": "lerp"}


def test_oft_interpolated_rotations_stay_orthogonal():
    model = adapter_model("oft")
    theta0 = capture_state(model)
    assert all(not t.any() for t in theta0.values())  # OFT's generator starts at zero
    perturb(model, scale=0.5)
    theta1 = capture_state(model)
    rotation = model.base_model.model.model.layers[1].self_attn.q_proj.oft_R["default"]
    for a in (0.0, 0.3, 0.7, 1.0):
        load_state(model, interpolate(theta0, theta1, a, path_rules(theta0)))
        with torch.no_grad():
            r = rotation.get_weight().double()
        eye = torch.eye(r.shape[-1], dtype=torch.float64)
        assert (r.transpose(-1, -2) @ r - eye).abs().max() < 1e-5
        if a == 0.0:
            assert (r - eye).abs().max() == 0
    # The generator itself is scaled: Q(α) = α·Q.
    load_state(model, interpolate(theta0, theta1, 0.3, path_rules(theta0)))
    name = next(n for n in theta1 if "layers.1.self_attn.q_proj.oft_R" in n)
    torch.testing.assert_close(capture_state(model)[name], 0.3 * theta1[name])


def test_layer_depths_and_layerwise_alphas():
    names = [
        "model.embed_tokens.weight",
        "model.layers.0.mlp.down_proj.weight",
        "model.layers.1.self_attn.q_proj.weight",
        "model.layers.3.mlp.up_proj.weight",
        "model.norm.weight",
        "lm_head.weight",
    ]
    d = layer_depths(names)
    assert d == {names[0]: 0.0, names[1]: 0.0, names[2]: 1 / 3, names[3]: 1.0, names[4]: 1.0, names[5]: 1.0}
    a = layerwise_alphas(names, 0.4)
    assert a[names[0]] == pytest.approx(0.4) and a[names[2]] == pytest.approx(0.4 + 0.6 / 3)
    assert a[names[5]] == 1.0
    # GPT-2 style names.
    assert layer_depths(
        ["transformer.h.0.attn.c_attn.weight", "transformer.h.5.mlp.c_fc.weight", "transformer.wte.weight"]
    ) == {
        "transformer.h.0.attn.c_attn.weight": 0.0,
        "transformer.h.5.mlp.c_fc.weight": 1.0,
        "transformer.wte.weight": 0.0,
    }


def test_interpolate_float64_reference():
    g = torch.Generator().manual_seed(3)
    t0 = {"w": torch.randn(5, 4, generator=g), "b": torch.randn(4, generator=g)}
    t1 = {k: v + torch.randn(v.shape, generator=g) for k, v in t0.items()}
    for a in (0.0, 0.37, 1.0):
        out = interpolate(t0, t1, a)
        for k in t0:
            ref = t0[k].double() + a * (t1[k].double() - t0[k].double())
            torch.testing.assert_close(out[k].double(), ref, rtol=0, atol=1e-6)
    per = interpolate(t0, t1, {"w": 0.0, "b": 1.0})
    assert torch.equal(per["w"], t0["w"]) and torch.equal(per["b"], t1["b"])


def test_capture_load_round_trip_and_errors(tmp_path):
    model = adapter_model("lora")
    perturb(model)
    state = capture_state(model)
    saved = {k: v.clone() for k, v in state.items()}
    perturb(model, seed=5)
    load_state(model, saved)
    after = capture_state(model)
    assert all(torch.equal(after[k], saved[k]) for k in saved)  # exact weights restored
    with pytest.raises(ValueError, match="missing"):
        load_state(model, {k: v for k, v in list(saved.items())[1:]})
    bad = dict(saved)
    k0 = next(iter(bad))
    bad[k0] = torch.zeros(1)
    with pytest.raises(ValueError, match="shape"):
        load_state(model, bad)
    # File round trip.
    save_state_file(saved, tmp_path / "s.safetensors")
    back = load_state_file(tmp_path / "s.safetensors")
    assert set(back) == set(saved) and all(torch.equal(back[k], saved[k]) for k in saved)


@pytest.mark.parametrize("in_memory", [True, False])
def test_slot_round_trip(tmp_path, in_memory):
    state = {"a": torch.arange(6.0).reshape(2, 3), "b": torch.ones(2, dtype=torch.bfloat16)}
    slot = Slot(tmp_path / "rewind" / "best.safetensors", in_memory)
    assert not slot.filled
    with pytest.raises(RuntimeError):
        slot.get()
    slot.put(state, 12)
    assert slot.filled and slot.step == 12 and (tmp_path / "rewind" / "best.safetensors").exists() != in_memory
    slot.export(tmp_path / "ckpt" / "arena_best.safetensors")
    other = Slot(tmp_path / "other.safetensors", not in_memory)
    other.restore(tmp_path / "ckpt" / "arena_best.safetensors", 12)
    got = other.get()
    assert other.step == 12 and all(torch.equal(got[k], state[k]) for k in state) and got["b"].dtype == torch.bfloat16


def test_non_finite_states_are_detected():
    assert is_finite_state({"a": torch.ones(3)})
    assert not is_finite_state({"a": torch.tensor([1.0, float("nan")])})
    assert not is_finite_state({"a": torch.ones(2), "b": torch.tensor([float("inf")])})
