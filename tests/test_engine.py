"""The continuous-batching engine: same tokens as static decoding, per-request steering and
readouts that leave neighbours alone, joining, cancelling and refusing requests."""

from __future__ import annotations

import copy

import pytest
import torch
import transformers as tf

from conftest import VOCAB, char_tokenizer, synthetic_bank, tiny_config
from emoscope.batching import from_token_lists
from emoscope.engine import Engine, Request
from emoscope.errors import EmoscopeError
from emoscope.generation import SamplingConfig, decode_rows
from emoscope.hooks import RowAddition, add_per_row, add_to_residual
from emoscope.models import wrap_model
from emoscope.monitor import Monitor
from emoscope.steer import Steerer, Steering

TEXTS = ["the cat sat on the mat.", "a dog!", "seven ships sailed at dawn, slowly.", "hi"]
GREEDY = SamplingConfig(max_new_tokens=8, stop_at_eos=False)
FAMILIES = ["llama", "gemma3"]


def prompt_ids(lm) -> list[list[int]]:
    return [lm.tokenizer(text)["input_ids"] for text in TEXTS]


def static(lm, ids: list[list[int]], sampling: SamplingConfig = GREEDY) -> list[list[int]]:
    return decode_rows(lm, from_token_lists(ids, 0), sampling)


def static_steered(lm, bank, ids: list[int], steering: Steering) -> list[int]:
    """The static decoding loop under the steering hooks: the reference the engine must match."""
    batch = from_token_lists([ids], 0)
    with Steerer(lm, bank).apply(steering, batch):
        return decode_rows(lm, batch, GREEDY)[0]


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_tokens_do_not_depend_on_the_batch_or_on_joining_late(tiny_lm, family):
    lm = tiny_lm(family)
    ids = prompt_ids(lm)
    expected = static(lm, ids)
    full = Engine(lm, max_batch=4, max_tokens=64).generate([Request(p, GREEDY) for p in ids])
    assert [h.tokens for h in full] == expected
    for prompt, tokens in zip(ids[::3], expected[::3]):  # the longest and the shortest
        alone = Engine(lm, max_batch=1, max_tokens=64).generate([Request(prompt, GREEDY)])
        assert alone[0].tokens == tokens

    # Two slots: requests wait, join mid-flight and take over freed (and moved) slots.
    engine = Engine(lm, max_batch=2, max_tokens=64)
    first = engine.submit(Request(ids[0], GREEDY))
    for _ in range(3):
        engine.step()
    short = SamplingConfig(max_new_tokens=4, stop_at_eos=False)
    late = [engine.submit(Request(ids[1], short)), engine.submit(Request(ids[2], GREEDY))]
    engine.step()
    assert engine.running == 2 and engine.waiting == 1
    late.append(engine.submit(Request(ids[3], GREEDY)))
    engine.run_until_done()
    assert first.tokens == expected[0]
    assert late[0].tokens == expected[1][:4] and late[0].finish_reason == "length"
    assert [late[1].tokens, late[2].tokens] == expected[2:]


def test_sliding_window_layers_attend_only_within_their_window():
    config = tiny_config("gemma3")
    config.sliding_window = 5
    config.layer_types = ["sliding_attention", "full_attention", *["sliding_attention"] * 2]
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    lm = wrap_model(model, char_tokenizer(), "tiny-gemma3-window")
    ids = prompt_ids(lm)
    expected = static(lm, ids)
    handles = Engine(lm, max_batch=2, max_tokens=64).generate([Request(p, GREEDY) for p in ids])
    assert [h.tokens for h in handles] == expected
    model.config.sliding_window = 4096
    assert static(lm, ids) != expected  # the window really shapes these replies


