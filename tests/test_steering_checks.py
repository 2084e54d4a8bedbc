"""Steering with real vectors changes what SmolLM2 says, in the expected direction."""

from __future__ import annotations

from emoscope.analysis.steering_checks import feeling_test
from emoscope.steer import Steerer, Steering
from emoscope.vectors import EmotionBank


def test_he_feels_own_words_rise(small_run, smollm):
    bank = EmotionBank.load(small_run[0].out, model=smollm)
    result = feeling_test(Steerer(smollm, bank), strength=0.5)  # the bank's steering layer
    assert result["words"] and len(result["words"]) == 12
    assert result["own_word_rises"] >= 8, result["delta_logprob"]
    assert result["diagonal_minus_off"] >= 1.0


def test_happy_steering_raises_sentiment(small_run, smollm):
    from emoscope.generation import SamplingConfig
    from emoscope.lexicons import vader_compound

    bank = EmotionBank.load(small_run[0].out, model=smollm)
    steerer = Steerer(smollm, bank)
    prompts = [
        "Describe an ordinary Tuesday morning.",
        "Tell me about a walk to the shop.",
        "Describe a quiet street.",
    ]
    sampling = SamplingConfig(max_new_tokens=30)
    mean = lambda texts: sum(vader_compound(t) for t in texts) / len(texts)  # noqa: E731
    down = mean(steerer.generate(prompts, steering=Steering({"happy": -0.3}), sampling=sampling))
    up = mean(steerer.generate(prompts, steering=Steering({"happy": 0.3}), sampling=sampling))
    assert up > down + 0.3, (down, up)
