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


def test_lexicon_rates_count_replies_with_any_phrase():
    from emoscope.analysis.speaker_steering import DENIAL, REASSURANCE, rate

    replies = ["I'm fine, really.", "Don't worry, you're safe here.", "The bus leaves at six."]
    assert rate(replies, DENIAL) == 1 / 3
    assert rate(replies, REASSURANCE) == 1 / 3
    assert rate([], DENIAL) == 0.0


def test_speaker_steering_changes_replies_in_every_family(small_run, smollm):
    from emoscope.analysis.speaker_steering import CHECK_INS, GREETINGS, SAMPLING, speaker_steering
    from emoscope.generation import SamplingConfig
    from emoscope.vectors import EmotionBank

    bank = EmotionBank.load(small_run[0].out, model=smollm)
    sampling = SamplingConfig(max_new_tokens=12, temperature=0.0, seed=SAMPLING.seed)
    result = speaker_steering(
        smollm,
        bank,
        strengths=(0.3,),
        samples=1,
        sampling=sampling,
        greetings=GREETINGS[:3],
        check_ins=CHECK_INS[:3],
    )
    greet, deny = result["greeting"], result["deflection"]
    assert result["summary"]["other_family"] == "other_assistant"
    base = greet["baseline"]["samples"]
    for key in ("story:afraid:0.3", "other_assistant:afraid:0.3", "present_assistant:angry:0.3"):
        assert greet[key]["samples"] != base and 0 <= greet[key]["reassurance"] <= 1
    steered = [k for k in deny if k.startswith("felt:")]
    assert steered and all(deny[k]["samples"] != deny["baseline"]["samples"] for k in steered)
    felt = bank.family("felt").emotions
    assert set(result["summary"]["denial"]) == {
        f"{f}:{e}"
        for f in ("story", "felt")
        for e in ("sad", "angry", "afraid")
        if f == "story" or e in felt
    }
