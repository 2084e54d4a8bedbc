"""Steered generation against peer libraries: emoscope, repeng and steering-vectors side by side.

Every library gets the same model (float32), the same 8 chat prompts (formatted with the
tokenizer's chat template and tokenised once, by emoscope), decoded as one left-padded batch of
8, greedily, for a fixed number of new tokens with EOS ignored, and the same steering: one seeded
random vector of norm 4.0 added to the output of each decoder block 10..19 at every position.

- ``emoscope``: ``Steerer(lm, bank).generate(prompts, steering=Steering({}, layers=...,
  extra={layer: vector}), sampling=SamplingConfig(max_new_tokens=N, temperature=0,
  stop_at_eos=False))``, the public API (chat formatting, tokenisation and decoding to text
  included in its time); the bank is a synthetic one with the model's shape, as ``extra`` carries
  the ready-made vectors;
- ``repeng``: ``ControlModel(model, layers)`` with ``set_control`` of a ``ControlVector`` built
  directly from the same directions, then ``model.generate``;
- ``steering_vectors``: ``SteeringVector(layer_activations=...)`` applied with its context
  manager around ``model.generate``.

All three add at the same residual point (the output of block ``i``, which emoscope calls layer
``i``), so the layer indices need no shifting. The peers run in their own environments (``make
bench-peers``) through bench/peers/steer_worker.py, alive for the whole run so the conditions are
interleaved round by round; their timed work is padding the token ids and ``generate``.
Throughput counts generated tokens (8 x N). Ratios are emoscope's throughput over the peer's, the
median over rounds of the two times measured in the same round. Token agreement: each reply is
decoded to text and re-encoded (emoscope's public API returns text), and per prompt the length
of the common prefix of the two token sequences is divided by the longer one; the mean over the
prompts is reported, with the number of replies the steering changes against unsteered
decoding (agreement would mean little if the vector did nothing). Greedy decoding of the same steered model should agree almost everywhere; a
late divergence can come from float32 rounding (different attention kernels or batch shapes).

    python bench/steering.py                          # 64 new tokens, 3 rounds
    python bench/steering.py --quick                  # 16 new tokens, 2 rounds
    python bench/steering.py --json runs/bench/steering.json
"""

from __future__ import annotations

import argparse
import importlib.metadata
import statistics
import sys
import time
from pathlib import Path

import torch

from emoscope.concepts import EMOTIONS
from emoscope.generation import SamplingConfig
from emoscope.models import load_model
from emoscope.steer import Steerer, Steering
from emoscope.vectors import EmotionBank, unit_rows
from peers.client import (
    Peer,
    PeerError,
    installed_versions,
    model_folder,
    ready_peers,
    speed_ratio,
    timed_rounds,
    write_json,
)

MODEL = "smollm2-135m-instruct"
LAYERS = list(range(10, 20))
NORM = 4.0
PROMPTS = [
    "Describe your morning in three sentences.",
    "What should I cook for dinner tonight?",
    "Write a short note to a neighbour about a lost cat.",
    "How do plants drink water?",
    "Give me one tip for a job interview.",
    "Tell me about the sea.",
    "Why do people keep diaries?",
    "Plan a rainy Sunday afternoon.",
]
PEERS = {"repeng": "repeng", "steering_vectors": "steering-vectors"}  # condition -> environment


def steering_vector(hidden: int) -> torch.Tensor:
    """The one vector every library adds: a seeded random direction of norm ``NORM``."""
    g = torch.Generator().manual_seed(1234)
    v = torch.randn(hidden, generator=g)
    return v / v.norm() * NORM


