"""The enclave batcher: verifications share enclave calls, and a lone one does not wait for
company that cannot come (``integrity.enclave.dispatch_when_idle``). The enclave is the
in-process double: a real EnclaveCore signing real evidence, with a chosen delay per call."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import numpy as np
import pytest

from fides.bench.enclave import mlp_verifier
from fides_core.attestation import AttestedEnclave
from fides_core.incident import evidence_module_id
from fides_core.verify import VerifyRequest
from gateway.enclave_client import EnclaveUnavailable
from gateway.integrity.enclave import EnclaveBatcher
from tests.enclave_double import FakeEnclaveClient
from tests.gateway.integrity.conftest import RestartingEnclave


def _enclave(tmp_path: Path) -> FakeEnclaveClient:
    path = tmp_path / "verifier.onnx"
    mlp_verifier(path, (64, 16, 10))
    return FakeEnclaveClient(path)


def _request(i: int) -> VerifyRequest:
    x = np.random.default_rng(i).standard_normal((1, 64)).astype(np.float32)
    return VerifyRequest(f"r{i}", os.urandom(16), {"input": x})


async def test_a_lone_verification_goes_at_once_when_the_enclave_is_idle(tmp_path: Path) -> None:
    enclave = _enclave(tmp_path)
    batcher = EnclaveBatcher(enclave, max_rows=32, delay_s=5.0, when_idle=True)
    t0 = time.monotonic()
    item = await batcher.verify(_request(0), 1)
    assert time.monotonic() - t0 < 2.0  # not the 5 s delay
    assert item.id == "r0"
    assert enclave.calls == 1
    await batcher.close()


async def test_what_gathers_during_a_call_goes_as_one_call_when_it_ends(tmp_path: Path) -> None:
    enclave = _enclave(tmp_path)
    enclave.delay_s = 0.3
    batcher = EnclaveBatcher(enclave, max_rows=32, delay_s=5.0, when_idle=True)
    t0 = time.monotonic()
    first = asyncio.ensure_future(batcher.verify(_request(0), 1))
    await asyncio.sleep(0.05)  # the first call is in flight
    rest = [asyncio.ensure_future(batcher.verify(_request(i), 1)) for i in range(1, 6)]
    items = await asyncio.gather(first, *rest)
    assert time.monotonic() - t0 < 3.0  # never the 5 s delay
    assert [it.id for it in items] == [f"r{i}" for i in range(6)]
    assert enclave.calls == 2  # the first alone, then the five that waited for it
    await batcher.close()


async def test_without_idle_dispatch_a_lone_verification_waits_the_delay(tmp_path: Path) -> None:
    enclave = _enclave(tmp_path)
    batcher = EnclaveBatcher(enclave, max_rows=32, delay_s=0.2, when_idle=False)
    t0 = time.monotonic()
    await batcher.verify(_request(0), 1)
    assert time.monotonic() - t0 >= 0.19
    # and verifications within the delay share the call
    await asyncio.gather(*(batcher.verify(_request(i), 1) for i in range(1, 5)))
    assert enclave.calls == 2
    await batcher.close()


async def test_each_call_names_the_boot_it_was_checked_against(tmp_path: Path) -> None:
    """``on_boot`` hears the boot a call went to, though the enclave restarted before the call
    returned (the first call's answers are boot A's, the supervisor's boot B's by then), and
    nothing for a call that failed."""
    path = tmp_path / "verifier.onnx"
    mlp_verifier(path, (64, 16, 10))
    enclave = RestartingEnclave(path)
    told: list[AttestedEnclave] = []
    batcher = EnclaveBatcher(enclave, max_rows=32, delay_s=0.0, on_boot=told.append)
    first = await batcher.verify(_request(0), 1)
    second = await batcher.verify(_request(1), 1)
    assert [evidence_module_id(it.evidence) for it in (first, second)] == enclave.boots
    assert [b.module_id for b in told] == enclave.boots
    assert all(b.document for b in told)
    enclave.fail = EnclaveUnavailable("the enclave is restarting")
    with pytest.raises(EnclaveUnavailable):
        await batcher.verify(_request(2), 1)
    assert len(told) == 2
    await batcher.close()


async def test_closing_abandons_a_call_the_enclave_hangs_on_after_the_grace(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A hung enclave (its call 30 s out) whose waiter has long given up (its own timeout):
    close waits the grace (0.5 s), then abandons the call, naming its request; the shutdown
    no longer lasts as long as the enclave hangs (it waited the 30 s)."""
    enclave = _enclave(tmp_path)
    enclave.delay_s = 30.0
    batcher = EnclaveBatcher(enclave, max_rows=32, delay_s=0.0)
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(batcher.verify(_request(7), 1), 0.2)
    t0 = time.monotonic()
    await asyncio.wait_for(batcher.close(grace_s=0.5), 15)
    assert time.monotonic() - t0 < 10
    assert "abandoned" in caplog.text
    assert "r7" in caplog.text


async def test_closing_waits_for_a_call_that_answers_within_the_grace(tmp_path: Path) -> None:
    """A slow but live enclave: its late signed answer is still told at close."""
    enclave = _enclave(tmp_path)
    enclave.delay_s = 0.5
    batcher = EnclaveBatcher(enclave, max_rows=32, delay_s=0.0)
    told: list[str] = []
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(
            batcher.verify(_request(8), 1, late=lambda item: told.append(item.id)), 0.1
        )
    await batcher.close(grace_s=20.0)
    assert told == ["r8"]
