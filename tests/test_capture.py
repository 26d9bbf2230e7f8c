import pytest
import torch
from helpers import corpus, make_model, sampled_activations

from arena_callbacks import ProbeRunner, ProbeSet, ProbeSettings
from arena_callbacks.capture import ActivationCapture, expand_braces, resolve_modules
from arena_callbacks.distributed import DistContext

TEXT = [{"text": s} for s in corpus(9, seed=5)]


def test_expand_braces():
    assert expand_braces("layers.{9,18}.mlp.down_proj") == ["layers.9.mlp.down_proj", "layers.18.mlp.down_proj"]
    assert expand_braces("a.{1,2}.{x,y}") == ["a.1.x", "a.1.y", "a.2.x", "a.2.y"]
    assert expand_braces("plain") == ["plain"]


def test_auto_modules_llama_and_gpt2():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=12,
                      num_attention_heads=2, num_key_value_heads=1)
    llama = LlamaForCausalLM(cfg)
    assert list(resolve_modules(llama, "auto")) == [
        "model.layers.2.mlp.down_proj",
        "model.layers.6.self_attn.o_proj",
        "model.layers.10.mlp.down_proj",
        "model.norm",
    ]
    gpt2 = make_model(kind="gpt2", vocab_size=60000)
    assert list(resolve_modules(gpt2, ["auto"])) == [
        "transformer.h.0.mlp.c_proj", "transformer.h.1.attn.c_proj", "transformer.h.1.mlp.c_proj", "transformer.ln_f",
    ]
    assert list(resolve_modules(llama, ["layers.{3,5}.mlp.down_proj", "final_norm"])) == [
        "model.layers.3.mlp.down_proj", "model.layers.5.mlp.down_proj", "model.norm",
    ]
    with pytest.raises(ValueError, match=r"geometry.modules: pattern 'layers.99.mlp' matches no module"):
        resolve_modules(llama, ["layers.99.mlp"])


def test_peft_wrapper_is_hooked_not_its_base_layer():
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(make_model(vocab_size=50), peft.LoraConfig(r=2, target_modules=["down_proj"]))
    mods = resolve_modules(model, ["layers.1.mlp.down_proj"])
    assert list(mods) == ["model.layers.1.mlp.down_proj"]
    assert type(mods["model.layers.1.mlp.down_proj"]).__module__.startswith("peft.tuners.lora")


def test_captured_rows_equal_direct_outputs_and_do_not_depend_on_batching(tokenizer):
    model = make_model(vocab_size=len(tokenizer))
    mods = resolve_modules(model, ["layers.1.mlp.down_proj", "final_norm"])
    got = {}
    for bs in (1, 4):
        s = ProbeSettings(batch_size=bs)
        r = ProbeRunner({"g": ProbeSet.build("g", TEXT, s)}, s)
        r.prepare(tokenizer)
        keys = ActivationCapture.sample_tokens({"g": r.sequences("g")}, 40, seed=0)
        cap = ActivationCapture(mods, keys)
        with cap.hooks():
            r.run(model, observer=cap)
        got[bs] = cap.collect(DistContext())
    assert len(keys) == 40 and keys == sorted(keys)
    # Reference: unpadded forward per row, pick the sampled positions in the same global order.
    want = sampled_activations(model, mods, r.sequences("g"), keys)
    for n in mods:
        ref = want[n]
        assert got[1][n].shape == ref.shape == (40, 32)
        torch.testing.assert_close(got[1][n], ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got[4][n], ref, rtol=1e-5, atol=1e-5)


def test_token_sample_is_seeded_and_bounded(tokenizer):
    s = ProbeSettings()
    r = ProbeRunner({"g": ProbeSet.build("g", TEXT, s)}, s)
    r.prepare(tokenizer)
    total = sum(len(q.ids) - 1 for q in r.sequences("g"))  # every fed token (the last is only a target)
    a = ActivationCapture.sample_tokens({"g": r.sequences("g")}, 30, seed=1)
    assert a == ActivationCapture.sample_tokens({"g": r.sequences("g")}, 30, seed=1)
    assert a != ActivationCapture.sample_tokens({"g": r.sequences("g")}, 30, seed=2)
    assert len(ActivationCapture.sample_tokens({"g": r.sequences("g")}, 10**6, seed=1)) == total


@pytest.mark.parametrize("family", ["qwen2", "gemma"])
def test_auto_modules_qwen_and_gemma(family):
    import transformers

    cfg_cls, model_cls = {
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
        "gemma": (transformers.GemmaConfig, transformers.GemmaForCausalLM),
    }[family]
    cfg = cfg_cls(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=6, num_attention_heads=2,
                  num_key_value_heads=1, head_dim=8)
    model = model_cls(cfg)
    assert list(resolve_modules(model, "auto")) == [
        "model.layers.1.mlp.down_proj", "model.layers.3.self_attn.o_proj", "model.layers.5.mlp.down_proj", "model.norm",
    ]