def test_prompt_strings_are_chat_formatted_like_the_batch_encoder(tiny_lm):
    lm = tiny_lm("llama")
    for chat in (True, False):
        batch = lm.encode_prompts(TEXTS[:2], chat=chat)
        expected = decode_rows(lm, batch, GREEDY)
        handles = Engine(lm, max_tokens=96).generate(
            [Request(text, GREEDY, chat=chat) for text in TEXTS[:2]]
        )
        assert [h.tokens for h in handles] == expected
        assert handles[0].text == lm.tokenizer.decode(expected[0], skip_special_tokens=True)


def test_a_request_stops_at_eos_alone(tiny_lm):
    base = tiny_lm("llama")
    ids = prompt_ids(base)[0]
    plain = static(base, [ids])[0]
    stop = plain[2]  # make the third greedy token this model's end of sequence
    tokenizer = char_tokenizer()
    tokenizer.eos_token = VOCAB[stop]
    lm = wrap_model(base.model, tokenizer, base.name)
    sampling = SamplingConfig(max_new_tokens=10, stop_at_eos=True)
    handles = Engine(lm, max_tokens=64).generate(
        [Request(ids, sampling), Request(ids, GREEDY)]  # the second one ignores EOS
    )
    assert handles[0].tokens == plain[: plain.index(stop) + 1]
    assert handles[0].finish_reason == "eos" and handles[0].events[-1].finished
    assert handles[1].tokens == plain and handles[1].finish_reason == "length"
    assert handles[0].tokens == static(lm, [ids], sampling)[0]


def test_seeded_sampling_is_each_requests_own(tiny_lm):
    lm = tiny_lm("llama")
    ids = prompt_ids(lm)
    sampled = SamplingConfig(
        max_new_tokens=12, temperature=1.3, top_p=0.8, seed=7, stop_at_eos=False
    )
    penalised = SamplingConfig(max_new_tokens=12, repetition_penalty=1.5, stop_at_eos=False)
    handles = Engine(lm, max_batch=3, max_tokens=64).generate(
        [Request(ids[3], GREEDY), Request(ids[0], sampled), Request(ids[1], penalised)]
    )
    assert handles[1].tokens == static(lm, [ids[0]], sampled)[0]
    assert handles[2].tokens == static(lm, [ids[1]], penalised)[0]
    assert handles[2].tokens != static(lm, [ids[1]])[0]  # the penalty really acts here


@pytest.mark.parametrize("family", FAMILIES)
def test_steering_one_request_leaves_its_neighbour_bit_identical(tiny_lm, family):
    lm = tiny_lm(family)
    bank = synthetic_bank(lm)
    ids = prompt_ids(lm)
    steering = Steering({"happy": 1.5, "sad": -0.7}, layers=[1, 2])
    watched = ["happy", "sad", "calm", "afraid"]

    def pair(neighbour_steering):
        engine = Engine(lm, bank=bank, max_tokens=64)
        return engine.generate(
            [
                Request(ids[0], GREEDY, emotions=watched),
                Request(ids[2], GREEDY, steering=neighbour_steering, emotions=watched),
            ]
        )

    plain, steered = pair(None), pair(steering)
    assert steered[1].tokens != plain[1].tokens  # the steering acts on its own row...
    assert steered[0].tokens == plain[0].tokens == static(lm, [ids[0]])[0]
    assert torch.equal(steered[0].scores, plain[0].scores)  # ...and nowhere else
    alone = Engine(lm, bank=bank, max_tokens=64).generate(
        [Request(ids[0], GREEDY, emotions=watched)]
    )
    torch.testing.assert_close(alone[0].scores, plain[0].scores, atol=1e-5, rtol=0)


@pytest.mark.parametrize("positions", ["all", "prompt", "response", (3, 12)])
def test_steered_request_matches_the_static_steerer(tiny_lm, positions):
    lm = tiny_lm("llama")
    bank = synthetic_bank(lm)
    ids = prompt_ids(lm)
    steering = Steering({"happy": 1.5, "sad": -0.7}, layers=[1, 2], positions=positions)
    expected = static_steered(lm, bank, ids[0], steering)
    assert expected != static(lm, [ids[0]])[0]
    handles = Engine(lm, bank=bank, max_tokens=64).generate(
        [Request(ids[1], GREEDY), Request(ids[0], GREEDY, steering=steering)]
    )
    assert handles[1].tokens == expected
    assert handles[0].tokens == static(lm, [ids[1]])[0]


