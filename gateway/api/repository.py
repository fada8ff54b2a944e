"""Model repository extension: index (user key), load and unload (admin key)."""

from __future__ import annotations

from fastapi import APIRouter, Response

from gateway.api.deps import AdminAuth, RepositoryDep, UserAuth
from gateway.api.responses import json_response

router = APIRouter(prefix="/v2/repository", tags=["repository"])


@router.get("/index", dependencies=[UserAuth])
@router.post("/index", dependencies=[UserAuth])  # tritonclient uses POST
async def index(repo: RepositoryDep) -> list[dict[str, str]]:
    return repo.index()


@router.post("/models/{name}/load", dependencies=[AdminAuth])
async def load(name: str, repo: RepositoryDep) -> Response:
    await repo.load(name)  # a verified model's integrity is set up as it loads
    versions = sorted(repo.served(name).versions)
    return json_response({"name": name, "versions": [str(v) for v in versions], "loaded": True})


@router.post("/models/{name}/unload", dependencies=[AdminAuth])
async def unload(name: str, repo: RepositoryDep) -> Response:
    await repo.unload(name)
    return json_response({"name": name, "unloaded": True})
