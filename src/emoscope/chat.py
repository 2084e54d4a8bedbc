"""Turn a conversation into model text and find the token positions that readouts use.

Models with a chat template use it; others (base models) get the plain ``Human: ...`` /
``Assistant:`` framing of the paper. The paper reads emotion at the start of the assistant turn
(the ``:`` after ``Assistant``) and at the last token of the user's message, so both positions
are reported with every formatted conversation.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from emoscope.errors import EmoscopeError

ROLES = ("system", "user", "assistant")
PLAIN_NAMES = {"user": "Human", "assistant": "Assistant"}
STYLES = ("auto", "template", "plain")


@dataclass(frozen=True)
class ChatText:
    """Formatted conversation plus character offsets of the positions readouts need."""

    text: str
    style: str
    last_user_end: int | None
    """Character offset just past the last user message's content (None if there is none)."""
    assistant_start: int
    """Character offset where assistant text begins: the end of the prompt."""

    @property
    def add_special_tokens(self) -> bool:
        """Templates write their own special tokens; plain text gets the tokenizer's BOS."""
        return self.style == "plain"

    def token_positions(self, tokenizer: Any) -> dict[str, int | None]:
        """Token indices (in the unpadded encoding of ``text``) of the readout positions.

        The encoding is the one :func:`emoscope.batching.encode` makes of this text.

        ``assistant_colon`` is the last prompt token before the assistant's reply (the ``:`` of
        ``Assistant:`` in plain framing); ``last_user_token`` is the last token of the user's
        message content.
        """
        encoding = tokenizer(
            self.text, add_special_tokens=self.add_special_tokens, return_offsets_mapping=True
        )
        offsets = encoding["offset_mapping"]
        return {
            "assistant_colon": _token_ending_before(offsets, self.assistant_start),
            "last_user_token": (
                None
                if self.last_user_end is None
                else _token_ending_before(offsets, self.last_user_end)
            ),
        }


def _token_ending_before(offsets: Sequence[tuple[int, int]], char: int) -> int:
    """Index of the last token that starts before ``char``."""
    best = 0
    for i, (start, end) in enumerate(offsets):
        if start < char and end > start:
            best = i
    return best


def validate_turns(turns: Any, source: str = "conversation") -> list[dict[str, str]]:
    """The one check of a conversation: a non-empty list of ``{role, content}`` turns.

    ``source`` names where the turns came from (a file path, say) in the error message.
    """
    if not isinstance(turns, list | tuple) or not turns:
        raise EmoscopeError(f"{source}: a conversation needs a non-empty list of turns.")
    for n, turn in enumerate(turns):
        if (
            not isinstance(turn, dict)
            or turn.get("role") not in ROLES
            or not isinstance(turn.get("content"), str)
        ):
            raise EmoscopeError(
                f"{source}: turn {n} must be an object with 'role' ({', '.join(ROLES)}) and "
                f"string 'content'; got {turn!r}."
            )
    return [{"role": t["role"], "content": t["content"]} for t in turns]


def format_plain(
    turns: Sequence[dict[str, str]], add_generation_prompt: bool = True
) -> tuple[str, int | None]:
    """``Human: ...\\n\\nAssistant: ...`` framing; returns the text and the last user end offset."""
    text = ""
    last_user_end = None
    for turn in turns:
        if turn["role"] == "system":
            piece = turn["content"].strip() + "\n\n"
        else:
            piece = f"{PLAIN_NAMES[turn['role']]}: {turn['content'].strip()}"
            if turn["role"] == "user":
                last_user_end = len(text) + len(piece)
            piece += "\n\n"
        text += piece
    if add_generation_prompt:
        text += "Assistant:"
    else:
        text = text.rstrip("\n")
    return text, last_user_end


def format_chat(
    tokenizer: Any,
    turns: Sequence[dict[str, str]],
    add_generation_prompt: bool = True,
    style: str = "auto",
) -> ChatText:
    """Format ``turns`` (``{"role", "content"}`` dicts) for ``tokenizer``'s model.

    Args:
        style: ``auto`` (the chat template when the tokenizer has one, else plain),
            ``template`` or ``plain``.
    """
    validate_turns(turns)
    if style not in STYLES:
        raise EmoscopeError(f"Unknown chat style '{style}' (use {', '.join(STYLES)}).")
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if style == "template" and not has_template:
        raise EmoscopeError("This tokenizer has no chat template; use style='plain'.")
    if style == "plain" or (style == "auto" and not has_template):
        text, last_user_end = format_plain(turns, add_generation_prompt)
        return ChatText(text, "plain", last_user_end, len(text))
    text = tokenizer.apply_chat_template(
        list(turns), tokenize=False, add_generation_prompt=add_generation_prompt
    )
    last_user_end = None
    users = [t for t in turns if t["role"] == "user"]
    if users:
        content = users[-1]["content"]
        position = text.rfind(content)
        if position >= 0:
            last_user_end = position + len(content.rstrip())
    return ChatText(text, "template", last_user_end, len(text))
