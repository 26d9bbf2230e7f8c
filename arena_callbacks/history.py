"""The run's measurement history: in memory, and as JSON lines on rank 0."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .budget import Decision
from .layout import HISTORY_FILE
from .measurements import Snapshot

__all__ = ["HISTORY_FILE", "History", "read_history"]

logger = logging.getLogger(__name__)



class History:
    """Snapshots in order (the first is the baseline), appended to ``history.jsonl``.

    A failed write is reported once and never interrupts training.
    """

    def __init__(self, path: Path | None = None) -> None:
        self.snapshots: list[Snapshot] = []
        self.decisions: list[dict[str, Any]] = []
        self.path = path
        self._write_failed = False

    def __len__(self) -> int:
        return len(self.snapshots)

    def __iter__(self) -> Iterator[Snapshot]:
        return iter(self.snapshots)

    @property
    def baseline(self) -> Snapshot | None:
        return self.snapshots[0] if self.snapshots else None

    def start_file(self, fresh: bool = True) -> None:
        """Create the output folder; start an empty file, or keep an existing one (``fresh=False``)."""
        if self.path is None:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if fresh or not self.path.exists():
                self.path.write_text("", encoding="utf-8")
        except OSError as e:
            self._report(e)

    def restore(self, records: list[dict[str, Any]]) -> None:
        """Replace the history by saved records (snapshot JSON with its ``decision``) and rewrite the file."""
        self.snapshots, self.decisions = [], []
        for r in records:
            r = dict(r)
            decision = r.pop("decision", None)
            self.snapshots.append(Snapshot.from_json(r))
            self.decisions.append(decision or {})
        if self.path is None:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_name(self.path.name + ".tmp")
            with tmp.open("w", encoding="utf-8") as f:
                for snap, dec in zip(self.snapshots, self.decisions):
                    record = snap.to_json()
                    if dec:
                        record["decision"] = dec
                    f.write(json.dumps(record, ensure_ascii=False) + "\n")
            tmp.replace(self.path)
        except OSError as e:
            self._report(e)

    def append(self, snapshot: Snapshot, decision: Decision | None) -> None:
        self.snapshots.append(snapshot)
        record = snapshot.to_json()
        if decision is not None:
            record["decision"] = decision.to_json()
        self.decisions.append(record.get("decision", {}))
        if self.path is None or self._write_failed:
            return
        try:
            with self.path.open("a", encoding="utf-8") as f:
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
        except OSError as e:
            self._report(e)

    def _report(self, error: OSError) -> None:
        self._write_failed = True
        logger.warning("arena-callbacks: could not write %s (%s); history stays in memory only", self.path, error)


def read_history(path: str | Path) -> list[Snapshot]:
    """Snapshots from a ``history.jsonl`` file or a folder holding one."""
    path = Path(path)
    if path.is_dir():
        path = path / HISTORY_FILE
    snaps = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            snaps.append(Snapshot.from_json(json.loads(line)))
    return snaps
