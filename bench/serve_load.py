"""Load on ``emoscope serve``: concurrent streaming clients on one server, loopback only.

Starts ``emoscope serve`` on a free loopback port (the default model, with ``runs/demo`` as the
bank when it is complete, else a bank of random vectors of the same shape), then runs, one after
the other:

1. 1, 4 and 8 concurrent streaming clients, each sending ``--requests`` chat completions of
   ``--max-tokens`` tokens (EOS ignored, so every reply has the same length) that report all of
   the bank's emotions per token. Reported per level: errors, time to first token and latency
   (p50 and p95, seconds), and aggregate generated tokens per second.
2. The cost of monitoring: 4 clients with every emotion reported per token (and the top 3)
   against 4 clients with no telemetry at all, in alternating rounds; the ratio is the median of
   the rounds' time ratios (> 1: monitoring costs that much).

Every request has a timeout and no new request starts after ``--time-limit`` seconds.

    python bench/serve_load.py                      # about five minutes on 2 cores
    python bench/serve_load.py --requests 2 --max-tokens 16 --json bench/out/serve.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = [
    "Describe an ordinary Tuesday morning.", "Explain how a bicycle gear works.",
    "List five uses of a paperclip.", "Write two sentences about a library.",
    "How is bread made?", "Tell me about the weather on the coast.",
    "What does a librarian do all day?", "Describe a small town square.",
]  # fmt: skip


@dataclass
class Result:
    ttft: float | None = None
    latency: float | None = None
    tokens: int = 0
    error: str | None = None


@dataclass
class Level:
    clients: int
    results: list[Result] = field(default_factory=list)
    seconds: float = 0.0

    def summary(self) -> dict[str, float | int | None]:
        done = [r for r in self.results if r.error is None]
        tokens = sum(r.tokens for r in done)
        return {
            "clients": self.clients,
            "requests": len(self.results),
            "errors": len(self.results) - len(done),
            "ttft_p50": percentile([r.ttft for r in done], 50),
            "ttft_p95": percentile([r.ttft for r in done], 95),
            "latency_p50": percentile([r.latency for r in done], 50),
            "latency_p95": percentile([r.latency for r in done], 95),
            "tokens_per_s": round(tokens / self.seconds, 2) if self.seconds else None,
        }


def percentile(values: list[float | None], q: float) -> float | None:
    kept = sorted(v for v in values if v is not None)
    if not kept:
        return None
    index = min(len(kept) - 1, round(q / 100 * (len(kept) - 1)))
    return round(kept[index], 3)


def demo_bank() -> Path | None:
    folder = ROOT / "runs" / "demo"
    complete = all((folder / name).is_file() for name in ("manifest.json", "vectors.safetensors"))
    return folder if complete else None


def random_bank(model: str, out: Path) -> Path:
    """A bank with the demo's shape (171 emotions, z-score statistics) and random vectors."""
    import torch

    from emoscope.concepts import EMOTIONS
    from emoscope.models import load_model
    from emoscope.vectors import EmotionBank, unit_rows

    lm = load_model(model)
    layer = lm.n_layers * 2 // 3
    g = torch.Generator().manual_seed(0)
    vectors = {layer: unit_rows(torch.randn(len(EMOTIONS), lm.hidden_size, generator=g))}
    stats = {
        f"mean.{layer}": torch.zeros(lm.hidden_size),
        f"residual_norm.{layer}": torch.tensor([200.0]),
        f"neutral_score_mean.{layer}": torch.zeros(len(EMOTIONS)),
        f"neutral_score_std.{layer}": torch.ones(len(EMOTIONS)),
    }
    manifest = {"model": lm.name, "hidden_size": lm.hidden_size, "default_layer": layer}
    return EmotionBank(list(EMOTIONS), [layer], vectors, stats, manifest).save(out)


def start_server(bank: Path, model: str, db: Path, log: Path) -> tuple[subprocess.Popen, str]:
    command = [
        sys.executable, "-m", "emoscope.cli", "serve", "--bank", str(bank), "--model", model,
        "--host", "127.0.0.1", "--port", "0", "--db", str(db), "--max-batch", "8",
    ]  # fmt: skip
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=log.open("w"), text=True, cwd=ROOT
    )
    line = process.stdout.readline() if process.stdout else ""
    if "http://127.0.0.1:" not in line:
        process.kill()
        raise SystemExit(f"the server did not start:\n{log.read_text()[-2000:]}")
    url = line.split()[2].rstrip("/")
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            httpx.get(f"{url}/health", timeout=5).raise_for_status()
            return process, url
        except httpx.HTTPError:
            time.sleep(0.2)
    process.kill()
    raise SystemExit("the server did not answer /health within 120 s")


