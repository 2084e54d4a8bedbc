"""What bfloat16 costs in quality (and gains or loses in speed) against float32, on the engine.

Two copies of the model, one per dtype, decode the same neutral prompts (the first user turns of
the shipped neutral dialogues, chat-formatted) greedily for 32 tokens with EOS ignored, every
emotion monitored. Reported:

- token agreement: the share of the first 32 positions where the bf16 token equals the fp32
  token, and the mean length of the common prefix (a greedy reply that diverges once differs
  from there on, so the prefix is the stricter figure);
- readout agreement: both copies score the *same* tokens (prompt plus the fp32 reply) offline;
  the absolute difference of every token's z-scores over all emotions, as mean, 99th
  percentile and maximum (tokens at attention sinks are left out, as the monitor leaves them);
- tokens/s of each dtype at the same batch size.

    python bench/dtype.py --bank runs/demo
    python bench/dtype.py --bank runs/demo --quick --json bench/out/dtype.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from emoscope.corpus.records import load_neutral
from emoscope.engine import Engine, Request
from emoscope.generation import SamplingConfig
from emoscope.models import load_model
from emoscope.monitor import Monitor
from emoscope.vectors import EmotionBank

NEW_TOKENS = 32


def neutral_prompts(count: int) -> list[str]:
    return [dialogue.turns[0].content for dialogue in load_neutral()[:count]]


def decode(lm, bank: EmotionBank, prompts: list[str]) -> tuple[list[list[int]], float]:
    sampling = SamplingConfig(max_new_tokens=NEW_TOKENS, stop_at_eos=False)
    with Engine(lm, bank=bank, max_batch=len(prompts), max_tokens=1024) as engine:
        start = time.perf_counter()
        handles = engine.generate([Request(p, sampling, emotions=bank.emotions) for p in prompts])
        seconds = time.perf_counter() - start
    return [handle.tokens for handle in handles], len(prompts) * NEW_TOKENS / seconds


def prompt_ids(lm, prompt: str) -> list[int]:
    chat = lm.chat([{"role": "user", "content": prompt}])
    return list(lm.tokenizer(chat.text, add_special_tokens=chat.add_special_tokens)["input_ids"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bank", type=Path, default=Path("runs/demo"))
    parser.add_argument("--quick", action="store_true", help="8 prompts instead of 24")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    bank = EmotionBank.load(args.bank)
    prompts = neutral_prompts(8 if args.quick else 24)
    full = load_model("smollm2-135m-instruct", dtype="float32")
    half = load_model("smollm2-135m-instruct", dtype="bfloat16")
    tokens32, speed32 = decode(full, bank, prompts)
    tokens16, speed16 = decode(half, bank, prompts)

    same = torch.tensor([a == b for x, y in zip(tokens32, tokens16) for a, b in zip(x, y)])
    prefixes = []
    for x, y in zip(tokens32, tokens16):
        n = next((i for i, (a, b) in enumerate(zip(x, y)) if a != b), NEW_TOKENS)
        prefixes.append(n / NEW_TOKENS)

    differences = []
    monitors = [Monitor(lm, bank) for lm in (full, half)]
    for prompt, reply in zip(prompts, tokens32):
        ids = prompt_ids(full, prompt) + reply
        z32, z16 = (monitor.score_tokens(ids).z for monitor in monitors)
        keep = ~(z32.isnan().any(dim=1) | z16.isnan().any(dim=1))
        differences.append((z32[keep] - z16[keep]).abs().flatten())
    gap = torch.cat(differences)
    result = {
        "dtype.token_agreement": round(float(same.float().mean()), 4),
        "dtype.common_prefix": round(sum(prefixes) / len(prefixes), 4),
        "dtype.z_abs_diff_mean": round(float(gap.mean()), 4),
        "dtype.z_abs_diff_p99": round(float(gap.quantile(0.99)), 4),
        "dtype.z_abs_diff_max": round(float(gap.max()), 4),
        "dtype.bf16_vs_fp32_speed": round(speed16 / speed32, 3),
        "dtype.prompts": len(prompts),
    }
    print(
        f"{len(prompts)} neutral prompts, {NEW_TOKENS} greedy tokens, {len(bank.emotions)} emotions"
    )
    print(
        f"  bf16 token = fp32 token at          {result['dtype.token_agreement']:.1%} of positions"
    )
    print(f"  common prefix                       {result['dtype.common_prefix']:.1%} of 32 tokens")
    print(
        f"  |z(bf16) - z(fp32)| on fp32 tokens  mean {result['dtype.z_abs_diff_mean']:.4f}, "
        f"p99 {result['dtype.z_abs_diff_p99']:.4f}, max {result['dtype.z_abs_diff_max']:.4f}"
    )
    print(
        f"  speed: fp32 {speed32:.1f} tok/s, bf16 {speed16:.1f} tok/s (ratio {speed16 / speed32:.2f})"
    )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
