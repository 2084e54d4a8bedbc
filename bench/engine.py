"""Throughput of the continuous-batching engine against Hugging Face ``generate`` and static batches.

Two workloads, each run as interleaved conditions in one process for several rounds; every ratio
is the median over rounds of the two conditions' times measured side by side in the same round.

1. Uniform: the same prompts, a fixed number of new tokens each (EOS ignored). The engine with
   all prompts at once, against ``model.generate`` one prompt at a time and against
   ``model.generate`` on one left-padded batch of the same size.
2. Mixed: requests of varied prompt length and reply length that arrive over time. The engine
   admits each as it arrives and retires each when done; static batching
   (:func:`emoscope.generation.decode_rows`) takes whatever has arrived, up to the batch size, and
   decodes the group until its longest reply is done. Reported: useful tokens per second over
   the whole run, and mean latency from arrival to completion.

    python bench/engine.py            # batch 16, 64 new tokens; 48 mixed requests, 16-128 tokens
    python bench/engine.py --quick    # batch 8, 16 new tokens; 12 mixed requests, 8-32 tokens
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from emoscope.batching import from_token_lists
from emoscope.engine import Engine, Request
from emoscope.generation import SamplingConfig, decode_rows
from emoscope.models import load_model

PROMPTS = [
    "Describe an ordinary Tuesday morning.", "Explain how a bicycle gear works.",
    "List five uses of a paperclip.", "Write two sentences about a library.", "How is bread made?",
    "Tell me about the weather on the coast.", "What does a librarian do all day?",
    "Describe a small town square.",
]  # fmt: skip
FILLER = (
    " Please answer in plain words, with one or two concrete examples, and keep it short enough "
    "to read aloud in a minute."
)


@dataclass(frozen=True)
class Arrival:
    at: float
    """Seconds after the start of the run."""
    prompt: list[int]
    new_tokens: int


def prompt_ids(lm, text: str) -> list[int]:
    """Plain prompts (no chat template), so prompt lengths are set by the workload alone."""
    return lm.tokenizer(text)["input_ids"]


def mixed_workload(
    lm, count: int, shortest: int, longest: int, fillers: int, seed: int = 0
) -> list[Arrival]:
    """Prompts with 0..``fillers`` extra sentences and replies of ``shortest..longest`` tokens
    (arrival times are filled in per run)."""
    rng = random.Random(seed)
    out = []
    for i in range(count):
        text = PROMPTS[i % len(PROMPTS)] + FILLER * rng.randint(0, fillers)
        out.append(Arrival(0.0, prompt_ids(lm, text), rng.randint(shortest, longest)))
    return out


def with_arrivals(work: list[Arrival], gap: float, seed: int = 0) -> list[Arrival]:
    """Poisson arrivals with a mean ``gap`` seconds apart."""
    rng = random.Random(seed)
    at, out = 0.0, []
    for item in work:
        out.append(Arrival(at, item.prompt, item.new_tokens))
        at += rng.expovariate(1 / gap)
    return out


def serve_engine(lm, work: list[Arrival], batch: int) -> tuple[float, float, int]:
    """Continuous batching: submit each request when it arrives, step while anything runs."""
    engine = Engine(lm, max_batch=batch, max_tokens=max(len(a.prompt) + a.new_tokens for a in work))
    pending = list(work)
    handles = []
    finished: dict[int, float] = {}
    start = time.perf_counter()
    while pending or engine.running or engine.waiting:
        now = time.perf_counter() - start
        while pending and pending[0].at <= now:
            item = pending.pop(0)
            sampling = SamplingConfig(max_new_tokens=item.new_tokens, stop_at_eos=False)
            handles.append((item, engine.submit(Request(item.prompt, sampling))))
        if not (engine.running or engine.waiting):
            time.sleep(max(0.0, pending[0].at - now))
            continue
        for event in engine.step():
            if event.finished:
                finished[event.request_id] = time.perf_counter() - start
    total = time.perf_counter() - start
    latency = statistics.mean(finished[h.id] - item.at for item, h in handles)
    return total, latency, sum(len(h.tokens) for _, h in handles)


def serve_static(lm, work: list[Arrival], batch: int) -> tuple[float, float, int]:
    """Static batching: take what has arrived (up to ``batch``), decode until the longest is done."""
    pad = lm.tokenizer.pad_token_id or 0
    pending = list(work)
    latencies, produced = [], 0
    start = time.perf_counter()
    while pending:
        now = time.perf_counter() - start
        if pending[0].at > now:
            time.sleep(pending[0].at - now)
            now = time.perf_counter() - start
        group = [a for a in pending[:batch] if a.at <= now]
        pending = pending[len(group) :]
        sampling = SamplingConfig(
            max_new_tokens=max(a.new_tokens for a in group), stop_at_eos=False
        )
        rows = decode_rows(
            lm, from_token_lists([a.prompt for a in group], pad, lm.device), sampling
        )
        done = time.perf_counter() - start
        produced += sum(min(len(r), a.new_tokens) for r, a in zip(rows, group))
        latencies += [done - a.at for a in group]
    return time.perf_counter() - start, statistics.mean(latencies), produced


def hf_generate(lm, prompts: list[list[int]], new_tokens: int) -> None:
    pad = lm.tokenizer.pad_token_id or 0
    batch = from_token_lists(prompts, pad, lm.device)
    with torch.inference_mode():
        lm.model.generate(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=pad,
        )


def engine_generate(lm, prompts: list[list[int]], new_tokens: int) -> None:
    sampling = SamplingConfig(max_new_tokens=new_tokens, stop_at_eos=False)
    engine = Engine(lm, max_batch=len(prompts), max_tokens=max(map(len, prompts)) + new_tokens)
    engine.generate([Request(p, sampling) for p in prompts])


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--quick", action="store_true", help="small workloads, for a busy or slow machine"
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    args = parser.parse_args()
    batch, new_tokens, sequential, mixed, lengths, fillers = (
        (8, 16, 2, 12, (8, 32), 2) if args.quick else (16, 64, 4, 48, (16, 128), 4)
    )
    if args.threads:
        torch.set_num_threads(args.threads)

    lm = load_model(args.model, dtype=args.dtype, device=args.device)
    prompts = [prompt_ids(lm, text) for text in PROMPTS]
    uniform = [prompts[i % len(prompts)] for i in range(batch)]
    print(
        f"model {lm.name} ({lm.dtype}, {lm.device}), torch threads {torch.get_num_threads()}, "
        f"{args.rounds} rounds"
    )

    # ----- uniform workload -----------------------------------------------------------------
    hf_generate(lm, uniform[:2], 4)  # warm-up
    engine_generate(lm, uniform[:2], 4)
    conditions = {
        # One prompt at a time is slow; a few prompts give its rate.
        f"HF generate, 1 at a time ({sequential} prompts)": (
            lambda: [hf_generate(lm, [p], new_tokens) for p in uniform[:sequential]],
            sequential * new_tokens,
        ),
        f"HF generate, batch {batch}": (
            lambda: hf_generate(lm, uniform, new_tokens),
            batch * new_tokens,
        ),
        f"engine, batch {batch}": (
            lambda: engine_generate(lm, uniform, new_tokens),
            batch * new_tokens,
        ),
    }
    rates: dict[str, list[float]] = {name: [] for name in conditions}
    for _ in range(args.rounds):
        for name, (fn, tokens) in conditions.items():
            rates[name].append(tokens / timed(fn))
    engine_name = f"engine, batch {batch}"
    print(f"\nuniform: {batch} prompts x {new_tokens} new tokens (greedy, EOS ignored)")
    for name in conditions:
        ratio = statistics.median(e / r for e, r in zip(rates[engine_name], rates[name]))
        print(
            f"  {name:40s} {statistics.median(rates[name]):8.1f} tok/s"
            f"   engine speed-up x{ratio:.2f}"
        )

    # ----- mixed workload arriving over time -------------------------------------------------
    work = mixed_workload(lm, mixed, *lengths, fillers)
    step = timed(lambda: engine_generate(lm, uniform, 8)) / 8  # one full-batch step, roughly
    gap = 3 * step  # a new request every few decode steps: the batch stays about full
    work = with_arrivals(work, gap)
    useful = sum(a.new_tokens for a in work)
    results: dict[str, list[tuple[float, float, int]]] = {"engine": [], "static": []}
    for _ in range(args.rounds):
        results["engine"].append(serve_engine(lm, work, batch))
        results["static"].append(serve_static(lm, work, batch))
    print(
        f"\nmixed: {mixed} requests, prompts {min(len(a.prompt) for a in work)}-"
        f"{max(len(a.prompt) for a in work)} tokens, replies {lengths[0]}-{lengths[1]} tokens "
        f"({useful} in all), arriving every {gap:.2f} s on average, batch {batch}"
    )
    for name, runs in results.items():
        total = statistics.median(r[0] for r in runs)
        latency = statistics.median(r[1] for r in runs)
        print(f"  {name:8s} {useful / total:8.1f} useful tok/s   mean latency {latency:6.2f} s")
    pairs = list(zip(results["engine"], results["static"]))
    speed = statistics.median(static[0] / engine[0] for engine, static in pairs)
    latency = statistics.median(engine[1] / static[1] for engine, static in pairs)
    print(f"  engine: throughput x{speed:.2f} of static batching, mean latency x{latency:.2f}")


if __name__ == "__main__":
    main()
