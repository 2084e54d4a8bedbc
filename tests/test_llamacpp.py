"""Exported control vectors work in llama.cpp itself (slow: needs llama-cpp-python, built from source).

Run with `make test-slow`. The file is read with llama.cpp's own Python GGUF reader and laid
out the way llama.cpp's control-vector loader does (``direction.N`` at offset ``N - 1``), then
applied to SmolLM2's own GGUF through llama.cpp's C API.
"""

from __future__ import annotations

import ctypes
import importlib.util
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.slow


def _llama_cpp():
    if importlib.util.find_spec("llama_cpp") is None:
        pytest.skip("llama-cpp-python is not installed (make test-slow installs it)")
    import llama_cpp

    return llama_cpp


def _load_like_llama_cpp(path: Path, n_embd: int) -> tuple[np.ndarray, int]:
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    arch = bytes(reader.fields["general.architecture"].parts[-1]).decode()
    assert arch == "controlvector"
    directions = {
        int(t.name.split(".")[1]): np.array(t.data, dtype=np.float32)
        for t in reader.tensors
        if t.name.startswith("direction.")
    }
    top = max(directions)
    buffer = np.zeros(n_embd * top, dtype=np.float32)
    for layer, vector in directions.items():
        assert layer >= 1 and vector.size == n_embd
        buffer[(layer - 1) * n_embd : layer * n_embd] = vector
    return buffer, top


def _next_token_logprobs(
    llama_cpp, model_path: Path, prompt: str, words: list[str], cvec: np.ndarray | None, top: int
) -> np.ndarray:
    """A fresh context per condition, with the control vector applied before it evaluates."""
    llm = llama_cpp.Llama(
        model_path=str(model_path), n_ctx=256, logits_all=True, verbose=False, n_threads=2
    )
    if cvec is not None:
        apply = (
            getattr(llama_cpp, "llama_apply_adapter_cvec", None)
            or llama_cpp.llama_control_vector_apply
        )
        data = cvec.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        assert apply(llm._ctx.ctx, data, cvec.size, llm.n_embd(), 1, top) == 0
    llm.eval(llm.tokenize(prompt.encode(), add_bos=False, special=True))
    logits = np.array(llm.scores[llm.n_tokens - 1], dtype=np.float64)
    logp = logits - np.log(np.exp(logits - logits.max()).sum()) - logits.max()
    ids = [llm.tokenize((" " + w).encode(), add_bos=False)[0] for w in words]
    return logp[ids]


def _hf_logprobs(lm, prompt_ids: list[int], words: list[str], vectors) -> np.ndarray:
    import torch

    from emoscope.batching import from_token_lists
    from emoscope.hooks import add_to_residual

    batch = from_token_lists([prompt_ids], lm.tokenizer.pad_token_id or 0, lm.device)
    with torch.inference_mode(), add_to_residual(lm.model, lm.adapter, vectors or {}):
        logits = lm.model(**batch.inputs()).logits[0, -1].double()
    logp = torch.log_softmax(logits, dim=-1).numpy()
    ids = [lm.tokenizer(" " + w, add_special_tokens=False)["input_ids"][0] for w in words]
    return logp[ids]


def test_exported_vector_steers_llama_cpp_like_emoscope(small_run, smollm, tmp_path):
    """Whole-sequence steering (what --control-vector does) moves the same words the same way in
    llama.cpp as in emoscope, and the steered emotion's own word rises the most."""
    llama_cpp = _llama_cpp()
    from emoscope.export import export_emotions
    from emoscope.models import EMBEDDED, _embedded_gguf
    from emoscope.steer import Steering, steering_vectors
    from emoscope.vectors import EmotionBank

    bank = EmotionBank.load(small_run[0].out, model=smollm)
    from emoscope.concepts import CORE_EMOTIONS

    words = list(CORE_EMOTIONS)
    gguf_model = _embedded_gguf(EMBEDDED["smollm2-135m-instruct"])
    prompt = smollm.chat([{"role": "user", "content": "How does he feel?"}]).text + "He feels"
    prompt_ids = smollm.tokenizer(prompt, add_special_tokens=False)["input_ids"]
    base_cpp = _next_token_logprobs(llama_cpp, gguf_model, prompt, words, None, 0)
    base_hf = _hf_logprobs(smollm, prompt_ids, words, None)
    agreement: dict[str, float] = {}
    for emotion in ("happy", "sad", "angry"):
        strength = {emotion: 0.15}
        path = export_emotions(bank, tmp_path / f"{emotion}.gguf", strength, [bank.steer_layer])
        cvec, top = _load_like_llama_cpp(path, smollm.hidden_size)
        change_cpp = (
            _next_token_logprobs(llama_cpp, gguf_model, prompt, words, cvec, top) - base_cpp
        )
        vectors = steering_vectors(bank, Steering(strength))
        change_hf = _hf_logprobs(smollm, prompt_ids, words, vectors) - base_hf
        own = words.index(emotion)
        others = np.delete(change_cpp, own)
        # The steered emotion's own word gains on the other emotion words by at least 0.5 nats.
        assert change_cpp[own] > others.mean() + 0.5, (emotion, change_cpp)
        # llama.cpp's quantised kernels differ numerically; the pattern over 12 words must agree
        # (for 12 unrelated words r is about 0 +- 0.3).
        agreement[emotion] = float(np.corrcoef(change_cpp, change_hf)[0, 1])
        assert agreement[emotion] > 0.7, (emotion, change_cpp, change_hf)
    # Agreement of one pattern moves by ~0.02 with 1e-6 changes to the vector (llama.cpp rounds
    # activations to 8 bits before its 4-bit matmuls), so the firm bar is on the average.
    assert np.mean(list(agreement.values())) > 0.8, agreement
