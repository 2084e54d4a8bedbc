"""Built-in causal checks that steering with a bank does what it should.

- "He feels" / "I feel" (the paper's appendix test): steer one emotion on the assistant-turn
  tokens up to and including ``He feels`` and measure the change in log-probability of each of
  12 emotion words as the continuation.
- Dose-response: steer ``happy``, ``sad``, ``calm`` and ``angry`` over a range of strengths on
  continuations of neutral prompts, score the text with VADER (a judge independent of the
  model), and guard coherence with the perplexity of the steered text under the unsteered model.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from scipy.stats import spearmanr
from tqdm.auto import tqdm

from emoscope.batching import Batch, from_token_lists
from emoscope.concepts import CORE_EMOTIONS
from emoscope.errors import EmoscopeError
from emoscope.generation import SamplingConfig
from emoscope.hooks import add_to_residual
from emoscope.lexicons import vader_compound
from emoscope.steer import Steerer, Steering, span_rule, steering_layers, steering_vectors

DOSE_EMOTIONS = ("happy", "sad", "calm", "angry")
MIN_STRENGTHS = 3
"""A rank correlation over fewer strengths is undefined or meaningless."""
NEUTRAL_PROMPTS = (
    "Describe an ordinary Tuesday morning.",
    "Write a few sentences about a kitchen table.",
    "Tell me about the weather today.",
    "What happens at a bus stop during the day?",
    "Describe the view from a window.",
    "Write about a walk to the shop.",
    "Tell me about a cup of tea.",
    "Describe a quiet street in the afternoon.",
    "Write a short note about a bicycle.",
    "What is it like to wait for a train?",
    "Describe a garden in spring.",
    "Write a few lines about a library.",
    "Tell me about a day at the office.",
    "Describe a river in the evening.",
    "Write about cooking dinner.",
    "Tell me about a phone call with a friend.",
    "Describe a classroom before a lesson.",
    "Write about a rainy afternoon.",
    "Tell me about a trip to the market.",
    "Describe a park bench.",
    "Write a few sentences about a letter arriving.",
    "Tell me about the end of a work day.",
    "Describe a small town square.",
    "Write about a visit to a neighbour.",
)


def _prefix(lm: Any, question: str, answer_start: str) -> tuple[list[int], int]:
    """Token ids of a chat ending in a prefilled assistant reply, and where the reply begins."""
    chat = lm.chat([{"role": "user", "content": question}])
    ids = lm.tokenizer(chat.text, add_special_tokens=chat.add_special_tokens)["input_ids"]
    reply = lm.tokenizer(answer_start, add_special_tokens=False)["input_ids"]
    return list(ids) + list(reply), len(ids) - 1


def word_logprobs(
    lm: Any,
    prefix: list[int],
    words: Sequence[str],
    vectors: dict[int, torch.Tensor] | None = None,
    span: tuple[int, int] = (0, 0),
) -> torch.Tensor:
    """Log-probability of each word (all of its tokens) continuing ``prefix``, optionally with
    ``vectors`` added on the prefix tokens ``span[0] <= i < span[1]``."""
    continuations = [lm.tokenizer(" " + w, add_special_tokens=False)["input_ids"] for w in words]
    rows = [prefix + c for c in continuations]
    batch = from_token_lists(rows, lm.tokenizer.pad_token_id or 0, lm.device)
    rule = span_rule(span[0], span[1], batch.padding)
    with torch.inference_mode(), add_to_residual(lm.model, lm.adapter, vectors or {}, rule):
        logits = lm.model(**batch.inputs()).logits
    logp = torch.log_softmax(logits.float(), dim=-1)
    out = []
    for r, c in enumerate(continuations):
        start = batch.width - len(c)
        total = sum(float(logp[r, start + j - 1, tok]) for j, tok in enumerate(c))
        out.append(total)
    return torch.tensor(out)


def feeling_test(
    steerer: Steerer,
    *,
    emotions: Sequence[str] = CORE_EMOTIONS,
    strength: float = 0.5,
    layers: Sequence[int] | None = None,
    subject: str = "he",
) -> dict[str, Any]:
    """The paper's "He feels" (``subject="he"``) or "I feel" (``subject="i"``) test."""
    lm = steerer.lm
    question, answer = (
        ("How does he feel?", "He feels") if subject == "he" else ("How do you feel?", "I feel")
    )
    prefix, reply_start = _prefix(lm, question, answer)
    span = (reply_start, len(prefix))  # the assistant turn up to and including "He feels"
    words = [e for e in emotions if e in steerer.bank.emotions]
    base = word_logprobs(lm, prefix, words)
    delta = np.zeros((len(words), len(words)))
    for i, e in enumerate(words):
        vectors = steering_vectors(steerer.bank, Steering({e: strength}, layers=layers))
        delta[i] = (word_logprobs(lm, prefix, words, vectors, span) - base).numpy()
    diag = np.diag(delta)
    off = delta[~np.eye(len(words), dtype=bool)]
    return {
        "prompt": f"{question} / {answer}",
        "strength": strength,
        "layers": steering_layers(steerer.bank, Steering({}, layers=layers)),
        "words": words,
        "delta_logprob": delta.round(4).tolist(),
        "own_word_rises": int((diag > 0).sum()),
        "own_word_top": int((delta.argmax(axis=1) == np.arange(len(words))).sum()),
        "mean_diagonal": float(diag.mean()),
        "mean_off_diagonal": float(off.mean()),
        "diagonal_minus_off": float(diag.mean() - off.mean()),
    }


