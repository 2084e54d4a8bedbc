"""A model spread over devices (accelerate's ``device_map="auto"``): readouts, steering and the
engine must give what the same model gives on one device. This machine has one device, so the
split is the CPU and disk offload: layers past the memory plan keep their weights on ``meta``
and are brought to the CPU to run, the situation a multi-GPU split creates at every boundary."""

from __future__ import annotations

import pytest
import torch

from conftest import save_tiny_model, synthetic_bank
from emoscope import Monitor, Steerer, Steering
from emoscope.engine import Engine, Request
from emoscope.errors import EmoscopeError
from emoscope.generation import SamplingConfig
from emoscope.hooks import execution_device
from emoscope.models import load_model, parse_max_memory


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("split") / "model")


@pytest.fixture(scope="module")
def whole_and_split(model_dir):
    whole = load_model(str(model_dir))
    # 90 KB holds the embeddings and block 0; blocks 1-3, the norm and the head go to disk
    split = load_model(str(model_dir), device="auto", max_memory="cpu=90KB")
    return whole, split


def test_the_memory_plan_really_splits_the_model(whole_and_split):
    _, split = whole_and_split
    placed = split.model.hf_device_map
    assert placed["model.layers.0"] == "cpu" and placed["model.layers.3"] == "disk"
    assert next(split.model.model.layers[3].parameters()).device.type == "meta"
    assert split.adapter.layer_device(split.model, 3) == torch.device("cpu")
    assert execution_device(split.model.model.layers[3]) == torch.device("cpu")
    assert split.device == torch.device("cpu")


def test_readouts_steering_and_engine_match_one_device(whole_and_split):
    whole, split = whole_and_split
    bank = synthetic_bank(whole, layers=(0, 2, 3))
    text = "the rain kept falling on the old roof."
    a = Monitor(whole, bank, layers=[2, 3]).score(text)
    b = Monitor(split, bank, layers=[2, 3], allow_other_model=True).score(text)
    torch.testing.assert_close(b.scores, a.scores, atol=1e-5, rtol=1e-5)
    greedy = SamplingConfig(max_new_tokens=12, temperature=0)
    steering = Steering({"happy": 0.8}, layers=[0, 3])
    prompts = ["hello there", "what is a cat?"]
    plain = Steerer(whole, bank).generate(prompts, steering=steering, sampling=greedy, chat=False)
    spread = Steerer(split, bank, allow_other_model=True).generate(
        prompts, steering=steering, sampling=greedy, chat=False
    )
    assert spread == plain
    unsteered = Steerer(whole, bank).generate(prompts, sampling=greedy, chat=False)
    assert unsteered != plain  # the steering changes the tokens, so the comparison means something
    events = []
    for lm in (whole, split):
        with Engine(lm, bank=bank, max_batch=2, allow_other_model=True) as engine:
            handle = engine.submit(
                Request("the sky", greedy, chat=False, steering=steering, emotions=["sad", "calm"])
            )
            engine.run_until_done()
        events.append(torch.stack([e.scores for e in handle.events]))
    torch.testing.assert_close(events[1], events[0], atol=1e-5, rtol=1e-5)


def test_a_memory_plan_is_read_and_checked():
    assert parse_max_memory("0=20GiB, 1=20GiB,cpu=64GiB") == {
        0: "20GiB",
        1: "20GiB",
        "cpu": "64GiB",
    }
    for bad in ("20GiB", "0=", "", "=1GiB"):
        with pytest.raises(EmoscopeError, match="DEVICE=SIZE"):
            parse_max_memory(bad)
    with pytest.raises(EmoscopeError, match="device='auto'"):
        load_model("smollm2-135m-instruct", max_memory={"cpu": "1GiB"})


def test_moments_of_parts_merge_into_the_moments_of_the_whole(tiny_lm):
    from emoscope.activations import merge_moments, neutral_moments
    from emoscope.cluster import length_shards, split_evenly

    lm = tiny_lm("llama")
    texts = [f"note {i}: the {'long ' * (i % 5)}shelf holds {i} jars." for i in range(14)]
    whole = neutral_moments(lm, texts, [1, 3], progress=False)
    shards = length_shards([len(t) for t in texts], 3)
    assert sorted(i for s in shards for i in s) == list(range(14)) and len(shards) >= 3
    parts = [
        (s, neutral_moments(lm, [texts[i] for i in s], [1, 3], progress=False)) for s in shards
    ]
    merged = merge_moments(parts, len(texts))
    assert merged.count == whole.count
    torch.testing.assert_close(merged.mean, whole.mean, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(merged.cov, whole.cov, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(merged.mean_norm, whole.mean_norm)
    torch.testing.assert_close(merged.text_means, whole.text_means, atol=1e-6, rtol=1e-5)
    assert [list(r) for r in split_evenly(10, 3)] == [[0, 1, 2], [3, 4, 5, 6], [7, 8, 9]]
    assert [list(r) for r in split_evenly(2, 4)] == [[0], [1]]
