from __future__ import annotations

import pytest
import torch

from conftest import FAMILIES
from emoscope.batching import encode
from emoscope.errors import EmoscopeError, UnsupportedArchitectureError
from emoscope.hooks import (
    ResidualReader,
    adapter_for,
    add_to_residual,
    positions_from,
    positions_mask,
)


def hook_count(lm) -> int:
    blocks = lm.adapter.layers(lm.model)
    return sum(len(b._forward_hooks) for b in blocks) + len(lm.model._forward_pre_hooks)


TEXTS = ["the cat sat on the mat.", "a dog!", "seven ships sailed at dawn, slowly."]


@pytest.mark.parametrize("family", FAMILIES)
def test_reader_matches_output_hidden_states(tiny_lm, family):
    lm = tiny_lm(family)
    batch = encode(lm.tokenizer, TEXTS)
    layers = list(range(lm.n_layers))
    before = hook_count(lm)
    with ResidualReader(lm.model, lm.adapter, layers) as reader, torch.inference_mode():
        out = lm.model(**batch.inputs(), output_hidden_states=True)
    hs = out.hidden_states
    assert len(hs) == lm.n_layers + 1
    for layer in layers[:-1]:
        torch.testing.assert_close(reader.last(layer), hs[layer + 1], rtol=0, atol=0)
    # HF normalises its last entry; emoscope keeps the raw block output.
    last = reader.last(layers[-1])
    torch.testing.assert_close(lm.adapter.final_norm(lm.model)(last), hs[-1], rtol=1e-5, atol=1e-5)
    assert hook_count(lm) == before


@pytest.mark.parametrize("family", FAMILIES)
def test_steering_changes_exactly_chosen_layer_and_positions(tiny_lm, family):
    lm = tiny_lm(family)
    batch = encode(lm.tokenizer, TEXTS)
    layers = list(range(lm.n_layers))
    before = hook_count(lm)
    with ResidualReader(lm.model, lm.adapter, layers) as base:
        base.run(**batch.inputs())
    target = 1
    vector = torch.randn(lm.hidden_size)
    mask = torch.zeros_like(batch.attention_mask)
    mask[:, 5:8] = 1
    with (
        add_to_residual(lm.model, lm.adapter, {target: vector}, positions_mask(mask)),
        ResidualReader(lm.model, lm.adapter, layers) as steered,
    ):
        steered.run(**batch.inputs())
    for layer in range(target):
        torch.testing.assert_close(steered.last(layer), base.last(layer), rtol=0, atol=0)
    delta = steered.last(target) - base.last(target)
    expected = mask.unsqueeze(-1).float() * vector
    torch.testing.assert_close(delta, expected, rtol=1e-5, atol=1e-5)
    # Causal: later layers change only at or after the first steered position.
    # (Padding positions are ignored: some families let fully masked pad queries attend anywhere.)
    later = (steered.last(target + 1) - base.last(target + 1)).abs().amax(
        dim=-1
    ) * batch.attention_mask
    assert later[:, :5].max() < 1e-5 and later[:, 5:].max() > 1e-3
    assert hook_count(lm) == before


def test_hooks_removed_after_exception(tiny_lm):
    lm = tiny_lm("llama")
    lm.adapter.layers(lm.model)
    before = hook_count(lm)
    with (
        pytest.raises(RuntimeError, match="boom"),
        add_to_residual(lm.model, lm.adapter, {0: torch.ones(lm.hidden_size)}),
        ResidualReader(lm.model, lm.adapter, [0, 2]),
    ):
        assert hook_count(lm) == before + 4
        raise RuntimeError("boom")
    assert hook_count(lm) == before


def test_stop_after_last_skips_later_blocks(tiny_lm):
    lm = tiny_lm("qwen2")
    batch = encode(lm.tokenizer, TEXTS[:1])
    calls = []
    handle = lm.adapter.layers(lm.model)[3].register_forward_hook(lambda *a: calls.append(1))
    try:
        with ResidualReader(lm.model, lm.adapter, [1], stop_after_last=True) as reader:
            reader.run(**batch.inputs())
    finally:
        handle.remove()
    assert reader.last(1).shape == (1, batch.width, lm.hidden_size)
    assert calls == []


def test_steering_response_positions_during_cached_decoding(tiny_lm):
    """With a KV cache, 'from position p' must hit decode steps too, not only the prefill."""
    lm = tiny_lm("gemma3")
    batch = encode(lm.tokenizer, TEXTS[:1])
    seen = []
    with add_to_residual(
        lm.model, lm.adapter, {0: torch.zeros(lm.hidden_size)}, positions_from(batch.width)
    ) as tracker:
        handle = lm.adapter.layers(lm.model)[0].register_forward_hook(
            lambda *a: seen.append((tracker.start, tracker.length))
        )
        try:
            with torch.inference_mode():
                lm.model.generate(
                    **batch.inputs(), max_new_tokens=3, do_sample=False, pad_token_id=0
                )
        finally:
            handle.remove()
    assert seen[0] == (0, batch.width)
    assert seen[1:] == [(batch.width, 1), (batch.width + 1, 1)]


def test_out_of_range_layer_is_a_clear_error(tiny_lm):
    lm = tiny_lm("llama")
    with (
        pytest.raises(EmoscopeError, match="out of range"),
        ResidualReader(lm.model, lm.adapter, [99]),
    ):
        pass
    with (
        pytest.raises(EmoscopeError, match="out of range"),
        add_to_residual(lm.model, lm.adapter, {-1: torch.ones(lm.hidden_size)}),
    ):
        pass


def test_unsupported_architecture_names_the_families():
    import transformers as tf

    model = tf.AutoModelForCausalLM.from_config(
        tf.BloomConfig(vocab_size=50, hidden_size=16, n_layer=1, n_head=2)
    )
    with pytest.raises(UnsupportedArchitectureError, match=r"llama.*qwen2"):
        adapter_for(model)
