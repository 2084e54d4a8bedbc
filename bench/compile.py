"""Does ``torch.compile`` pay off for decoding on this machine? The engine, eager against compiled.

The model's forward is wrapped in ``torch.compile`` (inductor, dynamic shapes, since the cache
width grows every step and the batch changes as requests come and go) and the engine generates
the same greedy tokens both ways. Reported: the compiled run's first-call cost (compilation),
its steady-state speed against eager at the same batch, and whether the tokens agree.

    python bench/compile.py            # batch 1 and 8, 32 new tokens
    python bench/compile.py --quick    # batch 4, 12 new tokens
"""

from __future__ import annotations

import argparse
import importlib.metadata
import statistics
import time
import traceback
from pathlib import Path

import torch

from emoscope.engine import Engine, Request
from emoscope.generation import SamplingConfig
from emoscope.models import load_model
from peers.client import write_json

PROMPT = "Describe an ordinary Tuesday morning in a small town."


def run(lm, batch: int, new_tokens: int) -> tuple[float, list[list[int]]]:
    sampling = SamplingConfig(max_new_tokens=new_tokens, stop_at_eos=False)
    prompt = lm.tokenizer(PROMPT)["input_ids"]
    start = time.perf_counter()
    with Engine(lm, max_batch=batch, max_tokens=len(prompt) + new_tokens) as engine:
        handles = engine.generate([Request(prompt, sampling)] * batch)
    return time.perf_counter() - start, [h.tokens for h in handles]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    batches, new_tokens = ([4], 12) if args.quick else ([1, 8], 32)
    lm = load_model("smollm2-135m-instruct")
    eager_forward = lm.model.forward
    results: dict = {}
    notes: dict[str, str] = {}
    try:
        compiled_forward = torch.compile(eager_forward, dynamic=True)
    except Exception as error:
        compiled_forward = None
        notes["compile.speedup"] = f"torch.compile failed: {error}"
    for batch in batches:
        run(lm, batch, 4)  # eager warm-up
        eager_times, compiled_times = [], []
        eager_tokens = compiled_tokens = None
        if compiled_forward is not None:
            lm.model.forward = compiled_forward
            try:
                first, _ = run(lm, batch, new_tokens)
                results[f"compile.first_run_s.batch{batch}"] = round(first, 1)
            except Exception:
                notes["compile.speedup"] = (
                    "compiled decoding failed: "
                    + traceback.format_exc(limit=1).strip().splitlines()[-1]
                )
                compiled_forward = None
            finally:
                lm.model.forward = eager_forward
        for _ in range(args.rounds):
            seconds, eager_tokens = run(lm, batch, new_tokens)
            eager_times.append(seconds)
            if compiled_forward is not None:
                lm.model.forward = compiled_forward
                try:
                    seconds, compiled_tokens = run(lm, batch, new_tokens)
                finally:
                    lm.model.forward = eager_forward
                compiled_times.append(seconds)
        eager = statistics.median(eager_times)
        line = f"batch {batch}: eager {batch * new_tokens / eager:6.1f} tok/s"
        if compiled_times:
            ratio = statistics.median(e / c for e, c in zip(eager_times, compiled_times))
            results[f"compile.speedup.batch{batch}"] = round(ratio, 3)
            results[f"compile.same_tokens.batch{batch}"] = compiled_tokens == eager_tokens
            line += (
                f", compiled x{ratio:.2f} (first run "
                f"{results[f'compile.first_run_s.batch{batch}']:.0f} s, tokens "
                f"{'identical' if compiled_tokens == eager_tokens else 'DIFFERENT'})"
            )
        print(line, flush=True)
    if notes:
        print("\n".join(f"{k}: {v}" for k, v in notes.items()))
    if args.json:
        versions = {name: importlib.metadata.version(name) for name in ("torch", "transformers")}
        write_json(args.json, results, notes, versions)


if __name__ == "__main__":
    main()
