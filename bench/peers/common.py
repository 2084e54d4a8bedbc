"""What every peer worker shares: the protocol, thread count, loading the model, versions.

Workers run inside a peer's own virtual environment (bench/.peers/<name>), so this module imports
only the standard library, torch and transformers, never emoscope.

Protocol (one JSON object per line, results prefixed with ``RESULT `` so that whatever a library
prints on stdout cannot be mistaken for one): the benchmark writes the spec as one line on stdin;
the worker loads the model, runs the work once untimed (warm-up) and answers
``{"event": "ready"}``. Each ``run`` line then runs the work once more, timed with
``time.perf_counter`` around the work alone, and answers ``{"event": "time", "seconds": ...}``.
``finish`` makes it write what the benchmark checks (activations, token ids)
and answer ``{"event": "done", ...}``. Keeping the worker alive between runs lets the benchmark
interleave the libraries round by round while each loads its model only once. An exception
answers ``{"event": "error", "error": ...}``.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

RESULT_PREFIX = "RESULT "


def read_spec() -> dict[str, Any]:
    spec = json.loads(sys.stdin.readline())
    threads = int(spec.get("threads", 2))
    import torch

    torch.set_num_threads(threads)
    torch.set_grad_enabled(False)
    return spec


PACKAGES = ("torch", "transformers", "transformer-lens", "nnsight", "repeng", "steering-vectors")


def versions() -> dict[str, str]:
    """Versions of the packages that matter here, among those installed in this environment."""
    out = {}
    for name in PACKAGES:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            out[name] = importlib.metadata.version(name)
    return out


def load_hf(folder: str) -> tuple[Any, Any]:
    """The model (float32, eval, sdpa attention) and its tokenizer from a plain HF folder.

    The folder was written by transformers 5, whose config stores the rotary base under
    ``rope_parameters``. transformers 4 does not read that key and would silently fall back to a
    rotary base of 10000 (SmolLM2 uses 100000), and it does not know the tokenizer class name
    ``TokenizersBackend``; both are translated here so every library gets the same model.
    """
    import torch
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM

    major = int(transformers.__version__.split(".")[0])
    config = AutoConfig.from_pretrained(folder)
    if major < 5:
        rope = getattr(config, "rope_parameters", None) or {}
        if "rope_theta" in rope:
            config.rope_theta = float(rope["rope_theta"])
        if rope.get("rope_type", "default") != "default":
            config.rope_scaling = dict(rope)
    model = AutoModelForCausalLM.from_pretrained(
        folder, config=config, dtype=torch.float32, attn_implementation="sdpa"
    )
    model.eval()
    model.requires_grad_(False)
    return model, load_tokenizer(folder, major)


def load_tokenizer(folder: str, major: int | None = None) -> Any:
    import transformers

    if major is None:
        major = int(transformers.__version__.split(".")[0])
    if major >= 5:
        return transformers.AutoTokenizer.from_pretrained(folder)
    config = json.loads((Path(folder) / "tokenizer_config.json").read_text())
    specials = {
        k: config[k]
        for k in ("bos_token", "eos_token", "unk_token", "pad_token")
        if isinstance(config.get(k), str)
    }
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_file=str(Path(folder) / "tokenizer.json"), **specials
    )
    template = Path(folder) / "chat_template.jinja"
    if template.exists():
        tokenizer.chat_template = template.read_text()
    return tokenizer


def emit(result: dict[str, Any]) -> None:
    sys.stdout.write(RESULT_PREFIX + json.dumps(result) + "\n")
    sys.stdout.flush()


def serve(
    setup: Callable[[dict[str, Any]], Any],
    work: Callable[[Any], Any],
    finish: Callable[[Any, Any], dict[str, Any]],
    warmup: Callable[[Any], Any] | None = None,
) -> None:
    """Run a worker: ``setup(spec) -> state``, ``work(state) -> result`` (the timed part),
    ``finish(state, last_result) -> dict`` (written with the final ``done`` event).

    ``warmup(state)`` is the untimed first run (default: ``work`` itself); a smaller piece of
    the same work is enough to initialise kernels and allocators and saves benchmark time.
    """
    try:
        spec = read_spec()
        state = setup(spec)
        result = (warmup or work)(state)  # untimed
        emit({"event": "ready", "versions": versions()})
        for line in sys.stdin:
            command = line.strip()
            if command == "finish":
                break
            if command != "run":
                continue
            start = time.perf_counter()
            result = work(state)
            emit({"event": "time", "seconds": time.perf_counter() - start})
        emit({"event": "done", **finish(state, result)})
    except Exception as exc:  # reported to the benchmark, which records the reason
        traceback.print_exc()
        emit({"event": "error", "error": f"{type(exc).__name__}: {exc}".splitlines()[0][:500]})