def one_request(url: str, model: str, body_extra: dict, prompt: str, timeout: float) -> Result:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "stream": True,
        "temperature": 0,
        **body_extra,
    }
    result = Result()
    start = time.perf_counter()
    try:
        with httpx.stream(
            "POST", f"{url}/v1/chat/completions", json=body, timeout=timeout
        ) as response:
            if response.status_code != 200:
                response.read()
                result.error = f"{response.status_code}: {response.text[:200]}"
                return result
            for line in response.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    result.error = chunk["error"]["message"]
                    return result
                if chunk.get("emoscope", {}).get("tokens"):
                    result.tokens += 1
                    if result.ttft is None:
                        result.ttft = time.perf_counter() - start
    except httpx.HTTPError as exc:
        result.error = f"{type(exc).__name__}: {exc}"
        return result
    result.latency = time.perf_counter() - start
    return result


def run_level(
    url: str, model: str, clients: int, requests: int, extra: dict, deadline: float
) -> Level:
    level = Level(clients)
    lock = threading.Lock()

    def client(number: int) -> None:
        for i in range(requests):
            if time.time() > deadline:
                return
            prompt = PROMPTS[(number + i * clients) % len(PROMPTS)]
            result = one_request(url, model, extra, prompt, timeout=300)
            with lock:
                level.results.append(result)

    threads = [threading.Thread(target=client, args=(n,)) for n in range(clients)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    level.seconds = time.perf_counter() - start
    return level


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--bank", type=Path, help="bank folder (default: runs/demo if complete)")
    parser.add_argument("--requests", type=int, default=6, help="requests per client per level")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=6, help="rounds of the monitoring check")
    parser.add_argument("--time-limit", type=float, default=900.0, help="seconds, all levels")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="emoscope-serve-bench-"))
    bank = args.bank or demo_bank()
    bank_note = str(bank) if bank else "random vectors (runs/demo is missing)"
    if bank is None:
        bank = random_bank(args.model, work / "bank")
    names = json.loads((bank / "manifest.json").read_text())["emotions"]
    process, url = start_server(bank, args.model, work / "log.db", work / "server.log")
    served = httpx.get(f"{url}/v1/models", timeout=10).json()["data"][0]["id"]
    everything = {"emotions": names, "top_k": 3, "ignore_eos": True}
    nothing = {"emotions": [], "top_k": 0, "ignore_eos": True}
    deadline = time.time() + args.time_limit
    figures: dict[str, object] = {
        "serve.bank": bank_note,
        "serve.max_tokens": args.max_tokens,
        "serve.threads": os.cpu_count(),
    }
    try:
        one_request(url, served, {"max_tokens": 4, "emoscope": everything}, "Hi.", 120)  # warm
        for clients in (1, 4, 8):
            extra = {"max_tokens": args.max_tokens, "emoscope": everything}
            level = run_level(url, served, clients, args.requests, extra, deadline)
            summary = level.summary()
            print(json.dumps(summary))
            figures.update({f"serve.c{clients}.{k}": v for k, v in summary.items()})
        ratios = []
        for _ in range(args.rounds):
            timed = {}
            for name, options in (("none", nothing), ("all", everything)):
                extra = {"max_tokens": args.max_tokens, "emoscope": options}
                level = run_level(url, served, 4, args.requests, extra, deadline)
                if level.summary()["errors"] or not level.results:
                    break
                timed[name] = level.seconds
            if len(timed) == 2:
                ratios.append(timed["all"] / timed["none"])
        cost = round(statistics.median(ratios), 3) if ratios else None
        figures["serve.monitor_all_vs_none"] = cost
        print(
            json.dumps(
                {"monitor_171_vs_none_time_ratio": cost, "rounds": [round(r, 3) for r in ratios]}
            )
        )
    finally:
        process.terminate()
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
