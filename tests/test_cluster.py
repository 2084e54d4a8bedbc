"""Scale-out on Ray: a local cluster of two workers on a tiny random model must give exactly what
one process gives, also when a worker is killed mid-run (``make test-ray``)."""

from __future__ import annotations

import json
import os
import signal

import pytest
import torch

from conftest import SLICE_EMOTIONS, save_tiny_model, synthetic_bank, write_jsonl
from emoscope.corpus.records import load_neutral, load_stories, record
from emoscope.errors import EmoscopeError
from emoscope.pipeline import ExtractConfig, extract
from emoscope.vectors import EmotionBank

ray = pytest.importorskip("ray", reason="Ray is an optional extra: make test-ray installs it")
cluster = pytest.importorskip("emoscope.cluster")

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def runtime():
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("ray") / "model")


@pytest.fixture(scope="module")
def tiny_corpus(tmp_path_factory):
    """Eight stories per slice emotion, cut to 400 characters, and 48 neutral dialogues."""
    root = tmp_path_factory.mktemp("ray-corpus")
    stories, count = [], {}
    for story in load_stories():
        if story.emotion in SLICE_EMOTIONS and count.get(story.emotion, 0) < 8:
            count[story.emotion] = count.get(story.emotion, 0) + 1
            row = record(story)
            row["text"] = row["text"][:400]
            stories.append(row)
    neutral = [record(d) for d in load_neutral()[:48]]
    return write_jsonl(root / "stories.jsonl", stories), write_jsonl(
        root / "neutral.jsonl", neutral
    )


def _config(out, folder, corpus, **extra):
    stories, neutral = corpus
    return ExtractConfig(
        out=out,
        model=str(folder),
        dtype="float32",
        stories=stories,
        neutral=neutral,
        families=False,
        progress=False,
        **extra,
    )


def _same_bank(a, b):
    left, right = EmotionBank.load(a), EmotionBank.load(b)
    assert left.emotions == right.emotions and left.layers == right.layers
    for layer in left.layers:
        torch.testing.assert_close(right.vectors[layer], left.vectors[layer], atol=1e-5, rtol=0)
    for name, value in left.stats.items():
        torch.testing.assert_close(right.stats[name], value, atol=1e-5, rtol=1e-4)
    manifest = [json.loads((p / "manifest.json").read_text()) for p in (a, b)]
    for m in manifest:
        m.pop("created")
    assert manifest[0] == manifest[1]


