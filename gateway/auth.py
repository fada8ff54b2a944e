"""API-key checks, constant time with respect to the key's content."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable

from fastapi import Request

from gateway.errors import Forbidden, Unauthorized


def _digest(key: str) -> bytes:
    # Hash first so every comparison is over 32 bytes whatever the key lengths.
    return hashlib.sha256(key.encode("utf-8", "surrogateescape")).digest()


class KeyChecker:
    """Holds the digests of user and admin keys; admin keys are also valid user keys."""

    def __init__(self, api_keys: list[str], admin_keys: list[str]) -> None:
        self._user = [_digest(k) for k in api_keys + admin_keys]
        self._admin = [_digest(k) for k in admin_keys]
        self.enabled = bool(api_keys or admin_keys)

    @staticmethod
    def _match(candidate: bytes, keys: list[bytes]) -> bool:
        found = False
        for k in keys:  # no early exit: time does not depend on which key matched
            found |= hmac.compare_digest(candidate, k)
        return found

    @staticmethod
    def presented(request: Request) -> str | None:
        return KeyChecker.presented_in(request.headers.get)

    @staticmethod
    def presented_in(get: Callable[[str], str | None]) -> str | None:
        """The key in ``Authorization: Bearer <key>`` or ``X-API-Key: <key>``; ``get`` looks a
        lower-case header (or gRPC metadata) name up."""
        auth = get("authorization")
        if auth is not None:
            scheme, _, token = auth.partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
        key = get("x-api-key")
        return key.strip() if key else None

    def check_user(self, request: Request) -> None:
        self.check_user_key(self.presented(request))

    def check_user_key(self, key: str | None) -> None:
        if not self.enabled:
            return
        if key is None:
            raise Unauthorized(
                "missing API key: send 'Authorization: Bearer <key>' or 'X-API-Key: <key>'",
                headers={"WWW-Authenticate": "Bearer"},
            )
        if not self._match(_digest(key), self._user):
            raise Unauthorized("invalid API key", headers={"WWW-Authenticate": "Bearer"})

    def check_admin(self, request: Request) -> None:
        self.check_admin_key(self.presented(request))

    def check_admin_key(self, key: str | None) -> None:
        if not self._admin:
            if self.enabled:
                raise Forbidden("admin endpoints are disabled: set FIDES_ADMIN_API_KEYS")
            return  # development mode without any keys
        if key is None:
            raise Unauthorized("missing admin API key", headers={"WWW-Authenticate": "Bearer"})
        digest = _digest(key)
        if self._match(digest, self._admin):
            return
        if self._match(digest, self._user):
            raise Forbidden("this endpoint needs an admin API key")
        raise Unauthorized("invalid API key", headers={"WWW-Authenticate": "Bearer"})
