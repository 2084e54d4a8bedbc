"""Shared fixtures: tiny randomly initialised models of every supported family, and the real
embedded models (loaded once per session from the emoscope cache)."""

from __future__ import annotations

import os
import string
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import transformers as tf
from tokenizers import Tokenizer, models, pre_tokenizers

from emoscope.models import LoadedModel, load_model, wrap_model

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

VOCAB = [
    "<pad>",
    "<unk>",
    "<bos>",
    "<eos>",
    *string.ascii_lowercase,
    *string.digits,
    *".,!?:'\n ",
    "<extra>",
]

_COMMON = dict(
    vocab_size=len(VOCAB),
    hidden_size=32,
    num_hidden_layers=4,
    num_attention_heads=4,
    intermediate_size=64,
)


def tiny_config(family: str) -> tf.PretrainedConfig:
    special = dict(pad_token_id=0, bos_token_id=2, eos_token_id=3)
    if family == "gpt2":
        return tf.GPT2Config(vocab_size=len(VOCAB), n_embd=32, n_layer=4, n_head=4, **special)
    if family == "gpt-neox":
        return tf.GPTNeoXConfig(**_COMMON, **special)
    config_class = {
        "llama": tf.LlamaConfig,
        "mistral": tf.MistralConfig,
        "qwen2": tf.Qwen2Config,
        "qwen3": tf.Qwen3Config,
        "gemma2": tf.Gemma2Config,
        "gemma3": tf.Gemma3TextConfig,
        "phi3": tf.Phi3Config,
        "olmo2": tf.Olmo2Config,
    }[family]
    extra = {"head_dim": 8} if family in ("qwen3", "gemma2", "gemma3") else {}
    return config_class(**_COMMON, num_key_value_heads=2, **extra, **special)


def char_tokenizer() -> tf.PreTrainedTokenizerFast:
    """A character-level tokenizer, so tiny models can be driven with real strings."""
    vocab = {tok: i for i, tok in enumerate(VOCAB)}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tok = tf.PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token="<pad>",
        unk_token="<unk>",
        bos_token="<bos>",
        eos_token="<eos>",
    )
    tok.padding_side = "left"
    return tok


FAMILIES = [
    "llama",
    "mistral",
    "qwen2",
    "qwen3",
    "gemma2",
    "gemma3",
    "phi3",
    "olmo2",
    "gpt2",
    "gpt-neox",
]


def save_tiny_model(folder: Path, family: str = "llama") -> Path:
    """A tiny random model and the character tokenizer saved as a model folder, for code that
    loads by name (workers, servers, ``load_model``)."""
    torch.manual_seed(0)
    tf.AutoModelForCausalLM.from_config(tiny_config(family)).save_pretrained(folder)
    char_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_lm() -> Callable[[str], LoadedModel]:
    cache: dict[str, LoadedModel] = {}

    def build(family: str) -> LoadedModel:
        if family not in cache:
            torch.manual_seed(0)
            model = tf.AutoModelForCausalLM.from_config(tiny_config(family), dtype=torch.float32)
            with torch.inference_mode():  # lets transformers install its own output recorders now
                model(torch.tensor([[2, 5, 6]]), output_hidden_states=True)
            cache[family] = wrap_model(model, char_tokenizer(), f"tiny-{family}")
        return cache[family]

    return build


@pytest.fixture(scope="session")
def smollm() -> LoadedModel:
    return load_model("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def gemma() -> LoadedModel:
    return load_model("gemma3-270m")


@pytest.fixture()
def tmp_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("EMOSCOPE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def synthetic_bank(
    lm: LoadedModel, emotions=("happy", "sad", "calm", "afraid"), layers=(1, 2), seed: int = 0
):
    """A bank of random unit vectors with simple statistics, for fast exact tests on tiny models."""
    from emoscope.vectors import EmotionBank, unit_rows

    # A typical residual norm: about 0.1-5 in the tiny models, about 10 in Gemma's, which scale
    # their embeddings by sqrt(hidden). Readouts treat tokens far above it as attention sinks.
    norm = 20.0 if lm.adapter.family.startswith("gemma") else 2.0
    g = torch.Generator().manual_seed(seed)
    vectors = {
        layer: unit_rows(torch.randn(len(emotions), lm.hidden_size, generator=g))
        for layer in layers
    }
    stats = {}
    for layer in layers:
        stats[f"mean.{layer}"] = torch.randn(lm.hidden_size, generator=g) * 0.1
        stats[f"neutral_mean.{layer}"] = torch.zeros(lm.hidden_size)
        stats[f"residual_norm.{layer}"] = torch.tensor([norm])
        stats[f"neutral_score_mean.{layer}"] = torch.zeros(len(emotions))
        stats[f"neutral_score_std.{layer}"] = torch.ones(len(emotions))
        stats[f"raw.{layer}"] = vectors[layer].clone()
    manifest = {
        "model": lm.name,
        "hidden_size": lm.hidden_size,
        "default_layer": layers[-1],
        "family": lm.adapter.family,
    }
    return EmotionBank(list(emotions), list(layers), vectors, stats, manifest)


# ----- a small real bank: the default model on a 16-emotion slice of the corpus (about 40 s) -----
import json  # noqa: E402

from emoscope.concepts import CORE_EMOTIONS  # noqa: E402
from emoscope.corpus.records import data_dir, load_neutral, load_stories, record  # noqa: E402
from emoscope.pipeline import ExtractConfig, extract  # noqa: E402

SLICE_EMOTIONS = [*CORE_EMOTIONS, "bored", "serene", "furious", "hopeful"]
LAYERS = [6, 12, 18, 19, 24]


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="session")
def corpus_slice(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("slice")
    stories = write_jsonl(
        root / "stories.jsonl", [record(s) for s in load_stories() if s.emotion in SLICE_EMOTIONS]
    )
    neutral = write_jsonl(root / "neutral.jsonl", [record(d) for d in load_neutral()[:120]])
    return stories, neutral


@pytest.fixture(scope="session")
def dialogue_slice(tmp_path_factory) -> Path:
    """Half the speaker dialogues whose two emotions are both in the slice, and a twelfth of the
    deflection dialogues: enough to build every family, small enough for the default suite."""
    root = tmp_path_factory.mktemp("dialogues")
    speakers = [
        json.loads(line)
        for path in sorted((data_dir() / "dialogues").glob("speakers-*.jsonl"))
        for line in path.read_text("utf-8").splitlines()
        if line.strip()
    ]
    inside = [d for d in speakers if set(d["emotions"].values()) <= set(SLICE_EMOTIONS)]
    write_jsonl(root / "speakers-1.jsonl", inside[::2])
    deflections = [
        json.loads(line)
        for path in sorted((data_dir() / "dialogues").glob("deflection-*.jsonl"))
        for line in path.read_text("utf-8").splitlines()
        if line.strip()
    ]
    write_jsonl(root / "deflection-1.jsonl", deflections[::12])
    return root


@pytest.fixture(scope="session")
def small_run(corpus_slice, dialogue_slice, tmp_path_factory):
    stories, neutral = corpus_slice
    out = tmp_path_factory.mktemp("run") / "bank"
    config = ExtractConfig(
        out=out,
        layers=LAYERS,
        stories=stories,
        neutral=neutral,
        dialogues=dialogue_slice,
        progress=False,
    )
    return extract(config, echo=lambda m: None), config
