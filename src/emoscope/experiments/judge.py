"""An optional judge: any local model that labels a free-generation reply by forced choice.

The judge reads the reply and a list of descriptions and answers with a letter; the label is the
description whose letter gets the highest next-token probability, so judging is deterministic.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from emoscope.errors import EmoscopeError
from emoscope.experiments.base import letters

MAX_REPLY_CHARS = 2000


def load_judge(name: str, device: str = "auto") -> Any:
    """Load the judge model, or fail with one line before any experiment work starts."""
    from emoscope.models import load_model

    try:
        return load_model(name, device=device)
    except EmoscopeError as exc:
        raise EmoscopeError(f"The judge model '{name}' cannot load: {exc}") from None
    except Exception as exc:  # a broken folder or file raises whatever its loader raises
        raise EmoscopeError(f"The judge model '{name}' cannot load: {exc}") from None


def judge_choice(judge: Any, reply: str, descriptions: Sequence[str]) -> int:
    """Index of the description the judge finds closest to what the reply does."""
    from emoscope.batching import encode
    from emoscope.experiments.runner import chat_text
    from emoscope.experiments.scoring import last_logits

    shown = "\n".join(
        f"({letter}) {d}" for letter, d in zip(letters(len(descriptions)), descriptions)
    )
    prompt = (
        "Here is a reply written by an AI assistant:\n\n<reply>\n"
        f"{reply[:MAX_REPLY_CHARS]}\n</reply>\n\nWhich description fits what the assistant does "
        f"in this reply?\n{shown}\n\nAnswer with the letter."
    )
    text, special = chat_text(judge, [{"role": "user", "content": prompt}], "(")
    batch = encode(judge.tokenizer, [text], judge.device, special)
    ids = []
    for letter in letters(len(descriptions)):
        full = judge.tokenizer(text + letter, add_special_tokens=special)["input_ids"]
        ids.append(int(full[-1]))
    with torch.inference_mode():
        logits = last_logits(judge.model, batch.inputs())[0]
    return int(torch.argmax(logits[torch.tensor(ids)]).item())
