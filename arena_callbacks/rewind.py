"""Rewinding (docs/design.md §4): trainable states kept aside, and the path from the pretrained weights.

A *trainable state* is ``{parameter name: CPU tensor}`` for the parameters that train
(``requires_grad``): the adapter for PEFT models, every weight for full finetuning. Each rank
keeps its own part and restores it in place, so no gather is needed: the whole tensor under
DDP and ZeRO-1/2, the local shard under FSDP2, the fp32 master partition under DeepSpeed ZeRO-3
(:mod:`~arena_callbacks.shards`).

The **path** from the pretrained weights ``θ0`` (the trainable state at step 0) to the current
``θ1`` is followed per parameter:

* ``lerp``: ``θ(α) = θ0 + α(θ1 − θ0)``: full finetuning (``W0 + αΔW``), OFT (its generator
  starts at zero, so this scales the skew-symmetric generator ``Q`` and ``R = Cayley(αQ)``
  stays orthogonal), DoRA magnitudes, biases, IA³ vectors, anything else;
* ``scale``: a LoRA ``B`` that started at zero: ``B(α) = α·B1`` with its partner ``A`` kept at
  ``A1`` (``keep``), which gives exactly ``W0 + α·s·B1A1``. A LoRA pair with a non-zero
  initial ``B`` (PiSSA, OLoRA...) falls back to ``lerp`` on both factors: exact at both ends,
  not linear in between.

``α = 0`` gives the pretrained model exactly, ``α = 1`` the current one. The layer-wise
variant (after LiNeS) gives each parameter its own ``α_l = α + (1 − α)·depth_l``: embeddings
(depth 0) move back the most, the last block and the head (depth 1) not at all.

Example:
    >>> import torch
    >>> t0 = {"w": torch.zeros(2), "layers.0.lora_B.default.weight": torch.zeros(2, 1),
    ...       "layers.0.lora_A.default.weight": torch.ones(1, 2)}
    >>> t1 = {"w": torch.ones(2), "layers.0.lora_B.default.weight": torch.ones(2, 1),
    ...       "layers.0.lora_A.default.weight": torch.full((1, 2), 3.0)}
    >>> half = interpolate(t0, t1, 0.5, path_rules(t0))
    >>> half["w"].tolist(), half["layers.0.lora_B.default.weight"].flatten().tolist()
    ([0.5, 0.5], [0.5, 0.5])
    >>> half["layers.0.lora_A.default.weight"].flatten().tolist()
    [3.0, 3.0]
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Literal

import torch

from .shards import local_shapes, read_local, trainable_parameters, write_local
from .tensors import load_state_file, save_state_file, state_bytes

__all__ = [
    "PathRule",
    "Slot",
    "capture_state",
    "check_state",
    "interpolate",
    "is_finite_state",
    "layer_depths",
    "layerwise_alphas",
    "lora_b_names",
    "load_state",
    "load_state_file",
    "next_alpha",
    "path_rules",
    "save_state_file",
    "state_bytes",
    "trainable_parameters",
]

logger = logging.getLogger(__name__)

PathRule = Literal["lerp", "scale", "keep"]
State = dict[str, torch.Tensor]

_LORA_B = re.compile(r"(lora_B|lora_embedding_B)")
_LAYER_INDEX = re.compile(r"\.(?:layers|h|blocks|block|layer)\.(\d+)\.")
_EMBEDDING = re.compile(r"(embed|wte|wpe|word_embeddings|position_embeddings)")


def capture_state(model: torch.nn.Module, names: Sequence[str] | None = None) -> State:
    """CPU copies of this rank's part of the trainable parameters (:mod:`~arena_callbacks.shards`)."""
    params = trainable_parameters(model)
    keep = params if names is None else {n: params[n] for n in names}
    return {n: read_local(p) for n, p in keep.items()}


