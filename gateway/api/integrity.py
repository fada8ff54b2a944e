"""Integrity routes: the attestation handshake and status (user key), attack drills (admin).

- ``GET /v2/models/{name}/attestation?nonce=<base64>``: the enclave's attestation document
  bound to the caller's nonce (the client SDK's handshake).
- ``GET /v2/models/{name}/integrity``: mode, threshold, enclave state, drill, substitution test.
- ``PUT /v2/admin/models/{name}/drill`` (body: ``{"attack", "rate", "substitute"?}``) starts an
  attack drill; ``DELETE`` stops it.
- ``POST /v2/admin/models/{name}/integrity/alarm/reset`` (body: ``{"scope", "key"?}``) resets
  the sequential alarm after an investigation.
- ``GET /v2/admin/models/{name}/integrity/incidents``: the incident bundles kept (newest last);
  ``GET .../incidents/{id}``: one bundle (``fides incident export``; checked offline by the SDK).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request
from pydantic import ValidationError

from fides_core.config import format_validation_error
from fides_core.integrity_config import DrillConfig
from gateway.api.deps import AdminAuth, UserAuth
from gateway.errors import BadRequest
from gateway.integrity.pipeline import MAX_NONCE, MIN_NONCE
from gateway.integrity.service import IntegrityService

router = APIRouter(prefix="/v2/models", tags=["integrity"], dependencies=[UserAuth])
admin = APIRouter(prefix="/v2/admin/models", tags=["integrity"], dependencies=[AdminAuth])


async def _integrity(request: Request) -> IntegrityService:
    return request.app.state.integrity  # type: ignore[no-any-return]


_TOO_DEEP = "the body nests too deeply; it must be a JSON object"

IntegrityDep = Annotated[IntegrityService, Depends(_integrity)]


@router.get("/{name}/attestation")
async def attestation(
    name: str,
    svc: IntegrityDep,
    nonce: Annotated[str, Query(description="base64 of 8..512 random bytes, yours")],
) -> dict[str, Any]:
    pipe = svc.require(name)
    try:
        raw = base64.b64decode(nonce, altchars=b"-_", validate=True)
    except (binascii.Error, ValueError):
        raise BadRequest("nonce is not valid base64") from None
    if not MIN_NONCE <= len(raw) <= MAX_NONCE:
        raise BadRequest(f"nonce must decode to {MIN_NONCE}..{MAX_NONCE} bytes, not {len(raw)}")
    doc = await pipe.attest(raw)
    return {
        "model": name,
        "attestation": base64.b64encode(doc).decode("ascii"),
        "measurement": pipe.measurement,
    }


@router.get("/{name}/integrity")
async def integrity_status(name: str, svc: IntegrityDep) -> dict[str, Any]:
    return svc.require(name).status()


@admin.put("/{name}/drill")
async def start_drill(name: str, request: Request, svc: IntegrityDep) -> dict[str, Any]:
    pipe = svc.require(name)
    try:
        body = await request.json()
    except ValueError:
        raise BadRequest("the body must be a JSON object: {attack, rate, substitute?}") from None
    except RecursionError:  # "[" * 100000: json nests past Python's recursion limit
        raise BadRequest(f"{_TOO_DEEP}: {{attack, rate, substitute?}}") from None
    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object: {attack, rate, substitute?}")
    try:
        drill = DrillConfig.model_validate(body)
    except ValidationError as exc:
        raise BadRequest(format_validation_error(exc, "drill", "drill")) from None
    pipe.set_drill(drill)
    return pipe.status()


@admin.post("/{name}/integrity/alarm/reset")
async def reset_alarm(name: str, request: Request, svc: IntegrityDep) -> dict[str, Any]:
    """After an investigation: start the sequential alarm over. Body (optional):
    ``{"scope": "model" | "key" | "all", "key": "<key id from the status>"}``; default all."""
    pipe = svc.require(name)
    raw = await request.body()
    body: Any = {}
    if raw.strip():
        try:
            body = json.loads(raw)
        except ValueError:
            raise BadRequest("the body must be a JSON object: {scope, key?}") from None
        except RecursionError:
            raise BadRequest(f"{_TOO_DEEP}: {{scope, key?}}") from None
    if not isinstance(body, dict) or set(body) - {"scope", "key"}:
        raise BadRequest("the body must be a JSON object with 'scope' and, for a key, 'key'")
    scope, key = body.get("scope", "all"), body.get("key")
    if not isinstance(scope, str) or (key is not None and not isinstance(key, str)):
        raise BadRequest("'scope' and 'key' must be strings")
    return pipe.reset_alarm(scope, key)


@admin.get("/{name}/integrity/incidents")
async def incidents(name: str, svc: IntegrityDep) -> dict[str, Any]:
    """The incident bundles kept for the model's alarms (oldest first). Read off the event
    loop: every bundle file is parsed (a few MB each, up to hundreds on a shared claim)."""
    pipe = svc.require(name)
    return {"model": name, "incidents": await asyncio.to_thread(pipe.incident_list)}


@admin.get("/{name}/integrity/incidents/{ident}")
async def incident(name: str, ident: str, svc: IntegrityDep) -> dict[str, Any]:
    """One incident bundle (``fides-incident/2``), for offline checking (read and parsed off
    the event loop)."""
    pipe = svc.require(name)
    return await asyncio.to_thread(pipe.incident, ident)


@admin.delete("/{name}/drill")
async def stop_drill(name: str, svc: IntegrityDep) -> dict[str, Any]:
    pipe = svc.require(name)
    pipe.set_drill(None)
    return pipe.status()