def placeholder_bank(lm, layers: list[int]) -> EmotionBank:
    """A bank with the model's shape at ``layers``, needed to build a Steerer.

    Its own vectors are never added: the steering has no emotions, only ``extra`` vectors.
    """
    g = torch.Generator().manual_seed(0)
    size = lm.hidden_size
    vectors = {layer: unit_rows(torch.randn(len(EMOTIONS), size, generator=g)) for layer in layers}
    stats: dict[str, torch.Tensor] = {}
    for layer in layers:
        stats[f"mean.{layer}"] = torch.zeros(size)
        stats[f"neutral_mean.{layer}"] = torch.zeros(size)
        stats[f"residual_norm.{layer}"] = torch.tensor([1.0])
        stats[f"neutral_score_mean.{layer}"] = torch.zeros(len(EMOTIONS))
        stats[f"neutral_score_std.{layer}"] = torch.ones(len(EMOTIONS))
    manifest = {
        "model": lm.name,
        "default_layer": layers[0],
        "steer_layer": layers[0],
        "n_layers_model": lm.n_layers,
    }
    return EmotionBank(list(EMOTIONS), list(layers), vectors, stats, manifest)


def agreement(tokenizer, ours: list[str], theirs: list[str]) -> tuple[float, int]:
    """Mean common-prefix share of the re-encoded replies, and how many replies are identical."""
    shares = []
    for a, b in zip(ours, theirs):
        ta = tokenizer(a, add_special_tokens=False)["input_ids"]
        tb = tokenizer(b, add_special_tokens=False)["input_ids"]
        prefix = 0
        for x, y in zip(ta, tb):
            if x != y:
                break
            prefix += 1
        shares.append(prefix / max(len(ta), len(tb), 1))
    return statistics.mean(shares), sum(a == b for a, b in zip(ours, theirs))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="16 new tokens, 2 rounds")
    parser.add_argument("--tokens", type=int, help="new tokens per prompt (default 64, quick 16)")
    parser.add_argument("--rounds", type=int, help="timed rounds (default 3, quick 2)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads in every process")
    parser.add_argument(
        "--peers", default=",".join(PEERS), help=f"comma-separated subset of {','.join(PEERS)}"
    )
    parser.add_argument("--show", action="store_true", help="print every reply")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args()
    new_tokens = args.tokens or (16 if args.quick else 64)
    rounds = args.rounds or (2 if args.quick else 3)
    torch.set_num_threads(args.threads)
    values: dict[str, object] = {}
    notes: dict[str, str] = {}

    lm = load_model(MODEL, dtype="float32")
    folder = model_folder(MODEL)
    vector = steering_vector(lm.hidden_size)
    steerer = Steerer(lm, placeholder_bank(lm, LAYERS))
    steering = Steering({}, layers=LAYERS, extra={layer: vector for layer in LAYERS})
    sampling = SamplingConfig(max_new_tokens=new_tokens, temperature=0, stop_at_eos=False)
    batch = lm.encode_prompts(PROMPTS)
    rows = [
        batch.input_ids[r, int(batch.padding[r]) :].tolist() for r in range(batch.size)
    ]  # the chat-formatted prompts, unpadded: what every peer gets
    print(
        f"model {lm.name} ({lm.dtype}); {len(PROMPTS)} prompts in one batch, {new_tokens} new "
        f"tokens each (greedy, EOS ignored); vector of norm {NORM} at layers "
        f"{LAYERS[0]}..{LAYERS[-1]}; {rounds} round(s), {args.threads} threads"
    )

    steerer.generate(
        PROMPTS,
        steering=steering,
        sampling=SamplingConfig(max_new_tokens=4, temperature=0, stop_at_eos=False),
    )  # warm-up
    # Untimed: the same generation without steering, to show the vector changes the replies
    # (agreement between libraries means little if the steering does nothing).
    plain = steerer.generate(PROMPTS, steering=None, sampling=sampling)
    replies: dict[str, list[str]] = {}

    def run_emoscope() -> float:
        start = time.perf_counter()
        replies["emoscope"] = steerer.generate(PROMPTS, steering=steering, sampling=sampling)
        return time.perf_counter() - start

    conditions = {"emoscope": run_emoscope}
    spec = {
        "model_dir": str(folder),
        "prompts": rows,
        "layers": LAYERS,
        "vector": vector.tolist(),
        "max_new_tokens": new_tokens,
    }
    starting: dict[str, tuple[Peer, float]] = {}
    for condition in [p.strip() for p in args.peers.split(",") if p.strip()]:
        if condition not in PEERS:
            raise SystemExit(f"unknown peer '{condition}' (known: {', '.join(PEERS)})")
        name = PEERS[condition]
        try:
            peer = Peer(name, "steer_worker.py", {**spec, "library": name}, threads=args.threads)
            starting[condition] = (peer, time.perf_counter())
        except PeerError as exc:
            notes[f"steering.vs_{condition}"] = str(exc)
            print(f"  {name}: cannot run: {exc}")
    peers: dict[str, Peer] = {}
    peers.update(ready_peers(starting, notes, "steering"))
    conditions.update({condition: peer.run for condition, peer in peers.items()})
    times = timed_rounds(conditions, peers, rounds, values, notes, "steering")

    versions = {
        "emoscope": importlib.metadata.version("emoscope"),
        "torch": torch.__version__,
        "transformers": importlib.metadata.version("transformers"),
    }
    for condition, peer in peers.items():
        try:
            tokens = peer.finish()["tokens"]
            if any(len(t) != new_tokens for t in tokens):
                notes[f"steering.vs_{condition}"] = (
                    f"generated {sorted({len(t) for t in tokens})} tokens, not {new_tokens}"
                )
            replies[condition] = lm.tokenizer.batch_decode(tokens, skip_special_tokens=True)
        except PeerError as exc:
            notes[f"steering.token_agreement_{condition}"] = str(exc)
        versions.update({f"{PEERS[condition]}.{k}": v for k, v in peer.versions.items()})
    for condition, name in PEERS.items():
        if condition not in peers:
            versions.update({f"{name}.{k}": v for k, v in installed_versions(name).items()})

    generated = len(PROMPTS) * new_tokens
    emo = statistics.median(times["emoscope"])
    values["steering.prompts"] = len(PROMPTS)
    values["steering.new_tokens"] = new_tokens
    values["steering.layers"] = f"{LAYERS[0]}-{LAYERS[-1]}"
    values["steering.vector_norm"] = NORM
    values["steering.rounds"] = rounds
    values["steering.emoscope_tokens_per_s"] = round(generated / emo, 1)
    changed = sum(a != b for a, b in zip(plain, replies["emoscope"]))
    values["steering.replies_changed_by_steering"] = changed
    print(f"the steering changes {changed}/{len(PROMPTS)} replies against unsteered decoding")
    print(f"\n{'condition':18s} {'tokens/s':>9s} {'emoscope x':>10s} {'agreement':>10s} identical")
    print(f"{'emoscope':18s} {generated / emo:9.1f} {'1.00':>10s} {'-':>10s}")
    for condition in PEERS:
        if condition not in times:
            values[f"steering.vs_{condition}"] = None
            values[f"steering.token_agreement_{condition}"] = None
            reason = notes.setdefault(f"steering.vs_{condition}", "not run: left out with --peers")
            notes.setdefault(f"steering.token_agreement_{condition}", reason)
            print(f"{condition:18s} {'-':>9s} {'-':>10s} {'-':>10s}  (not run)")
            continue
        rate = generated / statistics.median(times[condition])
        ratio = speed_ratio(times["emoscope"], times[condition])
        values[f"steering.{condition}.tokens_per_s"] = round(rate, 1)
        values[f"steering.vs_{condition}"] = round(ratio, 3)
        line = f"{condition:18s} {rate:9.1f} {ratio:10.2f}"
        if condition in replies:
            share, same = agreement(lm.tokenizer, replies["emoscope"], replies[condition])
            values[f"steering.token_agreement_{condition}"] = round(share, 4)
            values[f"steering.identical_replies_{condition}"] = same
            line += f" {share:10.3f} {same}/{len(PROMPTS)}"
        else:
            values[f"steering.token_agreement_{condition}"] = None
        print(line)
    if args.show:
        for i, prompt in enumerate(PROMPTS):
            print(f"\n[{i}] {prompt}")
            print(f"  {'(unsteered)':17s} {plain[i]!r}")
            for condition, texts in replies.items():
                print(f"  {condition:17s} {texts[i]!r}")
    for key, reason in notes.items():
        print(f"note: {key}: {reason}")
    if args.json:
        write_json(args.json, values, notes, versions)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    sys.exit(main())
