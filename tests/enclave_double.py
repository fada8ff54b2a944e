"""A test double of the enclave: :class:`FakeEnclaveClient`, an in-process
:class:`gateway.enclave_client.EnclaveClient` that still runs the ONNX verifier and really
signs (a real :class:`enclave_sim.core.EnclaveCore` under a fresh in-memory root CA), so evidence
checks run for real, without a process or a socket."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from enclave_sim.core import EnclaveCore
from enclave_sim.pki import create_identity
from enclave_sim.resources import ResourceSettings
from fides_core.attestation import Policy
from fides_core.enclave_config import EnclaveModelConfig
from fides_core.enclave_errors import EnclaveFailure as EnclaveSideError
from fides_core.measurement import Measurement, measure
from fides_core.verify import VerifyRequest
from gateway.enclave_client import (
    EnclaveError,
    EnclaveHealth,
    EnclaveState,
    EnclaveUnavailable,
    VerifyResult,
)


class FakeEnclaveClient:
    """An in-process EnclaveClient for unit tests: a real :class:`EnclaveCore` (onnxruntime,
    ES256 result signatures) under a fresh in-memory root CA, no process, no socket.

    ``fail`` -- while set, every call raises it (simulate an outage: ``EnclaveUnavailable``).
    ``delay_s`` -- added to every call (simulate a slow enclave). ``calls`` counts calls.
    """

    def __init__(
        self,
        model: bytes | Path,
        config: EnclaveModelConfig | None = None,
        *,
        resources: ResourceSettings | None = None,
    ) -> None:
        model_bytes = model.read_bytes() if isinstance(model, Path) else model
        self.config = config or EnclaveModelConfig()
        _, identity = create_identity()
        self.measurement: Measurement = measure(model_bytes, self.config)
        self.core = EnclaveCore(
            model_bytes, self.config, self.measurement, identity, resources=resources
        )
        self.root_pem: bytes = identity.root_pem
        self.fail: Exception | None = None
        self.delay_s = 0.0
        self.calls = 0
        self._closed = False

    def policy(self, **kwargs: Any) -> Policy:
        """A policy that accepts this fake (its measurement, simulated evidence allowed)."""
        return Policy(frozenset({self.measurement.pcr0}), allow_simulated=True, **kwargs)

    def health(self) -> EnclaveHealth:
        if self._closed:
            return EnclaveHealth(EnclaveState.DOWN, "the enclave client is closed")
        if self.fail is not None:
            return EnclaveHealth(EnclaveState.DOWN, f"{type(self.fail).__name__}: {self.fail}")
        return EnclaveHealth(EnclaveState.UP)

    def snapshot(self) -> dict[str, Any]:
        h = self.health()
        return {"state": h.state.value, "in_process": True, "calls": self.calls, "reason": h.reason}

    async def _enter(self) -> None:
        self.calls += 1
        if self._closed:
            raise EnclaveUnavailable("the enclave client is closed")
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        if self.fail is not None:
            raise self.fail

    async def ping(self) -> None:
        await self._enter()

    async def info(self) -> dict[str, Any]:
        await self._enter()
        return self.core.info()

    async def attest(self, nonce: bytes, user_data: bytes | None = None) -> bytes:
        await self._enter()
        try:
            return await asyncio.to_thread(self.core.attest, nonce, user_data)
        except EnclaveSideError as exc:
            raise EnclaveError(str(exc), code=exc.code) from None

    async def verify(self, requests: Sequence[VerifyRequest]) -> VerifyResult:
        await self._enter()
        # what the socket would carry: numpy arrays, as the wire decodes them
        reqs = [
            VerifyRequest(r.id, r.nonce, {k: np.asarray(v) for k, v in r.inputs.items()})
            for r in requests
        ]
        try:
            out = await asyncio.to_thread(self.core.verify, reqs)
        except EnclaveSideError as exc:
            raise EnclaveError(str(exc), code=exc.code) from None
        return VerifyResult(out.seq, out.items)

    async def close(self) -> None:
        self._closed = True
