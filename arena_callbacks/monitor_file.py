"""A monitor described entirely by one YAML (or JSON) file: its settings, its probes and its target.

The file holds the :class:`~arena_callbacks.config.MonitorConfig` fields plus two keys of its
own, ``probes`` (name → source) and ``target`` (a source). A source is one of:

* a path to a JSONL or JSON file of rows (relative paths are resolved against the YAML file's
  folder, not the working directory);
* ``{path: ..., kind: ..., signal: ...}``: the same with the probe's options (generative
  probes also ``scorer``, ``max_new_tokens``, ``stop``: :class:`~arena_callbacks.probes.Probe`);
* ``{capability: general_text, n: 24, seed: 0}``: a shipped capability set
  (:mod:`arena_callbacks.capabilities`);
* ``{lm_eval: arc_easy, limit: 64, include_path: tasks/, num_fewshot: 0}``: an lm-eval task
  (:func:`arena_callbacks.integrations.lm_eval.lm_eval_probes`).

Every error names the file and the key: ``monitor.yaml: probes.general: file data/g.jsonl not
found (looked at /abs/data/g.jsonl)``.

Example:
    >>> monitor = ForgettingMonitor.from_config("monitor.yaml")   # doctest: +SKIP

    with ``monitor.yaml``::

        cadence: {every_n_steps: 20}
        probes:
          general: data/general.jsonl
          facts: {capability: world_knowledge, n: 32}
        target: data/heldout.jsonl
        budgets:
          - {key: delta_nll/general, max_rise: 0.3, action: stop}
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from .config import MonitorConfig
from .exceptions import ArenaError, BudgetKeyError, ProbeDataError
from .measurements import TARGET
from .probes import Probe

__all__ = ["MonitorFile", "MonitorFileError", "build_from_file", "load_monitor_file"]

#: The keys a file adds to the config's own.
FILE_KEYS = ("probes", "target")
_SOURCES = ("path", "capability", "lm_eval")
_OPTIONS = ("kind", "signal", "scorer", "max_new_tokens", "stop")
_SOURCE_ARGS = {
    "path": (),
    "capability": ("n", "seed"),
    "lm_eval": ("limit", "include_path", "num_fewshot", "seed", "generate_until", "max_gen_toks", "metric"),
}


class MonitorFileError(ArenaError, ValueError):
    """A monitor file that cannot be used; the message names the file and the key."""


@dataclass
class MonitorFile:
    """What a monitor file describes: the config, the probes by name and the target (or ``None``)."""

    path: Path
    config: MonitorConfig
    probes: dict[str, Probe]
    target: Probe | None


def build_from_file(
    cls: type, path: str | Path, *, tokenizer: Any = None, data: Mapping[str, Any] | None = None, **kwargs: Any
) -> Any:
    """``cls(config, probes, target, tokenizer=tokenizer, **kwargs)`` from a monitor file, for every
    adapter's ``from_config``: the engine, the ``Trainer`` callback and the Lightning callback.

    ``kwargs`` that are config fields override the file's settings; the others go to ``cls``.
    ``data``: the file's content given inline (see :func:`load_monitor_file`).
    Errors, the probe checks done at construction included, name the file.
    """
    fields = {k: v for k, v in kwargs.items() if k in MonitorConfig.model_fields}
    others = {k: v for k, v in kwargs.items() if k not in fields}
    spec = load_monitor_file(path, tokenizer=tokenizer, data=data, **fields)
    try:
        return cls(spec.config, spec.probes, spec.target, tokenizer=tokenizer, **others)
    except (ProbeDataError, BudgetKeyError) as e:
        raise MonitorFileError(f"{spec.path}: {e}") from e


def load_monitor_file(
    path: str | Path, *, tokenizer: Any = None, data: Mapping[str, Any] | None = None, **config_fields: Any
) -> MonitorFile:
    """Read a monitor file (see the module docstring); ``config_fields`` override its settings.

    ``tokenizer`` is used by capability sets that follow a chat template (``instruction_following``).
    ``data``: the file's content, already read (a tool's config that holds it inline); ``path`` then
    only names it in messages and its folder resolves relative paths.

    Raises:
        MonitorFileError: the file is missing or malformed, a setting is invalid, or a probe
            source cannot be read; the message names the key.
    """
    path = Path(path)
    if data is None:
        data = _read(path)
    elif not isinstance(data, Mapping):
        raise MonitorFileError(f"{path}: expected a mapping of settings at the top, got {type(data).__name__}")
    fields = {k: v for k, v in data.items() if k not in FILE_KEYS}
    try:
        config = MonitorConfig.model_validate({**fields, **config_fields})
    except ValidationError as e:
        lines = [f"{'.'.join(str(x) for x in err['loc']) or '(top level)'}: {err['msg']}" for err in e.errors()]
        raise MonitorFileError(f"{path}: " + "; ".join(lines)) from None
    probes_spec = data.get("probes") or {}
    if not isinstance(probes_spec, Mapping):
        raise MonitorFileError(
            f"{path}: probes: expected a mapping of name -> source, got {type(probes_spec).__name__}"
        )
    probes: dict[str, Probe] = {}
    for name, spec in probes_spec.items():
        if name == TARGET:
            raise MonitorFileError(f"{path}: probes.{name}: the name {TARGET!r} is reserved; give it as target:")
        probes[str(name)] = _source(path, f"probes.{name}", spec, tokenizer)
    target = _source(path, "target", data["target"], tokenizer) if data.get("target") is not None else None
    if not probes and target is None:
        raise MonitorFileError(f"{path}: probes: give at least one probe (probes: {{name: source}}) or a target")
    return MonitorFile(path=path, config=config, probes=probes, target=target)


def _read(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise MonitorFileError(f"{path}: monitor file not found")
    import yaml

    text = path.read_text(encoding="utf-8")
    fmt = "JSON" if path.suffix == ".json" else "YAML"
    try:
        data = json.loads(text) if fmt == "JSON" else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as e:
        raise MonitorFileError(f"{path}: not valid {fmt} ({e})") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise MonitorFileError(f"{path}: expected a mapping of settings at the top, got {type(data).__name__}")
    return data


def _source(path: Path, key: str, spec: Any, tokenizer: Any) -> Probe:
    """One probe source of the file as a :class:`~arena_callbacks.probes.Probe`."""
    if isinstance(spec, str):
        spec = {"path": spec}
    if not isinstance(spec, Mapping):
        raise MonitorFileError(f"{path}: {key}: expected a file path or a mapping with one of {list(_SOURCES)}, "
                               f"got {type(spec).__name__}")
    given = [s for s in _SOURCES if s in spec]
    if len(given) != 1:
        raise MonitorFileError(f"{path}: {key}: give exactly one of {list(_SOURCES)} (found: {given or 'none'})")
    source = given[0]
    allowed = {source, *_OPTIONS, *_SOURCE_ARGS[source]}
    unknown = sorted(str(k) for k in spec if k not in allowed)
    if unknown:
        raise MonitorFileError(
            f"{path}: {key}: unknown keys {unknown} for a {source!r} source; valid: {sorted(allowed)}"
        )
    options = {k: spec[k] for k in _OPTIONS if k in spec}
    args = {k: spec[k] for k in _SOURCE_ARGS[source] if k in spec}
    try:
        if source == "path":
            return Probe(str(_resolve(path, key, spec["path"], must_be="file")), **options)
        if source == "capability":
            from .capabilities import capability_probe  # the rows with the set's own probe options

            return with_options(capability_probe(str(spec["capability"]), tokenizer=tokenizer, **args), options)
        return _lm_eval(path, key, spec["lm_eval"], args, options)
    except MonitorFileError:
        raise
    except (KeyError, ValueError, TypeError, ImportError, OSError) as e:
        message = e.args[0] if isinstance(e, KeyError) and e.args else e
        raise MonitorFileError(f"{path}: {key}: {message}") from None


def _lm_eval(path: Path, key: str, task: Any, args: dict[str, Any], options: dict[str, Any]) -> Probe:
    from .integrations.lm_eval import lm_eval_probes

    if "include_path" in args:
        args["include_path"] = str(_resolve(path, f"{key}.include_path", args["include_path"], must_be="dir"))
    if options.get("kind") == "completion":  # a generate_until task, teacher-forced as before
        args.setdefault("generate_until", "teacher_forced")
    built = lm_eval_probes([str(task)], **args)
    if len(built) != 1:
        raise MonitorFileError(f"{path}: {key}: lm-eval task {task!r} gave {len(built)} probes ({sorted(built)}); "
                               "name one task per probe")
    return with_options(next(iter(built.values())), options)


def with_options(data: Any, options: Mapping[str, Any]) -> Probe:
    """``data`` (rows, or a :class:`Probe` with options of its own) as a :class:`Probe`, the file's
    ``options`` taking precedence."""
    if isinstance(data, Probe):
        return dataclasses.replace(data, **options)
    return Probe(data, **options)


def _resolve(path: Path, key: str, value: Any, must_be: str) -> Path:
    """``value`` against the monitor file's folder (absolute paths stay); it must exist."""
    target = Path(str(value)).expanduser()
    if not target.is_absolute():
        target = path.parent / target
    ok = target.is_file() if must_be == "file" else target.is_dir()
    if not ok:
        raise MonitorFileError(f"{path}: {key}: {must_be} {value} not found (looked at {target.resolve()})")
    return target
