"""Per layer, what the finetune changed: the pretrained weight and the finetuned one (or its factors).

LoRA updates keep their factors (:class:`LowRankUpdate`); DoRA, OFT and full finetuning give
the dense finetuned weight (:class:`DenseUpdate`), computed as the layer computes it in eval
mode. See :func:`layer_updates`.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .layers import _is_conv1d, _measurable_layers, _sample
from .metrics import (
    _CPU,
    _F64,
    _WIDE,
    EXACT,
    PretrainedSVD,
    Solver,
    _gathered,
    _host,
    dense_update_metrics,
    lowrank_update_metrics,
)

__all__ = ["DenseUpdate", "LayerUpdate", "LowRankUpdate", "layer_updates", "snapshot_weights"]


@dataclass(frozen=True)
class LowRankUpdate:
    """``W_ft = w0 + scaling · b @ a`` (LoRA; several adapters stacked along the rank)."""

    w0: torch.Tensor
    b: torch.Tensor
    a: torch.Tensor
    scaling: float

    @property
    def w_ft(self) -> torch.Tensor:
        """The dense finetuned weight (materialised: for tests and small layers)."""
        return self.w0 + self.scaling * (self.b @ self.a)

    def metrics(self, *, k: int = 10, eps: float = 0.5, w0_svd: PretrainedSVD | None = None,
                solver: Solver = EXACT) -> dict[str, float]:
        """:func:`lowrank_update_metrics` of this update."""
        return lowrank_update_metrics(self.w0, self.b, self.a, self.scaling, k=k, eps=eps, w0_svd=w0_svd,
                                      solver=solver)


@dataclass(frozen=True)
class DenseUpdate:
    """Pretrained and finetuned weights of one layer, both ``d_out × d_in``."""

    w0: torch.Tensor
    w_ft: torch.Tensor

    def metrics(self, *, k: int = 10, eps: float = 0.5, w0_svd: PretrainedSVD | None = None,
                solver: Solver = EXACT) -> dict[str, float]:
        """:func:`dense_update_metrics` of this update."""
        return dense_update_metrics(self.w0, self.w_ft, k=k, eps=eps, w0_svd=w0_svd, solver=solver)


#: What :func:`layer_updates` yields per layer.
LayerUpdate = LowRankUpdate | DenseUpdate


@torch.no_grad()
def layer_updates(
    model: nn.Module,
    reference: Mapping[str, torch.Tensor] | None = None,
    *,
    names: Sequence[str] | None = None,
) -> Iterator[tuple[str, LayerUpdate]]:
    """What to measure per layer: the pretrained weight and the finetuned one (or its factors).

    Layer names are module names with PEFT's ``base_model.model.`` prefix stripped. Weights are
    ``d_out × d_in`` on the layer's device (GPT-2's ``Conv1D`` weights are transposed): float64
    copies, except a LoRA update's W0, which is the base layer's weight as it is held (not a copy:
    do not modify it); the metrics then work in their solver's precision. Adapters
    count as they compute in eval mode, whether or not they are switched off at the moment:

    * LoRA (``peft.tuners.lora.layer.Linear``), active adapters ``j``:
      ``W_ft = W0 + Σ_j s_j B_j A_j`` → :class:`LowRankUpdate` (factors stacked along the rank).
    * DoRA adapter (``lora_magnitude_vector[j]`` present), as peft's ``DoraLinearLayer.forward``
      in eval mode: ``W ← diag(m_j / ‖W0 + s_j B_j A_j‖_row) (W + s_j B_j A_j)``, row norms
      over the input dimension, applied in adapter order → :class:`DenseUpdate`.
    * OFT (``peft.tuners.oft.layer.Linear``): the input is rotated before the base layer,
      ``x ← x · blockdiag(R_j)``, so ``W_ft = W0 · (Π_j blockdiag(R_j))ᵀ`` with ``R_j`` built
      as ``OFTRotationModule.get_weight`` builds it (COFT projection, truncated Cayley–Neumann
      series or exact Cayley) → :class:`DenseUpdate`.
    * A plain ``nn.Linear`` / ``Conv1D`` named in ``reference``: ``W0 = reference[name]``,
      ``W_ft`` its current weight → :class:`DenseUpdate`.

    Args:
        model: The model, possibly wrapped by PEFT.
        reference: Step-0 weights of plain layers by name (:func:`snapshot_weights`).
        names: Layers to yield, in order; ``None``: every supported adapted layer, then every
            name in ``reference``.

    Yields:
        ``(layer name, update)``.

    Raises:
        ValueError: an unknown name, an adapted layer peft merged or of an unsupported LoRA
            variant, a plain layer missing from ``reference``, or a reference of the wrong shape.
    """
    layers = _measurable_layers(model)
    reference = reference or {}
    if names is None:
        adapted = [n for n, (kind, _) in layers.items() if kind != "linear"]
        names = adapted + [n for n in reference if n not in adapted]
    for name in names:
        if name not in layers:
            raise ValueError(f"layer {name!r} is not a measurable layer of {type(model).__name__}; {_sample(layers)}")
        kind, module = layers[name]
        if kind == "lora":
            yield name, _lora_update(name, module)
        elif kind == "oft":
            yield name, _oft_update(name, module)
        else:
            yield name, _full_update(name, module, reference)


def snapshot_weights(model: nn.Module, names: Sequence[str]) -> dict[str, torch.Tensor]:
    """Step-0 copies of layers' weights on the CPU (``d_out × d_in``, dtype kept), for full finetuning.

    Holds one CPU copy of each named weight. With FSDP2 or ZeRO-3 every rank must call it.

    Raises:
        ValueError: a name that is not a linear layer of the model.
    """
    layers = _measurable_layers(model)
    out: dict[str, torch.Tensor] = {}
    for name in names:
        if name not in layers:
            raise ValueError(f"layer {name!r} is not a measurable layer of {type(model).__name__}; {_sample(layers)}")
        kind, module = layers[name]
        layer = module if kind == "linear" else module.get_base_layer()
        out[name] = _raw_weight(layer, name).to(device=_CPU, copy=True)
    return out


_Step = tuple[torch.Tensor, torch.Tensor, float, "torch.Tensor | None"]  # (B, A, scaling, DoRA factor)


def _lora_update(name: str, module: nn.Module) -> LayerUpdate:
    _check_unmerged(name, module)
    w0_raw = _raw_weight(module.get_base_layer(), name)
    # A LoRA update keeps W0 as the layer holds it (no float64 copy: its metrics never subtract from it).
    w0 = w0_raw
    active = [adapter for adapter in module.active_adapters if adapter in module.lora_A]  # as forward skips
    steps = [_lora_step(name, module, adapter, w0_raw) for adapter in active]
    if not steps:  # no active adapter here: ΔW = 0
        return LowRankUpdate(w0, w0.new_zeros(w0.shape[0], 1), w0.new_zeros(1, w0.shape[1]), 1.0)
    if any(factor is not None for *_, factor in steps):
        return DenseUpdate(_wide(w0), _dora_weight(_wide(w0), steps))
    if len(steps) == 1:
        return LowRankUpdate(w0, *steps[0][:3])
    b = torch.cat([s * b for b, _, s, _ in steps], dim=1)
    return LowRankUpdate(w0, b, torch.cat([a for _, a, _, _ in steps], dim=0), 1.0)


def _lora_step(name: str, module: nn.Module, adapter: str, w0_raw: torch.Tensor) -> _Step:
    """One adapter's factors (float64) and, for DoRA, its row factor ``m / ‖W0 + s·BA‖_row``.

    The norm is computed as peft's ``DoraLinearLayer.get_weight_norm`` does, on the layer's
    device in the adapter's dtype, so that the factor is exactly 1 where peft initialised
    ``m`` to that norm (``B = 0``): a float64 norm would differ from the stored ``m`` by
    rounding and show a spurious update of ~1e-8.
    """
    dora = adapter in module.lora_magnitude_vector
    if not dora and getattr(module, "lora_variant", {}).get(adapter) is not None:
        variant = type(module.lora_variant[adapter]).__name__
        raise ValueError(f"layer {name!r}: LoRA variant {variant} of adapter {adapter!r} is not supported")
    b, a = _gathered(module.lora_B[adapter].weight), _gathered(module.lora_A[adapter].weight)
    scaling = float(module.scaling[adapter])
    factor = None
    if dora:
        norm = torch.linalg.norm(w0_raw.to(a.dtype) + scaling * (b @ a), dim=1)
        factor = _wide(module.lora_magnitude_vector[adapter].weight) / _wide(norm)
    return _wide(b), _wide(a), scaling, factor


def _dora_weight(w0: torch.Tensor, steps: list[_Step]) -> torch.Tensor:
    """The eval-mode weight of a LoRA layer with DoRA adapters, adapters applied in order.

    peft's ``DoraLinearLayer.forward`` adds ``(m/‖W0 + sBA‖ − 1) · base_result + m/‖·‖ · sBA x``
    to the running result, with ``base_result`` that running result less the bias (eval mode
    or no dropout), so ``W ← diag(m/‖·‖) (W + sBA)``; a plain LoRA adapter adds ``sBA``.
    """
    w = w0
    for b, a, s, factor in steps:
        delta = s * (b @ a)
        w = w + delta if factor is None else factor.unsqueeze(1) * (w + delta)
    return w


def _oft_update(name: str, module: nn.Module) -> DenseUpdate:
    _check_unmerged(name, module)
    w0 = _wide(_raw_weight(module.get_base_layer(), name))
    rotation = torch.eye(w0.shape[1], dtype=_F64, device=w0.device)
    for adapter in module.active_adapters:
        if adapter in module.oft_R:
            rotation = rotation @ _oft_block_rotation(module.oft_R[adapter])
    return DenseUpdate(w0, w0 @ rotation.T)


def _oft_block_rotation(rot: nn.Module) -> torch.Tensor:
    """``blockdiag(R)`` of peft's ``OFTRotationModule`` in float64, as its ``get_weight`` builds it."""
    b = rot.block_size
    rows, cols = torch.triu_indices(b, b, 1)
    vec = _wide(rot.weight)
    q = vec.new_zeros(vec.shape[0], b, b)
    q[:, rows, cols] = vec
    q = q - q.mT
    if rot.coft:  # _project_batch: each block's skew matrix clipped to Frobenius norm eps / sqrt(#rows)
        limit = rot.eps / math.sqrt(q.shape[0])
        norm = torch.linalg.matrix_norm(q, keepdim=True)
        q = torch.where(norm <= limit, q, limit * q / norm)
    r = _cayley_neumann(q, rot.num_cayley_neumann_terms) if rot.use_cayley_neumann else _cayley(q)
    n_blocks = rot.in_features // b if rot.block_share else rot.r
    blocks = [r[0]] * n_blocks if r.shape[0] == 1 else list(r[:n_blocks])
    return torch.block_diag(*blocks)


