"""The analysis stages on synthetic data where the right answer is known by construction."""

from __future__ import annotations

import pytest
import torch
import transformers as tf

from conftest import char_tokenizer, tiny_config
from emoscope.activations import NeutralMoments, TextMeans
from emoscope.analysis.calibration import readout_statistics
from emoscope.analysis.layers import (
    Accuracy,
    LabelledStories,
    choose,
    cross_validated_accuracy,
    sweep_layers,
)
from emoscope.analysis.logit_lens import logit_lens
from emoscope.analysis.validation import per_emotion_test
from emoscope.models import wrap_model
from emoscope.vectors import EmotionBank, LayerVectors, Recipe, centred_scores, unit_rows

EMOTIONS = ["happy", "sad", "calm", "afraid", "angry", "proud"]
HIDDEN = 24
N_TOPICS = 10


def noisy_stories(seed: int, signal_scale: float) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """One story per emotion and topic: a weak emotion signal under strong story-to-story
    variation along three fixed directions (what the story-variance denoising should remove)."""
    g = torch.Generator().manual_seed(seed)
    signal = torch.randn(len(EMOTIONS), HIDDEN, generator=g)
    nuisance = torch.linalg.qr(torch.randn(HIDDEN, 3, generator=g))[0]
    labels = torch.arange(len(EMOTIONS)).repeat(N_TOPICS)
    topics = [f"topic-{i // len(EMOTIONS)}" for i in range(len(labels))]
    x = (
        signal_scale * signal[labels]
        + 8.0 * torch.randn(len(labels), 3, generator=g) @ nuisance.T
        + 0.3 * torch.randn(len(labels), HIDDEN, generator=g)
    )
    return x, labels, topics


def test_cross_validation_prefers_the_level_that_removes_story_noise():
    x, labels, topics = noisy_stories(0, signal_scale=1.0)
    no_basis = torch.zeros(HIDDEN, 0)
    by_level = cross_validated_accuracy(x, labels, topics, len(EMOTIONS), no_basis, [0.0, 0.9])
    assert by_level[0.9].n == by_level[0.0].n == len(labels)  # every story held out once
    assert by_level[0.9].top1 >= 0.9
    assert by_level[0.0].top1 <= 0.6


def test_choose_takes_the_best_pair_and_breaks_ties_toward_less_denoising_then_earlier():
    good, fair = Accuracy(0.8, 1.0, 10), Accuracy(0.5, 0.9, 10)
    assert choose({(0.0, 3): fair, (0.5, 7): good, (0.0, 7): fair}) == (0.5, 7)
    assert choose({(0.5, 3): good, (0.0, 7): good, (0.0, 5): good}) == (0.0, 5)


def synthetic_run() -> tuple[LabelledStories, NeutralMoments]:
    """Layer 3 carries a weak signal, layer 7 a strong one; the last two topics are the test split."""
    weak, labels, topics = noisy_stories(1, signal_scale=0.2)
    strong, _, _ = noisy_stories(1, signal_scale=1.0)
    layers = [3, 7]
    means = TextMeans(
        torch.stack([weak, strong], dim=1),
        layers,
        torch.full((len(labels),), 60),
        torch.zeros(len(labels), dtype=torch.bool),
    )
    is_test = torch.tensor([t in ("topic-8", "topic-9") for t in topics])
    stories = LabelledStories(means, list(EMOTIONS), labels, is_test, topics)
    g = torch.Generator().manual_seed(2)
    neutral = NeutralMoments(
        layers,
        1000,
        torch.randn(2, HIDDEN, generator=g),
        torch.eye(HIDDEN, dtype=torch.float64).repeat(2, 1, 1),
        torch.tensor([5.0, 6.0]),
        torch.randn(12, 2, HIDDEN, generator=g),
    )
    return stories, neutral


def test_sweep_chooses_the_clearly_best_layer_and_level():
    stories, neutral = synthetic_run()
    prompts = torch.randn(9, 2, HIDDEN, generator=torch.Generator().manual_seed(3))
    recipe = Recipe(neutral_variance=0.0, story_variance_grid=(0.0, 0.9))
    sweep = sweep_layers(stories, neutral, prompts, recipe, cv_folds=4)
    assert (sweep.default_layer, sweep.recipe.story_variance) == (7, 0.9)
    assert sweep.selection["grid"] == [0.0, 0.9]
    assert sweep.selection["cv_by_level"]["0.9"] > sweep.selection["cv_by_level"]["0.0"]
    by_layer = {row["layer"]: row for row in sweep.rows}
    assert by_layer[7]["test"]["n"] == 12 and by_layer[7]["test"]["top1"] >= 0.9
    assert by_layer[7]["test"]["top1"] > by_layer[3]["test"]["top1"]
    assert by_layer[7]["residual_norm"] == 6.0 and by_layer[7]["neutral_components"] == 0
    for lv in sweep.layers.values():
        torch.testing.assert_close(lv.vectors.norm(dim=1), torch.ones(len(EMOTIONS)))
        assert lv.n_components >= 3  # the three story-noise directions are projected out
    names = {key.rsplit(".", 1)[0] for key in sweep.statistics}
    assert names == {
        "neutral_mean",
        "residual_norm",
        "neutral_score_mean",
        "neutral_score_std",
        "prompt_score_mean",
        "prompt_score_std",
    }
    expected = centred_scores(prompts[:, 1], sweep.layers[7].vectors, sweep.layers[7].mean)
    torch.testing.assert_close(sweep.statistics["prompt_score_mean.7"], expected.mean(dim=0))