def test_ready_made_vectors_steer_without_a_bank(tiny_lm):
    lm = tiny_lm("llama")
    bank = synthetic_bank(lm)
    ids = prompt_ids(lm)[0]
    steering = Steering({"happy": 1.5}, layers=2, positions="response")
    from emoscope.steer import steering_vectors

    vectors = steering_vectors(bank, steering)
    expected = static_steered(lm, bank, ids, steering)
    engine = Engine(lm, max_tokens=64)
    handle = engine.submit(Request(ids, GREEDY, steering=vectors, positions="response"))
    assert handle.result().tokens == expected


@pytest.mark.parametrize("family", FAMILIES)
def test_live_readouts_equal_offline_readouts(tiny_lm, family):
    lm = tiny_lm(family)
    bank = synthetic_bank(lm)
    ids = prompt_ids(lm)
    watch = [["calm", "happy"], [0, 3, 1], ["sad"], None]
    engine = Engine(lm, bank=bank, max_batch=3, max_tokens=64)
    handles = engine.generate(
        [Request(p, GREEDY, emotions=e) for p, e in zip(ids, watch, strict=True)]
    )
    monitor = Monitor(lm, bank)  # all emotions, at the bank's default layer
    for handle, emotions in zip(handles, watch):
        if emotions is None:
            assert handle.scores is None and handle.events[0].scores is None
            continue
        columns = [e if isinstance(e, int) else bank.emotions.index(e) for e in emotions]
        assert handle.emotions == [bank.emotions[c] for c in columns]
        offline = monitor.score_tokens(handle.prompt_ids + handle.tokens)
        choosing = slice(
            len(handle.prompt_ids) - 1, len(handle.prompt_ids) + len(handle.tokens) - 1
        )
        torch.testing.assert_close(
            handle.scores, offline.scores[choosing][:, columns], atol=1e-4, rtol=0
        )
        torch.testing.assert_close(
            handle.z, offline.z[choosing][:, columns], atol=1e-4, rtol=0, equal_nan=True
        )
        sinks = torch.tensor([event.sink for event in handle.events])
        assert torch.equal(sinks, offline.sinks[choosing])


def test_readouts_over_a_band_average_like_the_monitor(tiny_lm):
    lm = tiny_lm("llama")
    bank = synthetic_bank(lm)
    ids = prompt_ids(lm)[0]
    handle = Engine(lm, bank=bank, monitor_layers=[1, 2], max_tokens=64).submit(
        Request(ids, GREEDY, emotions=["afraid", "happy"])
    )
    handle.result()
    offline = Monitor(lm, bank, layers=[1, 2], emotions=["afraid", "happy"]).score_tokens(
        ids + handle.tokens
    )
    choosing = slice(len(ids) - 1, len(ids) + len(handle.tokens) - 1)
    torch.testing.assert_close(handle.scores, offline.scores[choosing], atol=1e-4, rtol=0)


def test_streaming_iterator_and_callback_see_the_same_events(tiny_lm):
    lm = tiny_lm("llama")
    ids = prompt_ids(lm)
    received = []
    engine = Engine(lm, max_batch=2, max_tokens=64)
    other = engine.submit(Request(ids[1], GREEDY))
    handle = engine.submit(Request(ids[0], GREEDY, on_token=received.append))
    streamed = list(handle)
    assert [e.index for e in streamed] == list(range(GREEDY.max_new_tokens))
    assert [e.token_id for e in streamed] == static(lm, [ids[0]])[0]
    assert received == streamed and streamed[-1].finished and streamed[-1].reason == "length"
    assert not any(e.finished for e in streamed[:-1])
    assert other.done and other.tokens == static(lm, [ids[1]])[0]  # stepped along with it