@pytest.fixture(scope="module")
def single(tiny_folder, tiny_corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("single") / "bank"
    extract(_config(out, tiny_folder, tiny_corpus), echo=lambda m: None)
    return out


def test_the_bank_built_on_ray_equals_the_single_process_bank(
    runtime, single, tiny_folder, tiny_corpus, tmp_path
):
    out = tmp_path / "bank"
    said = []
    extract(_config(out, tiny_folder, tiny_corpus, ray="local", workers=2), echo=said.append)
    assert any("Ray: 2 workers" in line for line in said)
    _same_bank(single, out)
    assert not list((out / "activations").glob("*.ray.ckpt"))  # finished stages drop them


def test_a_worker_killed_mid_run_loses_and_duplicates_nothing(
    runtime, single, tiny_folder, tiny_corpus, tmp_path, monkeypatch
):
    real = cluster.RayPool.imap
    seen = {"killed": 0, "rerun": 0, "shards": []}

    def imap_with_a_death(self, task, payloads, desc="", progress=True):
        for n, (shard, result) in enumerate(real(self, task, payloads, desc, progress)):
            seen["shards"].append((task, shard))
            if n == 0 and not seen["killed"]:
                os.kill(self.pids[-1], signal.SIGKILL)  # the other worker, busy with its shard
                seen["killed"] += 1
            yield shard, result
        seen["rerun"] += self.stats["rerun"]

    monkeypatch.setattr(cluster.RayPool, "imap", imap_with_a_death)
    out = tmp_path / "bank"
    extract(_config(out, tiny_folder, tiny_corpus, ray="local", workers=2), echo=lambda m: None)
    assert seen["killed"] == 1 and seen["rerun"] >= 1
    assert len(seen["shards"]) == len(set(seen["shards"]))  # each shard counted once
    _same_bank(single, out)


def test_an_interrupted_ray_stage_resumes_from_its_shards(
    runtime, single, tiny_folder, tiny_corpus, tmp_path, monkeypatch
):
    real = cluster.RayPool.imap

    def stop_after_two(self, task, payloads, desc="", progress=True):
        for n, item in enumerate(real(self, task, payloads, desc, progress)):
            if n == 2:
                raise KeyboardInterrupt
            yield item

    monkeypatch.setattr(cluster.RayPool, "imap", stop_after_two)
    out = tmp_path / "bank"
    config = _config(out, tiny_folder, tiny_corpus, ray="local", workers=2)
    with pytest.raises(KeyboardInterrupt):
        extract(config, echo=lambda m: None)
    kept = list((out / "activations" / "stories.ray.ckpt").glob("shard-*.safetensors"))
    assert len(kept) == 2
    sent = []
    monkeypatch.setattr(
        cluster.RayPool,
        "imap",
        lambda self, task, payloads, desc="", progress=True: (
            sent.extend(len(p["texts"]) for p in payloads if task == "text_means")
            or real(self, task, payloads, desc, progress)
        ),
    )
    extract(config, echo=lambda m: None)
    n_stories = len(tiny_corpus[0].read_text().splitlines())
    assert 0 < sum(sent) < n_stories  # only what the two finished shards did not cover
    _same_bank(single, out)


def test_speaker_means_on_ray_equal_one_process(runtime, tiny_folder):
    from emoscope.corpus.dialogues import load_speaker_dialogues, render
    from emoscope.models import load_model
    from emoscope.speakers import speaker_means

    lm = load_model(str(tiny_folder))
    rendered = [render(lm, d.turns, "chat") for d in load_speaker_dialogues()[:12]]
    with cluster.RayPool(cluster.ModelSpec.of(lm), workers=2) as pool:
        spread = cluster.speaker_means(pool, rendered, [1, 3], tiny_folder.parent / "spk.ckpt")
    torch.testing.assert_close(spread, speaker_means(lm, rendered, [1, 3], progress=False))


def test_experiment_cells_on_ray_equal_one_process(runtime, smollm, tmp_path):
    from emoscope.experiments import run_experiment

    bank = synthetic_bank(smollm, emotions=("happy", "calm", "sad"), layers=(10, 18))
    options = dict(quick=True, emotions=["calm"], strengths=[-0.5, 0.5], progress=False)
    alone = run_experiment("blackmail", smollm, bank, tmp_path / "one", **options)
    spread = run_experiment(
        "blackmail", smollm, bank, tmp_path / "ray", ray="local", workers=2, **options
    )
    rows = [
        {
            r["key"]: r
            for r in map(json.loads, (tmp_path / name / "records.jsonl").read_text().splitlines())
        }
        for name in ("one", "ray")
    ]
    assert rows[0].keys() == rows[1].keys() and len(rows[0]) > 10
    for key, record_ in rows[0].items():
        other = rows[1][key]
        assert other["choice"] == record_["choice"]
        for option, p in record_["probabilities"].items():
            assert other["probabilities"][option] == pytest.approx(p, abs=2e-4)
    for a, b in zip(alone["conditions"], spread["conditions"], strict=True):
        assert b["value"] == pytest.approx(a["value"], abs=1e-3)


def test_corpus_cells_on_ray_get_the_same_text(runtime, tiny_folder, tmp_path):
    from emoscope.corpus.backends import RayBackend
    from emoscope.corpus.generate import GenerationPlan, generate_corpus
    from emoscope.models import load_model

    lm = load_model(str(tiny_folder))
    plan = GenerationPlan(emotions=["happy", "sad"], n_topics=3, max_new_tokens=24, batch_size=2)
    generate_corpus(lm, tmp_path / "one", plan, progress=False)
    with cluster.RayPool(cluster.ModelSpec.of(lm), workers=2) as pool:
        generate_corpus(lm, tmp_path / "ray", plan, progress=False, backend=RayBackend(pool))

    def raw(name):
        lines = (tmp_path / name / "log.jsonl").read_text().splitlines()
        return {e["cell"]: e["raw"] for e in map(json.loads, lines)}

    assert raw("ray") == raw("one") and len(raw("one")) == 6


def test_a_model_built_in_memory_cannot_go_to_workers(tiny_lm):
    with pytest.raises(EmoscopeError, match="save_pretrained"):
        cluster.ModelSpec.of(tiny_lm("llama"))
