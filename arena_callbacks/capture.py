"""Activation capture on the probe tokens: which modules, which tokens, and the reference side.

* **Modules** are chosen by name pattern (``layers.{9,18}.mlp.down_proj``, ``*`` wildcards,
  ``final_norm``) or ``auto``: the final norm's output and sublayer outputs (``o_proj``,
  ``down_proj``, GPT-2's ``c_proj``) at about 1/6, 1/2 and 5/6 depth, the set whose
  Procrustes residual tracked held-out NLL best on SmolLM2-135M (docs/design.md §3). On PEFT models
  the adapted wrapper module is hooked, never its inner ``base_layer``.
* **Tokens**: a fixed, seeded sample of real (non-padding) token positions over the geometry
  probes, the same at every step and on any number of ranks (rows are put back in one global
  order after gathering), so numbers are comparable across steps and world sizes.
* **Reference**: a PEFT model's adapters switched off (``disable_adapter()``) in a second,
  logits-free pass over the same tokens, or activations cached at the baseline (bounded, in
  reduced precision, on the CPU), for full finetuning or when asked.
"""

from __future__ import annotations

import contextlib
import fnmatch
import random
import re
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from .distributed import DistContext

__all__ = ["ActivationCapture", "expand_braces", "resolve_modules"]

_FINAL_NORM_NAMES = ("norm", "ln_f", "final_layernorm", "final_layer_norm")
_SUBLAYERS = {
    "attn": ("self_attn.o_proj", "attn.c_proj", "self_attention.dense", "attention.o_proj"),
    "mlp": ("mlp.down_proj", "mlp.c_proj", "mlp.dense_4h_to_h", "feed_forward.w2"),
}


def expand_braces(pattern: str) -> list[str]:
    """``layers.{9,18}.mlp`` → ``["layers.9.mlp", "layers.18.mlp"]`` (nested braces allowed)."""
    m = re.search(r"\{([^{}]*)\}", pattern)
    if not m:
        return [pattern]
    head, tail = pattern[: m.start()], pattern[m.end() :]
    return [x for alt in m.group(1).split(",") for x in expand_braces(head + alt.strip() + tail)]


def _strip_peft(name: str) -> str:
    """Module name without PEFT's `base_model.model.` prefixes (shared with spectra)."""
    return re.sub(r"^(base_model\.model\.)+", "", name)


