"""Generation throughput of the engine against Hugging Face ``generate`` and static batches.

Every condition runs interleaved with the others in one process for several rounds; every ratio
is the median over rounds of two conditions timed side by side in the same round.

1. Uniform: the same plain prompts, a fixed number of new tokens each (greedy, EOS ignored).
   - ``generation.vs_hf_batch1``: the engine with ``--max-batch`` prompts at once (its
     aggregate throughput) against ``model.generate`` one prompt at a time;
   - ``generation.vs_hf_same_batch``: the engine against ``model.generate`` on one left-padded
     batch of the same size (``--batch``), plain, and steered + monitored on both sides (HF with
     emoscope's hooks, as steering libraries do it);
   - ``generation.steer_monitor_overhead``: time of the engine steering every row (at a band of
     10 layers) while reading all 171 emotions per token, over the plain engine's time.
2. Mixed (``mixed.vs_static_batching``): requests with prompts of 20-400 tokens and replies of
   16-256 tokens that arrive over time, about as fast as a full batch can serve them. The engine admits each as it arrives and retires each when done; static
   batching (:func:`emoscope.generation.decode_rows`) takes whatever has arrived, up to the batch
   size, and decodes the group until its longest reply is done. Reported: useful tokens per
   second over the whole run, and mean latency from arrival to completion.

    python bench/generation.py            # batch 16 (128 aggregate), 64 new tokens; 48 mixed
    python bench/generation.py --quick    # batch 8 (32 aggregate), 16 new tokens; 16 mixed
    python bench/generation.py --json bench/out/generation.json
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import random
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from emoscope.batching import from_token_lists
from emoscope.concepts import EMOTIONS
from emoscope.engine import Engine, Request
from emoscope.generation import SamplingConfig, decode_rows
from emoscope.models import load_model
from emoscope.monitor import Monitor
from emoscope.steer import Steerer, Steering
from emoscope.vectors import EmotionBank, unit_rows
from peers.client import interleaved, matmul_gflops, speed_ratio, write_json

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
    lm, count: int, prompts: tuple[int, int], replies: tuple[int, int], seed: int = 0
) -> list[Arrival]:
    """Prompts of ``prompts[0]..prompts[1]`` tokens (a question followed by as much of a filler
    paragraph as it takes) and replies of ``replies[0]..replies[1]`` tokens, uniformly drawn
    (arrival times are filled in per run)."""
    rng = random.Random(seed)
    filler = prompt_ids(lm, FILLER * 40)
    out = []
    for i in range(count):
        question = prompt_ids(lm, PROMPTS[i % len(PROMPTS)])
        length = rng.randint(*prompts)
        ids = (question + filler)[:length]
        out.append(Arrival(0.0, ids, rng.randint(*replies)))
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


def synthetic_bank(lm) -> EmotionBank:
    """171 random unit vectors of the model's shape at every layer: speed does not depend on
    their values. Residual norm 4.0, so a strength of 0.1 adds a vector of norm 0.4."""
    g = torch.Generator().manual_seed(0)
    layers = list(range(lm.n_layers))
    vectors = {
        layer: unit_rows(torch.randn(len(EMOTIONS), lm.hidden_size, generator=g))
        for layer in layers
    }
    stats = {}
    for layer in layers:
        stats |= {
            f"mean.{layer}": torch.zeros(lm.hidden_size),
            f"neutral_mean.{layer}": torch.zeros(lm.hidden_size),
            f"residual_norm.{layer}": torch.tensor([4.0]),
            f"neutral_score_mean.{layer}": torch.zeros(len(EMOTIONS)),
            f"neutral_score_std.{layer}": torch.ones(len(EMOTIONS)),
        }
    middle = 2 * lm.n_layers // 3
    manifest = {"model": lm.name, "default_layer": middle, "steer_layer": middle}
    return EmotionBank(list(EMOTIONS), layers, vectors, stats, manifest)


STEERING_BAND = range(10, 20)


def steering(lm) -> Steering:
    band = [layer for layer in STEERING_BAND if layer < lm.n_layers] or [0]
    return Steering({"desperate": 0.1, "calm": -0.05}, layers=band)


def hf_generate(
    lm, prompts: list[list[int]], new_tokens: int, bank: EmotionBank | None = None
) -> float:
    """``model.generate`` on one left-padded batch; with ``bank``, steered and monitored through
    emoscope's hooks (the static way). Returns the seconds it took."""
    pad = lm.tokenizer.pad_token_id or 0
    batch = from_token_lists(prompts, pad, lm.device)
    start = time.perf_counter()
    with contextlib.ExitStack() as stack:
        if bank is not None:
            stack.enter_context(Steerer(lm, bank).apply(steering(lm), batch))
            stack.enter_context(Monitor(lm, bank).reader())
        with torch.inference_mode():
            lm.model.generate(
                input_ids=batch.input_ids,
                attention_mask=batch.attention_mask,
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
                pad_token_id=pad,
            )
    return time.perf_counter() - start


