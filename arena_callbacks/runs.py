"""A saved run read back from disk: its snapshots, decisions, summary and config.

Example:
    >>> run = load_run("out")                     # doctest: +SKIP
    >>> run.metrics_frame()[["step", "sp/stability"]]  # doctest: +SKIP
"""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .config import MonitorConfig
from .exceptions import ArenaError
from .layout import ADAPTER_FILES, HISTORY_FILE, MODEL_FILES, MONITOR_DIR, SUMMARY_FILE, RunLayout
from .measurements import Snapshot, current_records

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

    from .sp import SPPoint

__all__ = ["ADAPTER_FILES", "MODEL_FILES", "MONITOR_DIR", "SUMMARY_FILE", "Run", "RunNotFoundError", "has_weights",
           "load_run"]

logger = logging.getLogger(__name__)

#: The monitor's default folder inside a trainer ``output_dir``.

#: Files of a saved adapter (``PeftModel.save_pretrained``) and of a saved full model.

_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


def has_weights(path: Path) -> bool:
    """``path`` holds a saved adapter or model (:data:`ADAPTER_FILES`, :data:`MODEL_FILES`)."""
    return any((path / f).is_file() for f in (*ADAPTER_FILES, *MODEL_FILES))


class RunNotFoundError(ArenaError, FileNotFoundError):
    """A folder given as a run holds no ``history.jsonl`` (nor ``arena/history.jsonl``)."""