def test_neutral_readout_spread_comes_from_the_covariance_alone():
    g = torch.Generator().manual_seed(5)
    tokens = torch.randn(4000, 8, generator=g) * torch.linspace(0.5, 3.0, 8) + 2.0
    centred = tokens.double() - tokens.double().mean(dim=0)
    neutral = NeutralMoments(
        [0],
        len(tokens),
        tokens.mean(dim=0, keepdim=True),
        (centred.T @ centred / len(tokens)).unsqueeze(0),
        tokens.norm(dim=1).mean().reshape(1),
        tokens[:3].unsqueeze(1),
    )
    vectors = unit_rows(torch.randn(3, 8, generator=g))
    layer = LayerVectors(vectors, vectors, torch.randn(8, generator=g), 0)
    stats = readout_statistics(layer, neutral, 0, tokens[:5])
    scores = centred_scores(tokens, vectors, layer.mean)
    torch.testing.assert_close(stats["neutral_score_mean"], scores.mean(dim=0), atol=1e-4, rtol=0)
    torch.testing.assert_close(
        stats["neutral_score_std"], scores.std(dim=0, unbiased=False), atol=1e-4, rtol=1e-4
    )


def test_per_emotion_test_ranks_the_true_emotion_of_held_out_stories():
    emotions = ["happy", "sad", "calm"]
    means = torch.tensor(
        [[1.0, 0.0, 0.0, 0.0], [1.0, 0.5, 0.0, 0.0], [0.3, 0.2, 0.1, 0.0], [0.0, 0.0, 1.0, 0.0]]
    )
    activations = TextMeans(means.unsqueeze(1), [0], torch.ones(4), torch.zeros(4, dtype=bool))
    stories = LabelledStories(
        activations,
        emotions,
        torch.tensor([0, 1, 2, 2]),
        torch.tensor([True, True, True, False]),
        ["a", "b", "c", "d"],
    )
    bank = EmotionBank(
        emotions, [0], {0: torch.eye(3, 4)}, {"mean.0": torch.zeros(4)}, {"default_layer": 0}
    )
    assert per_emotion_test(bank, stories, 0) == {
        "happy": {"ranks": [1], "confused_with": []},
        "sad": {"ranks": [2], "confused_with": ["happy"]},
        "calm": {"ranks": [3], "confused_with": ["happy"]},
    }


def test_logit_lens_of_an_unembedding_row_promotes_its_token(tiny_lm):
    lm = tiny_lm("llama")
    unembed = lm.adapter.unembed(lm.model).weight.detach()
    ids = lm.tokenizer.convert_tokens_to_ids(["e", "q", "7"])
    lens = logit_lens(lm, torch.cat([unembed[ids], -unembed[ids]]), k=3)
    assert [row["top"][0] for row in lens[:3]] == ["e", "q", "7"]
    assert [row["bottom"][0] for row in lens[3:]] == ["e", "q", "7"]
    special = set(lm.tokenizer.all_special_tokens)
    assert not special & {t for row in lens for t in row["top"] + row["bottom"]}


def test_logit_lens_is_not_fooled_by_a_final_norm_bias():
    """A LayerNorm bias adds the same logits to every direction; they must not top every list."""
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(tiny_config("gpt2"))
    lm = wrap_model(model, char_tokenizer(), "tiny-gpt2")
    unembed = lm.adapter.unembed(lm.model).weight.detach()
    favoured = lm.tokenizer.convert_tokens_to_ids("z")
    with torch.no_grad():
        lm.adapter.final_norm(lm.model).bias.copy_(50 * unembed[favoured])
    ids = lm.tokenizer.convert_tokens_to_ids(["e", "q"])
    lens = logit_lens(lm, unembed[ids], k=3)
    assert [row["top"][0] for row in lens] == ["e", "q"]
    assert all("z" not in row["top"] for row in lens)


@pytest.mark.parametrize("k", [1, 4])
def test_logit_lens_lists_have_k_tokens(tiny_lm, k):
    lm = tiny_lm("qwen2")
    lens = logit_lens(lm, torch.randn(2, lm.hidden_size), k=k)
    assert len(lens) == 2 and all(len(r["top"]) == len(r["bottom"]) == k for r in lens)