def engine_generate(
    lm, prompts: list[list[int]], new_tokens: int, bank: EmotionBank | None = None
) -> float:
    """The engine with every prompt at once; with ``bank``, each row steered and monitored
    (all 171 emotions). Returns the seconds it took, engine set-up included."""
    sampling = SamplingConfig(max_new_tokens=new_tokens, stop_at_eos=False)
    options = (
        {"steering": steering(lm), "emotions": list(range(len(bank.emotions)))}
        if bank is not None
        else {}
    )
    start = time.perf_counter()
    with Engine(
        lm, bank=bank, max_batch=len(prompts), max_tokens=max(map(len, prompts)) + new_tokens
    ) as engine:
        engine.generate([Request(p, sampling, **options) for p in prompts])
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true", help="small workloads (under 2 minutes)")
    parser.add_argument("--rounds", type=int, help="repetitions (default 3; 2 with --quick)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    parser.add_argument("--json", type=Path, help="write the figures to this file")
    args = parser.parse_args()
    batch, aggregate, new_tokens, sequential, mixed, prompt_range, lengths = (
        (8, 32, 16, 2, 16, (20, 100), (8, 48))
        if args.quick
        else (16, 128, 64, 3, 48, (20, 400), (16, 256))
    )
    rounds = args.rounds or (2 if args.quick else 3)
    if args.threads:
        torch.set_num_threads(args.threads)

    lm = load_model(args.model, dtype=args.dtype, device=args.device)
    bank = synthetic_bank(lm)
    prompts = [prompt_ids(lm, text) for text in PROMPTS]
    uniform = [prompts[i % len(prompts)] for i in range(aggregate)]
    fp32 = matmul_gflops(torch.float32, 2048)
    print(
        f"model {lm.name} ({lm.dtype}, {lm.device}), torch threads {torch.get_num_threads()}, "
        f"{rounds} rounds; 2048x2048 fp32 matmul {fp32:.0f} GFLOP/s"
    )

    # ----- uniform workload -----------------------------------------------------------------
    hf_generate(lm, uniform[:2], 4)  # warm-up
    engine_generate(lm, uniform[:2], 4, bank)
    same = uniform[:batch]
    conditions = {
        "hf_one_at_a_time": lambda: sum(
            hf_generate(lm, [p], new_tokens) for p in uniform[:sequential]
        ),
        "hf_batch": lambda: hf_generate(lm, same, new_tokens),
        "hf_batch_steer_monitor": lambda: hf_generate(lm, same, new_tokens, bank),
        "engine_batch": lambda: engine_generate(lm, same, new_tokens),
        "engine_batch_steer_monitor": lambda: engine_generate(lm, same, new_tokens, bank),
        "engine_aggregate": lambda: engine_generate(lm, uniform, new_tokens),
    }
    tokens = {
        "hf_one_at_a_time": sequential * new_tokens,
        "engine_aggregate": aggregate * new_tokens,
    }
    times = interleaved(conditions, rounds)
    # Per-token times, so that conditions with different amounts of work compare as rates.
    per_token = {
        name: [t / tokens.get(name, batch * new_tokens) for t in values]
        for name, values in times.items()
    }
    results = {
        "generation.vs_hf_batch1": speed_ratio(
            per_token["engine_aggregate"], per_token["hf_one_at_a_time"]
        ),
        "generation.vs_hf_same_batch": speed_ratio(
            per_token["engine_batch"], per_token["hf_batch"]
        ),
        "generation.vs_hf_same_batch_steer_monitor": speed_ratio(
            per_token["engine_batch_steer_monitor"], per_token["hf_batch_steer_monitor"]
        ),
        "generation.steer_monitor_overhead": statistics.median(
            s / p for s, p in zip(times["engine_batch_steer_monitor"], times["engine_batch"])
        ),
        "generation.engine_aggregate_tokens_per_s": 1
        / statistics.median(per_token["engine_aggregate"]),
        "generation.engine_batch_tokens_per_s": 1 / statistics.median(per_token["engine_batch"]),
        "generation.hf_batch1_tokens_per_s": 1 / statistics.median(per_token["hf_one_at_a_time"]),
        "generation.hf_same_batch_tokens_per_s": 1 / statistics.median(per_token["hf_batch"]),
        "generation.batch": batch,
        "generation.aggregate_batch": aggregate,
        "generation.new_tokens": new_tokens,
        "machine.matmul_gflops_fp32": fp32,
    }
    print(f"\nuniform: {new_tokens} new tokens per prompt (greedy, EOS ignored)")
    labels = {
        "hf_one_at_a_time": "HF generate, one prompt at a time",
        "hf_batch": f"HF generate, batch {batch}",
        "hf_batch_steer_monitor": f"HF generate, batch {batch}, steered + monitored",
        "engine_batch": f"engine, batch {batch}",
        "engine_batch_steer_monitor": f"engine, batch {batch}, steered + monitored",
        "engine_aggregate": f"engine, batch {aggregate}",
    }
    for name, label in labels.items():
        print(f"  {label:48s} {1 / statistics.median(per_token[name]):8.1f} tok/s")
    for key in (
        "generation.vs_hf_batch1",
        "generation.vs_hf_same_batch",
        "generation.vs_hf_same_batch_steer_monitor",
        "generation.steer_monitor_overhead",
    ):
        print(f"  {key:48s} x{results[key]:.3f}")

    # ----- mixed workload arriving over time -------------------------------------------------
    work = mixed_workload(lm, mixed, prompt_range, lengths)
    step = engine_generate(lm, same, 8) / 8  # one full-batch step, roughly
    gap = 3 * step  # a new request every few decode steps: the batch stays about full
    work = with_arrivals(work, gap)
    useful = sum(a.new_tokens for a in work)
    served: dict[str, list[tuple[float, float, int]]] = {"engine": [], "static": []}
    for _ in range(rounds):
        served["engine"].append(serve_engine(lm, work, batch))
        served["static"].append(serve_static(lm, work, batch))
    print(
        f"\nmixed: {mixed} requests, prompts {min(len(a.prompt) for a in work)}-"
        f"{max(len(a.prompt) for a in work)} tokens, replies {lengths[0]}-{lengths[1]} tokens "
        f"({useful} in all), arriving every {gap:.2f} s on average, batch {batch}"
    )
    for name, runs in served.items():
        total = statistics.median(r[0] for r in runs)
        latency = statistics.median(r[1] for r in runs)
        print(f"  {name:8s} {useful / total:8.1f} useful tok/s   mean latency {latency:6.2f} s")
    pairs = list(zip(served["engine"], served["static"]))
    results["mixed.vs_static_batching"] = statistics.median(s[0] / e[0] for e, s in pairs)
    results["mixed.latency_vs_static"] = statistics.median(e[1] / s[1] for e, s in pairs)
    print(
        f"  engine: throughput x{results['mixed.vs_static_batching']:.2f} of static batching, "
        f"mean latency x{results['mixed.latency_vs_static']:.2f}"
    )
    if args.json:
        rounded = {k: round(v, 4) if isinstance(v, float) else v for k, v in results.items()}
        versions = {
            name: importlib.metadata.version(name) for name in ("emoscope", "torch", "transformers")
        }
        write_json(args.json, rounded, {}, versions)


if __name__ == "__main__":
    main()
