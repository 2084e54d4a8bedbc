"""Story extraction on Ray workers against one process: what scale-out costs on this machine.

The same stories (a fixed sample of the shipped ones), SmolLM2-135M in float32, every layer,
timed round by round with the order rotating:

- ``single``: :func:`emoscope.activations.text_means` in this process, ``--threads`` threads;
- ``ray_1``: one Ray worker with ``--threads`` threads (:func:`emoscope.cluster.text_means`):
  the same compute plus sharding, shipping texts and results, and the checkpoint writes, so
  ``single / ray_1`` is Ray's overhead (target: within 10 %);
- ``ray_2``: two workers with ``threads / 2`` threads each: the same cores split two ways (about
  1x here; on a cluster each worker brings its own cores or GPU).

Workers are started and load the model before the timing (reported apart as the start-up cost).
Ratios are the median over rounds of single-process time over Ray time, measured in the same
round. On a real cluster: ``python bench/ray_extraction.py --address auto --workers 8``.

    python bench/ray_extraction.py                 # 64 stories, 3 rounds
    python bench/ray_extraction.py --quick         # 16 stories, 1 round
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import tempfile
import time
from pathlib import Path

import torch

from emoscope import cluster
from emoscope.activations import DEFAULT_BATCH_TOKENS, text_means
from emoscope.corpus.records import load_stories
from emoscope.models import load_model
from peers.client import cpu_name, interleaved, matmul_gflops

MODEL = "smollm2-135m-instruct"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="16 stories, 1 round")
    parser.add_argument("--texts", type=int, help="stories (default 64, quick 16)")
    parser.add_argument("--rounds", type=int, help="timed rounds (default 3, quick 1)")
    parser.add_argument("--threads", type=int, default=2, help="cores in use in every condition")
    parser.add_argument("--address", help="a Ray cluster (default: a local runtime)")
    parser.add_argument("--workers", type=int, default=2, help="workers in the ray_N condition")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args()
    n_texts = args.texts or (16 if args.quick else 64)
    rounds = args.rounds or (1 if args.quick else 3)
    torch.set_num_threads(args.threads)
    ray = cluster.require_ray()
    fp32 = matmul_gflops(torch.float32, 2048, 10)
    print(f"{cpu_name()}; 2048x2048 fp32 matmul {fp32:.0f} GFLOP/s; {args.threads} threads")

    lm = load_model(MODEL, dtype="float32")
    stories = load_stories()
    texts = [stories[i].text for i in sorted(random.Random(0).sample(range(len(stories)), n_texts))]
    tokens = sum(len(x) for x in lm.tokenizer(texts)["input_ids"])
    layers = list(range(lm.n_layers))
    spec = cluster.ModelSpec.of(lm)
    if args.address:
        ray.init(address=args.address, log_to_driver=False)
    else:  # logical CPUs for both pools at once; only one condition runs at a time
        ray.init(num_cpus=2 * args.threads, include_dashboard=False, log_to_driver=False)
    started = time.perf_counter()
    one = cluster.RayPool(spec, workers=1, cpus_per_worker=args.threads)
    many = cluster.RayPool(
        spec, workers=args.workers, cpus_per_worker=max(1, args.threads // args.workers)
    )
    startup = time.perf_counter() - started
    print(f"{n_texts} stories, {tokens} tokens, {len(layers)} layers; workers up in {startup:.1f}s")

    results: dict[str, torch.Tensor] = {}

    def single() -> float:
        start = time.perf_counter()
        results["single"] = text_means(lm, texts, layers, progress=False).means
        return time.perf_counter() - start

    def on(pool: cluster.RayPool, name: str):
        def run() -> float:
            with tempfile.TemporaryDirectory() as scratch:
                start = time.perf_counter()
                out = cluster.text_means(
                    pool, texts, layers, 50, True, DEFAULT_BATCH_TOKENS, Path(scratch), False
                )
                seconds = time.perf_counter() - start
            results[name] = out.means
            return seconds

        return run

    text_means(lm, texts[:2], layers, progress=False)  # warm-up
    many_name = f"ray_{args.workers}"
    times = interleaved(
        {"single": single, "ray_1": on(one, "ray_1"), many_name: on(many, many_name)}, rounds
    )
    one.close()
    many.close()
    ray.shutdown()
    print("seconds per round (order rotates):")
    for name, seconds in times.items():
        print(
            f"  {name:8s} {' '.join(f'{t:7.2f}' for t in seconds)}  ({tokens / min(seconds):.0f} tok/s best)"
        )
    ratios = {
        name: statistics.median(s / r for s, r in zip(times["single"], times[name], strict=True))
        for name in times
        if name != "single"
    }
    worst = max(float((results[name] - results["single"]).abs().max()) for name in ratios)
    values = {
        "ray.machine_matmul_gflops_fp32": round(fp32, 1),
        "ray.texts": n_texts,
        "ray.tokens": tokens,
        "ray.rounds": rounds,
        "ray.startup_seconds": round(startup, 1),
        "ray.single_tokens_per_s": round(tokens / statistics.median(times["single"]), 1),
        "ray.vs_single_1_worker": round(ratios["ray_1"], 3),
        f"ray.vs_single_{args.workers}_workers": round(ratios[many_name], 3),
        "ray.overhead_1_worker": round(1 / ratios["ray_1"] - 1, 3),
        "ray.max_abs_difference": worst,
    }
    print(
        f"throughput vs one process: 1 worker {ratios['ray_1']:.3f}x "
        f"(overhead {values['ray.overhead_1_worker']:+.1%}), {args.workers} workers "
        f"{ratios[many_name]:.3f}x; largest difference in the means {worst:.2e}"
    )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(values, indent=2) + "\n")
    load = os.getloadavg()[0]
    print(f"load average at the end: {load:.1f}")


if __name__ == "__main__":
    main()
