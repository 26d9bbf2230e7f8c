"""Scorers of generative probes: how a written answer is judged against a row.

A scorer is a function ``(prompt, generation, row) -> float`` in [0, 1]. Built-in ones compare
against the row's target (``answer``, or ``target``; a list means any of them counts):

* ``exact_match``: equal after :func:`normalize` (lower case, outer spaces and end punctuation
  dropped, inner whitespace collapsed);
* ``contains``: the normalised target appears in the normalised generation;
* ``last_number``: the last number written (``-1,234.5`` style; thousands commas dropped) equals
  the target number, the usual judge of a chain of thought in arithmetic;
* ``{"regex": pattern}``: the first match of ``pattern`` (its first group if it has one) then
  ``exact_match``;
* any callable ``(prompt, generation, row) -> float``, which needs no target field.

Example:
    >>> score = make_scorer("last_number")
    >>> score("2 + 3 =", "Two plus three is 5.", {"answer": 5}), score("", "5 then 6", {"answer": "5"})
    (1.0, 0.0)
    >>> make_scorer({"regex": r"answer: (\\w+)"})("", "so the answer: Paris.", {"answer": "paris"})
    1.0
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

from ..exceptions import ProbeDataError

__all__ = ["BUILTIN", "TARGET_FIELDS", "Scorer", "make_scorer", "needs_target", "normalize", "scorer_name"]

Scorer = Callable[[str, str, Mapping[str, Any]], float]
#: Where a row's target is read from, first present wins.
TARGET_FIELDS = ("answer", "target")
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")
_END_PUNCT = ".!?,;:\"'"


def normalize(text: str) -> str:
    """Lower case, whitespace collapsed, outer spaces and end punctuation dropped."""
    return " ".join(str(text).lower().split()).strip(_END_PUNCT + " ")


def _targets(row: Mapping[str, Any]) -> list[str]:
    for f in TARGET_FIELDS:
        value = row.get(f)
        if value is not None:
            return [str(v) for v in value] if isinstance(value, (list, tuple)) else [str(value)]
    return []


def _number(text: str) -> float | None:
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return None


def _exact(prompt: str, generation: str, row: Mapping[str, Any]) -> float:
    g = normalize(generation)
    return float(any(g == normalize(t) for t in _targets(row)))


def _contains(prompt: str, generation: str, row: Mapping[str, Any]) -> float:
    g = normalize(generation)
    return float(any(normalize(t) in g for t in _targets(row)))


def _last_number(prompt: str, generation: str, row: Mapping[str, Any]) -> float:
    found = _NUMBER.findall(generation)
    if not found:
        return 0.0
    got = _number(found[-1])
    wants = [w for t in _targets(row) if (w := _number(t)) is not None]
    return float(got is not None and any(abs(got - w) <= 1e-9 * max(1.0, abs(w)) for w in wants))


BUILTIN: dict[str, Scorer] = {"exact_match": _exact, "contains": _contains, "last_number": _last_number}


def _regex(pattern: str) -> Scorer:
    compiled = re.compile(pattern)

    def score(prompt: str, generation: str, row: Mapping[str, Any]) -> float:
        m = compiled.search(generation)
        if m is None:
            return 0.0
        return _exact(prompt, m.group(1) if compiled.groups else m.group(0), row)

    return score


def make_scorer(spec: Any, where: str = "scorer") -> Scorer:
    """The scorer a probe's ``scorer`` setting names (see the module docs).

    Raises:
        ProbeDataError: an unknown name, a bad regex, or anything else.
    """
    if callable(spec):
        return spec
    if isinstance(spec, str):
        if spec not in BUILTIN:
            raise ProbeDataError(f"{where}: unknown scorer {spec!r}; valid: {sorted(BUILTIN)}, "
                                 "{'regex': pattern}, or a callable (prompt, generation, row) -> float")
        return BUILTIN[spec]
    if isinstance(spec, Mapping) and set(spec) == {"regex"} and isinstance(spec["regex"], str):
        try:
            return _regex(spec["regex"])
        except re.error as e:
            raise ProbeDataError(f"{where}: regex {spec['regex']!r} does not compile: {e}") from None
    raise ProbeDataError(f"{where}: expected one of {sorted(BUILTIN)}, {{'regex': pattern}} or a callable "
                         f"(prompt, generation, row) -> float, got {spec!r:.80}")


def needs_target(spec: Any) -> bool:
    """Built-in scorers compare with the row's target; a callable reads what it wants."""
    return not callable(spec)


def scorer_name(spec: Any) -> str:
    """A readable name for logs and saved probe files."""
    if callable(spec):
        return getattr(spec, "__qualname__", type(spec).__name__)
    if isinstance(spec, Mapping):
        return f"regex:{spec.get('regex')}"
    return str(spec)
