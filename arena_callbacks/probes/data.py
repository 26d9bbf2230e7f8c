"""Probe data: the kinds, loading rows, validation, and :class:`Probe` / :class:`ProbeSet`.

Four kinds (the probes of docs/design.md), told apart by their fields unless named explicitly:

* ``text``: ``{"text": ...}``: mean token negative log-likelihood.
* ``multiple_choice``: ``{"context"|"question": ..., "choices": [...], "answer"|"label": i}``:
  log-likelihood ranking of the choices, accuracy; NLL of the correct choice.
* ``completion``: ``{"prompt": ..., "completion": ...}``: teacher-forced exact match of the
  answer span (every answer token is the greedy prediction) and answer NLL.
* ``generate``: ``{"prompt"|"messages": ..., "answer"|"target": ...}``: the model writes its own
  answer (greedy, :mod:`.generate`), judged by the probe's scorer (:mod:`.scorers`); no NLL.

Conversational rows, rendered with the tokenizer's chat template when they are tokenised:
``{"messages": [{"role": ..., "content": ...}, ...]}`` is a ``completion`` row when its last
message is the assistant's (that answer is scored; the template's own text around it counts as
the answer's, as the template writes it) and a ``text`` row otherwise (the whole conversation
scored; ``Probe(..., kind="text")`` asks for that on any conversation); TRL's conversational
``{"prompt": [messages], "completion": [messages]}`` is a ``completion`` row.
"""

from __future__ import annotations

import json
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from ..config import ProbeSettings
from ..exceptions import ProbeDataError

ProbeKind = Literal["text", "multiple_choice", "completion", "generate"]
KINDS: tuple[str, ...] = ("text", "multiple_choice", "completion", "generate")
CONTEXT_FIELDS = ("context", "question")
ANSWER_FIELDS = ("answer", "label")


@dataclass(frozen=True)
class Probe:
    """A probe set with explicit options, for when field-based inference is not enough.

    Args:
        data: A ``datasets.Dataset``, a list of dicts, or a path to a JSONL (or JSON list) file.
        kind: ``text``, ``multiple_choice``, ``completion`` or ``generate``; inferred from the
            fields if ``None``.
        signal: What ``retention/<name>`` follows for scored kinds: ``score`` (accuracy or exact
            match relative to baseline) or ``nll`` (``exp(-ΔNLL)``). Text probes always use NLL,
            generative ones always the score.
        scorer: ``generate`` only: how an answer is judged, a built-in name (``exact_match``,
            ``contains``, ``last_number``), ``{"regex": pattern}`` or a callable
            ``(prompt, generation, row) -> float`` (:mod:`.scorers`).
        max_new_tokens: ``generate`` only: the longest answer, in tokens (at least 1).
        stop: ``generate`` only: strings that end an answer (cut before them); the model's end
            of sequence token always does.

    Example:
        >>> Probe([{"prompt": "2+2=", "completion": "4"}], signal="nll").kind is None
        True
    """

    data: Any
    kind: ProbeKind | None = None
    signal: Literal["score", "nll"] = "score"
    scorer: Any = "exact_match"
    max_new_tokens: int = 64
    stop: tuple[str, ...] | list[str] = ()


@dataclass(frozen=True)
class Generation:
    """How a ``generate`` probe writes and judges its answers (see :class:`Probe`)."""

    scorer: Any = "exact_match"
    max_new_tokens: int = 64
    stop: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        """For ``probes.json``; a callable scorer is saved by name only (``{"callable": name}``)."""
        from .scorers import scorer_name

        scorer = {"callable": scorer_name(self.scorer)} if callable(self.scorer) else self.scorer
        return {"scorer": scorer, "max_new_tokens": self.max_new_tokens, "stop": list(self.stop)}

    @classmethod
    def check(cls, name: str, scorer: Any, max_new_tokens: Any, stop: Any) -> Generation:
        from .scorers import make_scorer

        make_scorer(scorer, where=f"probe {name!r}: scorer")
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ProbeDataError(f"probe {name!r}: max_new_tokens must be an integer of at least 1, got "
                                 f"{max_new_tokens!r}")
        if isinstance(stop, str):
            stop = [stop]
        if not isinstance(stop, (list, tuple)) or not all(isinstance(x, str) and x for x in stop):
            raise ProbeDataError(f"probe {name!r}: stop must be a list of non-empty strings, got {stop!r:.80}")
        return cls(scorer, max_new_tokens, tuple(stop))


