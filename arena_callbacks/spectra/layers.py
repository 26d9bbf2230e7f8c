"""Which layers of a model are measured: the walk over its modules and the selection by pattern.

On a PEFT model the measurable layers are its adapted layers (LoRA, DoRA, OFT on linear
layers); on a plain model its ``nn.Linear`` / ``Conv1D`` layers. Names are module names with
PEFT's ``base_model.model.`` prefix stripped.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterator, Mapping, Sequence

from torch import nn

from ..capture import _strip_peft, expand_braces

__all__ = ["spectra_layer_names"]


def spectra_layer_names(model: nn.Module, patterns: Sequence[str] | str | None = None) -> list[str]:
    """Names of the layers to measure.

    On a PEFT model the pool is its supported adapted layers (LoRA, DoRA, OFT on linear layers);
    on a plain model its ``nn.Linear`` / ``Conv1D`` layers. ``patterns=None`` takes the whole
    pool, less a plain model's output head. A pattern matches a module whose name equals it or
    ends with ``.<pattern>`` (``*`` and ``{a,b}`` allowed, as for geometry modules) and selects
    the pool's layers at or under it: ``layers.0.mlp`` selects its three projections, while a
    matched module with no layer of the pool (a norm) adds nothing.

    Raises:
        ValueError: a pattern that matches no module, or no layer to measure at all.
    """
    layers = _measurable_layers(model)
    adapters = _has_tuner_layers(model)
    pool = [n for n, (kind, _) in layers.items() if (kind != "linear") == adapters]
    if patterns is None:
        head = _output_head(model)
        names = [n for n in pool if adapters or layers[n][1] is not head]
    else:
        names = _match_patterns(model, pool, [patterns] if isinstance(patterns, str) else list(patterns))
    if not names:
        what = "adapted layer (LoRA, DoRA or OFT on a linear layer)" if adapters else "linear layer"
        raise ValueError(f"spectra.modules: no {what} of {type(model).__name__} to measure (patterns {patterns!r})")
    return names


def _measurable_layers(model: nn.Module) -> dict[str, tuple[str, nn.Module]]:
    """``{display name: (kind, module)}``, kind ``lora``, ``oft`` or ``linear``; PEFT internals left out."""
    out: dict[str, tuple[str, nn.Module]] = {}
    for name, module in _walk(model):
        kind = _kind(module)
        if kind is not None:
            out.setdefault(_strip_peft(name), (kind, module))
    return out


def _walk(module: nn.Module, prefix: str = "") -> Iterator[tuple[str, nn.Module]]:
    """Named submodules, not descending into PEFT adapter layers (their base layer is not a layer here)."""
    for child_name, child in module.named_children():
        name = f"{prefix}.{child_name}" if prefix else child_name
        yield name, child
        if not _is_tuner_layer(child):
            yield from _walk(child, name)


def _kind(module: nn.Module) -> str | None:
    lora_linear, oft_linear = _peft_linear_classes()
    if lora_linear is not None and isinstance(module, lora_linear):
        return "lora" if _is_linear(module.get_base_layer()) else None
    if oft_linear is not None and isinstance(module, oft_linear):
        return "oft" if _is_linear(module.get_base_layer()) else None
    if _is_tuner_layer(module):
        return None
    return "linear" if _is_linear(module) else None


def _is_linear(module: nn.Module) -> bool:
    """``nn.Linear`` or ``Conv1D`` with a floating-point weight (quantized layers are not measured)."""
    weight = getattr(module, "weight", None)
    return (isinstance(module, nn.Linear) or _is_conv1d(module)) and weight is not None and weight.is_floating_point()


def _is_conv1d(module: nn.Module) -> bool:
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers is a dependency
        return False
    return isinstance(module, Conv1D)


def _peft_linear_classes() -> tuple[type | None, type | None]:
    try:
        from peft.tuners.lora.layer import Linear as LoraLinear
        from peft.tuners.oft.layer import Linear as OftLinear
    except ImportError:
        return None, None
    return LoraLinear, OftLinear


def _is_tuner_layer(module: nn.Module) -> bool:
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:
        return False
    return isinstance(module, BaseTunerLayer)


def _has_tuner_layers(model: nn.Module) -> bool:
    return any(_is_tuner_layer(m) for m in model.modules())


def _output_head(model: nn.Module) -> nn.Module | None:
    get = getattr(model, "get_output_embeddings", None)
    return get() if callable(get) else None


def _match_patterns(model: nn.Module, pool: list[str], patterns: list[str]) -> list[str]:
    modules = [_strip_peft(n) for n, _ in _walk(model)]
    chosen: list[str] = []
    for pattern in patterns:
        found = [
            m for alt in expand_braces(pattern) for m in modules
            if fnmatch.fnmatchcase(m, alt) or fnmatch.fnmatchcase(m, "*." + alt)
        ]
        if not found:
            sample = ", ".join(pool[:8])
            raise ValueError(
                f"spectra.modules: pattern {pattern!r} matches no module of {type(model).__name__}; "
                f"layers look like: {sample}"
            )
        under = [p for p in pool if any(p == m or p.startswith(m + ".") for m in found)]
        chosen += [p for p in under if p not in chosen]
    return chosen


def _sample(layers: Mapping[str, tuple[str, nn.Module]]) -> str:
    names = list(layers)
    return f"measurable layers look like: {', '.join(names[:8])}" if names else "it has no linear layers"