def test_cancelling_one_request_leaves_the_others_undisturbed(tiny_lm):
    lm = tiny_lm("gemma3")
    ids = prompt_ids(lm)
    expected = static(lm, ids)
    engine = Engine(lm, max_batch=3, max_tokens=64)
    handles = [engine.submit(Request(p, GREEDY)) for p in ids]  # the fourth waits
    for _ in range(3):
        engine.step()
    handles[0].cancel()  # its slot is refilled by moving the last running request
    assert handles[0].finish_reason == "cancelled" and handles[0].tokens == expected[0][:3]
    assert engine.running == 2
    engine.run_until_done()
    assert handles[0].tokens == expected[0][:3]
    assert [h.tokens for h in handles[1:]] == expected[1:]

    queued = Engine(lm, max_batch=1, max_tokens=64)
    running, waiting = (queued.submit(Request(p, GREEDY)) for p in ids[:2])
    queued.step()
    waiting.cancel()
    assert waiting.done and waiting.tokens == [] and queued.waiting == 0
    queued.run_until_done()
    assert running.tokens == expected[0]


def test_cancelling_from_a_callback_stops_before_the_next_token(tiny_lm):
    lm = tiny_lm("llama")
    ids = prompt_ids(lm)
    engine = Engine(lm, max_tokens=64)
    handles: list = []

    def stop_at_three(event):
        if event.index == 2:
            handles[0].cancel()

    handles.append(engine.submit(Request(ids[0], GREEDY, on_token=stop_at_three)))
    handles.append(engine.submit(Request(ids[1], GREEDY)))
    engine.run_until_done()
    assert len(handles[0].tokens) == 3 and handles[0].finish_reason == "cancelled"
    assert handles[1].tokens == static(lm, [ids[1]])[0]


def test_over_long_and_broken_requests_fail_alone_at_submit(tiny_lm):
    lm = tiny_lm("llama")
    bank = synthetic_bank(lm)  # layers 1 and 2
    ids = prompt_ids(lm)
    engine = Engine(lm, bank=bank, max_batch=2, max_tokens=40)
    good = engine.submit(Request(ids[0], GREEDY))
    with pytest.raises(EmoscopeError, match="max_tokens"):
        engine.submit(Request(ids[2], SamplingConfig(max_new_tokens=10)))  # 35 + 10 > 40
    huge = Engine(lm, max_tokens=10**6)  # capped at the model's context
    assert huge.max_tokens == lm.model.config.max_position_embeddings
    with pytest.raises(EmoscopeError, match="context"):
        huge.submit(Request(ids[0], SamplingConfig(max_new_tokens=10**6)))
    broken = [
        Request(ids[1], GREEDY, steering=Steering({"bliss-ish": 0.5})),
        Request(ids[1], GREEDY, steering=Steering({"happy": 0.5}, layers=3)),
        Request(ids[1], GREEDY, steering={7: torch.zeros(lm.hidden_size)}),
        Request(ids[1], GREEDY, steering={1: torch.zeros(5)}),
        Request(ids[1], GREEDY, steering={1: torch.zeros(lm.hidden_size)}, positions="end"),
        Request(ids[1], GREEDY, emotions=["happy", "gloomy-ish"]),
        Request(ids[1], GREEDY, emotions=[9]),
        Request("   ", GREEDY),
        Request([], GREEDY),
        Request([len(VOCAB) + 5], GREEDY),
    ]
    for request in broken:
        with pytest.raises(EmoscopeError):
            engine.submit(request)
    assert engine.waiting == 1
    with pytest.raises(EmoscopeError, match="bank"):
        Engine(lm).submit(Request(ids[0], GREEDY, emotions=["happy"]))
    engine.run_until_done()
    assert good.tokens == static(lm, [ids[0]])[0]


