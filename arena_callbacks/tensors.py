"""Named tensor dicts (a model's trainable state, cached activations) on disk and in memory.

Shared by the rewind states, the geometry cache and the checkpoint files, so none of them needs
the others' modules.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch

__all__ = ["load_state_file", "save_state_file", "state_bytes"]


def state_bytes(state: Mapping[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in state.values())


def save_state_file(state: Mapping[str, torch.Tensor], path: str | Path) -> None:
    """Write a state as safetensors (atomically: a temporary file, then a rename)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file({n: t.contiguous() for n, t in state.items()}, str(tmp))
    tmp.replace(path)


def load_state_file(path: str | Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return dict(load_file(str(path), device="cpu"))
