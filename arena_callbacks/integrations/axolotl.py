"""Axolotl plugin: the forgetting monitor in an ``axolotl train`` run, configured in its YAML.

In the Axolotl config (see docs/axolotl.md)::

    plugins:
      - arena_callbacks.integrations.axolotl.ArenaPlugin
    arena_config: monitor.yaml        # a monitor file (paths relative to the Axolotl config's folder)
    # or, instead, the same content inline:
    # arena: {cadence: {every_n_steps: 50}, probes: {general: data/general.jsonl}}

The keys are checked when Axolotl registers the plugin, before the model is loaded: a missing
or invalid monitor file, a probe file that does not exist, an unknown key inside ``arena:`` and
a misspelt top-level key (``arena_confg:``, which Axolotl itself would drop without a word) each
stop the command with a message naming the key. After the trainer is built the plugin adds a
:class:`~arena_callbacks.ForgettingMonitor` with the trainer's tokenizer, unless the trainer has
one already (``ARENA_CALLBACKS_CONFIG`` set as well: :mod:`arena_callbacks.autoattach`).

Importing this module needs Axolotl only for :class:`ArenaPlugin`'s base class; without Axolotl
the class is still defined (on ``object``) so that the module can be read and documented.
"""

from __future__ import annotations

import difflib
import logging
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from ..monitor_file import MonitorFileError, build_from_file

try:
    from axolotl.integrations.base import BasePlugin
except ImportError:  # documentation builds, or `import arena_callbacks.integrations.axolotl` without Axolotl
    BasePlugin = object  # type: ignore[assignment,misc]

__all__ = ["ArenaArgs", "ArenaPlugin", "ArenaPluginError", "KEYS"]

logger = logging.getLogger("arena_callbacks")

#: The top-level keys the plugin adds to an Axolotl config.
KEYS = ("arena_config", "arena")


class ArenaPluginError(MonitorFileError):
    """The plugin's keys in the Axolotl config cannot be used; the message names the key."""


class ArenaArgs(BaseModel):
    """The plugin's keys, merged by Axolotl into its own config schema (``get_input_args``)."""

    arena_config: str | None = None
    arena: dict[str, Any] | None = None


class ArenaPlugin(BasePlugin):
    """``plugins: [arena_callbacks.integrations.axolotl.ArenaPlugin]``: see the module docstring."""

    def __init__(self) -> None:
        super().__init__()
        self.source: Path | None = None  # the monitor file, or the Axolotl config holding ``arena:``
        self.inline: dict[str, Any] | None = None

    def get_input_args(self) -> str:
        return f"{__name__}.ArenaArgs"

    def register(self, cfg: dict) -> None:
        """Check the plugin's keys in the raw config, before Axolotl validates and drops unknown ones."""
        self.source, self.inline = check_config(cfg)

    def add_callbacks_post_trainer(self, cfg: Any, trainer: Any) -> list:
        from ..autoattach import _tokenizer
        from ..callback import ForgettingMonitor

        if any(isinstance(cb, ForgettingMonitor) for cb in trainer.callback_handler.callbacks):
            logger.warning("arena-callbacks: the trainer has a ForgettingMonitor already (%s set?); "
                           "the plugin adds none", "ARENA_CALLBACKS_CONFIG")
            return []
        if self.source is None:  # register() not called (a tool driving the plugin by hand)
            self.source, self.inline = check_config(cfg)
        tokenizer = _tokenizer(trainer.processing_class)
        try:
            monitor = ForgettingMonitor.from_config(self.source, tokenizer=tokenizer, trainer=trainer, data=self.inline)
        except MonitorFileError as e:
            raise ArenaPluginError(_where(e, self.source, self.inline)) from None
        logger.info("arena-callbacks: monitor from %s added by the Axolotl plugin", self.source)
        return [monitor]


def check_config(cfg: Any) -> tuple[Path, dict[str, Any] | None]:
    """Validate the plugin's keys of an Axolotl config (a mapping); returns ``(source, inline)``:
    the monitor file, or the Axolotl config file with the inline ``arena:`` content.

    Raises:
        ArenaPluginError: a misspelt key, neither or both keys, or a monitor that cannot be used
            (a file, a setting, a probe source or a budget key).
    """
    config_path = cfg.get("axolotl_config_path")
    folder = Path(config_path).resolve().parent if config_path else Path.cwd()
    where = config_path or "axolotl config"
    unknown = [str(k) for k in cfg if k not in KEYS and _looks_like_ours(str(k))]
    if unknown:
        raise ArenaPluginError(f"{where}: unknown key {unknown[0]!r} for the arena plugin; valid keys: {list(KEYS)}")
    given = [k for k in KEYS if cfg.get(k) is not None]
    if len(given) != 1:
        raise ArenaPluginError(f"{where}: the arena plugin needs exactly one of {list(KEYS)} "
                               f"({'both' if given else 'neither'} given)")
    if given[0] == "arena_config":
        source = Path(str(cfg["arena_config"])).expanduser()
        source = source if source.is_absolute() else folder / source
        if not source.is_file():
            raise ArenaPluginError(f"{where}: arena_config: monitor file {cfg['arena_config']} not found "
                                   f"(looked at {source.resolve()})")
        inline = None
    else:
        source = Path(config_path).resolve() if config_path else folder / "axolotl-config"
        inline = cfg["arena"]
        if not isinstance(inline, dict):
            raise ArenaPluginError(f"{where}: arena: expected a mapping (the monitor file's content), "
                                   f"got {type(inline).__name__}")
        inline = dict(inline)
    from ..callback import ForgettingMonitor

    try:  # the whole monitor, budget keys included (the tokenizer comes with the trainer, later)
        build_from_file(ForgettingMonitor, source, data=inline)
    except MonitorFileError as e:
        raise ArenaPluginError(_where(e, source, inline)) from None
    return source, inline


def _where(error: Exception, source: Path, inline: dict[str, Any] | None) -> str:
    """The loader's message with the key as written in the Axolotl config."""
    message = str(error)
    if inline is None:
        return f"arena_config: {message}"
    prefix = f"{source}: "
    return f"{source}: arena." + message[len(prefix):] if message.startswith(prefix) else f"arena: {message}"


def _looks_like_ours(key: str) -> bool:
    """A top-level key meant for this plugin but misspelt (``arena_confg``, ``arean_config``)."""
    return key.startswith("arena") or bool(difflib.get_close_matches(key, KEYS, n=1, cutoff=0.8))