def _candidates(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """Named modules a user may track: PEFT prefixes stripped, inner PEFT parts left out."""
    out: dict[str, torch.nn.Module] = {}
    for name, mod in model.named_modules():
        if not name or re.search(r"\.(base_layer|lora_[A-Za-z_]+|oft_[A-Za-z_]+|default)(\.|$)", name):
            continue
        out.setdefault(_strip_peft(name), mod)
    return out


def _layer_list(cands: dict[str, torch.nn.Module]) -> tuple[str, int] | None:
    """The decoder's block list: the ``ModuleList`` with the most children."""
    best = None
    for name, mod in cands.items():
        if isinstance(mod, torch.nn.ModuleList) and len(mod) > 0 and (best is None or len(mod) > best[1]):
            best = (name, len(mod))
    return best


def _auto_modules(cands: dict[str, torch.nn.Module]) -> list[str]:
    chosen: list[str] = []
    layers = _layer_list(cands)
    if layers is not None:
        prefix, n = layers
        depths = sorted({min(n - 1, max(0, round(n * f))) for f in (1 / 6, 1 / 2, 5 / 6)})
        plan = [(depths[0], "mlp"), (depths[len(depths) // 2], "attn"), (depths[-1], "mlp")]
        for idx, kind in plan:
            for sub in _SUBLAYERS[kind]:
                name = f"{prefix}.{idx}.{sub}"
                if name in cands and name not in chosen:
                    chosen.append(name)
                    break
    norms = [n for n in cands if n.split(".")[-1] in _FINAL_NORM_NAMES and n.count(".") <= 2]
    if norms:
        chosen.append(min(norms, key=lambda n: n.count(".")))
    return chosen


def resolve_modules(model: torch.nn.Module, patterns: Sequence[str] | str) -> dict[str, torch.nn.Module]:
    """Tracked modules by display name (PEFT prefixes stripped).

    A pattern matches a module whose name equals it or ends with ``.<pattern>``; ``*`` and
    ``{a,b}`` are allowed; ``final_norm`` names the model's final norm; ``auto`` the default set.

    Raises:
        ValueError: a pattern that matches nothing, listing a few module names that exist.
    """
    cands = _candidates(model)
    if isinstance(patterns, str):
        patterns = [patterns]
    chosen: list[str] = []
    for pattern in patterns:
        if pattern == "auto":
            found = _auto_modules(cands)
        elif pattern == "final_norm":
            found = [n for n in _auto_modules(cands) if n.split(".")[-1] in _FINAL_NORM_NAMES]
        else:
            found = [
                n
                for alt in expand_braces(pattern)
                for n in cands
                if fnmatch.fnmatchcase(n, alt) or fnmatch.fnmatchcase(n, "*." + alt)
            ]
        if not found:
            sample = ", ".join(list(n for n in cands if "layers.0." in n or n.count(".") <= 1)[:12])
            raise ValueError(
                f"geometry.modules: pattern {pattern!r} matches no module of {type(model).__name__}; "
                f"names look like: {sample}"
            )
        chosen += [n for n in found if n not in chosen]
    return {n: cands[n] for n in chosen}


class ActivationCapture:
    """Forward hooks that keep the outputs of tracked modules at the sampled token positions.

    Args:
        modules: Display name → module (from :func:`resolve_modules`).
        token_keys: Global order of the sampled tokens, as ``(probe, example, choice, position)``.
    """

    def __init__(self, modules: dict[str, torch.nn.Module], token_keys: Sequence[tuple[str, int, int, int]]) -> None:
        self.modules = modules
        self.index = {k: i for i, k in enumerate(token_keys)}
        self.n_tokens = len(token_keys)
        self._rows: dict[str, list[torch.Tensor]] = {}
        self._ids: dict[str, list[torch.Tensor]] = {}
        self._sel: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    @staticmethod
    def sample_tokens(
        seqs_by_probe: dict[str, Sequence[Any]], n_tokens: int, seed: int
    ) -> list[tuple[str, int, int, int]]:
        """A seeded sample of the token positions a probe pass feeds (every token of a sequence
        but its last, which is only a target); multiple-choice rows use their first choice."""
        pool = [
            (probe, s.example, s.choice, t)
            for probe, seqs in seqs_by_probe.items()
            for s in seqs
            if s.choice == 0
            for t in range(len(s.ids) - 1)
        ]
        if len(pool) > n_tokens:
            pool = random.Random(seed).sample(pool, n_tokens)
        return sorted(pool)

    # ---- the BatchObserver protocol
    def before_batch(self, probe: str | None, placed: Sequence[tuple[int, int, Any]]) -> None:
        if probe is None or not placed:
            self._sel = None
            return
        # Rows are right-aligned: positions counted from the row's end (see BatchObserver).
        rows, pos, ids = [], [], []
        for r, end, s in placed:
            for t in range(len(s.ids)):
                g = self.index.get((probe, s.example, s.choice, t))
                if g is not None:
                    rows.append(r)
                    pos.append(end + t - len(s.ids))
                    ids.append(g)
        self._sel = (torch.tensor(rows, dtype=torch.long), torch.tensor(pos, dtype=torch.long), torch.tensor(ids))

    @contextlib.contextmanager
    def hooks(self) -> Iterator[None]:
        """Hooks attached for the duration of one pass; captured rows are reset on entry."""
        self._rows = {n: [] for n in self.modules}
        self._ids = {n: [] for n in self.modules}
        handles = [m.register_forward_hook(self._hook(n)) for n, m in self.modules.items()]
        try:
            yield
        finally:
            for h in handles:
                h.remove()
            self._sel = None

    def _hook(self, name: str) -> Any:
        def hook(module: torch.nn.Module, args: Any, output: Any) -> None:
            if self._sel is None or self._sel[0].numel() == 0:
                return
            out = output[0] if isinstance(output, (tuple, list)) else output
            rows, pos, ids = self._sel
            picked = out[rows.to(out.device), (pos + out.shape[1]).to(out.device)]
            self._rows[name].append(picked.detach().float().cpu())
            self._ids[name].append(ids)

        return hook

    def collect(self, ctx: DistContext) -> dict[str, torch.Tensor]:
        """Captured rows per module, gathered over ranks and put in the global token order."""
        result = {}
        for name in self.modules:
            rows = torch.cat(self._rows[name]) if self._rows[name] else torch.zeros(0, 0)
            ids = torch.cat(self._ids[name]) if self._ids[name] else torch.zeros(0, dtype=torch.long)
            rows, ids = ctx.all_gather_rows(rows, ids)
            order = torch.argsort(ids)
            result[name] = rows[order]
        return result


_CACHE_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def is_peft_model(model: torch.nn.Module) -> bool:
    return callable(getattr(model, "disable_adapter", None)) and callable(getattr(model, "get_base_model", None))


class GeometryTracker:
    """Runs the capture around the probe pass and turns it into ``geometry/*`` metrics.

    Args:
        config: The monitor's ``geometry`` section.
        runner: The prepared probe runner whose forwards the capture rides on.
    """

    def __init__(self, config: Any, runner: Any) -> None:
        self.config = config
        self.runner = runner
        self.capture: ActivationCapture | None = None
        self.reference_mode = "cache"
        self.cache: dict[str, torch.Tensor] | None = None
        self.cache_stats: dict[str, Any] | None = None
        self.cache_mb = 0.0
        self.probe_names: list[str] = []

    @property
    def module_names(self) -> list[str]:
        return list(self.capture.modules) if self.capture else []

    def setup(self, model: torch.nn.Module) -> None:
        """Resolve modules, sample tokens and pick the reference (at train start)."""
        from .measurements import TARGET

        model = getattr(model, "module", model)
        probes = self.runner.probes
        # Generative probes run no teacher-forced forward to capture from.
        caps = [n for n in probes if n != TARGET and probes[n].kind != "generate"]
        if self.config.probes is not None:
            unknown = [p for p in self.config.probes if p not in caps]
            if unknown:
                raise ValueError(f"geometry.probes: {unknown} are not teacher-forced capability probes; known: {caps}")
            names = list(self.config.probes)
        else:
            names = [n for n in caps if probes[n].kind == "text"] or caps
        if not names:
            raise ValueError("geometry: needs at least one capability probe (the target probe is not used)")
        self.probe_names = names
        modules = resolve_modules(model, self.config.modules)
        keys = ActivationCapture.sample_tokens(
            {n: self.runner.sequences(n) for n in names}, self.config.tokens_per_module, self.config.seed
        )
        self.capture = ActivationCapture(modules, keys)
        mode = self.config.reference
        if mode == "auto":
            mode = "disable_adapter" if is_peft_model(model) else "cache"
        if mode == "disable_adapter" and not is_peft_model(model):
            raise ValueError(
                f"geometry.reference: 'disable_adapter' needs a PEFT model, got {type(model).__name__}; "
                "use 'cache' (or 'auto')"
            )
        self.reference_mode = mode
        self.cache = None
        self.cache_stats = None

    @contextlib.contextmanager
    def capturing(self) -> Iterator[ActivationCapture | None]:
        """Hooks on for the probe pass this wraps."""
        if self.capture is None:
            yield None
            return
        with self.capture.hooks():
            yield self.capture

    def measure(self, model: torch.nn.Module, ctx: DistContext, *, baseline: bool) -> dict[str, float]:
        """Metrics from the activations the last pass captured; call right after it on all ranks."""
        from .geometry import aggregate, geometry_metrics

        assert self.capture is not None
        model = getattr(model, "module", model)
        current = self.capture.collect(ctx)
        if self.reference_mode == "disable_adapter":
            with self.capture.hooks():
                self.runner.run(
                    model, ctx, observer=self.capture, only=self.probe_names, forward_only=True,
                    context=model.disable_adapter(), desc="arena reference",
                )
            reference = self.capture.collect(ctx)
        else:
            if baseline or self.cache is None:
                self._store_cache(current)
            assert self.cache is not None
            reference = self.cache  # geometry_metrics upcasts the cached dtype to float64 itself
        stats = self.cache_stats  # None without a cache: a fresh reference each pass
        per_module = {
            n: geometry_metrics(reference[n], current[n], reference=None if stats is None else stats[n])
            for n in self.capture.modules
        }
        metrics = aggregate(per_module)
        metrics["geometry/cache_mb"] = self.cache_mb
        return metrics

    def _store_cache(self, current: dict[str, torch.Tensor]) -> None:
        dtype = _CACHE_DTYPES[self.config.cache_dtype]
        size = sum(x.numel() for x in current.values()) * torch.finfo(dtype).bits / 8 / 2**20
        if size > self.config.max_cache_mb:
            raise ValueError(
                f"geometry.max_cache_mb: the baseline activation cache needs {size:.1f} MB "
                f"({len(current)} modules × {self.capture.n_tokens if self.capture else 0} tokens) but the cap is "
                f"{self.config.max_cache_mb} MB; lower geometry.tokens_per_module, track fewer modules, "
                "or raise the cap"
            )
        self.restore_cache({n: x.to(dtype) for n, x in current.items()})

    def restore_cache(self, cache: dict[str, torch.Tensor]) -> None:
        """Take ``cache`` as the baseline activations (a fresh one, or one a checkpoint kept)."""
        from .geometry import reference_stats
        from .tensors import state_bytes

        self.cache = cache
        # The cache's own products, formed once for every step (from the values measure() reads).
        self.cache_stats = {n: reference_stats(x) for n, x in cache.items()}
        self.cache_mb = state_bytes(cache) / 2**20
