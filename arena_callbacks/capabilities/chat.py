"""What the generative sets share: rendering a chat with a worked example, and where a reply ends."""

from __future__ import annotations

from typing import Any

from .instructions import _chat_prompt, _end_of_turn

__all__: list[str] = []


def has_chat_template(tokenizer: Any) -> bool:
    return tokenizer is not None and bool(getattr(tokenizer, "chat_template", None))


def demo_prompt(tokenizer: Any, demo: tuple[str, str], question: str) -> str:
    """One worked example as an earlier chat turn, then ``question``, in the tokenizer's chat
    template with its generation prompt; a plain ``User:`` / ``Assistant:`` format without one."""
    messages = [{"role": "user", "content": demo[0]}, {"role": "assistant", "content": demo[1]},
                {"role": "user", "content": question}]
    return _chat_prompt(tokenizer, messages)


def reply_stops(tokenizer: Any) -> list[str]:
    """Where a reply ends: the template's end-of-turn marker (``<|im_end|>`` for SmolLM2; the
    model's end-of-sequence token ends a reply anyway), or the line's end in the plain format,
    where the next line would be the user's turn."""
    if has_chat_template(tokenizer):
        end = _end_of_turn(tokenizer)
        return [end] if end else ["\n\n"]
    return ["\n"]
