"""The few collective operations the monitor needs, safe to call without a process group.

Every rank takes part in every call (no rank-0-only collectives), so a probe pass cannot
leave other ranks waiting.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = ["DistContext", "current_context"]


@dataclass(frozen=True)
class DistContext:
    """Rank, world size and the device collectives must use (CUDA for NCCL, else CPU)."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1

    def all_reduce_sum(self, values: torch.Tensor) -> torch.Tensor:
        """Sum a float64 tensor over ranks; returns it on the CPU."""
        if not self.active:
            return values.detach().to("cpu", torch.float64)
        t = values.detach().to(self.device, torch.float64).clone()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t.cpu()

    def all_reduce_max(self, value: int) -> int:
        """Largest integer over ranks."""
        if not self.active:
            return int(value)
        t = torch.tensor([value], dtype=torch.int64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return int(t.item())

    def max_floats(self, values: list[float]) -> list[float]:
        """Element-wise largest values over ranks (float64)."""
        if not self.active:
            return [float(v) for v in values]
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return [float(v) for v in t.cpu()]

    def all_gather_rows(self, rows: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Concatenate every rank's ``rows`` (n_r × d, float) and ``ids`` (n_r); CPU results.

        Ranks may hold different numbers of rows (a rank with none passes a 0 × 0 tensor).
        """
        if not self.active:
            return rows, ids
        meta = torch.zeros(2 * self.world_size, dtype=torch.float64)
        meta[2 * self.rank] = rows.shape[0]
        meta[2 * self.rank + 1] = rows.shape[1] if rows.ndim == 2 else 0
        meta = self.all_reduce_sum(meta).long()
        counts, dim = meta[0::2].tolist(), int(meta[1::2].max())
        biggest = max(counts)
        buf = torch.zeros(biggest, dim + 1, dtype=torch.float32, device=self.device)
        if rows.shape[0]:
            buf[: rows.shape[0], :dim] = rows.to(self.device, torch.float32)
            buf[: rows.shape[0], dim] = ids.to(self.device, torch.float32)
        parts = [torch.empty_like(buf) for _ in range(self.world_size)]
        dist.all_gather(parts, buf)
        full = torch.cat([p[:c] for p, c in zip(parts, counts)]).cpu()
        return full[:, :dim], full[:, dim].round().long()

    def any(self, flag: bool) -> bool:
        """True on every rank if it is true on any rank."""
        return bool(self.all_reduce_max(int(bool(flag))))


def current_context() -> DistContext:
    """The context of the running process group, or a single-process one."""
    if not (dist.is_available() and dist.is_initialized()):
        return DistContext()
    backend = str(dist.get_backend()).lower()
    if "nccl" in backend and torch.cuda.is_available():
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        device = torch.device("cpu")
    return DistContext(rank=dist.get_rank(), world_size=dist.get_world_size(), device=device)
