"""Other engines for plain self-generation of a corpus: Ray workers and vLLM.

A corpus cell needs no hooks (nothing is steered or read while the model writes), so it can
decode anywhere: on Ray workers running emoscope's own engine, or on vLLM on GPUs. Both take the
same prompt ids and per-cell sampling (temperature, top-p, seed, length) as the built-in engine,
and hand back each cell's ids as its group finishes; :func:`emoscope.corpus.generate.generate_corpus`
appends them to the same log, so a run resumes the same way whichever backend wrote it.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from emoscope.errors import EmoscopeError
from emoscope.generation import SamplingConfig

BACKENDS = ("engine", "vllm")
VLLM_GROUP = 256
"""Cells handed to vLLM per call: large enough for its own batching, small enough that the log
grows as the run goes (a crash loses at most one group)."""


class IdsBackend(Protocol):
    def generate_ids(
        self, prompts: Sequence[list[int]], samplings: Sequence[SamplingConfig], group: int
    ) -> Iterator[tuple[int, list[int]]]: ...


class RayBackend:
    """Cells decoded on a :class:`~emoscope.cluster.RayPool`'s engines, ``group`` per task."""

    def __init__(self, pool: Any, progress: bool = False) -> None:
        self.pool, self.progress = pool, progress

    def generate_ids(
        self, prompts: Sequence[list[int]], samplings: Sequence[SamplingConfig], group: int
    ) -> Iterator[tuple[int, list[int]]]:
        from emoscope.cluster import generate_ids

        yield from generate_ids(self.pool, prompts, samplings, group, self.progress)


def vllm_available() -> tuple[bool, str]:
    """Whether the vLLM backend can run here, and why not when it cannot."""
    if importlib.util.find_spec("vllm") is None:
        return False, "vLLM is not installed (pip install 'emoscope[vllm]')"
    import torch

    if not torch.cuda.is_available():
        return False, "vLLM needs a CUDA GPU and none is visible"
    return True, ""


@dataclass
class TextModel:
    """What corpus generation needs of a model when another engine does the decoding: its name
    (the run folder records it), its tokenizer and its chat format."""

    name: str
    tokenizer: Any

    def chat(self, turns: Sequence[dict[str, str]], add_generation_prompt: bool = True) -> Any:
        from emoscope.chat import format_chat

        return format_chat(self.tokenizer, turns, add_generation_prompt, "auto")


def model_source(name_or_path: str) -> tuple[str, str]:
    """``(name emoscope records, what vLLM loads)``: an embedded model's dequantised cache folder
    (made on first use), a local folder, or a Hugging Face id as it is."""
    from emoscope.models import EMBEDDED, load_model

    if name_or_path in EMBEDDED:
        lm = load_model(name_or_path)  # builds the safetensors cache once; small models only
        folder = Path(lm.model.name_or_path)
        return lm.name, str(folder)
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return str(path.resolve()), str(path.resolve())
    if path.suffix == ".gguf":
        raise EmoscopeError(
            "The vLLM backend reads model folders and Hugging Face ids; load the .gguf once with "
            "emoscope (which caches it as a folder) or use --backend engine."
        )
    return name_or_path, name_or_path


class VllmBackend:
    """vLLM's offline ``LLM`` as a corpus generator (GPU only; an optional extra).

    Args:
        model: embedded name, model folder or Hugging Face id.
        dtype: ``auto``, ``bfloat16``, ``float16`` or ``float32``.
        tensor_parallel_size: GPUs one model is split over.
        engine_args: anything else ``vllm.LLM`` takes (``gpu_memory_utilization``,
            ``max_model_len``...).
    """

    def __init__(
        self,
        model: str,
        dtype: str = "auto",
        tensor_parallel_size: int = 1,
        **engine_args: Any,
    ) -> None:
        ok, why = vllm_available()
        if not ok:
            raise EmoscopeError(f"Cannot use --backend vllm: {why}.")
        from vllm import LLM

        self.name, source = model_source(model)
        self.llm = LLM(
            model=source,
            dtype=dtype,
            tensor_parallel_size=tensor_parallel_size,
            **engine_args,
        )
        self.text_model = TextModel(self.name, self.llm.get_tokenizer())

    def generate_ids(
        self, prompts: Sequence[list[int]], samplings: Sequence[SamplingConfig], group: int
    ) -> Iterator[tuple[int, list[int]]]:
        from vllm import SamplingParams

        step = max(group, VLLM_GROUP)
        for start in range(0, len(prompts), step):
            index = range(start, min(start + step, len(prompts)))
            params = [vllm_sampling(samplings[i], SamplingParams) for i in index]
            outputs = self.llm.generate(
                [{"prompt_token_ids": list(prompts[i])} for i in index],
                params,
                use_tqdm=False,
            )
            for i, output in zip(index, outputs, strict=True):
                yield i, list(output.outputs[0].token_ids)


def vllm_sampling(sampling: SamplingConfig, params_class: Any) -> Any:
    """The same sampling settings in vLLM's terms (greedy when the temperature is 0)."""
    return params_class(
        n=1,
        temperature=sampling.temperature,
        top_p=sampling.top_p if sampling.temperature > 0 else 1.0,
        repetition_penalty=sampling.repetition_penalty,
        max_tokens=sampling.max_new_tokens,
        seed=sampling.seed,
        ignore_eos=not sampling.stop_at_eos,
    )
