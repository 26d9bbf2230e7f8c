"""The model of a plan, built on the meta device from its config: parameter counts and shapes.

Nothing is downloaded but a config file: a local folder or ``config.json`` is read as is, a hub
id goes through ``transformers.AutoConfig`` (its config only, never weights). The model is built
under ``accelerate.init_empty_weights`` (every tensor on ``meta``), wrapped in a PEFT LoRA when
the plan is for LoRA, and the monitor's own selection code picks the geometry modules and
spectra layers from it, as it would at train start.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..exceptions import ArenaError

__all__ = ["ModelFacts", "PlanError", "build_meta_model", "load_config", "model_facts"]


class PlanError(ArenaError, ValueError):
    """Input a plan cannot use; the message names the option, the value and what is valid."""


def load_config(model: str) -> Any:
    """A ``transformers`` config from a local folder, a ``config.json`` path, or a hub id (config only)."""
    from transformers import AutoConfig, PretrainedConfig

    path = Path(model).expanduser()
    if path.is_file():
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except ValueError as e:
            raise PlanError(f"--model: {model} is not a JSON config file ({e})") from None
        model_type = data.get("model_type")
        if not model_type:
            raise PlanError(f"--model: {model} has no 'model_type'; give a transformers config.json")
        from transformers import CONFIG_MAPPING

        if model_type not in CONFIG_MAPPING:
            raise PlanError(f"--model: model_type {model_type!r} of {model} is not known to this transformers")
        cls: type[PretrainedConfig] = CONFIG_MAPPING[model_type]
        return cls.from_dict(data)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise PlanError(f"--model: folder {model} has no config.json")
        return AutoConfig.from_pretrained(str(path))
    if path.is_absolute() or model.startswith((".", "~")):
        raise PlanError(f"--model: {model} not found (give a model folder, a config.json or a hub id)")
    try:
        return AutoConfig.from_pretrained(model)
    except (OSError, ValueError) as e:
        raise PlanError(f"--model: could not fetch the config of {model!r} ({str(e).splitlines()[0]}); "
                        "give a local folder or config.json when offline") from None


def build_meta_model(config: Any, lora_rank: int | None, lora_targets: tuple[str, ...],
                     dtype: torch.dtype) -> torch.nn.Module:
    """The model on the meta device, with a LoRA adapter of ``lora_rank`` on ``lora_targets`` if given."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with init_empty_weights():
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        if getattr(config, "tie_word_embeddings", False):
            model.tie_weights()  # (outside init_empty_weights, which keeps it from tying)
        if lora_rank is not None:
            import peft

            targets: Any = list(lora_targets) if lora_targets != ("all-linear",) else "all-linear"
            try:
                with init_empty_weights():
                    model = peft.get_peft_model(model, peft.LoraConfig(r=lora_rank, lora_alpha=2 * lora_rank,
                                                                       target_modules=targets))
            except ValueError as e:
                raise PlanError(f"--lora-targets: {list(lora_targets)} ({e})") from None
    return model.eval()


@dataclass
class ModelFacts:
    """Parameter counts and shapes of the planned model.

    ``params``: the pretrained model's parameters (a tied head counted once); ``body``: those
    that cost FLOPs at every fed position (all but the input embedding and the head);
    ``head``: the output projection, paid only at scored positions; ``trainable``: what trains
    (the adapter, or every parameter) and ``trainable_bytes`` in the dtype it is kept in.
    """

    model_type: str
    layers: int
    hidden: int
    attention_width: int
    vocab: int
    params: int
    body: int
    head: int
    trainable: int
    trainable_bytes: int
    attn_implementation: str | None
    linears: dict[str, tuple[int, int]] = field(default_factory=dict)  # spectra layer -> (d_out, d_in)
    module_widths: dict[str, int] = field(default_factory=dict)  # geometry module -> output width


def model_facts(model: torch.nn.Module, config: Any, geometry_modules: tuple[str, ...] | None,
                spectra_modules: tuple[str, ...] | None, spectra: bool) -> ModelFacts:
    """Counts and shapes of ``model`` (built by :func:`build_meta_model`)."""
    from ..capture import resolve_modules

    base = model.get_base_model() if callable(getattr(model, "get_base_model", None)) else model
    unique = {id(p): (n, p) for n, p in base.named_parameters()}
    pretrained = [(n, p) for n, p in unique.values() if "lora_" not in n]
    params = sum(p.numel() for _, p in pretrained)
    embed = base.get_input_embeddings().weight
    head = base.get_output_embeddings().weight
    body = params - embed.numel() - (0 if head is embed else head.numel())
    trainable = [p for _, p in unique.values() if p.requires_grad]
    heads = getattr(config, "num_attention_heads", None) or 1
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    facts = ModelFacts(
        model_type=config.model_type, layers=config.num_hidden_layers, hidden=config.hidden_size,
        attention_width=heads * head_dim, vocab=head.shape[0], params=params, body=body, head=head.numel(),
        trainable=sum(p.numel() for p in trainable),
        trainable_bytes=sum(p.numel() * p.element_size() for p in trainable),
        attn_implementation=getattr(config, "_attn_implementation", None),
    )
    if geometry_modules is not None:
        try:
            modules = resolve_modules(model, geometry_modules)
        except ValueError as e:
            raise PlanError(str(e)) from None
        facts.module_widths = {n: _output_width(m, config) for n, m in modules.items()}
    if spectra:
        from ..spectra import spectra_layer_names

        try:
            names = spectra_layer_names(model, spectra_modules)
        except ValueError as e:
            raise PlanError(str(e)) from None
        for name in names:
            layer = base.get_submodule(name)
            w = getattr(layer, "base_layer", layer).weight
            facts.linears[name] = (int(w.shape[0]), int(w.shape[1]))
    return facts


def _output_width(module: torch.nn.Module, config: Any) -> int:
    """Width of a module's output (the features a hook captures)."""
    base = getattr(module, "base_layer", module)
    if isinstance(base, torch.nn.Linear):
        return int(base.out_features)
    weight = getattr(base, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.dim() == 1:
        return int(weight.shape[0])
    return int(config.hidden_size)
