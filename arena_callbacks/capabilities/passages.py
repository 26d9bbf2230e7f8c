"""The text sets: English prose (``general_text``) and Python code (``python_code``) passages.

Both draw from a fixed ``probe`` split of their sources (by pydoc topic, by stdlib module) and
give the disjoint ``train`` split to code that needs training text. Passages are 120-300
characters and at most 64 tokens for SmolLM2's tokenizer (see ``MAX_PIECES``).
"""

from __future__ import annotations

import hashlib
import random
import re
import sysconfig
from collections.abc import Iterable
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from .registry import Row

__all__ = ["CODE_PROBE_MODULES", "MAX_CHARS", "MAX_PIECES", "MIN_CHARS", "Split", "code_passages", "text_passages"]

Split = Literal["probe", "train"]

MIN_CHARS = 120
MAX_CHARS = 300
# Passages are also kept within MAX_PIECES (see _pieces): a tokenizer-free estimate of the
# token count that keeps every passage within 64 SmolLM2 tokens.
MAX_PIECES = 55


# --------------------------------------------------------------------------------------
# general_text: English prose from pydoc_data.topics
# --------------------------------------------------------------------------------------


def _split_of(key: str) -> Split:
    """A stable split by source name: a third of the sources are held out for probes."""
    return "probe" if hashlib.sha256(key.encode()).digest()[0] % 3 == 0 else "train"


_PIECE = re.compile(r"[A-Za-z]+|\d|\n[ \t]*|[^\sA-Za-z\d]")


def _pieces(text: str) -> int:
    """An estimate of the token count that depends on no tokenizer.

    Counts single digits, line breaks (with their indentation), other symbols, and words as one
    piece per six letters (long identifiers split into several tokens). SmolLM2's tokenizer
    gives 0.6-1.15 tokens per piece on these passages.
    """
    return sum(-(-len(p) // 6) if p[0].isalpha() else 1 for p in _PIECE.findall(text))


def _fits(text: str) -> bool:
    return len(text) <= MAX_CHARS and _pieces(text) <= MAX_PIECES


def _clip(text: str) -> str | None:
    """``text`` if short enough, else its longest prefix of whole sentences that fits."""
    if _fits(text):
        return text
    ends = [m.end() for m in re.finditer(r"[.!?](?=\s)", text[: MAX_CHARS + 1])]
    fitting = [e for e in ends if _fits(text[:e])]
    return text[: fitting[-1]] if fitting else None


def _prose_paragraphs(doc: str) -> list[str]:
    out = []
    for para in re.split(r"\n\s*\n", doc):
        lines = para.strip("\n").splitlines()
        # Prose only: no indented code or grammar, headings, tables or bullet lists.
        if not lines or any(line.startswith((" ", "\t", "*", "+", "-", "=", ">")) for line in lines):
            continue
        text = " ".join(line.strip() for line in lines)
        if not text[:1].isupper() or "::=" in text or not text.endswith((".", "!", "?")):
            continue
        text = _clip(text)
        if text and len(text) >= MIN_CHARS:
            out.append(text)
    return out


@lru_cache(maxsize=2)
def text_passages(split: Split = "probe") -> tuple[str, ...]:
    """English prose passages from ``pydoc_data.topics``, in a stable order, without duplicates.

    ``probe`` passages come from a fixed third of the topics (chosen by a hash of the topic
    name); ``train`` from the rest, less any paragraph that a probe topic has too.
    """
    from pydoc_data.topics import topics

    # Some paragraphs appear under several topics: the train split never repeats a probe one.
    exclude = text_passages("probe") if split == "train" else ()
    return _distinct((t for key in sorted(topics) if _split_of(key) == split for t in _prose_paragraphs(topics[key])),
                     exclude)


def _build_general_text(rng: random.Random, n: int, tokenizer: Any) -> list[Row]:
    return [{"text": t} for t in rng.sample(text_passages("probe"), n)]


# --------------------------------------------------------------------------------------
# python_code: functions and classes from standard-library sources
# --------------------------------------------------------------------------------------

# Probe modules: plain-Python, stable across 3.10-3.14. Every other top-level stdlib module is
# the train split.
CODE_PROBE_MODULES: tuple[str, ...] = (
    "bisect.py",
    "calendar.py",
    "colorsys.py",
    "difflib.py",
    "fnmatch.py",
    "fractions.py",
    "heapq.py",
    "shlex.py",
    "statistics.py",
    "textwrap.py",
)

_DEF = re.compile(r"^( {0,4})(def |class |async def )")


def _code_chunks(source: str) -> list[str]:
    """Chunks that start at a (method) definition and end at a line break within the limit."""
    lines = source.splitlines()
    out = []
    free = 0  # chunks never overlap: the next one starts after the last one ended
    for i, line in enumerate(lines):
        m = _DEF.match(line)
        if i < free or not m:
            continue
        indent = len(m.group(1))
        chunk: list[str] = []
        for nxt in lines[i:]:
            if not _fits("\n".join([*chunk, nxt])):
                break
            chunk.append(nxt)
        while chunk and not chunk[-1].strip():
            chunk.pop()
        text = "\n".join(c[indent:] if c[:indent].isspace() else c for c in chunk)
        if len(text) >= MIN_CHARS and len(chunk) >= 3:
            out.append(text)
            free = i + len(chunk)
    return out


def _stdlib() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


@lru_cache(maxsize=2)
def code_passages(split: Split = "probe") -> tuple[str, ...]:
    """Python code passages from the standard library, in a stable order, without duplicates.

    ``probe`` chunks come from :data:`CODE_PROBE_MODULES`, ``train`` chunks from the other
    top-level stdlib modules (less any chunk identical to a probe one).
    """
    root = _stdlib()
    if split == "probe":
        files = [root / name for name in CODE_PROBE_MODULES]
    else:
        files = sorted(p for p in root.glob("*.py") if p.name not in CODE_PROBE_MODULES)
    exclude = code_passages("probe") if split == "train" else ()
    chunks = (c for path in files if path.is_file()
              for c in _code_chunks(path.read_text(encoding="utf-8", errors="replace")))
    return _distinct(chunks, exclude)


def _distinct(passages: Iterable[str], exclude: Iterable[str]) -> tuple[str, ...]:
    """``passages`` in their order, each once, less those in ``exclude``."""
    seen = set(exclude)
    out = []
    for text in passages:
        if text not in seen:
            seen.add(text)
            out.append(text)
    return tuple(out)


def _build_python_code(rng: random.Random, n: int, tokenizer: Any) -> list[Row]:
    return [{"text": t} for t in rng.sample(code_passages("probe"), n)]
