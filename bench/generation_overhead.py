"""Generation speed with live 171-emotion monitoring, and with steering, against plain decoding.

Runs the three conditions interleaved (plain, monitored, steered) in one process, several
rounds, at each batch size, and prints tokens/s and the time ratio of each condition to plain
decoding measured side by side in the same round (median over rounds). Target: ratios <= 1.03.

    python bench/generation_overhead.py                      # smollm2, batch 1 and 16
    python bench/generation_overhead.py --bank runs/demo     # use a real bank
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from emoscope.concepts import EMOTIONS
from emoscope.generation import SamplingConfig, collect, decode_steps, eos_ids
from emoscope.models import load_model
from emoscope.monitor import Monitor
from emoscope.steer import Steerer, Steering
from emoscope.vectors import EmotionBank, two_thirds_layer, unit_rows

PROMPTS = [
    "Describe an ordinary Tuesday morning.", "Explain how a bicycle gear works.", "List five uses of a paperclip.",
    "Write two sentences about a library.", "How is bread made?", "Tell me about the weather on the coast.",
    "What does a librarian do all day?", "Describe a small town square.",
]  # fmt: skip


def synthetic_bank(lm, layer: int) -> EmotionBank:
    """171 random unit vectors with the model's shape: overhead does not depend on their values."""
    g = torch.Generator().manual_seed(0)
    v = unit_rows(torch.randn(len(EMOTIONS), lm.hidden_size, generator=g))
    stats = {
        f"mean.{layer}": torch.zeros(lm.hidden_size),
        f"neutral_mean.{layer}": torch.zeros(lm.hidden_size),
        f"residual_norm.{layer}": torch.tensor([100.0]),
        f"neutral_score_mean.{layer}": torch.zeros(len(EMOTIONS)),
        f"neutral_score_std.{layer}": torch.ones(len(EMOTIONS)),
    }
    manifest = {"model": lm.name, "default_layer": layer, "steer_layer": layer}
    return EmotionBank(list(EMOTIONS), [layer], {layer: v}, stats, manifest)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument(
        "--bank", type=Path, help="a bank folder (default: random vectors of the right shape)"
    )
    parser.add_argument("--batches", default="1,16")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--dtype", default="float32")
    args = parser.parse_args()

    lm = load_model(args.model, dtype=args.dtype)
    bank = (
        EmotionBank.load(args.bank, model=lm)
        if args.bank
        else synthetic_bank(lm, two_thirds_layer(range(lm.n_layers), lm.n_layers))
    )
    monitor = Monitor(lm, bank)  # all emotions in the bank, at its default layer
    steerer = Steerer(lm, bank)
    steering = Steering({"happy": 0.1})  # at the bank's steering layer
    sampling = SamplingConfig(max_new_tokens=args.tokens, stop_at_eos=False)
    eos, pad = eos_ids(lm.model, lm.tokenizer), lm.tokenizer.pad_token_id or 0
    print(
        f"model {lm.name} ({lm.dtype}), {len(monitor.emotions)} emotions monitored at layer {monitor.layers}, "
        f"{args.tokens} new tokens, {args.rounds} rounds, torch threads {torch.get_num_threads()}"
    )

    def plain(batch):
        collect(decode_steps(lm.model, batch, sampling, eos, pad), batch.size)

    def monitored(batch):
        for _ in monitor.stream(batch, sampling=sampling):
            pass

    def steered(batch):
        with steerer.apply(steering, batch):
            collect(decode_steps(lm.model, batch, sampling, eos, pad), batch.size)

    conditions = {"plain": plain, "monitored": monitored, "steered": steered}
    for size in (int(b) for b in args.batches.split(",")):
        prompts = [PROMPTS[i % len(PROMPTS)] for i in range(size)]
        batch = monitor.encode(prompts)
        for fn in conditions.values():  # warm-up
            fn(batch)
        times: dict[str, list[float]] = {name: [] for name in conditions}
        for _ in range(args.rounds):
            for name, fn in conditions.items():
                start = time.perf_counter()
                fn(batch)
                times[name].append(time.perf_counter() - start)
        tokens = size * args.tokens
        print(f"\nbatch {size}:")
        for name in conditions:
            median = statistics.median(times[name])
            ratio = statistics.median(t / p for t, p in zip(times[name], times["plain"]))
            print(f"  {name:10s} {tokens / median:8.1f} tok/s   time ratio to plain {ratio:.3f}")


if __name__ == "__main__":
    main()
