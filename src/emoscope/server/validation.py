"""Turn a request body into a checked plan, or refuse it with a message that names the field.

Everything a request asks for is checked here, against the bank and the server's limits, before
anything reaches the engine; the one check that needs the tokenizer (does the prompt fit?) runs
on the engine's thread just before submission (:func:`prompt_ids`, :func:`check_fits`).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from emoscope.errors import EmoscopeError
from emoscope.generation import SamplingConfig, chat_sampling
from emoscope.monitor import AlertRule
from emoscope.server.errors import APIError, bad_request
from emoscope.server.limits import ServerLimits
from emoscope.server.schemas import (
    UNSUPPORTED,
    ChatCompletionRequest,
    ChatMessage,
    SteeringOptions,
)
from emoscope.steer import MAX_STRENGTH, Steering
from emoscope.vectors import EmotionBank

Model = TypeVar("Model", bound=BaseModel)
MAX_STOP_CHARS = 200
_TYPE_LABELS = {"str", "int", "float", "bool", "list", "dict"}


@dataclass(frozen=True)
class ChatPlan:
    """A chat request, fully checked: what to generate and what to report."""

    turns: list[dict[str, str]]
    sampling: SamplingConfig
    steering: Steering | None
    steering_record: dict[str, Any] | None
    """The steering as the log stores it (canonical names, or None)."""
    emotions: list[str]
    """Reported per token: the requested ones, then those alert rules watch."""
    rules: list[AlertRule]
    top_k: int
    stop: list[str]
    stream: bool
    include_usage: bool

    def sampling_record(self) -> dict[str, Any]:
        s = self.sampling
        return {
            "max_tokens": s.max_new_tokens,
            "temperature": s.temperature,
            "top_p": s.top_p,
            "seed": s.seed,
            "repetition_penalty": s.repetition_penalty,
            "ignore_eos": not s.stop_at_eos,
            "stop": self.stop,
            "top_k": self.top_k,
        }


def decode_json(body: bytes) -> Any:
    """The body as JSON; NaN and Infinity, which JSON lacks, are refused too."""

    def refuse_constant(name: str) -> Any:
        raise ValueError(f"{name} is not a JSON number")

    try:
        return json.loads(body.decode("utf-8"), parse_constant=refuse_constant)
    except UnicodeDecodeError:
        raise bad_request("The request body is not UTF-8 text.", code="invalid_json") from None
    except ValueError as exc:
        raise bad_request(
            f"The request body is not valid JSON: {exc}.", code="invalid_json"
        ) from None


def parse(model: type[Model], data: Any) -> Model:
    """Validate a decoded body against a request shape; the first problem becomes a 400."""
    if not isinstance(data, dict):
        raise bad_request("The request body must be a JSON object.", code="invalid_json")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise _from_validation(exc) from None


def _from_validation(exc: ValidationError) -> APIError:
    first = exc.errors()[0]
    # Leave out the union-branch labels pydantic puts in a location ("str", "list[TextPart]").
    path = [str(p) for p in first["loc"] if str(p) not in _TYPE_LABELS and "[" not in str(p)]
    param = ".".join(path) or None
    kind = first["type"]
    if kind == "missing":
        message = f"'{param}' is required."
    elif kind == "extra_forbidden":
        message = f"Unknown field '{param}'."
    else:
        message = f"Invalid '{param}': {first['msg']}."
    return bad_request(message, param=param, code="invalid_value")


def reject_unsupported(data: dict[str, Any]) -> None:
    for name in UNSUPPORTED:
        if data.get(name) not in (None, False, [], {}):
            raise bad_request(f"'{name}' is not supported by this server.", param=name)


def check_emotions(bank: EmotionBank, names: list[str], param: str) -> list[str]:
    """Canonical names, each in the bank, without repeats."""
    out: list[str] = []
    for i, name in enumerate(names):
        try:
            canonical = bank.emotions[bank.index(name)]
        except EmoscopeError as exc:
            raise bad_request(str(exc), param=f"{param}.{i}", code="unknown_emotion") from None
        if canonical not in out:
            out.append(canonical)
    return out


def check_steering(
    bank: EmotionBank, options: SteeringOptions | None, limits: ServerLimits
) -> tuple[Steering | None, dict[str, Any] | None]:
    if options is None or not options.emotions:
        return None, None
    strengths: dict[str, float] = {}
    for name, strength in options.emotions.items():
        param = f"emoscope.steering.emotions.{name}"
        try:
            canonical = bank.emotions[bank.index(name)]
        except EmoscopeError as exc:
            raise bad_request(str(exc), param=param, code="unknown_emotion") from None
        if not math.isfinite(strength) or abs(strength) > limits.max_strength:
            raise bad_request(
                f"Steering strength {strength} for '{canonical}' is out of range: this server "
                f"allows -{limits.max_strength:g} to {limits.max_strength:g} (units of the "
                "layer's average residual norm; about 0.1 steers a whole reply).",
                param=param,
                code="strength_out_of_range",
            )
        strengths[canonical] = strengths.get(canonical, 0.0) + strength
    layers = None
    if options.layers is not None:
        if not options.layers:
            raise bad_request(
                "emoscope.steering.layers must list at least one layer, or be null for the "
                "bank's steering layer.",
                param="emoscope.steering.layers",
            )
        layers = []
        for layer in options.layers:
            if layer not in bank.vectors:
                raise bad_request(
                    f"Layer {layer} is not in this bank (it has layers "
                    f"{', '.join(map(str, bank.layers))}).",
                    param="emoscope.steering.layers",
                    code="unknown_layer",
                )
            if layer not in layers:
                layers.append(layer)
    steering = Steering(
        strengths,
        layers=layers,
        positions=options.positions,
        force=limits.max_strength > MAX_STRENGTH,
    )
    record = {"emotions": strengths, "layers": layers, "positions": options.positions}
    return steering, record


def check_rules(
    bank: EmotionBank, texts: list[str], limits: ServerLimits, z_available: bool
) -> list[AlertRule]:
    if len(texts) > limits.max_alert_rules:
        raise bad_request(
            f"{len(texts)} alert rules; this server allows at most {limits.max_alert_rules}.",
            param="emoscope.alerts",
        )
    if texts and not z_available:
        raise bad_request(
            "Alert rules need z-scores, and this bank has no neutral statistics.",
            param="emoscope.alerts",
        )
    rules = []
    for i, text in enumerate(texts):
        param = f"emoscope.alerts.{i}"
        try:
            rule = AlertRule.parse(text)
        except EmoscopeError as exc:
            raise bad_request(str(exc), param=param, code="invalid_alert_rule") from None
        if rule.kind != "z":
            raise bad_request(
                f"{text!r}: gap rules judge a finished text and are not available on the server; "
                "use z-score rules like 'desperate > 2 sigma for 3 tokens'.",
                param=param,
                code="invalid_alert_rule",
            )
        check_emotions(bank, [rule.emotion], param)
        rules.append(rule)
    return rules


def check_stop(stop: str | list[str] | None, limits: ServerLimits) -> list[str]:
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stops) > limits.max_stop:
        raise bad_request(
            f"{len(stops)} stop sequences; at most {limits.max_stop} are allowed.", param="stop"
        )
    for text in stops:
        if not text or len(text) > MAX_STOP_CHARS:
            raise bad_request(
                f"Each stop sequence must have 1 to {MAX_STOP_CHARS} characters.", param="stop"
            )
    return stops


def check_new_tokens(request: ChatCompletionRequest, limits: ServerLimits) -> int:
    asked = request.max_completion_tokens or request.max_tokens
    param = "max_completion_tokens" if request.max_completion_tokens else "max_tokens"
    if asked is None:
        return min(limits.default_new_tokens, limits.max_new_tokens)
    if asked > limits.max_new_tokens:
        raise bad_request(
            f"{param} is {asked}; this server generates at most {limits.max_new_tokens} "
            "tokens per reply.",
            param=param,
            code="max_tokens_exceeded",
        )
    return asked


def turns_of(messages: list[ChatMessage]) -> list[dict[str, str]]:
    turns = [message.turn() for message in messages]
    if not any(turn["content"].strip() for turn in turns):
        raise bad_request("Every message is empty.", param="messages")
    return turns


def chat_plan(
    request: ChatCompletionRequest,
    *,
    lm: Any,
    bank: EmotionBank,
    limits: ServerLimits,
    z_available: bool,
) -> ChatPlan:
    options = request.emoscope
    emotions = check_emotions(bank, options.emotions, "emoscope.emotions")
    rules = check_rules(bank, options.alerts, limits, z_available)
    for rule in rules:  # a rule's emotion is reported with the others
        if rule.emotion not in emotions:
            emotions.append(rule.emotion)
    if options.top_k > len(bank.emotions):
        raise bad_request(
            f"emoscope.top_k is {options.top_k}; the bank has {len(bank.emotions)} emotions.",
            param="emoscope.top_k",
        )
    steering, record = check_steering(bank, options.steering, limits)
    try:
        sampling = chat_sampling(
            lm,
            max_new_tokens=check_new_tokens(request, limits),
            temperature=request.temperature,
            top_p=request.top_p,
            repetition_penalty=request.repetition_penalty,
            seed=request.seed,
        )
    except EmoscopeError as exc:
        raise bad_request(str(exc)) from None
    if options.ignore_eos:
        sampling = replace(sampling, stop_at_eos=False)
    return ChatPlan(
        turns=turns_of(request.messages),
        sampling=sampling,
        steering=steering,
        steering_record=record,
        emotions=emotions,
        rules=rules,
        top_k=options.top_k,
        stop=check_stop(request.stop, limits),
        stream=request.stream,
        include_usage=bool(request.stream_options and request.stream_options.include_usage),
    )


# ----- on the engine's thread: the checks that need the tokenizer ------------------------------


def prompt_ids(lm: Any, turns: list[dict[str, str]], *, generation: bool = True) -> list[int]:
    """The turns as the model reads them (its chat template, or the plain framing)."""
    try:
        chat = lm.chat(turns, add_generation_prompt=generation)
    except EmoscopeError as exc:
        raise bad_request(str(exc), param="messages") from None
    except Exception as exc:  # a chat template may refuse an order of roles
        raise bad_request(
            f"The model's chat template refused these messages: {exc}", param="messages"
        ) from None
    return list(lm.tokenizer(chat.text, add_special_tokens=chat.add_special_tokens)["input_ids"])


def check_fits(prompt_tokens: int, new_tokens: int, capacity: int) -> None:
    if prompt_tokens + new_tokens > capacity:
        raise bad_request(
            f"The messages take {prompt_tokens} tokens and max_tokens is {new_tokens}: "
            f"together more than the {capacity} tokens this server's context holds. Shorten "
            "the messages or lower max_tokens.",
            param="messages",
            code="context_length_exceeded",
        )
