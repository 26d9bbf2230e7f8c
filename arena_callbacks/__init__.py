"""arena-callbacks: watch a finetune for catastrophic forgetting while it runs, and act on it."""

from .budget import BudgetOutcome, Decision, Reason, evaluate_budgets
from .callback import ForgettingMonitor
from .config import (
    Action,
    BudgetConfig,
    CadenceConfig,
    GeometryConfig,
    LoggingConfig,
    MonitorConfig,
    OperatingPointConfig,
    ProbeSettings,
    RewindConfig,
    SpectraConfig,
)
from .exceptions import ArenaError, BudgetKeyError, ProbeDataError
from .history import read_history
from .measurements import Snapshot
from .monitor_file import MonitorFileError, load_monitor_file
from .probes import Probe, ProbeFailure, ProbeResult, ProbeRunner, ProbeSet
from .runs import Run, load_run

__version__ = "0.1.0"

__all__ = [
    "Action",
    "ArenaError",
    "BudgetConfig",
    "BudgetKeyError",
    "BudgetOutcome",
    "CadenceConfig",
    "Decision",
    "ForgettingMonitor",
    "GeometryConfig",
    "LoggingConfig",
    "MonitorConfig",
    "MonitorFileError",
    "OperatingPointConfig",
    "Probe",
    "ProbeDataError",
    "ProbeFailure",
    "ProbeResult",
    "ProbeRunner",
    "ProbeSet",
    "ProbeSettings",
    "Reason",
    "RewindConfig",
    "Run",
    "Snapshot",
    "SpectraConfig",
    "__version__",
    "evaluate_budgets",
    "load_monitor_file",
    "load_run",
    "read_history",
]