def _perplexity(lm: Any, prompts_batch: Batch, rows: list[list[int]]) -> float:
    """Perplexity of generated continuations under the unsteered model."""
    full = []
    prompt_lengths = prompts_batch.lengths.tolist()
    for r, tokens in enumerate(rows):
        prompt = prompts_batch.input_ids[r, prompts_batch.width - prompt_lengths[r] :].tolist()
        full.append(prompt + tokens)
    batch = from_token_lists(full, lm.tokenizer.pad_token_id or 0, lm.device)
    with torch.inference_mode():
        logp = torch.log_softmax(lm.model(**batch.inputs()).logits.float(), dim=-1)
    nll, count = 0.0, 0
    for r, tokens in enumerate(rows):
        for j, tok in enumerate(tokens):
            pos = batch.width - len(tokens) + j
            nll -= float(logp[r, pos - 1, tok])
            count += 1
    return float(np.exp(nll / max(count, 1)))


def _crossing(
    strengths: Sequence[float], values: Sequence[float], limit: float
) -> dict[str, float | None]:
    """Smallest |strength| on each side at which ``values`` first reaches ``limit`` (linear interpolation)."""
    s = np.asarray(strengths)
    v = np.asarray(values)
    zero = int(np.argmin(np.abs(s)))
    out: dict[str, float | None] = {"positive": None, "negative": None}
    for side, order in (("positive", range(zero, len(s))), ("negative", range(zero, -1, -1))):
        prev = None
        for i in order:
            if v[i] >= limit:
                if prev is None:
                    out[side] = float(s[i])
                else:
                    t = (limit - v[prev]) / max(v[i] - v[prev], 1e-9)
                    out[side] = float(s[prev] + t * (s[i] - s[prev]))
                break
            prev = i
    return out


def _finite(x: float | None) -> float | None:
    """A correlation, or ``None`` where it is undefined (constant input), so JSON stays standard."""
    return None if x is None or not np.isfinite(x) else float(x)


