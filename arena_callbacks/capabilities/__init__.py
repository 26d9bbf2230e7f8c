"""Built-in capability probe sets: held-out, deterministic, made by this project's own code.

Each set stands for one ability of a pretrained model (a probe, docs/design.md §2) and is returned as a list
of probe rows in the formats of :mod:`arena_callbacks.probes`:

* ``general_text`` (text): English prose paragraphs from the standard library's
  ``pydoc_data/topics.py``;
* ``python_code`` (text): functions and classes cut from standard-library ``.py`` sources;
* ``world_knowledge`` (multiple choice): simple facts written for this module (capitals,
  science, geography, everyday knowledge) with three distractors each, after two worked
  questions;
* ``arithmetic`` (completion): generated sums and products of one-digit numbers after a
  fixed three-example prefix (``3 + 4 = 7``);
* ``instruction_following`` (completion): short verifiable instructions ("Repeat exactly:
  ...", "Reply with only the word ...") in the model's own chat format, scored on the exact
  reply followed by the end-of-turn marker;
* ``word_problems`` (generate): short arithmetic word problems (one operation, answers 1-25) in
  the chat format; the model writes its answer, judged on the last number written;
* ``format_following`` (generate): everyday questions with a format instruction (word count,
  capitals, a word to avoid, ...); the written reply checked by rule (:func:`follows_format`).

The generative sets are scored with probe options of their own (scorer, ``max_new_tokens``,
stop strings): :func:`capability_probe` gives any set as a :class:`~arena_callbacks.probes.Probe`
carrying them, and :func:`build_capabilities` returns those sets that way.

Sets are *held out*: the text and code sets draw only from a fixed ``probe`` split of their
sources (by pydoc topic, by stdlib module), and :func:`text_passages` / :func:`code_passages`
give the disjoint ``train`` split to code that needs training text. They are *deterministic*:
the same ``seed`` (and Python version, for the stdlib-derived sets) gives the same rows; a
different seed draws another sample and order. Passages are 120-300 characters and at most
64 tokens for SmolLM2's tokenizer (see ``MAX_PIECES``).

Modules, one per concern:

* :mod:`.registry`: :class:`Capability`, :data:`CAPABILITIES`, :func:`build_capability` and
  :func:`build_capabilities`.
* :mod:`.passages`: the text sets (``general_text``, ``python_code``): :func:`text_passages`,
  :func:`code_passages`, their splits and length limits.
* :mod:`.facts`: ``world_knowledge`` (:data:`FACTS`, :data:`WORLD_KNOWLEDGE_SHOTS`).
* :mod:`.arithmetic`: ``arithmetic`` (:data:`ARITHMETIC_SHOTS`).
* :mod:`.instructions`: ``instruction_following``.
* :mod:`.word_problems`: ``word_problems``; :mod:`.formats`: ``format_following`` and its
  scorer :func:`follows_format` (:data:`RULES`); :mod:`.chat`: what the two share.

Example:
    >>> rows = build_capability("arithmetic", n=2, seed=0)
    >>> sorted(rows[0])
    ['completion', 'operation', 'prompt']
    >>> sets = build_capabilities(["general_text", "world_knowledge"], n=8)
    >>> {name: len(rows) for name, rows in sets.items()}
    {'general_text': 8, 'world_knowledge': 8}
"""

from __future__ import annotations

# The names besides __all__'s (imported ``X as X``) stay importable from here as before the
# split: tests read the sets' data and helpers.
from .arithmetic import ARITHMETIC_SHOTS as ARITHMETIC_SHOTS
from .arithmetic import _arithmetic_problems as _arithmetic_problems
from .facts import FACTS as FACTS
from .facts import WORLD_KNOWLEDGE_SHOTS as WORLD_KNOWLEDGE_SHOTS
from .formats import RULES, follows_format
from .formats import _format_pool as _format_pool
from .instructions import _DEMOS as _DEMOS
from .instructions import _instruction_pool as _instruction_pool
from .passages import CODE_PROBE_MODULES as CODE_PROBE_MODULES
from .passages import MAX_CHARS as MAX_CHARS
from .passages import MAX_PIECES as MAX_PIECES
from .passages import MIN_CHARS as MIN_CHARS
from .passages import Split as Split
from .passages import _code_chunks as _code_chunks
from .passages import _pieces as _pieces
from .passages import _prose_paragraphs as _prose_paragraphs
from .passages import _split_of as _split_of
from .passages import _stdlib as _stdlib
from .passages import code_passages, text_passages
from .registry import CAPABILITIES, Capability, build_capabilities, build_capability, capability_probe
from .registry import Row as Row
from .word_problems import _word_problem_pool as _word_problem_pool

__all__ = [
    "CAPABILITIES",
    "RULES",
    "Capability",
    "build_capabilities",
    "build_capability",
    "capability_probe",
    "code_passages",
    "follows_format",
    "text_passages",
]
