"""The registry of built-in capability sets (:data:`CAPABILITIES`) and the functions that build them."""

from __future__ import annotations

import random
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from .arithmetic import _arithmetic_problems, _build_arithmetic
from .facts import FACTS, _build_world_knowledge
from .formats import _build_format_following, _format_options, _format_pool
from .instructions import _build_instruction_following, _instruction_pool
from .passages import CODE_PROBE_MODULES, _build_general_text, _build_python_code, code_passages, text_passages
from .word_problems import _build_word_problems, _word_problem_options, _word_problem_pool

__all__ = ["CAPABILITIES", "Capability", "Row", "build_capabilities", "build_capability", "capability_probe"]

Row = dict[str, Any]


@dataclass(frozen=True)
class Capability:
    """One built-in capability set: what it measures, where it comes from, how big it is.

    Attributes:
        name: Registry key, also a valid probe name.
        kind: Probe kind of its rows (``text``, ``multiple_choice``, ``completion`` or ``generate``).
        description: What ability the set stands for.
        provenance: Where the rows come from.
        license: License of the row contents.
        default_size: Rows built when ``n`` is not given.
        uses_tokenizer: The rows depend on the tokenizer (its chat template).
        probe_options: Generative sets: ``tokenizer -> {kind, scorer, max_new_tokens, stop}``, the
            :class:`~arena_callbacks.probes.Probe` options its rows are scored with (the stop
            strings follow the chat template); ``None`` for the teacher-forced sets, whose rows
            alone say how they are scored.
    """

    name: str
    kind: str
    description: str
    provenance: str
    license: str
    default_size: int
    builder: Callable[[random.Random, int, Any], list[Row]]
    uses_tokenizer: bool = False
    probe_options: Callable[[Any], dict[str, Any]] | None = None

    @property
    def generative(self) -> bool:
        """The model writes its answers (kind ``generate``): scored only with :meth:`options`."""
        return self.probe_options is not None

    def options(self, tokenizer: Any = None) -> dict[str, Any]:
        """The :class:`~arena_callbacks.probes.Probe` options of the set (empty for row-only sets)."""
        return dict(self.probe_options(tokenizer)) if self.probe_options is not None else {}

    def available(self) -> int | None:
        """How many distinct rows the set can give (``None``: effectively unlimited)."""
        return _POOL_SIZES[self.name]()


def build_capability(name: str, *, n: int | None = None, seed: int = 0, tokenizer: Any = None) -> list[Row]:
    """Rows of one built-in capability set.

    Args:
        name: A key of :data:`CAPABILITIES`.
        n: Rows to build (default: the set's ``default_size``).
        seed: Chooses the sample and its order; the same seed gives the same rows.
        tokenizer: Used by ``instruction_following``, ``word_problems`` and ``format_following``
            for the model's chat template (without one, a plain ``User:``/``Assistant:`` format);
            ignored by the other sets.

    Generative sets (``word_problems``, ``format_following``) need their probe options to be
    scored right: use :func:`capability_probe` (or :func:`build_capabilities`) for them.

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


def capability_probe(
    name: str, *, n: int | None = None, seed: int = 0, tokenizer: Any = None, **options: Any
) -> Any:
    """One built-in set as a :class:`~arena_callbacks.probes.Probe`: its rows with the probe
    options it is scored with (a generative set's kind, scorer, ``max_new_tokens`` and stop
    strings); ``options`` (``kind``, ``signal``, ...) override them. What a monitor file's
    ``{capability: name}`` gives.

    Arguments and errors as :func:`build_capability`.
    """
    from ..probes import Probe

    rows = build_capability(name, n=n, seed=seed, tokenizer=tokenizer)
    return Probe(rows, **{**CAPABILITIES[name].options(tokenizer), **options})


def build_capabilities(
    names: Iterable[str] | None = None, *, n: int | None = None, seed: int = 0, tokenizer: Any = None
) -> dict[str, Any]:
    """Several built-in sets at once; when ``names`` is ``None``, every teacher-forced set.

    ``{name: rows}`` for the teacher-forced sets and ``{name: Probe}`` (:func:`capability_probe`)
    for the generative ones, so that the result can be passed as ``ForgettingMonitor(probes=...)``.
    The generative sets are given only by name: the model writes every answer token by token, and
    on a CPU one of them costs several times a pass of all the others (docs/capabilities.md).
    """
    names = [n for n, c in CAPABILITIES.items() if not c.generative] if names is None else list(names)
    return {
        name: capability_probe(name, n=n, seed=seed, tokenizer=tokenizer) if _generative(name)
        else build_capability(name, n=n, seed=seed, tokenizer=tokenizer)
        for name in names
    }


def _generative(name: str) -> bool:
    cap = CAPABILITIES.get(name)
    return cap is not None and cap.generative


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
        Capability(
            name="word_problems",
            kind="generate",
            description="Short arithmetic word problems (add, subtract, multiply, two steps; answers 1-25) after "
            "one worked example: the model writes its answer, judged on the last number written",
            provenance="generated by arena-callbacks (capabilities.word_problems), in the tokenizer's chat template",
            license="Apache-2.0 (this project)",
            default_size=32,
            builder=_build_word_problems,
            uses_tokenizer=True,
            probe_options=_word_problem_options,
        ),
        Capability(
            name="format_following",
            kind="generate",
            description="Everyday questions with a format instruction (word count, capitals, lowercase, a word "
            "to avoid, a first word, a number only) after one worked example: the written reply checked by rule",
            provenance="generated by arena-callbacks (capabilities.formats), in the tokenizer's chat template; "
            "scored by capabilities.follows_format",
            license="Apache-2.0 (this project)",
            default_size=32,
            builder=_build_format_following,
            uses_tokenizer=True,
            probe_options=_format_options,
        ),
    )
}

_POOL_SIZES: dict[str, Callable[[], int | None]] = {
    "general_text": lambda: len(text_passages("probe")),
    "python_code": lambda: len(code_passages("probe")),
    "world_knowledge": lambda: len(FACTS),
    "arithmetic": lambda: len(_arithmetic_problems()),
    "instruction_following": lambda: len(_instruction_pool()),
    "word_problems": lambda: len(_word_problem_pool()),
    "format_following": lambda: len(_format_pool()),
}
