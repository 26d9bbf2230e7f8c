"""The file names of a run, in one place: the monitor writes them, ``load_run``, the report and
post-hoc rewinds read them.

A run's monitor folder (``<trainer output_dir>/arena`` by default) holds ``history.jsonl``,
``summary.json``, ``probes.json`` and, for rewinds kept on disk, ``rewind/``; every trainer
checkpoint holds ``arena_state.json`` and the tensors it refers to.

Example:
    >>> RunLayout.for_output_dir("out").history.as_posix()
    'out/arena/history.jsonl'
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "ADAPTER_FILES", "HISTORY_FILE", "MODEL_FILES", "MONITOR_DIR", "PROBES_FILE", "STATE_FILE", "SUMMARY_FILE",
    "CheckpointFiles", "RunLayout",
]

#: The monitor's default folder inside a trainer ``output_dir``.
MONITOR_DIR = "arena"
HISTORY_FILE = "history.jsonl"
SUMMARY_FILE = "summary.json"
PROBES_FILE = "probes.json"
#: The monitor's state inside each trainer checkpoint.
STATE_FILE = "arena_state.json"
#: Files that make a folder hold a PEFT adapter, or a whole model.
ADAPTER_FILES = ("adapter_model.safetensors", "adapter_model.bin")
MODEL_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")


@dataclass(frozen=True)
class RunLayout:
    """The files of one monitor folder."""

    root: Path

    @classmethod
    def for_output_dir(cls, output_dir: str | Path) -> RunLayout:
        return cls(Path(output_dir) / MONITOR_DIR)

    @property
    def history(self) -> Path:
        return self.root / HISTORY_FILE

    @property
    def summary(self) -> Path:
        return self.root / SUMMARY_FILE

    @property
    def probes(self) -> Path:
        return self.root / PROBES_FILE

    @property
    def generations(self) -> Path:
        """A few answers per generative probe and probe step (:mod:`arena_callbacks.samples`)."""
        return self.root / "generations.jsonl"

    @property
    def rewind_dir(self) -> Path:
        """Kept rewind states with ``rewind.storage`` on disk (``best-rank<r>``, ``theta0-rank<r>``)."""
        return self.root / "rewind"


@dataclass(frozen=True)
class CheckpointFiles:
    """The monitor's files inside one trainer checkpoint folder."""

    folder: Path

    @property
    def state(self) -> Path:
        return self.folder / STATE_FILE

    def kept(self, name: str, rank: int) -> Path:
        """A rank's kept rewind state: ``best`` or ``theta0``."""
        return self.folder / f"arena_{name}-rank{rank}.safetensors"

    @property
    def geometry_reference(self) -> Path:
        return self.folder / "arena_geometry_reference.safetensors"

    @property
    def spectra_reference(self) -> Path:
        return self.folder / "arena_spectra_reference.safetensors"
