"""The registry of built-in capability sets (:data:`CAPABILITIES`) and the functions that build them."""

from __future__ import annotations

import random
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from .arithmetic import _arithmetic_problems, _build_arithmetic
from .facts import FACTS, _build_world_knowledge
from .instructions import _build_instruction_following, _instruction_pool
from .passages import CODE_PROBE_MODULES, _build_general_text, _build_python_code, code_passages, text_passages

__all__ = ["CAPABILITIES", "Capability", "Row", "build_capabilities", "build_capability"]

Row = dict[str, Any]


@dataclass(frozen=True)
class Capability:
    """One built-in capability set: what it measures, where it comes from, how big it is.

    Attributes:
        name: Registry key, also a valid probe name.
        kind: Probe kind of its rows (``text``, ``multiple_choice`` or ``completion``).
        description: What ability the set stands for.
        provenance: Where the rows come from.
        license: License of the row contents.
        default_size: Rows built when ``n`` is not given.
        uses_tokenizer: The rows depend on the tokenizer (its chat template).
    """

    name: str
    kind: str
    description: str
    provenance: str
    license: str
    default_size: int
    builder: Callable[[random.Random, int, Any], list[Row]]
    uses_tokenizer: bool = False

    def available(self) -> int | None:
        """How many distinct rows the set can give (``None``: effectively unlimited)."""
        return _POOL_SIZES[self.name]()


def build_capability(name: str, *, n: int | None = None, seed: int = 0, tokenizer: Any = None) -> list[Row]:
    """Rows of one built-in capability set.

    Args:
        name: A key of :data:`CAPABILITIES`.
        n: Rows to build (default: the set's ``default_size``).
        seed: Chooses the sample and its order; the same seed gives the same rows.
        tokenizer: Used by ``instruction_following`` for the model's chat template (without
            one, a plain ``User:``/``Assistant:`` format); ignored by the other sets.

    Raises:
        KeyError: Unknown ``name`` (the message lists the known ones).
        ValueError: ``n`` is not positive or larger than the set can give.
    """
    cap = CAPABILITIES.get(name)
    if cap is None:
        raise KeyError(f"capability {name!r} is not built in; known: {sorted(CAPABILITIES)}")
    n = cap.default_size if n is None else n
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"capability {name!r}: n must be a positive integer, got {n!r}")
    limit = cap.available()
    if limit is not None and n > limit:
        raise ValueError(f"capability {name!r}: n={n} is more than the {limit} distinct rows it has")
    rng = random.Random(f"arena-callbacks/{name}/{seed}")  # str seeds are stable across runs
    return cap.builder(rng, n, tokenizer)


def build_capabilities(
    names: Iterable[str] | None = None, *, n: int | None = None, seed: int = 0, tokenizer: Any = None
) -> dict[str, list[Row]]:
    """Several built-in sets at once, ``{name: rows}``: all of them when ``names`` is ``None``.

    The result can be passed as ``ForgettingMonitor(probes=...)``.
    """
    names = list(CAPABILITIES) if names is None else list(names)
    return {name: build_capability(name, n=n, seed=seed, tokenizer=tokenizer) for name in names}


_PY = f"Python {sys.version_info.major}.{sys.version_info.minor}"

CAPABILITIES: dict[str, Capability] = {
    c.name: c
    for c in (
        Capability(
            name="general_text",
            kind="text",
            description="English technical prose: mean token NLL on held-out documentation paragraphs",
            provenance=f"standard library pydoc_data/topics.py ({_PY}); prose paragraphs of the third of "
            "topics in the probe split, 120-300 characters",
            license="PSF-2.0 (Python documentation)",
            default_size=64,
            builder=_build_general_text,
        ),
        Capability(
            name="python_code",
            kind="text",
            description="Python source code: mean token NLL on functions and classes of held-out stdlib modules",
            provenance=f"standard library sources ({_PY}): " + ", ".join(CODE_PROBE_MODULES)
            + "; non-overlapping chunks starting at a def/class line, 120-300 characters",
            license="PSF-2.0 (Python standard library)",
            default_size=64,
            builder=_build_python_code,
        ),
        Capability(
            name="world_knowledge",
            kind="multiple_choice",
            description="Simple facts (capitals, science, geography, everyday) after two worked questions: "
            "four-way log-likelihood ranking",
            provenance="written for arena-callbacks (capabilities.FACTS)",
            license="Apache-2.0 (this project)",
            default_size=64,
            builder=_build_world_knowledge,
        ),
        Capability(
            name="arithmetic",
            kind="completion",
            description="Sums and products of one-digit numbers after a three-example prefix: "
            "exact match of the answer",
            provenance="generated by arena-callbacks (capabilities.ARITHMETIC_SHOTS and _arithmetic_problems)",
            license="Apache-2.0 (this project)",
            default_size=64,
            builder=_build_arithmetic,
        ),
        Capability(
            name="instruction_following",
            kind="completion",
            description="Verifiable chat instructions (repeat a sentence, reply with only a word, write a word in "
            "capitals) after one worked example: exact reply and end of turn",
            provenance="generated by arena-callbacks (capabilities._instruction_pool), in the tokenizer's chat "
            "template",
            license="Apache-2.0 (this project)",
            default_size=48,
            builder=_build_instruction_following,
            uses_tokenizer=True,
        ),
    )
}

_POOL_SIZES: dict[str, Callable[[], int | None]] = {
    "general_text": lambda: len(text_passages("probe")),
    "python_code": lambda: len(code_passages("probe")),
    "world_knowledge": lambda: len(FACTS),
    "arithmetic": lambda: len(_arithmetic_problems()),
    "instruction_following": lambda: len(_instruction_pool()),
}
