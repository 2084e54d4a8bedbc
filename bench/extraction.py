"""Activation extraction against peer libraries: the mean residual of every text at every layer.

The same texts (a fixed sample of the shipped emotion stories), the same model in float32 and
the same grouping into batches for every condition, timed in one run:

- ``emoscope``: :func:`emoscope.activations.text_means` (hooks reduce each layer to per-text
  means inside the forward pass; the last block's hook stops the pass, so the LM head never runs);
- ``hf_fp32``: plain transformers in this process, the base model (no LM head) called with
  ``output_hidden_states=True`` on emoscope's left-padded batches, means taken afterwards;
- ``transformer_lens``: TransformerLens 3.9 ``HookedTransformer.run_with_cache`` keeping only
  ``blocks.{i}.hook_resid_post`` (``return_type=None``, so no unembedding);
- ``transformer_lens_4``: TransformerLens 4.3 ``TransformerBridge.run_with_cache`` (4.0 removed
  HookedTransformer), the same hooks;
- ``nnsight``: one ``trace`` saving every decoder layer's output, stopped after the last layer.

Peers run in their own environments (``make bench-peers``) through bench/peers/extract_worker.py,
kept alive for the whole run so the conditions are interleaved round by round. Each peer gets the
token ids emoscope's batching produced, tokenisation is not part of its timed work (it is part of
emoscope's and of hf_fp32's: a few milliseconds). Throughput counts real tokens (every token of
every text, no padding). Ratios are emoscope's throughput over the peer's: the median over rounds
of the two times measured in the same round. After timing, each peer's means are compared with
emoscope's (largest absolute difference); a large one would mean the work was not the same.

Model FLOPs per token = 2 x (weights of the ``nn.Linear`` layers inside the decoder blocks): q, k,
v, o, gate, up and down projections, 3,538,944 per block and 106.2 M in all for SmolLM2-135M.
Embedding lookups, norms, attention scores (QK^T and AV, which grow with the text length: about
5 % more at 160 tokens) and the LM head (``text_means`` never runs it) are not counted. The
fractions divide emoscope's achieved model FLOP/s by the GFLOP/s of one 2048 x 2048 matmul
measured at the start of the run: float32 best of 10, bfloat16 once (1024 x 1024 with ``--quick``,
as one 2048 x 2048 bfloat16 matmul takes about a minute here). This CPU has no bf16 matrix units,
so bfloat16 runs at about 0.3 GFLOP/s (about 1 at 1024) and emoscope uses float32; the bf16
fraction is far above 1 for that reason.

    python bench/extraction.py                       # 8 stories, 3 rounds
    python bench/extraction.py --quick               # 4 stories, 1 round
    python bench/extraction.py --json runs/bench/extraction.json
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from emoscope.activations import DEFAULT_BATCH_TOKENS, text_means
from emoscope.batching import encode, length_sorted_batches
from emoscope.corpus.records import load_stories
from emoscope.models import load_model
from peers.client import (
    Peer,
    PeerError,
    cpu_name,
    installed_versions,
    matmul_gflops,
    model_folder,
    ready_peers,
    speed_ratio,
    timed_rounds,
    write_json,
)

MODEL = "smollm2-135m-instruct"
MAX_BATCH = 32  # text_means' default
PEERS = {  # condition -> peer environment
    "transformer_lens": "transformer-lens",
    "transformer_lens_4": "transformer-lens-4",
    "nnsight": "nnsight",
}
MISMATCH = 1e-3  # relative difference above which a peer's means do not count as the same work


def sample_texts(n: int) -> list[str]:
    """``n`` stories chosen with a fixed seed from all shipped stories."""
    stories = load_stories()
    picks = sorted(random.Random(0).sample(range(len(stories)), n))
    return [stories[i].text for i in picks]


def decoder_linear_params(lm) -> int:
    blocks = lm.adapter.layers(lm.model)
    return sum(m.weight.numel() for m in blocks.modules() if isinstance(m, nn.Linear))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="4 stories, 1 round")
    parser.add_argument("--texts", type=int, help="stories (default 8, quick 4)")
    parser.add_argument("--rounds", type=int, help="timed rounds (default 3, quick 1)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads in every process")
    parser.add_argument(
        "--peers", default=",".join(PEERS), help=f"comma-separated subset of {','.join(PEERS)}"
    )
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args()
    n_texts = args.texts or (4 if args.quick else 8)
    rounds = args.rounds or (1 if args.quick else 3)
    torch.set_num_threads(args.threads)
    values: dict[str, object] = {}
    notes: dict[str, str] = {}

    bf16_size = 1024 if args.quick else 2048
    values["machine.cpu"] = cpu_name()
    values["machine.threads"] = args.threads
    values["machine.matmul_gflops_fp32"] = round(matmul_gflops(torch.float32, 2048, 10), 2)
    values["machine.matmul_gflops_bf16"] = round(matmul_gflops(torch.bfloat16, bf16_size, 1), 3)
    values["machine.matmul_size_bf16"] = bf16_size
    print(
        f"matmul 2048x2048: float32 {values['machine.matmul_gflops_fp32']} GFLOP/s, "
        f"bfloat16 ({bf16_size}x{bf16_size}) {values['machine.matmul_gflops_bf16']} GFLOP/s, "
        f"{args.threads} threads"
    )

    lm = load_model(MODEL, dtype="float32")
    folder = model_folder(MODEL)
    texts = sample_texts(n_texts)
    ids = lm.tokenizer(texts, add_special_tokens=True)["input_ids"]
    lengths = [len(row) for row in ids]
    tokens = sum(lengths)
    batches = length_sorted_batches(lengths, MAX_BATCH, DEFAULT_BATCH_TOKENS)
    flops_per_token = 2 * decoder_linear_params(lm)
    print(
        f"model {lm.name} ({lm.dtype}), {lm.n_layers} layers; {n_texts} stories, {tokens} tokens "
        f"in {len(batches)} batch(es); {rounds} round(s)"
    )

    # emoscope: warm up on two texts; a pass reading only layer 0 (it stops after block 0) gives
    # the positions each mean covers, which the peers need; the means to compare come from the
    # timed runs.
    text_means(lm, texts[:2], progress=False)
    probe = text_means(lm, texts, layers=[0], progress=False)
    starts = [[lengths[i] - int(probe.n_tokens[i]) for i in b] for b in batches]
    order = [i for b in batches for i in b]  # the peers return their means in batch order
    results = {}

    def run_emoscope() -> float:
        start = time.perf_counter()
        results["emoscope"] = text_means(lm, texts, progress=False)
        return time.perf_counter() - start

    hf_means = torch.zeros(n_texts, lm.n_layers, lm.hidden_size)

    def run_hf(subset: int | None = None) -> float:
        start = time.perf_counter()
        with torch.inference_mode():
            for items, first in zip(batches, starts):
                items, first = items[:subset], first[:subset]
                batch = encode(lm.tokenizer, [texts[i] for i in items], lm.device, True)
                column = torch.arange(batch.width).unsqueeze(0)
                begin = batch.padding.unsqueeze(1) + torch.tensor(first).unsqueeze(1)
                weights = ((column >= begin) & (batch.attention_mask > 0)).float().unsqueeze(-1)
                weights = weights / weights.sum(dim=1, keepdim=True)
                out = lm.model.model(**batch.inputs(), output_hidden_states=True, use_cache=False)
                means = [(h * weights).sum(dim=1) for h in out.hidden_states[1:]]
                hf_means[items] = torch.stack(means, dim=1)
                if subset is not None:
                    break
        return time.perf_counter() - start

    conditions = {"emoscope": run_emoscope, "hf_fp32": run_hf}
    run_hf(subset=2)  # warm-up
    workdir = Path(tempfile.mkdtemp(prefix="emoscope-bench-"))
    peers: dict[str, Peer] = {}
    warm = batches[0][:2]
    spec = {
        "model_dir": str(folder),
        "batches": [[ids[i] for i in b] for b in batches],
        "starts": starts,
        "warmup_batches": [[ids[i] for i in warm]],
        "warmup_starts": [starts[0][:2]],
    }
    starting: dict[str, tuple[Peer, float]] = {}
    for condition in [p.strip() for p in args.peers.split(",") if p.strip()]:
        if condition not in PEERS:
            raise SystemExit(f"unknown peer '{condition}' (known: {', '.join(PEERS)})")
        name = PEERS[condition]
        try:  # all start at once: loading is mostly imports, and nothing is timed yet
            peer_spec = {**spec, "library": name, "out": str(workdir / f"{condition}.pt")}
            starting[condition] = (
                Peer(name, "extract_worker.py", peer_spec, threads=args.threads),
                time.perf_counter(),
            )
        except PeerError as exc:
            notes[f"extraction.vs_{condition}"] = str(exc)
            print(f"  {name}: cannot run: {exc}")
    peers.update(ready_peers(starting, notes, "extraction"))
    conditions.update({condition: peer.run for condition, peer in peers.items()})
    times = timed_rounds(conditions, peers, rounds, values, notes, "extraction")

    versions = {
        "emoscope": importlib.metadata.version("emoscope"),
        "torch": torch.__version__,
        "transformers": importlib.metadata.version("transformers"),
    }
    diffs: dict[str, tuple[float, float]] = {}
    reference = results["emoscope"]
    scale = float(reference.means.abs().max())
    hf_layers = slice(0, lm.n_layers - 1)  # HF's last hidden state has the final norm applied
    diffs["hf_fp32"] = (float((hf_means - reference.means)[:, hf_layers].abs().max()), scale)
    for condition, peer in peers.items():
        try:
            peer.finish()
            means = torch.load(workdir / f"{condition}.pt")
            theirs = torch.zeros_like(reference.means)
            theirs[order] = means
            diffs[condition] = (float((theirs - reference.means).abs().max()), scale)
        except (PeerError, OSError) as exc:
            notes[f"extraction.max_abs_diff.{condition}"] = str(exc)
        versions.update({f"{PEERS[condition]}.{k}": v for k, v in peer.versions.items()})
    for condition in PEERS:
        if condition not in peers and PEERS[condition] in args.peers:
            versions.update(
                {
                    f"{PEERS[condition]}.{k}": v
                    for k, v in installed_versions(PEERS[condition]).items()
                }
            )

    emo = statistics.median(times["emoscope"])
    values["extraction.texts"] = n_texts
    values["extraction.tokens"] = tokens
    values["extraction.rounds"] = rounds
    values["extraction.flops_per_token"] = flops_per_token
    values["extraction.tokens_per_s"] = round(tokens / emo, 1)
    achieved = flops_per_token * tokens / emo / 1e9
    values["extraction.model_gflops"] = round(achieved, 2)
    values["extraction.fraction_of_fp32_limit"] = round(
        achieved / values["machine.matmul_gflops_fp32"], 3
    )
    values["extraction.fraction_of_bf16_limit"] = round(
        achieved / values["machine.matmul_gflops_bf16"], 3
    )
    values["extraction.largest_abs_mean"] = float(f"{scale:.4g}")
    print(f"\n{'condition':20s} {'tokens/s':>9s} {'emoscope x':>10s} {'max |diff|':>11s}")
    for condition in ["emoscope", "hf_fp32", *PEERS]:
        if condition not in times:
            if condition != "emoscope":
                values[f"extraction.vs_{condition}"] = None
                notes.setdefault(f"extraction.vs_{condition}", "not run: left out with --peers")
                print(f"{condition:20s} {'-':>9s} {'-':>10s} {'-':>11s}  (not run)")
            continue
        rate = tokens / statistics.median(times[condition])
        line = f"{condition:20s} {rate:9.1f}"
        if condition != "emoscope":
            ratio = speed_ratio(times["emoscope"], times[condition])
            values[f"extraction.{condition}.tokens_per_s"] = round(rate, 1)
            values[f"extraction.vs_{condition}"] = round(ratio, 3)
            line += f" {ratio:10.2f}"
            if condition in diffs:
                diff, ref = diffs[condition]
                values[f"extraction.max_abs_diff.{condition}"] = float(f"{diff:.3g}")
                flag = "  MISMATCH" if diff > MISMATCH * ref else ""
                line += f" {diff:11.2e}{flag}"
                if flag:
                    notes[f"extraction.vs_{condition}"] = (
                        f"means differ from emoscope's by up to {diff:.3g} "
                        f"(largest |mean| {ref:.3g}): not the same work"
                    )
        else:
            line += f" {'1.00':>10s} {'(reference)':>11s}"
        print(line)
    print(f"(max |diff|: against emoscope's means, whose largest |value| is {scale:.3g})")
    notes.setdefault(
        "extraction.max_abs_diff.hf_fp32",
        "layers 0..n-2 only: HF applies the final norm to its last hidden state",
    )
    print(
        f"\nemoscope: {achieved:.1f} model GFLOP/s = "
        f"{values['extraction.fraction_of_fp32_limit']:.2f} of the float32 matmul rate, "
        f"{values['extraction.fraction_of_bf16_limit']:.1f}x the bfloat16 one "
        f"({flops_per_token / 1e6:.1f} MFLOP/token)"
    )
    for key, reason in notes.items():
        print(f"note: {key}: {reason}")
    if args.json:
        write_json(args.json, values, notes, versions)
        print(f"wrote {args.json}")
    for path in workdir.iterdir():
        path.unlink()
    os.rmdir(workdir)


if __name__ == "__main__":
    sys.exit(main())