def load_rows(data: Any, name: str) -> list[dict[str, Any]]:
    """Rows of a probe as plain dicts, from a Dataset, a list of dicts or a JSON(L) path."""
    if isinstance(data, (str, Path)):
        path = Path(data)
        if not path.is_file():
            raise ProbeDataError(f"probe {name!r}: file not found: {path}")
        text = path.read_text(encoding="utf-8")
        if path.suffix.lower() == ".json":
            rows = json.loads(text)
            if not isinstance(rows, list):
                raise ProbeDataError(f"probe {name!r}: {path} must hold a JSON list of objects")
        else:
            rows = []
            for lineno, line in enumerate(text.splitlines(), start=1):
                if not line.strip():
                    continue
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ProbeDataError(f"probe {name!r}: {path} line {lineno} is not valid JSON: {e.msg}") from None
    elif hasattr(data, "to_list") and hasattr(data, "column_names"):  # datasets.Dataset
        rows = data.to_list()
    elif isinstance(data, Sequence) and not isinstance(data, (str, bytes)):
        rows = list(data)
    else:
        raise ProbeDataError(
            f"probe {name!r}: expected a datasets.Dataset, a list of dicts or a path to a JSONL file, "
            f"got {type(data).__name__}"
        )
    for i, row in enumerate(rows):
        if not isinstance(row, Mapping):
            raise ProbeDataError(f"probe {name!r}, row {i}: expected a dict, got {type(row).__name__}")
    return [dict(r) for r in rows]


def is_conversation(value: Any) -> bool:
    """A list of ``{"role", "content"}`` messages (a conversational field)."""
    return isinstance(value, list) and bool(value) and all(isinstance(m, Mapping) for m in value)


def _infer_kind(rows: list[dict[str, Any]], name: str) -> str:
    first = rows[0]
    if is_conversation(first.get("messages")):
        return "completion" if first["messages"][-1].get("role") == "assistant" else "text"
    if "choices" in first:
        return "multiple_choice"
    if "prompt" in first and "completion" in first:
        return "completion"
    if "prompt" in first and any(f in first for f in ("answer", "target")):
        return "generate"
    if "text" in first:
        return "text"
    raise ProbeDataError(
        f"probe {name!r}, row 0: cannot tell the probe kind from fields {sorted(first)}; expected 'text' "
        "(text), 'context'/'question' + 'choices' + 'answer' (multiple_choice), 'prompt' + 'completion' "
        "(completion) or 'prompt' + 'answer' (generate), or pass Probe(data, kind=...)"
    )


def first_field(row: dict[str, Any], names: Sequence[str]) -> tuple[str | None, Any]:
    # None counts as absent: a datasets.Dataset fills columns a row lacks with None.
    for n in names:
        if row.get(n) is not None:
            return n, row[n]
    return None, None


@dataclass
class ProbeSet:
    """A validated probe: its name, kind, signal and the rows it will use."""

    name: str
    kind: str
    rows: list[dict[str, Any]]
    row_ids: list[int]
    signal: str = "score"
    generation: Generation | None = None

    @classmethod
    def build(cls, name: str, data: Any, settings: ProbeSettings) -> ProbeSet:
        """Load, sample (seeded, ``max_examples``) and validate a probe's rows."""
        if not isinstance(name, str) or not name or "/" in name or name != name.strip():
            raise ProbeDataError(f"probe name {name!r}: use a non-empty name without '/' or surrounding spaces")
        kind, signal, spec = None, "score", Probe(None)
        if isinstance(data, Probe):
            kind, signal, spec, data = data.kind, data.signal, data, data.data
        if kind is not None and kind not in KINDS:
            raise ProbeDataError(f"probe {name!r}: kind {kind!r} is not one of {list(KINDS)}")
        if signal not in ("score", "nll"):
            raise ProbeDataError(f"probe {name!r}: signal {signal!r} is not one of ['score', 'nll']")
        rows = load_rows(data, name)
        if not rows:
            raise ProbeDataError(f"probe {name!r}: the probe set is empty; give it at least one row")
        kind = kind or _infer_kind(rows, name)
        generation = Generation.check(name, spec.scorer, spec.max_new_tokens, spec.stop) if kind == "generate" else None
        ids = list(range(len(rows)))
        if settings.max_examples is not None and len(rows) > settings.max_examples:
            ids = sorted(random.Random(settings.seed).sample(ids, settings.max_examples))
        chosen = [rows[i] for i in ids]
        for i, row in zip(ids, chosen):
            _validate_row(name, kind, i, row, generation)
        signal = {"text": "nll", "generate": "score"}.get(kind, signal)
        return cls(name=name, kind=kind, rows=chosen, row_ids=ids, signal=signal, generation=generation)

    @property
    def scored(self) -> bool:
        return self.kind != "text"