@dataclass
class Run:
    """One saved monitor run.

    Attributes:
        name: Label (the trainer output folder's name by default).
        path: The monitor folder holding ``history.jsonl`` (and ``summary.json`` once training ended).
        snapshots: Every record of ``history.jsonl`` in order, the baseline first; ``extra`` holds
            no ``decision``. After a rewind a step has two records, the breach and then the state
            the rewind loaded (``trigger == "rewind"``); :meth:`current_snapshots`, :meth:`points`,
            :attr:`final` and :meth:`operating_record` count only the latter
            (:func:`arena_callbacks.measurements.current_records`).
        summary: ``summary.json`` as a dict (``{}`` when the run has not ended).
        config: The monitor config rebuilt from ``summary["config"]``, else the default.
        decisions: One dict per snapshot, aligned with ``snapshots`` (``{}`` for the baseline
            or where none was recorded), as written by the monitor.
        output_dir: The trainer output folder, searched for ``checkpoint-<step>`` folders and a saved
            model (:meth:`saved_model`).
        trainable_parameters: ``summary["trainable_parameters"]`` when present, else ``None``.
    """

    name: str
    path: Path
    snapshots: list[Snapshot]
    summary: dict[str, Any] = field(default_factory=dict)
    config: MonitorConfig = field(default_factory=MonitorConfig)
    decisions: list[dict[str, Any]] = field(default_factory=list)
    output_dir: Path | None = None
    trainable_parameters: int | None = None

    @property
    def layout(self) -> RunLayout:
        """The run folder's files (``history.jsonl``, ``summary.json``, ``probes.json``...)."""
        return RunLayout(self.path)

    # ------------------------------------------------------------------ frames
    def metrics_frame(self) -> pd.DataFrame:
        """One row per probe step: ``step``, ``epoch``, ``trigger`` and every metric key (NaN where absent)."""
        import pandas as pd

        keys = sorted({k for s in self.snapshots for k in s.metrics})
        rows = [
            {"step": s.step, "epoch": s.epoch, "trigger": s.trigger, **{k: s.metrics.get(k, math.nan) for k in keys}}
            for s in self.snapshots
        ]
        return pd.DataFrame(rows, columns=["step", "epoch", "trigger", *keys])

    def fired(self) -> list[dict[str, Any]]:
        """Every budget outcome that fired an action: step, action, reason, message, budget, key, value."""
        rows = []
        for snap, dec in zip(self.snapshots, self.decisions):
            for o in dec.get("outcomes", []) or []:
                if o.get("action") is None:
                    continue
                rows.append(
                    {
                        "step": snap.step,
                        "action": o["action"],
                        "reason": o.get("reason"),
                        "message": o.get("message", ""),
                        "budget": o.get("budget"),
                        "key": o.get("key"),
                        "value": _float(o.get("value")),
                    }
                )
        return rows

    def decisions_frame(self) -> pd.DataFrame:
        """:meth:`fired` as a DataFrame (columns step, action, reason, message, budget, key, value)."""
        import pandas as pd

        return pd.DataFrame(self.fired(), columns=["step", "action", "reason", "message", "budget", "key", "value"])

    def breaches(self) -> list[dict[str, Any]]:
        """Every budget outcome in breach (fired or pending), with its step."""
        out = []
        for snap, dec in zip(self.snapshots, self.decisions):
            for o in dec.get("outcomes", []) or []:
                if o.get("in_breach"):
                    out.append(
                        {"step": snap.step, **o, "value": _float(o.get("value")), "baseline": _float(o.get("baseline"))}
                    )
        return out

    # ------------------------------------------------------------------ rewinds
    def current_snapshots(self) -> list[Snapshot]:
        """The snapshots less the records a rewind superseded
        (:func:`~arena_callbacks.measurements.current_records`)."""
        return current_records(self.snapshots)

    def rewinds(self) -> list[dict[str, Any]]:
        """One dict per rewind record, in order: ``step`` and the record's ``extra["rewind"]``
        (``number``, ``mode``, ``alpha`` or ``restored_step``, ``before``, ``after``, ``then``, ...)."""
        return [{**s.extra.get("rewind", {}), "step": s.step} for s in self.snapshots if s.trigger == "rewind"]

    # ------------------------------------------------------------------ sp plane
    def points(self, include_superseded: bool = False) -> list[SPPoint]:
        """The run's stability-plasticity trajectory (:func:`arena_callbacks.sp.trajectory`) over its
        current records; ``include_superseded=True``: over every record, breaches before a rewind too."""
        from .sp import trajectory

        return list(trajectory(self.snapshots if include_superseded else self.current_snapshots()))

    def operating_record(self) -> Snapshot | None:
        """The current record the ``operating_point`` rule picks (``None`` without a finite (P, S)).

        After a rewind this is the record of the state it loaded, never the breach before it.
        """
        from .sp import operating_point, trajectory

        pairs = [(s, p) for s in self.current_snapshots() for p in trajectory([s])]
        op = operating_point([p for _, p in pairs], self.config.operating_point)
        return next((s for s, p in pairs if p is op), None)

    # ------------------------------------------------------------------ misc
    @property
    def baseline(self) -> Snapshot | None:
        return self.snapshots[0] if self.snapshots else None

    @property
    def final(self) -> Snapshot | None:
        """The last current record: after a rewind and stop, the state the rewind loaded."""
        current = self.current_snapshots()
        return current[-1] if current else None

    @property
    def stop_step(self) -> int | None:
        """Where training was stopped: ``summary["stop_step"]``, else the first ``stop`` decision or
        ``rewind`` decision that stopped (a rewind that went on training is not one)."""
        if self.summary.get("stop_step") is not None:
            return int(self.summary["stop_step"])
        for i, (snap, dec) in enumerate(zip(self.snapshots, self.decisions)):
            if dec.get("action") in ("stop", "rewind") and not self._continued(i):
                return snap.step
        return None

    @property
    def stop_message(self) -> str | None:
        if self.summary.get("stop_message"):
            return str(self.summary["stop_message"])
        for i, dec in enumerate(self.decisions):
            if dec.get("action") in ("stop", "rewind") and not self._continued(i):
                return str(dec.get("message") or "")
        return None

    def _continued(self, i: int) -> bool:
        """The record after decision ``i`` is a rewind that went on training (not a stop)."""
        nxt = self.snapshots[i + 1] if i + 1 < len(self.snapshots) else None
        return nxt is not None and nxt.trigger == "rewind" and nxt.extra.get("rewind", {}).get("then") == "continue"

    def checkpoints(self) -> list[tuple[int, Path]]:
        """``checkpoint-<step>`` folders in the trainer output folder, by step."""
        if self.output_dir is None or not self.output_dir.is_dir():
            return []
        found = []
        for p in self.output_dir.iterdir():
            m = _CHECKPOINT.match(p.name)
            if m and p.is_dir():
                found.append((int(m.group(1)), p))
        return sorted(found)

    def base_model(self, folder: Path | None = None) -> str | None:
        """The pretrained model: ``base_model_name_or_path`` of ``folder``'s ``adapter_config.json``
        when there is one, else ``summary["base_model"]``, else ``None``."""
        cfg = folder / "adapter_config.json" if folder is not None else None
        if cfg is not None and cfg.is_file():
            try:
                name = json.loads(cfg.read_text(encoding="utf-8")).get("base_model_name_or_path")
            except ValueError:
                name = None
            if name:
                return str(name)
        return str(self.summary["base_model"]) if self.summary.get("base_model") else None

    def saved_model(self) -> Path | None:
        """The trainer output folder when it holds a saved adapter or model (``trainer.save_model``)."""
        return self.output_dir if self.output_dir is not None and has_weights(self.output_dir) else None


