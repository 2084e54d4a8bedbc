"""The vLLM corpus backend. Its real run needs vLLM and a CUDA GPU (``make test-gpu``) and is
skipped with the reason where they are missing; the translation of sampling settings is checked
everywhere."""

from __future__ import annotations

import json
import time

import pytest

from emoscope.corpus.backends import vllm_available, vllm_sampling
from emoscope.generation import SamplingConfig


class Params:
    def __init__(self, **kwargs):
        self.__dict__.update(kwargs)


def test_sampling_settings_carry_over_to_vllm():
    sampled = vllm_sampling(SamplingConfig(400, 0.8, 0.95, seed=17, repetition_penalty=1.1), Params)
    assert (sampled.temperature, sampled.top_p, sampled.seed) == (0.8, 0.95, 17)
    assert (sampled.max_tokens, sampled.repetition_penalty, sampled.ignore_eos) == (400, 1.1, False)
    greedy = vllm_sampling(SamplingConfig(12, 0.0, 0.5, stop_at_eos=False), Params)
    assert (greedy.temperature, greedy.top_p, greedy.ignore_eos) == (0.0, 1.0, True)


@pytest.mark.gpu
def test_vllm_writes_the_same_cells_and_resumes(tmp_path):
    ok, why = vllm_available()
    if not ok:
        pytest.skip(why)
    from emoscope.corpus.backends import VllmBackend
    from emoscope.corpus.generate import GenerationPlan, generate_corpus
    from emoscope.models import load_model

    plan = GenerationPlan(emotions=["happy", "sad", "calm", "afraid"], n_topics=8, batch_size=32)
    backend = VllmBackend("smollm2-135m-instruct", "bfloat16", gpu_memory_utilization=0.3)
    started = time.perf_counter()
    fast = generate_corpus(backend.text_model, tmp_path / "vllm", plan, False, backend=backend)
    vllm_seconds = time.perf_counter() - started
    lm = load_model("smollm2-135m-instruct", dtype="bfloat16", device="cuda")
    started = time.perf_counter()
    ours = generate_corpus(lm, tmp_path / "engine", plan, False)
    engine_seconds = time.perf_counter() - started
    assert fast["cells_done"] == ours["cells_done"] == 32
    cells = [
        [json.loads(line)["cell"] for line in (tmp_path / name / "log.jsonl").open()]
        for name in ("vllm", "engine")
    ]
    assert sorted(cells[0]) == sorted(cells[1])
    again = generate_corpus(backend.text_model, tmp_path / "vllm", plan, False, backend=backend)
    assert again["cells_done"] == 32 and len(cells[0]) == 32  # nothing generated twice
    print(f"vLLM {vllm_seconds:.1f}s vs engine {engine_seconds:.1f}s for 32 cells")
