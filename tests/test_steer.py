from __future__ import annotations

import pytest
import torch

from conftest import synthetic_bank
from emoscope.batching import encode
from emoscope.errors import EmoscopeError, UnknownEmotionError
from emoscope.generation import SamplingConfig
from emoscope.hooks import ResidualReader
from emoscope.steer import Steerer, Steering, steering_vectors

PROMPTS = ["the cat sat.", "a long walk by the sea at dawn.", "hi"]


def test_vector_is_strength_times_norm_times_unit(tiny_lm):
    lm = tiny_lm("llama")
    bank = synthetic_bank(lm)
    vectors = steering_vectors(bank, Steering({"happy": 0.3, "sad": -0.1}, layers=[1, 2]))
    expected = 0.3 * 2.0 * bank.vector("happy", 1) - 0.1 * 2.0 * bank.vector("sad", 1)
    torch.testing.assert_close(vectors[1], expected)
    assert set(vectors) == {1, 2}


def test_steering_adds_exactly_at_chosen_layer(tiny_lm):
    lm = tiny_lm("qwen3")
    bank = synthetic_bank(lm)
    steerer = Steerer(lm, bank)
    batch = encode(lm.tokenizer, PROMPTS)
    with ResidualReader(lm.model, lm.adapter, [1]) as base:
        base.run(**batch.inputs())
    with (
        steerer.apply(Steering({"calm": 0.5}, layers=1), batch),
        ResidualReader(lm.model, lm.adapter, [1]) as steered,
    ):
        steered.run(**batch.inputs())
    delta = steered.last(1) - base.last(1)
    torch.testing.assert_close(
        delta, (0.5 * 2.0 * bank.vector("calm", 1)).expand_as(delta), rtol=1e-5, atol=1e-5
    )


@pytest.mark.parametrize("positions", ["all", "prompt", "response", (2, 9)])
@pytest.mark.parametrize("family", ["llama", "gemma3", "gpt2"])
def test_batched_steered_generation_equals_unbatched(tiny_lm, family, positions):
    lm = tiny_lm(family)
    steerer = Steerer(lm, synthetic_bank(lm))
    steering = Steering({"happy": 1.5, "afraid": -0.7}, layers=[1, 2], positions=positions)
    sampling = SamplingConfig(max_new_tokens=8, stop_at_eos=False)
    together = steerer.generate(PROMPTS, steering=steering, sampling=sampling, chat=False)
    alone = [
        steerer.generate([p], steering=steering, sampling=sampling, chat=False)[0] for p in PROMPTS
    ]
    assert together == alone
    plain = steerer.generate(PROMPTS, sampling=sampling, chat=False)
    assert plain != together  # the steering really acted


def test_response_steering_leaves_the_prompt_alone(tiny_lm):
    lm = tiny_lm("llama")
    steerer = Steerer(lm, synthetic_bank(lm))
    batch = encode(lm.tokenizer, PROMPTS)
    with ResidualReader(lm.model, lm.adapter, [2]) as base:
        base.run(**batch.inputs())
    with (
        steerer.apply(Steering({"happy": 1.0}, layers=1, positions="response"), batch),
        ResidualReader(lm.model, lm.adapter, [2]) as steered,
    ):
        steered.run(**batch.inputs())
    torch.testing.assert_close(steered.last(2), base.last(2))


def test_bad_steering_requests_are_refused(tiny_lm):
    lm = tiny_lm("llama")
    bank = synthetic_bank(lm)
    with pytest.raises(EmoscopeError, match="sane range"):
        Steering({"happy": 3.0})
    assert Steering({"happy": 3.0}, force=True).emotions["happy"] == 3.0
    with pytest.raises(UnknownEmotionError, match="Did you mean: happy"):
        steering_vectors(bank, Steering({"hapy": 0.1}))
    with pytest.raises(EmoscopeError, match="not in this bank"):
        steering_vectors(bank, Steering({"happy": 0.1}, layers=[3]))
    with pytest.raises(EmoscopeError, match="span"):
        Steering({"happy": 0.1}, positions=(5, 2))


def test_ready_made_vectors_alone_add_nothing_at_the_emotion_layers(tiny_lm):
    from emoscope.steer import steering_vectors

    lm = tiny_lm("llama")
    bank = synthetic_bank(lm)
    vector = torch.ones(lm.hidden_size)
    out = steering_vectors(bank, Steering({}, layers=[1, 2], extra={0: vector}))
    assert list(out) == [0] and torch.equal(out[0], vector)
