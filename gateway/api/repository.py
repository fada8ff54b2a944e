"""Model repository extension: index (user key), load and unload (admin key).

The bodies are Triton's: ``{"ready": bool}`` for the index, ``{"parameters": {...}}`` for load
and unload. A model is (un)loaded as its directory in the repository holds it, so a load's
``config`` override or ``file:`` contents (tritonclient's ``load_model(config=, files=)``) are
refused by name, as over gRPC, rather than ignored under a 200 "loaded" that would serve
something else than what was asked.
"""

from __future__ import annotations

import json
from typing import Any

from fastapi import APIRouter, Request, Response

from gateway.api.deps import AdminAuth, RepositoryDep, UserAuth
from gateway.api.responses import json_response
from gateway.errors import BadRequest

router = APIRouter(prefix="/v2/repository", tags=["repository"])


async def _body(request: Request, what: str, keys: set[str]) -> dict[str, Any]:
    """The JSON object of a repository request (an empty body is ``{}``); a body that is not
    one, or that has keys other than ``keys``, is a 400 naming the problem."""
    raw = await request.body()
    if not raw.strip():
        return {}
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError):
        raise BadRequest(f"{what} body is not valid JSON") from None
    if not isinstance(body, dict):
        raise BadRequest(f"{what} body must be a JSON object")
    unknown = sorted(set(body) - keys)
    if unknown:
        raise BadRequest(f"{what} body has unknown keys {unknown}; expected {sorted(keys)}")
    return body


def _parameters(body: dict[str, Any], what: str, allowed: set[str]) -> dict[str, Any]:
    params = body.get("parameters", {})
    if not isinstance(params, dict):
        raise BadRequest(f"{what} 'parameters' must be a JSON object")
    overrides = sorted(k for k in params if k == "config" or k.startswith("file:"))
    if overrides:
        raise BadRequest(
            f"{what} parameters {overrides} are not supported: the model is loaded as its "
            "directory in the repository holds it (change its config.yaml and files there, "
            "then load it)"
        )
    unsupported = sorted(set(params) - allowed)
    if unsupported:
        raise BadRequest(
            f"{what} parameters {unsupported} are not supported: the model is "
            "(un)loaded as its directory in the repository holds it"
        )
    return params


@router.get("/index", dependencies=[UserAuth])
@router.post("/index", dependencies=[UserAuth])  # tritonclient uses POST
async def index(request: Request, repo: RepositoryDep) -> list[dict[str, str]]:
    body = await _body(request, "repository index", {"ready"})
    ready = body.get("ready", False)
    if not isinstance(ready, bool):
        raise BadRequest("repository index 'ready' must be a JSON boolean")
    rows = repo.index()
    return [r for r in rows if r["state"] == "READY"] if ready else rows


@router.post("/models/{name}/load", dependencies=[AdminAuth])
async def load(name: str, request: Request, repo: RepositoryDep) -> Response:
    _parameters(await _body(request, "load", {"parameters"}), "load", set())
    versions = await repo.load(name)  # a verified model's integrity is set up as it loads
    return json_response({"name": name, "versions": [str(v) for v in versions], "loaded": True})


@router.post("/models/{name}/unload", dependencies=[AdminAuth])
async def unload(name: str, request: Request, repo: RepositoryDep) -> Response:
    # tritonclient always sends unload_dependents; there are no ensembles, so no dependents
    params = _parameters(
        await _body(request, "unload", {"parameters"}), "unload", {"unload_dependents"}
    )
    if not isinstance(params.get("unload_dependents", False), bool):
        raise BadRequest("unload parameter 'unload_dependents' must be a JSON boolean")
    await repo.unload(name)
    return json_response({"name": name, "unloaded": True})
