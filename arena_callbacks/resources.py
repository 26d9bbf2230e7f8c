"""What a rewind will hold, and whether this rank's host has room for it (checked at train start).

Every rank keeps its own part of each kept state (:mod:`~arena_callbacks.shards`): the best
in-budget state, and for path rewinds the step-0 state too. A rewind then works on a few more
copies of the same size: the current state (path rewinds) and each candidate it loads, and a
kept state read back from disk. All ranks on one node share its host memory, so the need is
counted per node.

Example:
    >>> from arena_callbacks.config import RewindConfig
    >>> plan = rewind_plan(2**30, RewindConfig(mode="path", storage="memory"), Path("."), ranks=8,
    ...                    memory_available=64 * 2**30)
    >>> plan.in_memory, plan.memory_bytes // 2**30   # 8 ranks x (2 kept + 2 working) x 1 GiB
    (True, 32)
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from .config import RewindConfig

__all__ = ["RewindPlan", "disk_free", "host_memory_available", "ranks_per_node", "rewind_plan"]

GiB = 2**30


@dataclass(frozen=True)
class RewindPlan:
    """Where kept states live and what they take on one node.

    Attributes:
        state_bytes: One copy of this rank's part of the trainable parameters.
        kept: States kept for the whole run (best, plus step-0 for path rewinds).
        working: Extra copies alive during a rewind.
        in_memory: Kept states in CPU memory (else in files under the rewind folder).
        memory_bytes: Host memory the node's ranks need at the peak of a rewind.
        disk_bytes: Disk the node's ranks need for kept states (0 in memory).
        problem: Why it does not fit, with the numbers; ``None`` when it does.
    """

    state_bytes: int
    kept: int
    working: int
    in_memory: bool
    memory_bytes: int
    disk_bytes: int
    problem: str | None = None


def ranks_per_node(world_size: int) -> int:
    """Processes sharing this host: ``LOCAL_WORLD_SIZE`` (torchrun, accelerate), else the world size."""
    try:
        return max(1, int(os.environ["LOCAL_WORLD_SIZE"]))
    except (KeyError, ValueError):
        return max(1, world_size)


def host_memory_available() -> int | None:
    """Bytes of host memory a new allocation can take now: ``MemAvailable``, capped by the cgroup's
    limit where one is set (containers); ``None`` where neither can be read."""
    available = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                available = int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            used = int(Path("/sys/fs/cgroup/memory.current").read_text().strip())
            room = max(0, int(limit) - used)
            available = room if available is None else min(available, room)
    except (OSError, ValueError):
        pass
    return available


def disk_free(folder: Path) -> int | None:
    """Free bytes on the filesystem that holds (or will hold) ``folder``."""
    path = Path(folder).resolve()
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


def _gib(n: float) -> str:
    return f"{n / GiB:.2f} GiB"


def rewind_plan(
    state_bytes: int, cfg: RewindConfig, folder: Path, ranks: int = 1,
    memory_available: int | None = None, disk_available: int | None = None,
) -> RewindPlan:
    """Decide where kept states go and check that the node has room (``None`` availability: read it).

    ``storage: auto`` keeps them in memory when one copy is at most ``max_memory_mb`` and the
    node's memory holds them, else on disk.
    """
    path_mode = cfg.mode in ("path", "layerwise")
    kept = 2 if path_mode else 1
    memory = host_memory_available() if memory_available is None else memory_available
    disk = disk_free(folder) if disk_available is None else disk_available

    def working(in_memory: bool) -> int:
        # path: the current state and a candidate; checkpoint: the state a later offer captures.
        # Kept states read back from files are one more copy each at the peak.
        return (2 if path_mode else 1) + (0 if in_memory else kept)

    def need(in_memory: bool) -> int:
        return ranks * state_bytes * (working(in_memory) + (kept if in_memory else 0))

    fits = memory is None or need(True) <= memory
    in_memory = cfg.storage == "memory" or (
        cfg.storage == "auto" and state_bytes <= cfg.max_memory_mb * 2**20 and fits
    )
    memory_bytes = need(in_memory)
    disk_bytes = 0 if in_memory else ranks * kept * state_bytes
    counts = (f"{ranks} rank(s) on this node x ({kept if in_memory else 0} kept + {working(in_memory)} working "
              f"copies) x {_gib(state_bytes)} of trainable state per rank")
    problem = None
    if memory is not None and memory_bytes > memory:
        fix = ("set rewind.storage: disk (kept states in files)" if in_memory else
               "shard the trainable state over more ranks (FSDP, ZeRO-3)")
        problem = (f"budgets: action 'rewind' needs {_gib(memory_bytes)} of host memory ({counts}), and "
                   f"{_gib(memory)} is available; {fix}, use rewind.mode 'checkpoint' (fewer copies), or use action "
                   "'stop' and rewind afterwards with `arena-callbacks rewind <output_dir>`")
    elif disk is not None and disk_bytes > disk:
        problem = (f"budgets: action 'rewind' needs {_gib(disk_bytes)} of disk in {folder} ({ranks} rank(s) x {kept} "
                   f"kept states x {_gib(state_bytes)}), and {_gib(disk)} is free; free space there, set "
                   "logging.output_dir elsewhere, or use action 'stop'")
    return RewindPlan(state_bytes, kept, working(in_memory), in_memory, memory_bytes, disk_bytes, problem)
