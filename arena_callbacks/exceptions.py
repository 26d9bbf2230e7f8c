"""Errors raised by arena-callbacks. Messages name the probe, row, field or key at fault."""

from __future__ import annotations

__all__ = ["ArenaError", "BudgetKeyError", "ProbeDataError"]


class ArenaError(Exception):
    """Base class of the library's own errors."""


class ProbeDataError(ArenaError, ValueError):
    """A probe set is empty, has missing or malformed fields, or rows that do not fit."""


class BudgetKeyError(ArenaError, KeyError):
    """A budget names a key the monitor does not measure."""

    def __str__(self) -> str:  # KeyError would quote the whole message
        return str(self.args[0]) if self.args else ""
