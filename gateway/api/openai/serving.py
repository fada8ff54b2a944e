"""The work behind the /v1 routes: turn OpenAI requests into generation-service calls and its
deltas into OpenAI answers (JSON, or Server-Sent Events when streaming), with cancellation when
the client goes away. The generation itself is
:class:`gateway.generation.service.GenerationService`.
"""

from __future__ import annotations

import asyncio
import itertools
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from typing import Any

import orjson
from fastapi import Request, Response
from fastapi.responses import StreamingResponse

from gateway.api.openai.protocol import (
    ChatRequest,
    CompletionRequest,
    SamplingFields,
    openai_error_body,
)
from gateway.api.responses import json_response
from gateway.errors import GatewayError
from gateway.generation.params import SamplingParams
from gateway.generation.service import (
    INLINE_PROMPT_CHARS,
    GenerationHandle,
    GenerationService,
    InvalidGeneration,
    ModelRetired,
    TextModel,
)

__all__ = ["list_models", "serve_chat", "serve_completion"]

# -- helpers ----------------------------------------------------------------------------------

_ids = itertools.count()
_prefix = uuid.uuid4().hex[:12]


def _new_id(kind: str) -> str:
    return f"{kind}-{_prefix}{next(_ids):08x}"


def _params(body: SamplingFields, model: TextModel, max_tokens: int) -> SamplingParams:
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=1.0 if body.temperature is None else body.temperature,
        top_p=1.0 if body.top_p is None else body.top_p,
        top_k=max(0, body.top_k or 0),
        seed=body.seed,
        eos_token_ids=frozenset() if body.ignore_eos else model.eos_token_ids,
    )


def _timeout(body: SamplingFields, model: TextModel) -> float:
    """The request's time limit: its ``timeout`` (an extension), never past the model's."""
    limit = model.config.timeout_s
    return limit if body.timeout is None else min(body.timeout, limit)


async def _encode(svc: GenerationService, model: TextModel, text: str) -> list[int]:
    """The text's tokens: a 400 first when it is too long to fit whatever they are; a long
    text is tokenised in a worker thread, so the event loop serves other requests meanwhile."""
    if not text:
        return []
    svc.check_prompt_chars(model, text)
    if len(text) <= INLINE_PROMPT_CHARS:
        return model.encode(text)
    return await asyncio.to_thread(model.encode, text)


async def _chat_prompt(
    svc: GenerationService, model: TextModel, messages: list[dict[str, str]]
) -> list[int]:
    """The chat's tokens (the template in a worker thread too when the messages are long: a
    template may drop or repeat text, so only its output's length says whether it fits)."""
    if sum(len(m["content"]) for m in messages) <= INLINE_PROMPT_CHARS:
        text = model.chat_text(messages)
    else:
        text = await asyncio.to_thread(model.chat_text, messages)
    return await _encode(svc, model, text)


async def _completion_prompt(
    body: CompletionRequest, model: TextModel, svc: GenerationService
) -> list[int]:
    prompt = body.prompt
    if isinstance(prompt, str):
        return await _encode(svc, model, prompt)
    if not prompt:
        return []
    if all(isinstance(p, str) for p in prompt):
        if len(prompt) != 1:
            raise InvalidGeneration(
                f"one prompt per request is supported, got {len(prompt)}", param="prompt"
            )
        return await _encode(svc, model, str(prompt[0]))
    ids = [int(t) for t in prompt]
    vocab = model.engine.target.vocab_size
    bad = [t for t in ids if not 0 <= t < vocab]
    if bad:
        raise InvalidGeneration(f"token ids must be in [0, {vocab}), got {bad[:3]}", param="prompt")
    return ids


def _usage(handle: GenerationHandle) -> dict[str, int]:
    return {
        "prompt_tokens": handle.prompt_tokens,
        "completion_tokens": handle.completion_tokens,
        "total_tokens": handle.prompt_tokens + handle.completion_tokens,
    }


def _spec_stats(handle: GenerationHandle) -> dict[str, Any]:
    """Per-request speculative record (an extension, like llama.cpp's draft_n)."""
    st = handle.stats
    drafted = st.get("draft_tokens", 0)
    return {
        "rounds": st.get("rounds", 0),
        "draft_tokens": drafted,
        "accepted_tokens": st.get("accepted", 0),
        "acceptance_rate": round(st.get("accepted", 0) / drafted, 4) if drafted else None,
    }


