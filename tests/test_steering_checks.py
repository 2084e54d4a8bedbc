"""Steering with real vectors changes what SmolLM2 says, in the expected direction."""

from __future__ import annotations

from emoscope.analysis.steering_checks import feeling_test
from emoscope.steer import Steerer, Steering
from emoscope.vectors import EmotionVectors


def test_he_feels_own_words_rise(small_run, smollm):
    bank = EmotionVectors.load(small_run[0].out, model=smollm)
    result = feeling_test(smollm, Steerer(smollm, bank), strength=0.5, layers=[bank.steer_layer])
    assert result["words"] and len(result["words"]) == 12
    assert result["own_word_rises"] >= 8, result["delta_logprob"]
    assert result["diagonal_minus_off"] >= 1.0


def test_happy_steering_raises_sentiment(small_run, smollm):
    from emoscope.corpus.quality import vader_compound
    from emoscope.generation import SamplingConfig

    bank = EmotionVectors.load(small_run[0].out, model=smollm)
    steerer = Steerer(smollm, bank)
    prompts = [
        "Describe an ordinary Tuesday morning.",
        "Tell me about a walk to the shop.",
        "Describe a quiet street.",
    ]
    sampling = SamplingConfig(max_new_tokens=30)
    mean = lambda texts: sum(vader_compound(t) for t in texts) / len(texts)  # noqa: E731
    down = mean(steerer.generate(prompts, Steering({"happy": -0.3}, [bank.steer_layer]), sampling))
    up = mean(steerer.generate(prompts, Steering({"happy": 0.3}, [bank.steer_layer]), sampling))
    assert up > down + 0.3, (down, up)
