from __future__ import annotations

import json

import pytest
import torch

from conftest import synthetic_bank
from emoscope.errors import EmoscopeError
from emoscope.generation import SamplingConfig
from emoscope.monitor import AlertRule, AlertTracker, Monitor, load_transcript
from emoscope.steer import Steering

PROMPTS = ["the cat sat.", "a long walk by the sea at dawn.", "hi"]


@pytest.mark.parametrize("family", ["llama", "gemma3", "gpt-neox"])
def test_live_readout_equals_offline_readout_of_the_choosing_state(tiny_lm, family):
    lm = tiny_lm(family)
    monitor = Monitor(lm, synthetic_bank(lm), layers=[1, 2])
    batch = monitor.encode(PROMPTS[:1], chat=False)
    steps = list(
        monitor.stream(batch, sampling=SamplingConfig(max_new_tokens=6, stop_at_eos=False))
    )
    generated = [int(s.tokens[0]) for s in steps]
    prompt = batch.input_ids[0].tolist()
    offline = monitor.score_tokens(prompt + generated)
    for k, step in enumerate(steps):
        position = len(prompt) - 1 + k  # the state that chose token k
        torch.testing.assert_close(step.scores[0], offline.scores[position], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(step.z[0], offline.z[position], rtol=1e-4, atol=1e-4)


def test_batched_live_monitoring_equals_unbatched(tiny_lm):
    lm = tiny_lm("llama")
    monitor = Monitor(lm, synthetic_bank(lm), layers=2)
    sampling = SamplingConfig(max_new_tokens=5, stop_at_eos=False)
    together = monitor.generate(PROMPTS, sampling=sampling, chat=False)
    for row, prompt in enumerate(PROMPTS):
        alone = monitor.generate([prompt], sampling=sampling, chat=False)[0]
        assert alone.token_ids == together[row].token_ids
        torch.testing.assert_close(alone.scores, together[row].scores, rtol=1e-4, atol=1e-4)


def test_monitoring_sees_steering_at_the_same_layer(tiny_lm):
    lm = tiny_lm("qwen2")
    bank = synthetic_bank(lm)
    monitor = Monitor(lm, bank, emotions=["happy"], layers=1)
    sampling = SamplingConfig(max_new_tokens=3, stop_at_eos=False)
    plain = monitor.generate(PROMPTS[:1], sampling=sampling, chat=False)[0]
    steered = monitor.generate(
        PROMPTS[:1], sampling=sampling, steering=Steering({"happy": 1.0}, layers=1), chat=False
    )[0]
    # The first readout is at the last prompt position: shifted by exactly strength x norm.
    assert float(steered.scores[0, 0] - plain.scores[0, 0]) == pytest.approx(1.0 * 2.0, abs=1e-4)


def test_offline_modes_band_smoothing_and_display(tiny_lm):
    lm = tiny_lm("llama")
    bank = synthetic_bank(lm)
    text = "the quick brown fox jumps."
    one = Monitor(lm, bank, layers=1).score(text)
    two = Monitor(lm, bank, layers=2).score(text)
    band = Monitor(lm, bank, layers=[1, 2]).score(text)
    torch.testing.assert_close(band.scores, (one.scores + two.scores) / 2)
    proj = Monitor(lm, bank, layers=1, mode="projection").score(text)
    cos = Monitor(lm, bank, layers=1, mode="cosine").score(text)
    assert cos.z is None and cos.scores.abs().max() <= 1.0 + 1e-5
    assert not torch.allclose(proj.scores, one.scores)
    smooth = one.smoothed(3)
    torch.testing.assert_close(smooth.scores[2], one.scores[:3].mean(dim=0))
    shown = one.display()
    assert shown.abs().max() <= 1 and (shown.abs() == 1).float().mean() <= 0.05
    assert len(one.tokens) == one.scores.shape[0] and one.scores.shape[1] == 4


def test_alert_rules_parse_and_fire_after_n_tokens():
    rule = AlertRule.parse("desperate > 2.5 sigma for 3 tokens")
    assert (rule.emotion, rule.threshold, rule.tokens, rule.above, rule.kind) == (
        "desperate",
        2.5,
        3,
        True,
        "z",
    )
    low = AlertRule.parse("calm<-2@5")
    assert (low.threshold, low.tokens, low.above) == (-2.0, 5, False)
    assert AlertRule.parse("gap:afraid>2").kind == "gap"
    with pytest.raises(EmoscopeError, match="Cannot read alert rule"):
        AlertRule.parse("desperate is high")
    tracker = AlertTracker([rule], ["calm", "desperate"], batch_size=2)
    series = [3.0, 3.0, 1.0, 3.0, 3.0, 3.0, 3.0]
    fired = []
    active = torch.tensor([True, True])
    for step, value in enumerate(series):
        z = torch.tensor([[0.0, value], [0.0, 0.0]])
        fired += tracker.update(z, step, active)
    assert [(a.row, a.step) for a in fired] == [
        (0, 5)
    ]  # third consecutive token above, once per run


def test_alerts_and_transcripts_go_to_the_log(tiny_lm, tmp_path):
    lm = tiny_lm("llama")
    bank = synthetic_bank(lm)
    monitor = Monitor(lm, bank, layers=2)
    log = tmp_path / "alerts.jsonl"
    out = monitor.generate(
        PROMPTS[:2],
        sampling=SamplingConfig(max_new_tokens=4, stop_at_eos=False),
        alerts=["happy > -100 for 2 tokens"],
        log=log,
        chat=False,
        expression=True,
    )
    records = [json.loads(line) for line in log.read_text().splitlines()]
    alerts = [r for r in records if r["type"] == "alert"]
    transcripts = [r for r in records if r["type"] == "transcript"]
    assert (
        len(alerts) == 2
        and {a["row"] for a in alerts} == {0, 1}
        and all(a["step"] == 1 for a in alerts)
    )
    assert len(transcripts) == 2 and transcripts[0]["response"] == out[0].text
    assert transcripts[0]["turns"] == [
        {"role": "user", "content": PROMPTS[0]},
        {"role": "assistant", "content": out[0].text},
    ]
    assert set(transcripts[0]["mean_z"]) == set(bank.emotions)
    assert out[0].concealment is not None and set(out[0].concealment["gap"]) == set(bank.emotions)
    plain = monitor.generate(PROMPTS[:1], sampling=SamplingConfig(max_new_tokens=2), chat=False)
    assert plain[0].concealment is None  # the expression readout is opt-in


def test_transcript_roles_and_bad_files(tiny_lm, tmp_path):
    lm = tiny_lm("llama")
    monitor = Monitor(lm, synthetic_bank(lm), layers=1)
    turns = [
        {"role": "user", "content": "where is it?"},
        {"role": "assistant", "content": "it is here."},
    ]
    readout = monitor.score(turns)
    assert {"user", "assistant", "format"} <= set(readout.roles)
    assert readout.mean("assistant").shape == (4,)
    bad = tmp_path / "t.json"
    bad.write_text('[{"role": "robot", "content": "x"}]')
    with pytest.raises(EmoscopeError, match="turn 0"):
        load_transcript(bad)
    bad.write_text("{nope")
    with pytest.raises(EmoscopeError, match="not valid JSON"):
        load_transcript(bad)
    with pytest.raises(EmoscopeError, match="No such transcript"):
        load_transcript(tmp_path / "absent.json")


def test_monitor_refuses_a_bank_from_another_model(tiny_lm):
    from emoscope.errors import BankMismatchError

    bank = synthetic_bank(tiny_lm("llama"))
    with pytest.raises(BankMismatchError, match="tiny-llama"):
        Monitor(tiny_lm("qwen2"), bank)


def test_rules_on_unmonitored_emotions_are_refused(tiny_lm):
    lm = tiny_lm("llama")
    monitor = Monitor(lm, synthetic_bank(lm), emotions=["happy", "sad"], layers=1)
    for rule in ("calm > 1", "gap:calm > 0"):
        with pytest.raises(EmoscopeError, match="not being monitored"):
            monitor.generate(
                PROMPTS[:1],
                sampling=SamplingConfig(max_new_tokens=2),
                alerts=[rule],
                chat=False,
            )


def test_allow_other_model_waives_the_name_but_not_the_shape(tiny_lm):
    import dataclasses

    from emoscope.errors import BankMismatchError
    from emoscope.steer import Steerer

    llama_bank = synthetic_bank(tiny_lm("llama"))
    qwen = tiny_lm("qwen2")
    monitor = Monitor(qwen, llama_bank, allow_other_model=True)
    assert monitor.score("hello there").scores.shape[1] == len(llama_bank.emotions)
    Steerer(qwen, llama_bank, allow_other_model=True)
    narrow = dataclasses.replace(
        llama_bank, vectors={layer: v[:, :16] for layer, v in llama_bank.vectors.items()}
    )
    for build in (Monitor, Steerer):
        with pytest.raises(BankMismatchError, match="hidden size 16"):
            build(qwen, narrow, allow_other_model=True)


def test_a_subset_reads_the_same_z_scores_as_the_full_bank(tiny_lm):
    lm = tiny_lm("llama")
    bank = synthetic_bank(lm)
    text = "the quick brown fox jumps."
    full = Monitor(lm, bank, layers=[1, 2]).score(text)
    part = Monitor(lm, bank, emotions=["calm", "happy"], layers=[1, 2]).score(text)
    columns = [bank.emotions.index("calm"), bank.emotions.index("happy")]
    torch.testing.assert_close(part.z, full.z[:, columns])
    torch.testing.assert_close(part.scores, full.scores[:, columns])


def _bank_with_measured_norm(lm, layer: int):
    """A synthetic bank whose residual-norm statistic is the model's own on ordinary text."""
    from emoscope.hooks import ResidualReader

    texts = ["The kettle clicked off and she poured two cups.", "He parked the van by the shop."]
    norms = []
    for text in texts:
        batch = encode_texts(lm, text)
        with ResidualReader(lm.model, lm.adapter, [layer]) as reader:
            reader.run(**batch.inputs())
        norms.append(reader.last(layer)[0, 1:].float().norm(dim=-1))  # past the first token
    bank = synthetic_bank(lm, layers=(layer,))
    bank.stats[f"residual_norm.{layer}"] = torch.cat(norms).mean().reshape(1)
    return bank


def encode_texts(lm, text):
    from emoscope.batching import encode

    return encode(lm.tokenizer, [text], lm.device)


@pytest.mark.parametrize(("model", "layer"), [("smollm", 18), ("gemma", 10)])
def test_attention_sinks_are_found_by_their_norm_and_left_out(request, model, layer):
    lm = request.getfixturevalue(model)
    bank = _bank_with_measured_norm(lm, layer)
    readout = Monitor(lm, bank, layers=layer).score("We won the championship, all of us!")
    sinks = readout.sinks.tolist()
    assert sinks[0] and not any(sinks[1:]), list(zip(readout.tokens, sinks))
    assert torch.isnan(readout.z[0]).all() and not torch.isnan(readout.z[1:]).any()
    torch.testing.assert_close(readout.mean(), readout.z[1:].mean(dim=0))
    assert readout.top(2)[0] == [] and len(readout.top(2)[1]) == 2
    assert readout.display()[0].abs().sum() == 0
    assert readout.to_dict()["z"][0] is None
    smooth = readout.smoothed(3)
    torch.testing.assert_close(smooth.z[2], readout.z[1:3].mean(dim=0))


def test_sinks_no_longer_dominate_what_a_text_reads_as(small_run, smollm):
    """With the sink left out, a text about debt and one about winning read differently."""
    bank = small_run[0].bank
    monitor = Monitor(smollm, bank)
    debt = monitor.score("The rent is due tomorrow and my account is empty.")
    win = monitor.score("We won the championship! Everyone was cheering and hugging.")
    assert debt.sinks[0] and win.sinks[0]
    assert float(debt.z[~debt.sinks].abs().max()) < 50  # the sink's z was in the hundreds

    def top(readout, k=3):
        return [bank.emotions[i] for i in readout.mean().argsort(descending=True)[:k]]

    positive = {"happy", "proud", "inspired", "hopeful", "loving", "serene", "calm", "surprised"}
    assert top(win)[0] in positive and top(debt)[0] not in positive, (top(win), top(debt))
    assert [e for e, _ in win.strongest(3)] == top(win)
