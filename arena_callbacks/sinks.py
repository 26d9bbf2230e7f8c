"""Where the monitor's records go: one small interface, three outputs.

A :class:`Sink` receives each record (a snapshot, with the budget decision taken on it), short
texts (a rewind's message) and loose scalars (the cadence's interval). The engine sends
everything to every sink in order; a sink that cannot write warns and goes on, it never stops
training. The outputs: :class:`HistorySink` (``history.jsonl`` and the history in memory),
:class:`arena_callbacks.tensorboard.TensorBoardSink` (the monitor's own event file), and a
:class:`LogSink` around a training loop's own logger (for a Hugging Face ``Trainer``: its
``log``, so every ``report_to`` backend gets the scalars).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

from .budget import Decision
from .history import History
from .measurements import Snapshot

__all__ = ["HistorySink", "LogSink", "Sink"]


class Sink:
    """An output of the monitor; every method does nothing unless a subclass says otherwise."""

    def record(self, snapshot: Snapshot, decision: Decision | None, history: Sequence[Snapshot]) -> None:
        """One record; ``history`` holds every record so far, this one last."""

    def text(self, tag: str, message: str, step: int) -> None:
        """A message worth keeping beside the curves (``arena/rewinds``)."""

    def scalars(self, values: Mapping[str, float], step: int) -> None:
        """Scalars that are not part of a record (the cadence's interval, a rewind's α)."""

    def close(self) -> None:
        """Training ended."""


class HistorySink(Sink):
    """Appends each record to the :class:`~arena_callbacks.history.History` (memory and ``history.jsonl``)."""

    def __init__(self, history: History) -> None:
        self.history = history

    def record(self, snapshot: Snapshot, decision: Decision | None, history: Sequence[Snapshot]) -> None:
        self.history.append(snapshot, decision)


class LogSink(Sink):
    """Passes each record's metrics to ``log(metrics, step)``: a training loop's own logger."""

    def __init__(self, log: Callable[[dict[str, float], int], None]) -> None:
        self.log = log

    def record(self, snapshot: Snapshot, decision: Decision | None, history: Sequence[Snapshot]) -> None:
        self.log(dict(snapshot.metrics), snapshot.step)