def _float(v: Any) -> float:
    if v is None:
        return math.nan
    try:
        return float(v)  # "nan"/"inf" strings as written for non-finite values
    except (TypeError, ValueError):
        return math.nan


def _monitor_dir(path: Path) -> tuple[Path, Path]:
    """(monitor folder, trainer output folder) for a path given by the user."""
    if path.is_file() and path.name == HISTORY_FILE:
        return path.parent, path.parent.parent
    if (path / HISTORY_FILE).is_file():
        return path, path.parent
    if (path / MONITOR_DIR / HISTORY_FILE).is_file():
        return path / MONITOR_DIR, path
    if not path.exists():
        raise RunNotFoundError(f"run folder not found: {path}")
    raise RunNotFoundError(
        f"no {HISTORY_FILE} in {path} (looked for {path / HISTORY_FILE} and {path / MONITOR_DIR / HISTORY_FILE})"
    )


def load_run(path: str | Path, name: str | None = None) -> Run:
    """Read a run from its monitor folder, or a trainer ``output_dir`` holding ``arena/``.

    Raises:
        RunNotFoundError: no ``history.jsonl`` there.
    """
    given = Path(path)
    mdir, odir = _monitor_dir(given)
    layout = RunLayout(mdir)
    snapshots: list[Snapshot] = []
    decisions: list[dict[str, Any]] = []
    lines = [(i, ln) for i, ln in enumerate(layout.history.read_text(encoding="utf-8").splitlines(), 1) if ln.strip()]
    for n, (i, line) in enumerate(lines):
        try:
            snap = Snapshot.from_json(json.loads(line))
        except (ValueError, KeyError, TypeError) as e:
            if n == len(lines) - 1:  # a last line cut short by a crash mid-write
                logger.warning("arena-callbacks: skipping unreadable last line %d of %s (%s)", i, layout.history, e)
                continue
            raise ArenaError(f"{layout.history}, line {i}: not a snapshot record ({e})") from e
        extra = dict(snap.extra)
        decisions.append(extra.pop("decision", None) or {})
        snapshots.append(Snapshot(snap.step, snap.metrics, snap.epoch, snap.trigger, extra))

    summary: dict[str, Any] = {}
    if layout.summary.is_file():
        try:
            summary = json.loads(layout.summary.read_text(encoding="utf-8"))
        except ValueError as e:
            logger.warning("arena-callbacks: could not read %s (%s)", layout.summary, e)
    config = MonitorConfig()
    if isinstance(summary.get("config"), dict):
        try:
            config = MonitorConfig.model_validate(summary["config"])
        except ValueError as e:
            logger.warning("arena-callbacks: config in %s not understood (%s); using defaults", layout.summary, e)
    tp = summary.get("trainable_parameters")
    run_name = name or (mdir.parent.name if mdir.name == MONITOR_DIR and mdir.parent.name else mdir.name)
    return Run(
        name=run_name,
        path=mdir,
        snapshots=snapshots,
        summary=summary,
        config=config,
        decisions=decisions,
        output_dir=odir,
        trainable_parameters=int(tp) if isinstance(tp, (int, float)) else None,
    )