def dose_response(
    steerer: Steerer,
    *,
    emotions: Sequence[str] = DOSE_EMOTIONS,
    max_strength: float = 0.5,
    n_strengths: int = 9,
    prompts: Sequence[str] = NEUTRAL_PROMPTS,
    layers: Sequence[int] | None = None,
    max_new_tokens: int = 40,
    progress: bool = True,
) -> dict[str, Any]:
    """Mean VADER score of steered continuations per strength, with a perplexity guard."""
    if n_strengths < MIN_STRENGTHS:
        raise EmoscopeError(
            f"A dose-response needs at least {MIN_STRENGTHS} strengths (got {n_strengths})."
        )
    if not max_strength > 0:
        raise EmoscopeError(f"max_strength must be > 0 (got {max_strength}).")
    lm = steerer.lm
    strengths = [round(float(x), 6) for x in np.linspace(-max_strength, max_strength, n_strengths)]
    sampling = SamplingConfig(max_new_tokens=max_new_tokens)
    batch = steerer.encode(prompts)
    out: dict[str, Any] = {
        "strengths": strengths,
        "layers": steering_layers(steerer.bank, Steering({}, layers=layers)),
        "prompts": len(prompts),
        "max_new_tokens": max_new_tokens,
        "emotions": {},
    }
    bar = tqdm(
        total=1 + len(emotions) * sum(s != 0 for s in strengths),
        desc="dose-response",
        disable=not progress,
        leave=False,
    )

    def run(steering: Steering | None) -> tuple[float, float, str]:
        rows = steerer.generate_rows(batch, steering=steering, sampling=sampling)
        texts = [lm.tokenizer.decode(r, skip_special_tokens=True) for r in rows]
        bar.update()
        return (
            float(np.mean([vader_compound(t) for t in texts])),
            _perplexity(lm, batch, rows),
            texts[0],
        )

    baseline = run(None)  # unsteered: shared by every emotion's strength 0 and the guard
    base_ppl = baseline[1]
    for emotion in emotions:
        results = [
            run(Steering({emotion: s}, layers=layers)) if s != 0 else baseline for s in strengths
        ]
        vader, ppl, samples = (list(column) for column in zip(*results, strict=True))
        coherent = [i for i, p in enumerate(ppl) if p < 2 * base_ppl]
        rho_all = spearmanr(strengths, vader)[0]
        rho_ok = (
            spearmanr([strengths[i] for i in coherent], [vader[i] for i in coherent])[0]
            if len(coherent) >= 3
            else None
        )
        out["emotions"][emotion] = {
            "mean_vader": vader,
            "perplexity": ppl,
            "spearman_rho": _finite(rho_all),
            "spearman_rho_coherent": _finite(rho_ok),
            "coherent_strengths": [strengths[i] for i in coherent],
            "perplexity_doubles_at": _crossing(strengths, ppl, 2 * base_ppl),
            "samples": samples,
        }
    bar.close()
    out["baseline_perplexity"] = base_ppl
    return out


def validate_steering(
    steerer: Steerer,
    *,
    layers: Sequence[int] | None = None,
    feeling_strength: float = 0.5,
    max_strength: float = 0.5,
    n_strengths: int = 9,
    max_new_tokens: int = 40,
    progress: bool = True,
    speaker_checks: bool = True,
) -> dict[str, Any]:
    """The "He feels"/"I feel" tests and the dose-response; with a bank that has speaker
    families, also the speaker and deflection steering checks
    (:mod:`emoscope.analysis.speaker_steering`)."""
    he = feeling_test(steerer, strength=feeling_strength, layers=layers, subject="he")
    i_feel = feeling_test(steerer, strength=feeling_strength, layers=layers, subject="i")
    dose = dose_response(
        steerer,
        max_strength=max_strength,
        n_strengths=n_strengths,
        layers=layers,
        max_new_tokens=max_new_tokens,
        progress=progress,
    )
    speakers = None
    if speaker_checks and steerer.bank.families:
        from emoscope.analysis.speaker_steering import speaker_steering

        speakers = speaker_steering(steerer.lm, steerer.bank, layers=layers)
    summary = {
        "he_feels_own_word_rises": he["own_word_rises"],
        "he_feels_diagonal_minus_off": he["diagonal_minus_off"],
        "i_feel_own_word_rises": i_feel["own_word_rises"],
        "dose_rho": {e: d["spearman_rho_coherent"] for e, d in dose["emotions"].items()},
    }
    result = {"summary": summary, "he_feels": he, "i_feel": i_feel, "dose_response": dose}
    if speakers is not None:
        result["speakers"] = speakers
        summary["speakers"] = speakers["summary"]
    return result
