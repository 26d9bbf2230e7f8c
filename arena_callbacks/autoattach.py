"""Zero-code attach: the monitor added to every ``transformers.Trainer`` a command builds.

``ARENA_CALLBACKS_CONFIG=monitor.yaml <command>`` (or ``arena-callbacks run --config
monitor.yaml -- <command>``) runs any Trainer-based program (``trl sft``, a script, a launcher
that starts child processes) with a :class:`~arena_callbacks.ForgettingMonitor` built from the
file (:mod:`arena_callbacks.monitor_file`) in each ``Trainer``.

How: a one-line ``.pth`` file in the environment's ``site-packages``
(``arena-callbacks hook install``; ``arena-callbacks run`` installs it when missing) runs at
every interpreter start, child processes included, and does nothing unless the variable is set.
With it set, :func:`install` checks the file at once (a bad config fails the command at start,
with the message) and wraps ``Trainer.__init__`` when ``transformers.trainer`` is imported: after
the trainer is built, the monitor is added unless one is there already (a script that passed its
own ``ForgettingMonitor`` keeps it). ``sitecustomize`` is left alone.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import logging
import os
import sys
import sysconfig
from pathlib import Path
from typing import Any

__all__ = ["ENV", "PTH_FILE", "attach", "hook_path", "install", "install_hook", "uninstall_hook"]

logger = logging.getLogger("arena_callbacks")

#: The variable naming the monitor file.
ENV = "ARENA_CALLBACKS_CONFIG"
PTH_FILE = "arena_callbacks_autoattach.pth"
_PTH_LINE = (
    "import os; exec('import arena_callbacks.autoattach as _a; _a.install()') "
    f"if os.environ.get({ENV!r}) else None\n"
)
_MODULE = "transformers.trainer"
_WRAPPED = "__arena_callbacks_wrapped__"


def hook_path(site_packages: str | Path | None = None) -> Path:
    """Where the ``.pth`` file goes: this environment's ``site-packages`` unless given."""
    return Path(site_packages or sysconfig.get_paths()["purelib"]) / PTH_FILE


def install_hook(site_packages: str | Path | None = None) -> Path:
    """Write the ``.pth`` file (idempotent); inert while :data:`ENV` is unset."""
    path = hook_path(site_packages)
    if not path.is_file() or path.read_text(encoding="utf-8") != _PTH_LINE:
        path.write_text(_PTH_LINE, encoding="utf-8")
    return path


def uninstall_hook(site_packages: str | Path | None = None) -> bool:
    """Remove the ``.pth`` file; returns whether there was one."""
    path = hook_path(site_packages)
    if path.is_file():
        path.unlink()
        return True
    return False


def install(config: str | Path | None = None) -> None:
    """Check the monitor file named by :data:`ENV` (or ``config``) and wrap ``Trainer.__init__``.

    A file that cannot be used ends the process with its message (exit status 2), before any
    training starts.
    """
    path = Path(config or os.environ[ENV]).expanduser().resolve()
    from .monitor_file import MonitorFileError, load_monitor_file

    try:
        load_monitor_file(path)
    except MonitorFileError as e:
        # Raising here would surface as "Fatal Python error: init_import_site" with a traceback:
        # say what is wrong and leave at once, before the command runs.
        print(f"arena-callbacks: {ENV}: {e}", file=sys.stderr, flush=True)
        os._exit(2)
    os.environ[ENV] = str(path)  # child processes resolve the same file, whatever their folder
    module = sys.modules.get(_MODULE)
    if module is not None:
        _wrap(module)
    elif not any(isinstance(f, _TrainerFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _TrainerFinder())


def attach(trainer: Any, config: str | Path | None = None) -> Any:
    """Add a monitor built from the file to ``trainer``, unless it has one; returns the monitor."""
    from .callback import ForgettingMonitor

    own = [cb for cb in trainer.callback_handler.callbacks if isinstance(cb, ForgettingMonitor)]
    if own:
        for monitor in own:
            if monitor._trainer is None:
                monitor.attach(trainer)
        return own[0]
    path = config or os.environ[ENV]
    monitor = ForgettingMonitor.from_config(path, tokenizer=_tokenizer(trainer.processing_class), trainer=trainer)
    trainer.add_callback(monitor)
    logger.info("arena-callbacks: monitor from %s attached to %s", path, type(trainer).__name__)
    return monitor


def _tokenizer(processing_class: Any) -> Any:
    """A processor's tokenizer, or the tokenizer itself."""
    return getattr(processing_class, "tokenizer", processing_class)


def _wrap(module: Any) -> None:
    trainer_cls = module.Trainer
    if getattr(trainer_cls.__init__, _WRAPPED, False):
        return
    original = trainer_cls.__init__

    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        attach(self)

    setattr(__init__, _WRAPPED, True)
    __init__.__wrapped__ = original  # type: ignore[attr-defined]
    trainer_cls.__init__ = __init__


class _TrainerFinder(importlib.abc.MetaPathFinder):
    """Wraps ``Trainer.__init__`` right after ``transformers.trainer`` is executed."""

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        if fullname != _MODULE:
            return None
        sys.meta_path.remove(self)  # find the real spec with the other finders
        try:
            spec = importlib.util.find_spec(fullname)
        finally:
            sys.meta_path.insert(0, self)
        if spec is None or spec.loader is None:
            return spec
        loader = spec.loader
        exec_module = loader.exec_module

        def exec_and_wrap(module: Any) -> None:
            exec_module(module)
            _wrap(module)

        loader.exec_module = exec_and_wrap  # type: ignore[method-assign]
        return spec
