"""Request bodies in the shapes clients already send (OpenAI's completions and chat
completions, Text Embeddings Inference's /predict), and OpenAI's error body."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from llmkit.errors import LlmkitError


class RequestError(LlmkitError):
    """A request the server refuses, with the HTTP status that says why."""

    def __init__(self, status: int, message: str, code: str | None = None):
        super().__init__(message)
        self.status, self.code = status, code


ERROR_TYPES = {401: "authentication_error", 404: "not_found_error", 413: "invalid_request_error",
               429: "rate_limit_error", 500: "server_error", 503: "server_error"}


def error_body(status: int, message: str, code: str | None = None,
               param: str | None = None) -> dict[str, Any]:
    """OpenAI's error shape, which its clients turn into their own exceptions."""
    return {"error": {"message": message, "type": ERROR_TYPES.get(status,
                                                                   "invalid_request_error"),
                      "param": param, "code": code}}


class Body(BaseModel):
    # fields of the APIs this server does not implement (logprobs, user, ...) are ignored, as
    # vLLM and TGI ignore them
    model_config = ConfigDict(extra="ignore")


class StreamOptions(Body):
    include_usage: bool = False


class Sampling(Body):
    """What completions and chat completions share."""

    model: str
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    n: int = Field(1, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, le=2**32 - 1)
    stream: bool = False
    stream_options: StreamOptions | None = None

    def stops(self) -> tuple[str, ...]:
        given = [self.stop] if isinstance(self.stop, str) else self.stop or []
        return tuple(s for s in given if s)


class CompletionRequest(Sampling):
    prompt: str | list[str]
    max_tokens: int | None = Field(None, ge=1)


class Message(Body):
    role: Literal["system", "user", "assistant", "tool"]
    content: str


class ChatRequest(Sampling):
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)


class PredictRequest(Body):
    """TEI's /predict: one text, or a list whose items are texts or [text, text pair]."""

    inputs: str | list[str | list[str]]
    raw_scores: bool = False
    truncate: bool = False


class QARequest(Body):
    question: str = Field(min_length=1)
    context: str = Field(min_length=1)
