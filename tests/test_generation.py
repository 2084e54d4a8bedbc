"""Decoding: repetition penalty, nucleus sampling, seeds, batching, and the chat defaults."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from transformers import GenerationConfig, RepetitionPenaltyLogitsProcessor

from emoscope.batching import from_token_lists
from emoscope.errors import EmoscopeError
from emoscope.generation import (
    CHAT_DEFAULTS,
    SamplingConfig,
    chat_sampling,
    decode_rows,
    generate,
    penalise_repeats,
    pick_tokens,
    seen_tokens,
)

TEXTS = ["the cat sat on the mat.", "a dog!", "seven ships sailed at dawn, slowly.", "hi"]


def test_penalty_divides_positive_and_multiplies_negative_logits_of_seen_ids():
    logits = torch.tensor([[2.0, -1.0, 0.5, -3.0, 0.0], [2.0, -1.0, 0.5, -3.0, 0.0]])
    seen = torch.tensor([[True, True, False, False, True], [False, False, True, True, False]])
    out = penalise_repeats(logits, seen, 2.0)
    assert out.tolist() == [[1.0, -2.0, 0.5, -3.0, 0.0], [2.0, -1.0, 0.25, -6.0, 0.0]]
    assert penalise_repeats(logits, seen, 0.5)[0, :2].tolist() == [4.0, -0.5]  # < 1 favours repeats


def test_seen_mask_counts_real_tokens_only_and_matches_hugging_face():
    pad = 3  # also a real token of the first row, as end-of-turn pads often are
    batch = from_token_lists([[5, 3, 7, 5], [9]], pad_id=pad)
    seen = seen_tokens(batch, vocab_size=12)
    assert seen.nonzero().tolist() == [[0, 3], [0, 5], [0, 7], [1, 9]]
    logits = torch.randn(2, 12, generator=torch.Generator().manual_seed(0))
    ours = penalise_repeats(logits, seen, 1.3)
    reference = RepetitionPenaltyLogitsProcessor(1.3)
    for row, ids in enumerate([[5, 3, 7, 5], [9]]):
        expected = reference(torch.tensor([ids]), logits[row : row + 1].clone())
        assert torch.equal(ours[row : row + 1], expected)


def test_greedy_with_penalty_matches_hugging_face_generate(tiny_lm):
    lm = tiny_lm("llama")
    ids = lm.tokenizer("the cat sat on the mat.", return_tensors="pt")["input_ids"]
    config = SamplingConfig(max_new_tokens=12, repetition_penalty=1.5, stop_at_eos=False)
    ours = generate(lm, ["the cat sat on the mat."], config).tokens[0]
    with torch.inference_mode():
        theirs = lm.model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=12,
            min_new_tokens=12,
            do_sample=False,
            repetition_penalty=1.5,
            pad_token_id=0,
        )[0, ids.shape[1] :].tolist()
    assert ours == theirs
    plain = generate(lm, ["the cat sat on the mat."], SamplingConfig(12, stop_at_eos=False))
    assert plain.tokens[0] != ours  # the penalty really changes this model's choices


def test_penalty_must_be_positive():
    for bad in (0.0, -1.2):
        with pytest.raises(EmoscopeError, match="repetition_penalty"):
            SamplingConfig(repetition_penalty=bad)


def test_top_p_samples_only_the_nucleus():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log().expand(4000, -1)
    generator = torch.Generator().manual_seed(0)
    nucleus = pick_tokens(logits, SamplingConfig(temperature=1.0, top_p=0.7), generator)
    counts = Counter(nucleus.tolist())
    assert set(counts) == {0, 1}  # 0.5 + 0.3 covers 0.7; 2 and 3 lie outside
    assert 0.58 < counts[0] / 4000 < 0.67  # renormalised inside the nucleus: 0.5 / 0.8
    everything = pick_tokens(logits, SamplingConfig(temperature=1.0, top_p=1.0), generator)
    assert set(everything.tolist()) == {0, 1, 2, 3}


def test_seeded_sampling_is_reproducible_and_seed_dependent(tiny_lm):
    lm = tiny_lm("llama")

    def sample(seed: int) -> list[list[int]]:
        config = SamplingConfig(
            16, temperature=1.0, top_p=0.95, seed=seed, stop_at_eos=False, repetition_penalty=1.2
        )
        return generate(lm, TEXTS[:2], config).tokens

    assert sample(3) == sample(3)
    assert sample(3) != sample(4)


def test_batched_decoding_with_penalty_equals_each_row_alone(tiny_lm):
    lm = tiny_lm("llama")
    config = SamplingConfig(max_new_tokens=16, stop_at_eos=False, repetition_penalty=1.8)
    together = generate(lm, TEXTS, config).tokens
    for row, text in enumerate(TEXTS):
        assert generate(lm, [text], config).tokens[0] == together[row], row
    plain = generate(lm, TEXTS, SamplingConfig(max_new_tokens=16, stop_at_eos=False)).tokens
    assert plain != together


def test_chat_sampling_reads_the_models_generation_config(tiny_lm, monkeypatch):
    lm = tiny_lm("llama")
    own = GenerationConfig(do_sample=True, temperature=0.4, top_p=0.8, repetition_penalty=1.3)
    monkeypatch.setattr(lm.model, "generation_config", own)
    config = chat_sampling(lm, max_new_tokens=20, seed=5)
    assert (config.temperature, config.top_p, config.repetition_penalty) == (0.4, 0.8, 1.3)
    assert (config.max_new_tokens, config.seed) == (20, 5)
    given = chat_sampling(lm, max_new_tokens=20, temperature=1.1, repetition_penalty=1.0)
    assert (given.temperature, given.top_p, given.repetition_penalty) == (1.1, 0.8, 1.0)
    greedy = chat_sampling(lm, max_new_tokens=20, greedy=True, temperature=0.9)
    assert greedy.temperature == 0 and greedy.repetition_penalty == 1.3

    # Without do_sample, model.generate would ignore temperature and top-p: only the penalty counts.
    monkeypatch.setattr(lm.model, "generation_config", GenerationConfig(temperature=0.4, top_p=0.8))
    assert chat_sampling(lm, max_new_tokens=8).temperature == CHAT_DEFAULTS["temperature"]
    monkeypatch.setattr(lm.model, "generation_config", GenerationConfig())
    plain = chat_sampling(lm, max_new_tokens=8)
    assert (plain.temperature, plain.top_p, plain.repetition_penalty) == tuple(
        CHAT_DEFAULTS[k] for k in ("temperature", "top_p", "repetition_penalty")
    )


def test_greedy_chat_sampling_is_deterministic(tiny_lm):
    lm = tiny_lm("llama")
    config = chat_sampling(lm, max_new_tokens=10, greedy=True)
    batch = lm.encode_prompts(["hi"], chat=False)
    assert decode_rows(lm, batch, config) == decode_rows(lm, batch, config)


def most_frequent_share(ids: list[int]) -> float:
    return Counter(ids).most_common(1)[0][1] / len(ids)


def test_default_chat_sampling_ends_the_emoji_loop_on_smollm(smollm):
    batch = smollm.encode_prompts(["My dog died this morning."])
    reply = decode_rows(smollm, batch, chat_sampling(smollm, max_new_tokens=60, seed=0))[0]
    assert len(reply) >= 20 and most_frequent_share(reply) < 0.3, smollm.tokenizer.decode(reply)
    looping = decode_rows(smollm, batch, SamplingConfig(max_new_tokens=60))[0]
    assert most_frequent_share(looping) >= 0.3  # what plain greedy decoding does on this prompt
