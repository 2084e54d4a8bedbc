"""End to end on the real default model with a 16-emotion slice of the corpus (about a minute)."""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest
import torch

from conftest import LAYERS
from conftest import SLICE_EMOTIONS as EMOTIONS
from emoscope.activations import text_means
from emoscope.concepts import EMOTIONS as CATALOGUE
from emoscope.errors import BankMismatchError, EmoscopeError, RunDirectoryError
from emoscope.pipeline import ExtractConfig, extract
from emoscope.vectors import EmotionBank, Recipe


def interrupt_encode_on_call(monkeypatch, n: int) -> Callable[[], None]:
    """Make the n-th batch encoding raise KeyboardInterrupt, as a Ctrl-C in the middle would."""
    import emoscope.activations as acts

    calls = {"n": 0}
    real = acts.encode

    def crashing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == n:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(acts, "encode", crashing)
    return lambda: monkeypatch.setattr(acts, "encode", real)


def test_bank_files_and_manifest(small_run):
    result, _config = small_run
    out = result.out
    for name in (
        "vectors.safetensors",
        "stats.safetensors",
        "manifest.json",
        "report.json",
        "report.html",
        "run.json",
    ):
        assert (out / name).exists(), name
    manifest = json.loads((out / "manifest.json").read_text())
    for key in (
        "emotions",
        "layers",
        "default_layer",
        "model",
        "hidden_size",
        "token_offset",
        "neutral_variance",
        "emoscope_version",
        "corpus_sha256",
        "steer_layer",
        "recipe",
    ):
        assert key in manifest, key
    assert manifest["emotions"] == [e for e in CATALOGUE if e in EMOTIONS]  # catalogue order
    assert (
        manifest["layers"] == LAYERS
        and manifest["model"] == "smollm2-135m-instruct"
        and manifest["hidden_size"] == 576
    )
    assert manifest["default_layer"] in LAYERS
    assert manifest["steer_layer"] == 19  # nearest extracted layer to two thirds of 30 blocks
    from safetensors.torch import load_file

    tensors = load_file(str(out / "vectors.safetensors"))
    families = manifest["families"]
    assert set(tensors) == {f"layer.{i}" for i in LAYERS} | {
        f"{name}.layer.{i}" for name in families for i in LAYERS
    }
    for key, v in tensors.items():
        rows = len(families[key.split(".")[0]]["emotions"]) if key.count(".") == 2 else None
        assert v.shape == (rows or len(EMOTIONS), 576) and v.dtype == torch.float32
        torch.testing.assert_close(v.norm(dim=1), torch.ones(v.shape[0]))


def test_vectors_identify_held_out_stories(small_run):
    report = small_run[0].report
    best = max(s["test"]["top1"] for s in report["layer_sweep"])
    assert best >= 0.5, best  # 16-way, chance 6%; topics unseen in training
    assert report["summary"]["test_top5"] >= 0.8
    html = (small_run[0].out / "report.html").read_text()
    assert (
        "src='http" not in html
        and "href='http" not in html
        and 'src="http' not in html
        and "<svg" in html
        and "data:image/png;base64" in html
    )


def test_rerun_resumes_and_other_runs_are_refused(small_run, corpus_slice):
    result, config = small_run
    cached = [
        "stories.safetensors",
        "neutral.safetensors",
        "prompts.safetensors",
        "chat_sites.safetensors",
        "dialogues-chat.safetensors",
        "dialogues-person.safetensors",
        "dialogues-deflection.safetensors",
    ]
    stamps = {n: (result.out / "activations" / n).stat().st_mtime_ns for n in cached}
    again = extract(config, echo=lambda m: None)
    assert {n: (result.out / "activations" / n).stat().st_mtime_ns for n in cached} == stamps
    assert sorted(p.name for p in (result.out / "activations").iterdir()) == sorted(cached)

    def stable(report):  # all but what may differ between two runs of the same recipe
        kept = {k: v for k, v in report.items() if k not in ("timings", "model")}
        return json.dumps(kept, sort_keys=True, default=float)

    assert stable(again.report) == stable(result.report)
    other = ExtractConfig(
        out=result.out,
        layers=LAYERS,
        stories=config.stories,
        neutral=config.neutral,
        recipe=Recipe(token_offset=20),
        progress=False,
    )
    with pytest.raises(RunDirectoryError, match="token_offset"):
        extract(other, echo=lambda m: None)
    foreign = result.out.parent / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(RunDirectoryError, match="not an emoscope run"):
        extract(
            ExtractConfig(
                out=foreign,
                layers=LAYERS,
                stories=config.stories,
                neutral=config.neutral,
                progress=False,
            ),
            echo=lambda m: None,
        )


def test_bank_refuses_other_models(small_run, tiny_lm):
    bank = EmotionBank.load(small_run[0].out)
    with pytest.raises(BankMismatchError, match="hidden size"):
        EmotionBank.load(small_run[0].out, model=tiny_lm("llama"))
    with pytest.raises(EmoscopeError, match="not in this bank"):
        bank.check_layer(7)
    with pytest.raises(EmoscopeError, match="empty"):
        bank.subset([])
    with pytest.raises(EmoscopeError, match="not a vector bank"):
        EmotionBank.load(small_run[0].out / "activations")


def test_interrupted_activation_run_resumes_to_the_same_result(tiny_lm, tmp_path, monkeypatch):
    lm = tiny_lm("llama")
    texts = [f"story number {i} " + "word " * (10 + i % 7) for i in range(40)]
    full = text_means(lm, texts, token_offset=3, max_batch=8, progress=False)
    restore = interrupt_encode_on_call(monkeypatch, 3)
    with pytest.raises(KeyboardInterrupt):
        text_means(
            lm, texts, token_offset=3, max_batch=8, checkpoint=tmp_path / "ckpt", progress=False
        )
    assert len(list((tmp_path / "ckpt").glob("chunk-*"))) == 2
    restore()
    resumed = text_means(
        lm, texts, token_offset=3, max_batch=8, checkpoint=tmp_path / "ckpt", progress=False
    )
    torch.testing.assert_close(resumed.means, full.means)


def test_interrupted_neutral_moments_resume_to_the_same_result(tiny_lm, tmp_path, monkeypatch):
    import emoscope.activations as acts

    lm = tiny_lm("qwen2")
    texts = [f"dialogue {i}: " + "text " * (5 + i % 9) for i in range(48)]
    full = acts.neutral_moments(lm, texts, max_batch=4, progress=False)
    restore = interrupt_encode_on_call(monkeypatch, 7)
    ckpt = tmp_path / "neutral.ckpt.safetensors"
    with pytest.raises(KeyboardInterrupt):
        acts.neutral_moments(
            lm, texts, max_batch=4, progress=False, checkpoint=ckpt, checkpoint_every=2
        )
    assert ckpt.exists()
    restore()
    resumed = acts.neutral_moments(  # a different batch size must not double-count anything
        lm, texts, max_batch=3, progress=False, checkpoint=ckpt, checkpoint_every=2
    )
    assert resumed.count == full.count
    torch.testing.assert_close(resumed.mean, full.mean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(resumed.cov, full.cov, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(resumed.text_means, full.text_means)
