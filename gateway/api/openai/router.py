"""OpenAI-compatible text generation routes: /v1/completions, /v1/chat/completions, /v1/models.

HTTP only: the wire format is :mod:`gateway.api.openai.protocol` (the body parsed strictly by
:mod:`gateway.api.openai.json_body`), the work :mod:`gateway.api.openai.serving`. Errors on /v1
use OpenAI's body (:func:`gateway.api.openai.protocol.openai_error_response`).
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request, Response

from gateway.api.deps import UserAuth
from gateway.api.openai import serving
from gateway.api.openai.json_body import JSONBodyRoute
from gateway.api.openai.protocol import ChatRequest, CompletionRequest
from gateway.generation.service import GenerationService

router = APIRouter(
    prefix="/v1", tags=["openai"], dependencies=[UserAuth], route_class=JSONBodyRoute
)


async def _service(request: Request) -> GenerationService:
    svc: GenerationService = request.app.state.generation
    return svc


GenerationDep = Annotated[GenerationService, Depends(_service)]


@router.get("/models")
async def list_models(svc: GenerationDep) -> Response:
    return serving.list_models(svc)


@router.post("/completions")
async def completions(body: CompletionRequest, request: Request, svc: GenerationDep) -> Response:
    return await serving.serve_completion(body, request, svc)


@router.post("/chat/completions")
async def chat_completions(body: ChatRequest, request: Request, svc: GenerationDep) -> Response:
    return await serving.serve_chat(body, request, svc)