async def _wait_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def _result_or_disconnect(request: Request, handle: GenerationHandle) -> str | None:
    """The completion text, or None (generation cancelled) if the client went away first."""
    work = asyncio.ensure_future(handle.result())
    gone = asyncio.ensure_future(_wait_disconnect(request))
    try:
        done, _ = await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not work.done():
            work.cancel()
            handle.cancel()
    return work.result() if work in done else None


Prepare = Callable[[TextModel], Awaitable[tuple[list[int], SamplingParams]]]


async def _admit(
    request: Request,
    svc: GenerationService,
    model: TextModel,
    prepare: Prepare,
    body: SamplingFields,
) -> tuple[TextModel, GenerationHandle] | None:
    """Prepare the request for ``model`` (prompt tokens, sampling) and admit it: the model
    and the running generation, or None when the client went away while the request waited
    for a slot (it leaves the queue; nothing of it ran). When the version it waited for is
    retired by a reload, it goes to the version that took its place, prepared again (the
    tokenizer may differ) within the same time limit; by an unload, 503."""
    timeout_s = _timeout(body, model)
    deadline = None
    while True:
        prompt, params = await prepare(model)
        if deadline is None:
            deadline = time.monotonic() + timeout_s
        else:  # sent on after a reload: what is left of its time
            timeout_s = max(deadline - time.monotonic(), 0.0)
        try:
            handle = await _submit_or_disconnect(
                request, model, svc.submit(model, prompt, params, body.stops(), timeout_s)
            )
        except ModelRetired:
            model = svc.successor(model)
            continue
        return None if handle is None else (model, handle)


async def _submit_or_disconnect(
    request: Request, model: TextModel, submit: Coroutine[Any, Any, GenerationHandle]
) -> GenerationHandle | None:
    """``submit``'s handle, or None if the client went away while it waited for a slot (the
    wait is cancelled: the request gives its place in the queue up)."""
    if not model.slots.locked():
        return await submit  # a slot is free: admitted without waiting
    work = asyncio.ensure_future(submit)
    gone = asyncio.ensure_future(_wait_disconnect(request))
    try:
        await asyncio.wait((work, gone), return_when=asyncio.FIRST_COMPLETED)
        if not work.done() and gone.exception() is not None:  # no answer on disconnects
            await asyncio.wait((work,))
    except BaseException:  # this request itself is cancelled: nobody reads what it started
        if work.done() and not work.cancelled() and work.exception() is None:
            work.result().cancel()
        raise
    finally:
        gone.cancel()
        if not work.done():
            work.cancel()
            await asyncio.wait((work,))  # out of the queue, counted, before we answer
    if work.cancelled():
        return None
    handle = work.result()  # or submit's error (busy, timeout, retired)
    if gone.done() and not gone.cancelled() and gone.exception() is None:
        handle.cancel()  # admitted just as its client left
        return None
    return handle


def _sse(doc: Any) -> bytes:
    return b"data: " + orjson.dumps(doc) + b"\n\n"


async def _stream(
    handle: GenerationHandle, chunk: Any, include_usage: bool
) -> AsyncIterator[bytes]:
    """SSE events from the handle's deltas; abandoning the iterator cancels the generation."""
    try:
        first = chunk(None, None)
        if first is not None:
            yield _sse(first)
        async for delta in handle.deltas():
            yield _sse(chunk(delta.text, delta.finish_reason))
    except GatewayError as exc:  # a timeout: the status line is gone, so it goes in the stream
        yield _sse(openai_error_body(exc.message, exc.status))
    except Exception as exc:  # noqa: BLE001 - the status line is gone: report in the stream
        yield _sse(openai_error_body(f"generation failed: {type(exc).__name__}: {exc}", 500))
    finally:
        if handle.finish_reason is None:  # client gone (or error): stop the worker
            handle.cancel()
    if include_usage:
        doc = chunk(None, None, final=True)
        doc["usage"] = _usage(handle)
        yield _sse(doc)
    yield b"data: [DONE]\n\n"


async def _answer(
    request: Request,
    handle: GenerationHandle,
    stream: bool,
    chunk: Any,
    include_usage: bool,
    final: Callable[[str], dict[str, Any]],
) -> Response:
    """SSE chunks when streaming; otherwise wait for the text (499 if the client left) and
    answer ``final(text)`` with the usage and the request's speculative-decoding counts."""
    if stream:
        return _streaming_response(_stream(handle, chunk, include_usage))
    text = await _result_or_disconnect(request, handle)
    if text is None:
        return Response(status_code=499)
    return json_response(
        {**final(text), "usage": _usage(handle), "spec_decode": _spec_stats(handle)}
    )