def _present(row: dict[str, Any]) -> list[str]:
    return sorted(k for k, v in row.items() if v is not None)


def _validate_row(name: str, kind: str, i: int, row: dict[str, Any], generation: Generation | None = None) -> None:
    def fail(msg: str) -> None:
        raise ProbeDataError(f"probe {name!r} ({kind}), row {i}: {msg}")

    def need_text(field_name: str | None, value: Any, what: str) -> None:
        if field_name is None:
            fail(f"missing field {what}; fields present: {_present(row)}")
        if not isinstance(value, str) or not value.strip():
            fail(f"field {field_name!r} must be a non-empty string, got {value!r:.60}")

    def need_messages(field_name: str, value: Any) -> None:
        if not is_conversation(value):
            fail(f"field {field_name!r} must be a non-empty list of messages, got {value!r:.60}")
        for j, m in enumerate(value):
            if not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                fail(f"{field_name}[{j}] needs string 'role' and 'content', got {dict(m)!r:.80}")

    if kind == "generate":
        assert generation is not None
        if is_conversation(row.get("messages")):
            need_messages("messages", row["messages"])
            if row["messages"][-1]["role"] == "assistant":
                fail("a generative row's messages end before the answer the model writes (not with the assistant's)")
        else:
            need_text(*first_field(row, ["prompt"]), "'prompt' (or 'messages')")
        from .scorers import TARGET_FIELDS, needs_target

        if needs_target(generation.scorer) and first_field(row, TARGET_FIELDS)[0] is None:
            fail(f"missing field 'answer' (or 'target'), which scorer {generation.scorer!r} compares with; fields "
                 f"present: {_present(row)}")
        return
    if "messages" in row and row["messages"] is not None:
        need_messages("messages", row["messages"])
        if kind == "completion" and (row["messages"][-1]["role"] != "assistant" or len(row["messages"]) < 2):
            fail("a conversational completion row ends with the assistant's message, after at least one other")
        if kind == "multiple_choice":
            fail("conversational rows are text or completion probes, not multiple choice")
    elif kind == "completion" and is_conversation(row.get("prompt")):
        need_messages("prompt", row["prompt"])
        need_messages("completion", row.get("completion"))
    elif kind == "text":
        need_text(*first_field(row, ["text"]), "'text'")
    elif kind == "completion":
        need_text(*first_field(row, ["prompt"]), "'prompt'")
        need_text(*first_field(row, ["completion"]), "'completion'")
    else:
        f_ctx, ctx = first_field(row, CONTEXT_FIELDS)
        need_text(f_ctx, ctx, "'context' (or 'question')")
        choices = row.get("choices")
        if not isinstance(choices, (list, tuple)) or len(choices) < 2:
            fail(f"field 'choices' must be a list of at least 2 strings, got {choices!r:.80}")
        for j, c in enumerate(choices):
            if not isinstance(c, str) or not c.strip():
                fail(f"choices[{j}] must be a non-empty string, got {c!r:.60}")
        f_ans, ans = first_field(row, ANSWER_FIELDS)
        if f_ans is None:
            fail(f"missing field 'answer' (or 'label'), the index of the correct choice; "
                 f"fields present: {_present(row)}")
        if isinstance(ans, bool) or not isinstance(ans, int):
            fail(f"field {f_ans!r} must be an integer index into 'choices', got {ans!r}")
        if not 0 <= ans < len(choices):
            fail(f"field {f_ans!r} = {ans} is out of range for {len(choices)} choices (valid: 0..{len(choices) - 1})")