def test_zero_new_tokens_finishes_without_work(tiny_lm):
    lm = tiny_lm("llama")
    engine = Engine(lm, max_tokens=64)
    handle = engine.submit(Request(prompt_ids(lm)[0], SamplingConfig(max_new_tokens=0)))
    assert engine.step() == [] and handle.done and handle.tokens == []


def test_bfloat16_runs_the_model_in_bf16_and_reads_out_in_float32(tiny_lm):
    base = tiny_lm("llama")
    lm = wrap_model(copy.deepcopy(base.model), base.tokenizer, base.name)  # cast a copy only
    bank = synthetic_bank(lm)
    ids = prompt_ids(lm)
    watched = ["happy", "sad"]

    def pair(steering):
        engine = Engine(lm, bank=bank, dtype="bfloat16", max_tokens=64)
        return engine.generate(
            [
                Request(ids[0], GREEDY, emotions=watched),
                Request(ids[2], GREEDY, steering=steering, emotions=watched),
            ]
        )

    plain, steered = pair(None), pair(Steering({"happy": 1.5}, layers=[1, 2]))
    assert lm.dtype == torch.bfloat16 and base.dtype == torch.float32
    assert plain[0].scores.dtype == torch.float32
    assert torch.equal(plain[0].scores, steered[0].scores)
    assert plain[0].tokens == steered[0].tokens
    offline = Monitor(lm, bank, emotions=watched).score_tokens(ids[0] + plain[0].tokens)
    choosing = slice(len(ids[0]) - 1, len(ids[0]) + len(plain[0].tokens) - 1)
    torch.testing.assert_close(plain[0].scores, offline.scores[choosing], atol=2e-2, rtol=2e-2)


