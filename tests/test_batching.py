from __future__ import annotations

import pytest

from conftest import FAMILIES, char_tokenizer
from emoscope.batching import encode, from_token_lists, length_sorted_batches
from emoscope.generation import SamplingConfig, generate
from emoscope.hooks import ResidualReader

TEXTS = ["the cat sat on the mat.", "a dog!", "seven ships sailed at dawn, slowly.", "hi"]


def read_all(lm, texts, **kw):
    batch = encode(lm.tokenizer, texts, **kw)
    with ResidualReader(lm.model, lm.adapter, range(lm.n_layers)) as reader:
        reader.run(**batch.inputs())
    return batch, reader


@pytest.mark.parametrize("family", FAMILIES)
def test_batched_activations_equal_unbatched(tiny_lm, family):
    lm = tiny_lm(family)
    _batch, together = read_all(lm, TEXTS)
    for row, text in enumerate(TEXTS):
        single, alone = read_all(lm, [text])
        n = single.width
        for layer in range(lm.n_layers):
            diff = (together.last(layer)[row, -n:] - alone.last(layer)[0]).abs().max().item()
            assert diff <= 1e-4, (family, row, layer, diff)


@pytest.mark.parametrize("family", ["llama", "gemma3", "gpt2", "gpt-neox", "qwen3"])
def test_batched_greedy_tokens_equal_unbatched(tiny_lm, family):
    lm = tiny_lm(family)
    config = SamplingConfig(max_new_tokens=12, stop_at_eos=False)
    together = generate(lm, TEXTS, config)
    for row, text in enumerate(TEXTS):
        assert generate(lm, [text], config).tokens[0] == together.tokens[row]


def test_sampling_is_reproducible_with_a_seed(tiny_lm):
    lm = tiny_lm("llama")
    config = SamplingConfig(
        max_new_tokens=10, temperature=1.0, top_p=0.9, seed=3, stop_at_eos=False
    )
    assert generate(lm, TEXTS[:2], config).tokens == generate(lm, TEXTS[:2], config).tokens


def test_left_padding_and_positions():
    batch = from_token_lists([[5, 6, 7], [9]], pad_id=0)
    assert batch.input_ids.tolist() == [[5, 6, 7], [0, 0, 9]]
    assert batch.position_ids.tolist() == [[0, 1, 2], [0, 0, 0]]
    assert batch.padding.tolist() == [0, 2]


def test_length_sorted_batches_cover_everything_once():
    lengths = [5, 100, 7, 60, 61, 3, 99]
    batches = length_sorted_batches(lengths, max_batch=3, max_tokens=200)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    assert all(len(b) <= 3 and max(lengths[i] for i in b) * len(b) <= 200 for b in batches)


def test_real_model_batched_equals_unbatched(smollm):
    prompts = [
        smollm.chat([{"role": "user", "content": p}]).text
        for p in ["Hi!", "Name three rivers in Europe.", "What is 2+2?"]
    ]
    _batch, together = read_all(smollm, prompts, add_special_tokens=False)
    for row, text in enumerate(prompts):
        single, alone = read_all(smollm, [text], add_special_tokens=False)
        n = single.width
        for layer in (0, 10, 20, smollm.n_layers - 1):
            a, b = together.last(layer)[row, -n:], alone.last(layer)[0]
            # fp32 rounding scales with each token's magnitude (the first token's residual
            # reaches ~2.5e4, where one float32 step is 2e-3): compare relative to it.
            scale = b.abs().amax(dim=-1, keepdim=True)
            assert ((a - b).abs() <= 1e-4 + 1e-5 * scale).all(), (row, layer)
    config = SamplingConfig(max_new_tokens=16)
    gen = generate(smollm, prompts, config, add_special_tokens=False)
    for row, text in enumerate(prompts):
        assert (
            generate(smollm, [text], config, add_special_tokens=False).tokens[0] == gen.tokens[row]
        )
    assert "4" in gen.texts[2]


def test_encode_left_pads_without_touching_the_tokenizer():
    reference = char_tokenizer()  # pad token and left padding, as the batch must come out
    expected = reference(TEXTS, padding=True, return_tensors="pt")
    tokenizer = char_tokenizer()
    tokenizer.padding_side = "right"
    tokenizer.pad_token = None  # padding falls back to EOS, which the mask hides
    batch = encode(tokenizer, TEXTS)
    assert tokenizer.padding_side == "right" and tokenizer.pad_token is None
    assert batch.attention_mask.tolist() == expected["attention_mask"].tolist()
    real = batch.attention_mask.bool()
    assert batch.input_ids[real].tolist() == expected["input_ids"][real].tolist()
    assert (batch.input_ids[~real] == tokenizer.eos_token_id).all()
