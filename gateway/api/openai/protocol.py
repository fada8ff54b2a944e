"""OpenAI's wire format for /v1: the request models (strict: "5" is not an int, unknown fields
are refused, as OpenAI does) and the error body ``{"error": {"message", "type", "param",
"code"}}``."""

from __future__ import annotations

from typing import Literal

from fastapi import Response
from pydantic import BaseModel, ConfigDict, Field

from gateway.api.responses import json_response
from gateway.generation.service import InvalidGeneration

__all__ = [
    "ChatMessage",
    "ChatRequest",
    "CompletionRequest",
    "StreamOptions",
    "openai_error_body",
    "openai_error_response",
]

_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    503: "service_unavailable",
    504: "timeout_error",
}
MAX_STOP_SEQUENCES = 4


def openai_error_body(
    message: str, status: int, param: str | None = None, code: str | None = None
) -> dict[str, dict[str, str | None]]:
    """OpenAI's error document (also the event that ends a stream that failed)."""
    kind = _ERROR_TYPES.get(status, "server_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def openai_error_response(
    message: str,
    status: int,
    headers: dict[str, str] | None = None,
    param: str | None = None,
    code: str | None = None,
) -> Response:
    return json_response(openai_error_body(message, status, param, code), status, headers)


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Request):
    include_usage: bool = False


class SamplingFields(_Request):
    model: str = Field(min_length=1)
    temperature: float | None = Field(1.0, ge=0.0, le=2.0)
    top_p: float | None = Field(1.0, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=-1, description="Extension (vLLM): -1 or 0 = off.")
    timeout: float | None = Field(
        None,
        gt=0,
        description="Extension: seconds this request may take, its wait for a slot included; "
        "at most the model's generation.timeout_s.",
    )
    ignore_eos: bool = Field(
        False,
        description="Extension (vLLM): generate past the end-of-sequence token up to "
        "max_tokens, for fixed-length load tests.",
    )
    n: int = Field(1, ge=1, le=1, description="Only one choice per request.")
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = Field(None)
    seed: int | None = Field(
        None,
        ge=-(2**63),
        le=2**64 - 1,
        description="Sampling seed: a 64-bit integer (what torch.Generator.manual_seed takes).",
    )
    user: str | None = None
    presence_penalty: float = Field(0.0, ge=0.0, le=0.0, description="Not supported: 0 only.")
    frequency_penalty: float = Field(0.0, ge=0.0, le=0.0, description="Not supported: 0 only.")

    def stops(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > MAX_STOP_SEQUENCES:
            raise InvalidGeneration(
                f"at most {MAX_STOP_SEQUENCES} stop sequences, got {len(stops)}", param="stop"
            )
        if any(not s for s in stops):
            raise InvalidGeneration("stop sequences must not be empty", param="stop")
        return stops


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[int]
    max_tokens: int | None = Field(None, ge=1)
    echo: bool = Field(False, description="Not supported: false only.")
    logprobs: None = Field(None, description="Not supported.")


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant"]
    content: str
    name: str | None = None


class ChatRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = Field(False, description="Not supported: false only.")
