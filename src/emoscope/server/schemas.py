"""The shapes of request bodies: the OpenAI chat-completions fields the server honours, and the
``emoscope`` extension. Shape only; what the bank and the limits allow is checked in
:mod:`emoscope.server.validation`."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

UNSUPPORTED = (
    "tools",
    "tool_choice",
    "functions",
    "function_call",
    "response_format",
    "logprobs",
    "top_logprobs",
    "logit_bias",
    "audio",
    "modalities",
    "prediction",
)
"""OpenAI fields that would change the reply's meaning: refused rather than ignored."""


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]

    def turn(self) -> dict[str, str]:
        """The ``{role, content}`` turn emoscope formats (``developer`` is a system turn)."""
        text = (
            self.content
            if isinstance(self.content, str)
            else "".join(part.text for part in self.content)
        )
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class SteeringOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    emotions: dict[str, float]
    layers: list[int] | None = None
    positions: Literal["all", "prompt", "response"] = "all"


class EmoscopeOptions(BaseModel):
    """The ``emoscope`` object of a chat request."""

    model_config = ConfigDict(extra="forbid")

    emotions: list[str] = Field(default_factory=list)
    steering: SteeringOptions | None = None
    alerts: list[str] = Field(default_factory=list)
    top_k: int = Field(3, ge=0)
    ignore_eos: bool = False


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")

    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    seed: int | None = Field(None, ge=0, lt=2**63)
    stop: str | list[str] | None = None
    n: int = Field(1, ge=1, le=1)
    repetition_penalty: float | None = Field(None, gt=0, le=10)
    emoscope: EmoscopeOptions = Field(default_factory=EmoscopeOptions)


class ScoreRequest(BaseModel):
    """``POST /v1/score``: a transcript to read without generating."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    emotions: list[str] = Field(default_factory=list)
    top_k: int = Field(3, ge=0)
