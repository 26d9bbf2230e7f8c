#!/usr/bin/env python
"""Write ``docs/configuration.md`` from the pydantic models in ``arena_callbacks/config.py``.

The page holds one table per config section (field, type, default, description). Types,
defaults and bounds come from the models' fields; descriptions come from each class
docstring's ``Attributes:`` entries (or ``* ``field``: ...`` items in its text), else from a
field's ``description``. The docstrings are the one source of truth: change them, then run

    .venv/bin/python scripts/gen_config_docs.py           # rewrite docs/configuration.md
    .venv/bin/python scripts/gen_config_docs.py --check   # exit 1 if the page is out of date

``tests/test_docs.py`` fails when the checked-in page differs from what this script writes.
"""

from __future__ import annotations

import argparse
import enum
import inspect
import json
import re
import sys
import types
import typing
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
PAGE = ROOT / "docs" / "configuration.md"
EXAMPLE = "examples/arena.yaml"
COMMAND = "python scripts/gen_config_docs.py"

if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from pydantic import BaseModel  # noqa: E402
from pydantic.fields import FieldInfo  # noqa: E402

from arena_callbacks.config import MonitorConfig  # noqa: E402

_SECTION = re.compile(r"^(Attributes|Args|Example|Examples|Note|Notes|Raises|Returns):\s*$")
_ENTRY = re.compile(r"^(\w+):\s*(.*)$")
_BULLET = re.compile(r"^[*-] ``(\w+)``:\s*(.*)$")
_ROLE = re.compile(r":(?:class|meth|func|mod|attr|data):`~?([^`]+)`")


def markdown(text: str) -> str:
    """Docstring markup (reST) as Markdown: ``x`` -> `x`; :class:`~a.B` -> `B`; design sections linked."""
    text = _ROLE.sub(lambda m: "`" + m.group(1).rsplit(".", 1)[-1] + "`", text)
    text = re.sub(r"docs/design\.md (§\d+)", r"[docs/design.md \1](design.md)", text)
    return text.replace("``", "`")


def cell(text: str) -> str:
    """Text safe inside a Markdown table cell."""
    return " ".join(text.split()).replace("|", "\\|")


def parse_docstring(cls: type) -> tuple[list[str], dict[str, str]]:
    """A class docstring as (prose paragraphs, field -> description).

    Descriptions come from the ``Attributes:`` section and from ``* ``field``: ...`` items in
    the prose; those items are left out of the prose. ``Example:`` and other sections are dropped.
    """
    doc = inspect.getdoc(cls) or ""
    prose: list[str] = []
    fields: dict[str, str] = {}
    section: str | None = None
    current: list[str] | None = None  # the entry being continued
    for line in doc.splitlines():
        m = _SECTION.match(line)
        if m:
            section, current = m.group(1), None
            continue
        if section is None:
            bullet = _BULLET.match(line)
            if bullet:
                current = ["Within budget while " + bullet.group(2)]
                fields[bullet.group(1)] = current  # type: ignore[assignment]
            elif current is not None and line.startswith("  ") and line.strip():
                current.append(line.strip())
            else:
                current = None
                prose.append(line)
        elif section == "Attributes":
            stripped = line.strip()
            entry = _ENTRY.match(stripped)
            indent = len(line) - len(line.lstrip())
            if entry and indent <= 4:
                current = [entry.group(2)]
                fields[entry.group(1)] = current  # type: ignore[assignment]
            elif current is not None and stripped:
                current.append(stripped)
    paragraphs = [" ".join(p.split()) for p in "\n".join(prose).split("\n\n") if p.strip()]
    return paragraphs, {k: " ".join(v).rstrip(",;") for k, v in fields.items()}  # type: ignore[arg-type]


def _bounds(info: FieldInfo) -> str:
    marks = {"ge": "≥", "gt": ">", "le": "≤", "lt": "<"}
    out = []
    for meta in info.metadata:
        for attr, sign in marks.items():
            value = getattr(meta, attr, None)
            if value is not None:
                out.append(f"{sign} {value:g}" if isinstance(value, float) else f"{sign} {value}")
    return ", ".join(out)