def _streaming_response(gen: AsyncIterator[bytes]) -> StreamingResponse:
    return StreamingResponse(
        gen,
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


# -- handlers ------------------------------------------------------------------------------


def list_models(svc: GenerationService) -> Response:
    """/v1/models."""
    data = [
        {
            "id": m.name,
            "object": "model",
            "created": m.created,
            "owned_by": "fides",
            "max_model_len": m.max_context,
        }
        for m in svc.models()
    ]
    return json_response({"object": "list", "data": data})


async def serve_completion(
    body: CompletionRequest, request: Request, svc: GenerationService
) -> Response:
    """/v1/completions: admit, generate, answer (JSON or SSE)."""
    model = svc.get(body.model)
    if body.echo:
        raise InvalidGeneration("echo is not supported", param="echo")

    async def prepare(model: TextModel) -> tuple[list[int], SamplingParams]:
        prompt = await _completion_prompt(body, model, svc)
        default = model.config.default_max_tokens
        max_tokens = svc.check_lengths(model, prompt, body.max_tokens, default)
        return prompt, _params(body, model, max_tokens)

    admitted = await _admit(request, svc, model, prepare, body)
    if admitted is None:
        return Response(status_code=499)  # the client left while the request was queued
    model, handle = admitted
    rid, created = _new_id("cmpl"), int(time.time())

    def chunk(text: str | None, finish: str | None, final: bool = False) -> Any:
        if text is None and not final:
            return None  # completions have no role chunk
        choices = (
            [] if final else [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}]
        )
        doc: dict[str, Any] = {
            "id": rid,
            "object": "text_completion",
            "created": created,
            "model": model.name,
            "choices": choices,
        }
        if include_usage:
            doc["usage"] = None
        return doc

    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    return await _answer(
        request,
        handle,
        body.stream,
        chunk,
        include_usage,
        lambda text: {
            "id": rid,
            "object": "text_completion",
            "created": created,
            "model": model.name,
            "choices": [
                {"index": 0, "text": text, "logprobs": None, "finish_reason": handle.finish_reason}
            ],
        },
    )


async def serve_chat(body: ChatRequest, request: Request, svc: GenerationService) -> Response:
    """/v1/chat/completions: the chat template, then as a completion."""
    model = svc.get(body.model)
    if body.logprobs:
        raise InvalidGeneration("logprobs is not supported", param="logprobs")
    if body.max_tokens is not None and body.max_completion_tokens is not None:
        raise InvalidGeneration(
            "give max_tokens or max_completion_tokens, not both", param="max_tokens"
        )
    messages = [{"role": m.role, "content": m.content} for m in body.messages]
    if not any(m["content"] for m in messages):
        raise InvalidGeneration("the messages are empty", param="messages")
    asked = body.max_completion_tokens or body.max_tokens

    async def prepare(model: TextModel) -> tuple[list[int], SamplingParams]:
        prompt = await _chat_prompt(svc, model, messages)
        return prompt, _params(body, model, svc.check_lengths(model, prompt, asked, None))

    admitted = await _admit(request, svc, model, prepare, body)
    if admitted is None:
        return Response(status_code=499)  # the client left while the request was queued
    model, handle = admitted
    rid, created = _new_id("chatcmpl"), int(time.time())
    include_usage = bool(body.stream_options and body.stream_options.include_usage)

    def chunk(text: str | None, finish: str | None, final: bool = False) -> Any:
        if final:
            choices: list[Any] = []
        elif text is None:
            choices = [
                {
                    "index": 0,
                    "delta": {"role": "assistant", "content": ""},
                    "logprobs": None,
                    "finish_reason": None,
                }
            ]
        else:
            delta = {"content": text} if text or finish is None else {}
            choices = [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]
        doc: dict[str, Any] = {
            "id": rid,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model.name,
            "choices": choices,
        }
        if include_usage:
            doc["usage"] = None
        return doc

    return await _answer(
        request,
        handle,
        body.stream,
        chunk,
        include_usage,
        lambda text: {
            "id": rid,
            "object": "chat.completion",
            "created": created,
            "model": model.name,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "logprobs": None,
                    "finish_reason": handle.finish_reason,
                }
            ],
        },
    )