def load_state(model: torch.nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Copy ``state`` into this rank's part of the model's trainable parameters, in place.

    Under DeepSpeed the optimizer's master weights are set as well (:func:`~arena_callbacks.shards.write_local`).

    Raises:
        ValueError: names or shapes differ from the model's trainable parameters; nothing is
            changed then.
    """
    params = trainable_parameters(model)
    check_state(state, local_shapes(params))
    write_local(params, state)


def check_state(state: Mapping[str, torch.Tensor], shapes: Mapping[str, tuple[int, ...]], where: str = "rewind state"
                ) -> None:
    """Raise ``ValueError`` unless ``state`` has exactly these names and shapes."""
    missing = sorted(set(shapes) - set(state))
    unknown = sorted(set(state) - set(shapes))
    if missing or unknown:
        raise ValueError(
            f"{where} does not match the model's trainable parameters: missing {missing[:3]}"
            f"{'...' if len(missing) > 3 else ''}, unexpected {unknown[:3]}{'...' if len(unknown) > 3 else ''}"
        )
    for n, shape in shapes.items():
        if tuple(state[n].shape) != tuple(shape):
            raise ValueError(f"{where}: {n} has shape {tuple(state[n].shape)}, the model's part on this rank "
                             f"{tuple(shape)} (was it kept under another world size or sharding?)")


def is_finite_state(state: Mapping[str, torch.Tensor]) -> bool:
    """No NaN or infinity anywhere in the state."""
    return all(bool(torch.isfinite(t).all()) for t in state.values() if t.is_floating_point())


def lora_b_names(names: Sequence[str]) -> list[str]:
    """The LoRA ``B`` factors among ``names``, sorted (the same list on every rank)."""
    return sorted(n for n in names if _LORA_B.search(n))


def path_rules(theta0: Mapping[str, torch.Tensor], nonzero: Mapping[str, bool] | None = None) -> dict[str, PathRule]:
    """How each parameter moves along the path (see the module docs).

    ``nonzero`` says which LoRA ``B`` factors started non-zero, where ``theta0`` holds only a part
    of them (a shard or partition: every rank must pick the same rules); by default the tensors
    in ``theta0`` decide.
    """
    rules: dict[str, PathRule] = {n: "lerp" for n in theta0}
    for n in lora_b_names(list(theta0)):
        partner = _LORA_B.sub(lambda m: m.group(1).replace("_B", "_A"), n)
        started_nonzero = nonzero[n] if nonzero is not None else bool(theta0[n].any())
        if partner in theta0 and not started_nonzero:
            rules[n] = "scale"
            rules[partner] = "keep"
    return rules


def interpolate(
    theta0: Mapping[str, torch.Tensor],
    theta1: Mapping[str, torch.Tensor],
    alpha: float | Mapping[str, float],
    rules: Mapping[str, PathRule] | None = None,
) -> State:
    """The state at ``α`` on the path from ``θ0`` to ``θ1`` (``alpha`` per parameter allowed).

    Computed in float64 and cast back, so ``α = 0`` and ``α = 1`` return ``θ0`` and ``θ1`` exactly.
    """
    rules = rules if rules is not None else path_rules(theta0)
    out: State = {}
    for n, t1 in theta1.items():
        a = float(alpha[n]) if isinstance(alpha, Mapping) else float(alpha)
        t0 = theta0[n]
        rule = rules.get(n, "lerp")
        if not t1.is_floating_point() or rule == "keep" or a == 1.0:
            out[n] = t1.clone()
        elif a == 0.0 and rule == "lerp":
            out[n] = t0.clone()
        elif rule == "scale":
            out[n] = (t1.double() * a).to(t1.dtype)
        else:
            out[n] = (t0.double() + a * (t1.double() - t0.double())).to(t1.dtype)
    return out


def layer_depths(names: Sequence[str]) -> dict[str, float]:
    """Depth in [0, 1] of each parameter: block index / (blocks − 1); embeddings 0; after the last block 1."""
    indices = {n: int(m.group(1)) for n in names if (m := _LAYER_INDEX.search(n))}
    last = max(indices.values(), default=0)
    depths = {}
    for n in names:
        if n in indices:
            depths[n] = indices[n] / last if last > 0 else 1.0
        elif _EMBEDDING.search(n):
            depths[n] = 0.0
        else:
            depths[n] = 1.0
    return depths


def layerwise_alphas(names: Sequence[str], alpha: float) -> dict[str, float]:
    """``α_l = α + (1 − α)·depth_l``: shallow layers move back the most (LiNeS-style)."""
    return {n: alpha + (1.0 - alpha) * d for n, d in layer_depths(names).items()}


def alphas_for(names: Sequence[str], alpha: float, layerwise: bool) -> float | dict[str, float]:
    return layerwise_alphas(names, alpha) if layerwise else alpha


class Slot:
    """One trainable state, held in CPU memory or in a safetensors file of the monitor's own."""

    def __init__(self, path: Path, in_memory: bool) -> None:
        self.path = path
        self.in_memory = in_memory
        self._state: State | None = None
        self.step: int | None = None

    @property
    def filled(self) -> bool:
        return self.step is not None

    def put(self, state: State, step: int) -> None:
        if self.in_memory:
            self._state = state
        else:
            save_state_file(state, self.path)
        self.step = step

    def get(self) -> State:
        if not self.filled:
            raise RuntimeError("rewind: no state kept yet")
        if self.in_memory:
            assert self._state is not None
            return self._state
        return load_state_file(self.path)

    def export(self, path: Path) -> None:
        """Write the state to ``path`` (a hard link when it already lives in a file)."""
        if not self.filled:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        if self.in_memory:
            assert self._state is not None
            save_state_file(self._state, path)
            return
        if path.exists():
            path.unlink()
        try:
            os.link(self.path, path)
        except OSError:
            shutil.copy2(self.path, path)

    def restore(self, path: Path, step: int, check: Callable[[State], None] | None = None) -> None:
        """Keep the state saved at ``path``, after ``check`` (which raises on a bad one) if given."""
        state = load_state_file(path)
        if check is not None:
            check(state)
        self.put(state, step)


def next_alpha(alphas: Sequence[float], chosen: float, min_gap: float = 1 / 64) -> float | None:
    """Where to probe next when refining a path rewind: the midpoint of the wider of the two
    intervals next to ``chosen`` among the ``alphas`` probed so far (0 and 1 included); ``None``
    when both are narrower than ``min_gap``. Pure, so every rank picks the same point.

    Example:
        >>> next_alpha([0.0, 0.25, 0.5, 0.75, 1.0], 0.25)  # at the grid's edge: look below it
        0.125
    """
    points = sorted(set(alphas))
    i = points.index(chosen)
    gaps = []
    if i > 0:
        gaps.append((chosen - points[i - 1], (chosen + points[i - 1]) / 2))
    if i + 1 < len(points):
        gaps.append((points[i + 1] - chosen, (chosen + points[i + 1]) / 2))
    if not gaps:
        return None
    width, mid = max(gaps, key=lambda g: g[0])  # equal widths: the lower side (closer to the pretrained model)
    return mid if width >= min_gap else None
