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
    llama_cpp, llm, prompt: str, words: list[str], cvec: np.ndarray | None, top: int
) -> np.ndarray:
    apply = (
        getattr(llama_cpp, "llama_apply_adapter_cvec", None) or llama_cpp.llama_control_vector_apply
    )
    ctx = llm._ctx.ctx
    if cvec is None:
        apply(ctx, None, 0, llm.n_embd(), 0, 0)
    else:
        data = cvec.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        assert apply(ctx, data, cvec.size, llm.n_embd(), 1, top) == 0
    llm.reset()
    llm.eval(llm.tokenize(prompt.encode(), add_bos=False, special=True))
    logits = np.array(llm.scores[llm.n_tokens - 1], dtype=np.float64)
    logp = logits - np.log(np.exp(logits - logits.max()).sum()) - logits.max()
    ids = [llm.tokenize((" " + w).encode(), add_bos=False)[0] for w in words]
    return logp[ids]


def test_exported_vector_steers_llama_cpp(small_run, smollm, tmp_path):
    llama_cpp = _llama_cpp()
    from emoscope.export import export_emotions
    from emoscope.models import EMBEDDED, _embedded_gguf
    from emoscope.vectors import EmotionVectors

    bank = EmotionVectors.load(small_run[0].out, model=smollm)
    words = ["happy", "sad", "angry", "calm"]
    gguf_model = _embedded_gguf(EMBEDDED["smollm2-135m-instruct"])
    llm = llama_cpp.Llama(
        model_path=str(gguf_model), n_ctx=256, logits_all=True, verbose=False, n_threads=2
    )
    prompt = smollm.chat([{"role": "user", "content": "How does he feel?"}]).text + "He feels"
    base = _next_token_logprobs(llama_cpp, llm, prompt, words, None, 0)
    for emotion in ("happy", "sad"):
        path = export_emotions(
            bank, tmp_path / f"{emotion}.gguf", {emotion: 0.5}, [bank.steer_layer]
        )
        cvec, top = _load_like_llama_cpp(path, llm.n_embd())
        steered = _next_token_logprobs(llama_cpp, llm, prompt, words, cvec, top)
        change = steered - base
        own = words.index(emotion)
        assert change[own] > 0.5, (emotion, change)
        assert change[own] == change.max(), (emotion, change)