def test_add_per_row_adds_each_rows_vector_and_leaves_zero_rows_exact(tiny_lm):
    lm = tiny_lm("llama")
    batch = from_token_lists(prompt_ids(lm)[:2], 0)
    vector = torch.randn(lm.hidden_size, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        plain = lm.model(**batch.inputs()).logits
        with add_to_residual(lm.model, lm.adapter, {1: vector}):
            reference = lm.model(**batch.inputs()).logits
        rows = RowAddition(
            torch.stack([torch.zeros_like(vector), vector]), torch.ones(2, batch.width)
        )
        with add_per_row(lm.model, lm.adapter, {1: rows}):
            mixed = lm.model(**batch.inputs()).logits
    assert torch.equal(mixed[0], plain[0])
    assert torch.equal(mixed[1], reference[1])
    assert not torch.equal(mixed[1], plain[1])
    with (
        pytest.raises(EmoscopeError, match="out of range"),
        add_per_row(lm.model, lm.adapter, {9: rows}),
    ):
        pass


# ----- every caller generates through the engine ------------------------------------------


def _static_loop_forbidden(*_args, **_kwargs):
    raise AssertionError("the static decoding loop ran")


def test_steerer_monitor_and_corpus_generation_run_on_the_engine(tiny_lm, tmp_path, monkeypatch):
    from emoscope.corpus import generate as corpus_generate

    lm = tiny_lm("llama")
    bank = synthetic_bank(lm)
    for module in ("emoscope.steer", "emoscope.monitor", "emoscope.corpus.generate"):
        for name in ("decode_rows", "decode_steps"):
            monkeypatch.setattr(f"{module}.{name}", _static_loop_forbidden, raising=False)
    steering = Steering({"happy": 1.0}, layers=1)
    assert len(Steerer(lm, bank).generate(TEXTS, steering=steering, sampling=GREEDY)) == 4
    monitored = Monitor(lm, bank, emotions=["calm"]).generate(TEXTS[:2], sampling=GREEDY)
    assert [len(m.token_ids) for m in monitored] == [8, 8]
    plan = corpus_generate.GenerationPlan(emotions=["happy"], n_topics=2, max_new_tokens=6)
    assert corpus_generate.generate_corpus(lm, tmp_path, plan, progress=False)["cells_done"] == 2


def test_the_static_fallback_gives_what_the_engine_gives(tiny_lm, monkeypatch):
    from emoscope.errors import UnsupportedArchitectureError

    lm = tiny_lm("llama")
    bank = synthetic_bank(lm)
    steering = Steering({"happy": 1.0, "sad": -0.5}, layers=[1, 2], positions="response")
    monitor = Monitor(lm, bank, emotions=["calm", "happy"], layers=[1, 2])

    def run():
        steered = Steerer(lm, bank).generate(TEXTS, steering=steering, sampling=GREEDY, chat=False)
        watched = monitor.generate(TEXTS, steering=steering, sampling=GREEDY, chat=False)
        return steered, watched

    on_engine = run()

    def refuse(*_args, **_kwargs):
        raise UnsupportedArchitectureError("not this one")

    monkeypatch.setattr("emoscope.steer.engine_for", refuse)
    monkeypatch.setattr("emoscope.monitor.engine_for", refuse)
    on_loop = run()
    assert on_loop[0] == on_engine[0]
    for a, b in zip(on_loop[1], on_engine[1], strict=True):
        assert a.token_ids == b.token_ids
        torch.testing.assert_close(a.scores, b.scores, atol=1e-4, rtol=0)
        torch.testing.assert_close(a.z, b.z, atol=1e-4, rtol=0, equal_nan=True)


@pytest.mark.parametrize("mode", ["projection", "cosine"])
def test_live_readouts_equal_offline_in_every_mode(tiny_lm, mode):
    lm = tiny_lm("llama")
    monitor = Monitor(lm, synthetic_bank(lm), layers=[1, 2], mode=mode)
    batch = monitor.encode(TEXTS[:2], chat=False)
    live = monitor.generate(TEXTS[:2], sampling=GREEDY, chat=False)
    for row, generation in enumerate(live):
        prompt = batch.rows()[row]
        offline = monitor.score_tokens(prompt + generation.token_ids)
        choosing = slice(len(prompt) - 1, len(prompt) + len(generation.token_ids) - 1)
        torch.testing.assert_close(generation.scores, offline.scores[choosing], atol=1e-4, rtol=0)
        if mode == "cosine":
            assert generation.z is None and offline.z is None
        else:
            torch.testing.assert_close(
                generation.z, offline.z[choosing], atol=1e-4, rtol=0, equal_nan=True
            )


def test_a_seeded_batch_gives_each_row_its_own_reproducible_stream(tiny_lm):
    lm = tiny_lm("llama")
    steerer = Steerer(lm, synthetic_bank(lm))
    sampled = SamplingConfig(max_new_tokens=12, temperature=1.0, seed=5, stop_at_eos=False)
    pair = steerer.generate(["same prompt", "same prompt"], sampling=sampled, chat=False)
    assert pair[0] != pair[1]
    alone = steerer.generate(
        ["same prompt"], sampling=SamplingConfig(12, 1.0, seed=6, stop_at_eos=False), chat=False
    )
    assert alone[0] == pair[1]
    assert steerer.generate(["same prompt"] * 2, sampling=sampled, chat=False) == pair


def test_corpus_cells_get_the_same_text_whatever_the_batch_size(tiny_lm, tmp_path):
    from emoscope.corpus.generate import GenerationPlan, generate_corpus
    from emoscope.files import iter_complete_jsonl

    lm = tiny_lm("llama")
    raws = []
    for batch_size in (1, 3):
        plan = GenerationPlan(
            emotions=["happy", "sad"], n_topics=2, batch_size=batch_size, max_new_tokens=10
        )
        out = tmp_path / f"batch-{batch_size}"
        generate_corpus(lm, out, plan, progress=False)
        entries = iter_complete_jsonl(out / "log.jsonl")
        raws.append({entry["cell"]: entry["raw"] for entry in entries})
    assert raws[0] == raws[1] and len(raws[0]) == 4
