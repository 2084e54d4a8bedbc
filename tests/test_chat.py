from __future__ import annotations

import pytest

from emoscope.chat import format_chat, format_plain
from emoscope.errors import EmoscopeError

TURNS = [{"role": "user", "content": "My dog passed away this morning."}]


def test_plain_framing_and_positions(tiny_lm):
    lm = tiny_lm("llama")
    chat = format_chat(
        lm.tokenizer, [{"role": "system", "content": "be brief"}, *TURNS], style="plain"
    )
    assert chat.text == "be brief\n\nHuman: My dog passed away this morning.\n\nAssistant:"
    ids = lm.tokenizer(chat.text)["input_ids"]
    pos = chat.token_positions(lm.tokenizer)
    assert lm.tokenizer.convert_ids_to_tokens(ids[pos["assistant_colon"]]) == ":"
    assert pos["assistant_colon"] == len(ids) - 1
    assert lm.tokenizer.convert_ids_to_tokens(ids[pos["last_user_token"]]) == "."
    assert chat.text[: chat.last_user_end].endswith("morning.")


def test_plain_without_generation_prompt():
    text, end = format_plain(
        [*TURNS, {"role": "assistant", "content": "That is sad news."}], add_generation_prompt=False
    )
    assert text.endswith("Assistant: That is sad news.") and end is not None


def test_template_positions_on_smollm(smollm):
    chat = smollm.chat(TURNS)
    assert chat.style == "template" and "<|im_start|>assistant" in chat.text
    ids = smollm.tokenizer(chat.text, add_special_tokens=False)["input_ids"]
    pos = chat.token_positions(smollm.tokenizer)
    assert pos["assistant_colon"] == len(ids) - 1
    assert smollm.tokenizer.decode(ids[pos["last_user_token"]]) == "."
    plain = smollm.chat(TURNS, style="plain")
    assert plain.text.startswith("Human:")


def test_bad_turns_are_rejected(tiny_lm):
    lm = tiny_lm("llama")
    with pytest.raises(EmoscopeError, match="role"):
        format_chat(lm.tokenizer, [{"role": "robot", "content": "x"}])
    with pytest.raises(EmoscopeError, match="non-empty"):
        format_chat(lm.tokenizer, [])
    with pytest.raises(EmoscopeError, match="no chat template"):
        format_chat(lm.tokenizer, TURNS, style="template")