def _cayley_neumann(q: torch.Tensor, terms: int) -> torch.Tensor:
    """peft's truncated series ``I + 2Q + 2Q² + … + 2Q^(t−2) + Q^(t−1)`` (only nearly orthogonal)."""
    r = torch.eye(q.shape[-1], dtype=q.dtype, device=q.device).expand_as(q).clone()
    if terms > 1:
        r = r + 2 * q
        if terms > 2:
            power = q @ q
            r = r + 2 * power
            for _ in range(3, terms - 1):
                power = power @ q
                r = r + 2 * power
            r = r + power @ q
    return r


def _cayley(q: torch.Tensor) -> torch.Tensor:
    """peft's exact branch ``solve(I + Q, I − Q, left=False) = (I − Q)(I + Q)⁻¹`` (orthogonal)."""
    eye = torch.eye(q.shape[-1], dtype=q.dtype, device=q.device).expand_as(q)
    return torch.linalg.solve(eye + q, eye - q, left=False)


def _full_update(name: str, module: nn.Module, reference: Mapping[str, torch.Tensor]) -> DenseUpdate:
    if name not in reference:
        raise ValueError(
            f"layer {name!r} is a plain linear layer: measuring full finetuning needs its step-0 weight "
            "in reference (take it with snapshot_weights before training)"
        )
    w_ft = _wide(_raw_weight(module, name))
    w0 = _wide(reference[name]).to(w_ft.device)
    if w0.shape != w_ft.shape:
        raise ValueError(f"reference[{name!r}] has shape {tuple(w0.shape)}; the layer's weight is {tuple(w_ft.shape)}")
    return DenseUpdate(w0, w_ft)


def _wide(t: torch.Tensor) -> torch.Tensor:
    """Detached float64 copy on the tensor's own device (a sharded one gathered whole first)."""
    return _host(t, _WIDE)


def _check_unmerged(name: str, module: nn.Module) -> None:
    if getattr(module, "merged", False):
        raise ValueError(f"layer {name!r}: its adapter is merged into the base weight; unmerge it to measure it")


def _raw_weight(layer: nn.Module, name: str) -> torch.Tensor:
    """A linear layer's weight as ``d_out × d_in``, detached, on its device, in its dtype."""
    w = _gathered(layer.weight)
    if _is_conv1d(layer):
        w = w.T  # Conv1D stores d_in × d_out and computes x @ W
    if w.ndim != 2:
        raise ValueError(
            f"layer {name!r}: weight has shape {tuple(w.shape)}, not 2-D "
            "(a partitioned parameter of a sharding scheme other than FSDP2 or ZeRO-3? gather it first)"
        )
    return w