def type_name(annotation: Any) -> str:
    """A field's type in YAML words."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        names = [type_name(a) for a in args if a is not type(None)]
        return " or ".join(names) + (" or null" if type(None) in args else "")
    if origin is typing.Literal:
        return "one of " + ", ".join(f"`{a}`" for a in args)
    if origin in (tuple, list):
        return f"list of {type_name(args[0])}" if args else "list"
    if inspect.isclass(annotation) and issubclass(annotation, enum.Enum):
        return "one of " + ", ".join(f"`{m.value}`" for m in annotation)
    if inspect.isclass(annotation) and issubclass(annotation, BaseModel):
        return f"`{annotation.__name__}`"
    return {int: "integer", float: "number", bool: "boolean", str: "string"}.get(annotation, str(annotation))


def field_type(info: FieldInfo) -> str:
    name = type_name(info.annotation)
    bounds = _bounds(info)
    if not bounds:
        return name
    if name.endswith(" or null"):
        return f"{name[: -len(' or null')]} ({bounds}) or null"
    return f"{name} ({bounds})"


def default_text(info: FieldInfo) -> str:
    if info.is_required():
        return "required"
    value = info.get_default(call_default_factory=True)
    if isinstance(value, BaseModel):
        return "its defaults"
    return f"`{_yaml(value)}`"


def _yaml(value: Any) -> str:
    if isinstance(value, enum.Enum):
        return _yaml(value.value)
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (tuple, list)):
        return "[" + ", ".join(_yaml(v) for v in value) + "]"
    if isinstance(value, str):
        return value
    return json.dumps(value)


def _models(annotation: Any) -> list[type[BaseModel]]:
    """The config models a field holds (a section, or a list of them)."""
    found = []
    for arg in (annotation, *typing.get_args(annotation)):
        if inspect.isclass(arg) and issubclass(arg, BaseModel):
            found.append(arg)
    return found


def table(cls: type[BaseModel], prefix: str, links: dict[str, str]) -> list[str]:
    _, described = parse_docstring(cls)
    rows = ["| field | type | default | description |", "| --- | --- | --- | --- |"]
    for name, info in cls.model_fields.items():
        text = described.get(name) or info.description
        if not text:
            raise ValueError(
                f"{cls.__name__}.{name} has no description: add it to the class docstring's Attributes section"
            )
        text = markdown(text)
        if name in links:
            text += f" See [`{prefix}{name}`](#{links[name]})."
        rows.append(f"| `{prefix}{name}` | {cell(field_type(info))} | {cell(default_text(info))} | {cell(text)} |")
    return rows


def render() -> str:
    """The whole page, as the checked-in ``docs/configuration.md`` should hold it."""
    sections: list[tuple[str, type[BaseModel], str]] = []  # (heading, model, field prefix)
    links: dict[str, str] = {}
    for name, info in MonitorConfig.model_fields.items():
        for model in _models(info.annotation):
            list_of = typing.get_origin(info.annotation) in (tuple, list)
            heading = f"{name}[]" if list_of else name
            prefix = f"{name}[]." if list_of else f"{name}."
            sections.append((heading, model, prefix))
            links[name] = re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")

    out = [
        "# Configuration reference",
        "",
        f"<!-- Generated by `{COMMAND}` from arena_callbacks/config.py; do not edit by hand. -->",
        "",
        "Every section is a frozen pydantic model: unknown fields are errors, a built config cannot be "
        "changed, and an invalid value is refused with the field, the value and what would be valid. Live "
        "objects (datasets, tokenizers, models) are passed to the monitor beside the config, never inside it.",
        "",
        "A config is a `MonitorConfig`, a dict of the same shape, or a path to a `.yaml`/`.yml`/`.json` file "
        "(`MonitorConfig.from_file`). `ForgettingMonitor` and `ForgettingEngine` take any of these as their "
        "first argument; `ForgettingMonitor` also takes top-level fields as keyword arguments "
        "(`ForgettingMonitor(config, probes=..., stability=\"min\")`), each replacing the field it names.",
        "",
        "This page is generated from the class docstrings and fields of "
        f"[`arena_callbacks/config.py`](../arena_callbacks/config.py) by `{COMMAND}`; "
        "`tests/test_docs.py` fails when it is out of date. What the keys mean: "
        "[probes.md](probes.md), [budgets.md](budgets.md), [geometry.md](geometry.md), "
        "[outputs.md](outputs.md).",
        "",
        "## `MonitorConfig`",
        "",
    ]
    paragraphs, _ = parse_docstring(MonitorConfig)
    out += [markdown(p) + "\n" for p in paragraphs]
    out += table(MonitorConfig, "", links)
    for heading, model, prefix in sections:
        paragraphs, _ = parse_docstring(model)
        first, rest = (paragraphs[0], paragraphs[1:]) if paragraphs else ("", [])
        out += ["", f"## `{heading}`", "", f"`{model.__name__}`: {markdown(first)}", ""]
        out += [markdown(p) + "\n" for p in rest]
        out += table(model, prefix, {})
    example = (ROOT / EXAMPLE).read_text(encoding="utf-8").rstrip("\n")
    out += [
        "",
        "## Example",
        "",
        f"[`{EXAMPLE}`](../{EXAMPLE}), the demo arena's config, sets every field with a comment "
        "(`MonitorConfig.from_file(\"examples/arena.yaml\")`); [`examples/monitor.yaml`](../examples/monitor.yaml) "
        "is a short one (the small demo's).",
        "",
        "```yaml",
        example,
        "```",
        "",
    ]
    text = "\n".join(out)
    return re.sub(r"\n{3,}", "\n\n", text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only check that the page is up to date")
    parser.add_argument("--out", type=Path, default=PAGE, help=f"where to write (default: {PAGE.relative_to(ROOT)})")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        current = args.out.read_text(encoding="utf-8") if args.out.is_file() else None
        if current != text:
            print(f"{args.out} is out of date; run: {COMMAND}", file=sys.stderr)
            return 1
        return 0
    if not args.out.is_file() or args.out.read_text(encoding="utf-8") != text:
        args.out.write_text(text, encoding="utf-8")
    print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
