"""The gateway's enclave clients (fake, socket) and the supervisor of the enclave process."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from fides_core.attestation import Policy, check_verification, verify_attestation
from fides_core.enclave_config import EnclaveModelConfig
from fides_core.enclave_errors import FrameTooLarge
from fides_core.session import SessionOffer
from gateway.enclave_client import (
    EnclaveClient,
    EnclaveError,
    EnclaveLaunch,
    EnclaveState,
    EnclaveSupervisor,
    EnclaveUnavailable,
    SocketEnclaveClient,
    VerifyRequest,
)
from tests.enclave_double import FakeEnclaveClient
from tests.enclave_sim.helpers import (
    REPO_ROOT,
    EnclaveFiles,
    RunningEnclave,
    enclave_env,
    make_enclave_files,
    pid_alive,
    running_enclave,
    short_tmpdir,
)
from tests.model_factory import tiny_classifier, tiny_expected

START_TIMEOUT_S = 60.0


def _request(i: int, rows: int = 2) -> VerifyRequest:
    x = (np.arange(rows * 4, dtype=np.float32).reshape(rows, 4) + i) / 7
    return VerifyRequest(f"req-{i}", os.urandom(16), {"input": x})


async def _attest(client: EnclaveClient, root: bytes, policy: Policy) -> object:
    nonce = os.urandom(32)
    return verify_attestation(await client.attest(nonce), root=root, policy=policy, nonce=nonce)


# -- fake ------------------------------------------------------------------------------------


@pytest.fixture
def fake(tmp_path: Path) -> FakeEnclaveClient:
    tiny_classifier(tmp_path / "v.onnx")
    return FakeEnclaveClient(tmp_path / "v.onnx", EnclaveModelConfig(max_batch_size=16))


async def test_fake_runs_the_model_and_really_signs(fake: FakeEnclaveClient) -> None:
    assert isinstance(fake, EnclaveClient)
    attested = await _attest(fake, fake.root_pem, fake.policy())
    requests = [_request(i) for i in range(3)]
    result = await fake.verify(requests)
    for req, item in zip(requests, result.items, strict=True):
        np.testing.assert_allclose(
            item.outputs["probabilities"], tiny_expected(req.inputs["input"])[1], rtol=1e-5
        )
        check_verification(
            item.evidence,
            attested=attested,  # type: ignore[arg-type]
            inputs=req.inputs,
            nonce=req.nonce,
            request_id=req.id,
            outputs=item.outputs,
        )


async def test_fake_failures(fake: FakeEnclaveClient) -> None:
    with pytest.raises(EnclaveError) as info:
        await fake.verify([_request(0, rows=17)])
    assert info.value.code == "batch_too_large"
    fake.fail = EnclaveUnavailable("simulated outage")
    with pytest.raises(EnclaveUnavailable, match="outage"):
        await fake.verify([_request(0)])
    fake.fail = None
    await fake.close()
    with pytest.raises(EnclaveUnavailable):
        await fake.ping()


# -- socket client against the real process ---------------------------------------------------


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> EnclaveFiles:
    return make_enclave_files(tmp_path_factory.mktemp("enclave"))


@pytest.fixture(scope="module")
def enclave(files: EnclaveFiles) -> Iterator[RunningEnclave]:
    with short_tmpdir() as d, running_enclave(files, d / "e.sock") as running:
        yield running


@pytest.fixture
async def client(enclave: RunningEnclave) -> AsyncIterator[SocketEnclaveClient]:
    c = SocketEnclaveClient(enclave.socket_path, timeout_s=30.0, max_connections=3)
    try:
        yield c
    finally:
        await c.close()


async def test_socket_client_attest_and_verify(
    client: SocketEnclaveClient, files: EnclaveFiles
) -> None:
    assert isinstance(client, EnclaveClient)
    await client.ping()
    info = await client.info()
    assert info["simulated"] is True
    assert info["measurement"] == files.measurement.pcr0
    policy = Policy.of(files.measurement.pcr0, allow_simulated=True)
    attested = await _attest(client, files.root_pem, policy)
    requests = [_request(i, rows=1 + i) for i in range(4)]
    result = await client.verify(requests)
    for req, item in zip(requests, result.items, strict=True):
        np.testing.assert_allclose(
            item.outputs["probabilities"], tiny_expected(req.inputs["input"])[1], rtol=1e-5
        )
        check_verification(
            item.evidence,
            attested=attested,  # type: ignore[arg-type]
            inputs=req.inputs,
            nonce=req.nonce,
            outputs=item.outputs,
        )


async def test_socket_client_concurrent_calls(client: SocketEnclaveClient) -> None:
    results = await asyncio.gather(*(client.verify([_request(i)]) for i in range(12)))
    seqs = [r.seq for r in results]
    assert len(set(seqs)) == 12  # each call its own signed result


async def test_socket_client_errors(client: SocketEnclaveClient) -> None:
    with pytest.raises(EnclaveError) as info:
        await client.verify([_request(0, rows=65)])
    assert info.value.code == "batch_too_large"
    assert not isinstance(info.value, EnclaveUnavailable)
    await client.ping()  # the connection went on
    small = SocketEnclaveClient(client.socket_path, max_frame_bytes=64)
    with pytest.raises(EnclaveError) as too_big:
        await small.verify([_request(0)])
    assert too_big.value.code == FrameTooLarge.code
    await small.close()


async def test_socket_client_without_enclave(tmp_path: Path) -> None:
    c = SocketEnclaveClient(tmp_path / "absent.sock", timeout_s=2)
    with pytest.raises(EnclaveUnavailable, match="cannot connect"):
        await c.ping()
    await c.close()


# -- supervisor -------------------------------------------------------------------------------


def _supervisor(
    files: EnclaveFiles, socket_dir: Path, *extra: str, **kwargs: object
) -> EnclaveSupervisor:
    launch = EnclaveLaunch(
        socket_path=socket_dir / "sup.sock",
        sealed_model=files.sealed_path,
        platform_dir=files.platform_dir,
        extra_args=extra,
        cwd=REPO_ROOT,
        env=enclave_env(),
        log_path=socket_dir / "enclave.log",
    )
    options: dict[str, object] = {
        "ready_timeout_s": START_TIMEOUT_S,
        "backoff_initial_s": 0.1,
        "call_timeout_s": 30.0,
        "stop_timeout_s": 10.0,
        "policy": Policy.of(files.measurement.pcr0, allow_simulated=True),
        **kwargs,
    }
    return EnclaveSupervisor(launch, root=files.root_pem, **options)  # type: ignore[arg-type]


async def _wait_restarts(sup: EnclaveSupervisor, n: int) -> None:
    """Poll (with a deadline, never a fixed sleep) until ``n`` restarts and the state is up."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + START_TIMEOUT_S
    while sup.restarts < n:
        assert loop.time() < deadline, sup.snapshot()
        await asyncio.sleep(0.05)
    await sup.wait_up(START_TIMEOUT_S)


async def test_supervisor_restarts_a_killed_enclave_and_reattests(files: EnclaveFiles) -> None:
    """A verify in flight when the enclave is killed fails (never "verified"); the supervisor
    restarts the process, re-attests the new boot and serves again."""
    with short_tmpdir() as d:
        # paging penalty: every verify call takes 3 s inside the enclave, attest does not
        sup = _supervisor(
            files,
            d,
            "--memory-budget-mb",
            "0.001",
            "--paging",
            "--paging-penalty-us-per-mib",
            "3000000",
            health_interval_s=0,
        )
        pids: list[int] = []
        try:
            assert sup.state is EnclaveState.DOWN
            await sup.start()
            assert sup.state is EnclaveState.UP
            first = sup.attested
            assert first is not None
            assert first.simulated
            assert sup.pid is not None
            pids.append(sup.pid)
            in_flight = asyncio.create_task(sup.verify([_request(1)]))
            await asyncio.sleep(0.5)
            assert not in_flight.done()
            os.kill(pids[0], signal.SIGKILL)
            with pytest.raises(EnclaveUnavailable):
                await in_flight
            await _wait_restarts(sup, 1)
            assert sup.restarts == 1
            assert sup.counters.crashes == 1
            assert sup.pid is not None
            assert sup.pid != pids[0]
            pids.append(sup.pid)
            assert not pid_alive(pids[0])
            second = sup.attested
            assert second is not None
            assert second.module_id != first.module_id  # a new boot, attested again
            await sup.ping()
            snap = sup.snapshot()
            assert snap["state"] == "up"
            assert snap["restarts"] == 1
        finally:
            await sup.close()
        assert sup.state is EnclaveState.DOWN
        for pid in pids:
            assert not pid_alive(pid)
        with pytest.raises(EnclaveUnavailable, match="down"):
            await sup.verify([_request(2)])


async def test_supervisor_restarts_a_hung_enclave(files: EnclaveFiles) -> None:
    with short_tmpdir() as d:
        sup = _supervisor(files, d, health_interval_s=0.3, health_failures=2)
        pids: list[int] = []
        try:
            await sup.start()
            assert sup.pid is not None
            pids.append(sup.pid)
            result = await sup.verify([_request(3)])  # checked against the attested key
            assert result.items[0].id == "req-3"
            os.kill(pids[0], signal.SIGSTOP)  # alive, but answers nothing
            await _wait_restarts(sup, 1)
            assert sup.pid is not None
            pids.append(sup.pid)
            assert "health checks" in sup.counters.last_error
            await sup.verify([_request(4)])
        finally:
            await sup.close()
            for pid in pids:  # a stopped process ignores SIGTERM: make sure it is gone
                if pid_alive(pid):
                    os.kill(pid, signal.SIGKILL)
        assert not any(pid_alive(p) for p in pids)


async def test_supervisor_checks_results_by_its_session_mac(files: EnclaveFiles) -> None:
    """The supervisor offers a MAC session when it attests and checks every batch by its
    MAC; the evidence it returns is the signed one, which a client checks on its own; after a
    restart the new boot gets a new session."""
    with short_tmpdir() as d:
        sup = _supervisor(files, d, health_interval_s=0)
        try:
            await sup.start()
            attested = sup.attested
            assert attested is not None
            assert "session" in attested.claims["fides"]
            requests = [_request(i) for i in range(3)]
            results = await asyncio.gather(*(sup.verify([r]) for r in requests))
            assert all(r.mac is not None for r in results)
            assert sup.counters.mac_checks == 3
            assert sup.counters.signature_checks == 0
            snap = sup.snapshot()
            assert snap["session"] is True
            assert snap["mac_checks"] == 3
            for req, result in zip(requests, results, strict=True):
                check_verification(  # a client's check: the signature, no session
                    result.items[0].evidence,  # type: ignore[union-attr]
                    attested=attested,
                    inputs=req.inputs,
                    nonce=req.nonce,
                    request_id=req.id,
                    outputs=result.items[0].outputs,  # type: ignore[union-attr]
                )
            first_pid = sup.pid
            assert first_pid is not None
            os.kill(first_pid, signal.SIGKILL)
            await _wait_restarts(sup, 1)
            await sup.verify([_request(9)])
            assert sup.counters.mac_checks == 4
            assert sup.counters.signature_checks == 0
        finally:
            await sup.close()


def _offer_on_the_way(
    sup: EnclaveSupervisor,
    monkeypatch: pytest.MonkeyPatch,
    change: Callable[[bytes | None], bytes | None],
) -> None:
    """What a host between the gateway and the enclave could do to the session offer of the
    supervisor's attestation: ``change`` gets the offered key and returns what is sent."""
    real_attest = sup._client.attest

    async def attest(
        nonce: bytes, user_data: bytes | None = None, session_key: bytes | None = None
    ) -> bytes:
        return await real_attest(nonce, user_data, change(session_key))

    monkeypatch.setattr(sup._client, "attest", attest)


async def test_supervisor_falls_back_to_signatures_without_a_session(
    files: EnclaveFiles, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An enclave that offers no session (one that predates sessions: here the offer is
    dropped on the way) is still checked, by every result's signature; a session id the
    enclave does not know gets no MAC."""
    with short_tmpdir() as d:
        sup = _supervisor(files, d, health_interval_s=0)
        _offer_on_the_way(sup, monkeypatch, lambda _: None)  # the offer dropped
        try:
            await sup.start()
            assert sup.snapshot()["session"] is False
            result = await sup.verify([_request(1)])
            assert result.mac is None
            assert sup.counters.signature_checks == 1
            assert sup.counters.mac_checks == 0
            unknown = await sup._client.verify([_request(2)], session=b"not-a-session-id")
            assert unknown.mac is None
        finally:
            await sup.close()


async def test_supervisor_refuses_a_session_made_for_another_offer(
    files: EnclaveFiles, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A host that swaps the gateway's session key on the way: the signed document names
    the other key, and the enclave is not taken into use."""
    with short_tmpdir() as d:
        sup = _supervisor(files, d, health_interval_s=0)
        _offer_on_the_way(sup, monkeypatch, lambda _: SessionOffer.new().public)  # swapped
        try:
            with pytest.raises(EnclaveUnavailable, match="BindingError.*another offer"):
                await sup.start()
            assert sup.attested is None
        finally:
            await sup.close()


async def test_supervisor_agrees_a_new_session_once_the_enclave_drops_its_own(
    files: EnclaveFiles,
) -> None:
    """Sixteen later sessions push the gateway's out of the enclave's table: its next result
    comes without a MAC and is checked by its signature, the status stops claiming a session,
    and a new session is agreed with the same boot in the background (once per renewal
    interval however often it is dropped); results are MAC-checked again."""
    with short_tmpdir() as d:
        sup = _supervisor(files, d, health_interval_s=0)
        sup.session_renew_interval_s = 3600.0
        try:
            await sup.start()
            first = sup.attested
            await sup.verify([_request(0)])
            assert sup.counters.mac_checks == 1

            async def push_ours_out() -> None:
                for _ in range(16):
                    await sup._client.attest(os.urandom(32), session_key=SessionOffer.new().public)

            await push_ours_out()
            result = await sup.verify([_request(1)])
            assert result.mac is None
            assert sup.counters.signature_checks == 1
            assert sup.snapshot()["session"] is False
            assert sup._renewal is not None
            await sup._renewal  # the new session, agreed in the background
            assert sup.snapshot()["session"] is True
            assert sup.counters.session_renewals == 1
            assert sup.attested is first  # the same boot, not re-attested as a new one
            renewed = await sup.verify([_request(2)])
            assert renewed.mac is not None
            assert sup.counters.mac_checks == 2

            await push_ours_out()  # dropped again within the interval: no second renewal
            await sup.verify([_request(3)])
            assert sup._renewal is None
            assert sup.snapshot()["session"] is False
            await sup.verify([_request(4)])
            assert sup.counters.signature_checks == 3
            assert sup.counters.session_renewals == 1
        finally:
            await sup.close()


async def test_supervisor_refuses_an_enclave_the_policy_rejects(files: EnclaveFiles) -> None:
    with short_tmpdir() as d:
        sup = _supervisor(files, d, policy=Policy.of(b"\x07" * 48, allow_simulated=True))
        try:
            with pytest.raises(EnclaveUnavailable, match="MeasurementMismatch"):
                await sup.start()
            assert sup.state is EnclaveState.DOWN
            assert sup.pid is None
            assert not (d / "sup.sock").exists()  # the process was stopped (it removes it)
            with pytest.raises(EnclaveUnavailable):
                await sup.verify([_request(0)])
        finally:
            await sup.close()


async def test_supervisor_strict_policy_rejects_the_simulation(files: EnclaveFiles) -> None:
    with short_tmpdir() as d:
        sup = _supervisor(files, d, policy=Policy.of(files.measurement.pcr0))
        try:
            with pytest.raises(EnclaveUnavailable, match="SimulatedEvidenceRejected"):
                await sup.start()
        finally:
            await sup.close()


async def test_supervisor_reports_a_boot_failure(files: EnclaveFiles, tmp_path: Path) -> None:
    bad = tmp_path / "bad.sealed"
    data = bytearray(files.sealed_path.read_bytes())
    data[-1] ^= 1
    bad.write_bytes(bytes(data))
    with short_tmpdir() as d:
        sup = _supervisor(files, d)
        sup.launch.sealed_model = bad
        try:
            with pytest.raises(EnclaveUnavailable, match="exited with status 2"):
                await sup.start()
            assert "failed authentication" in (d / "enclave.log").read_text()
        finally:
            await sup.close()


async def test_a_sidecar_that_cannot_be_attached_again_goes_down_and_keeps_trying() -> None:
    """A sidecar enclave lost while up, whose every re-attach fails (gone, or replaced by one
    the policy refuses): after max_consecutive_failures attempts the state is down, so a
    fail_closed model is not ready, and the attempts go on in the background."""
    from enclave_sim.pki import create_identity
    from gateway.enclave_client import AttachedEnclave

    with short_tmpdir() as d:
        sup = AttachedEnclave(
            d / "gone.sock",
            root=create_identity()[1].root_cert,
            policy=Policy.of("00" * 48, allow_simulated=True),
            backoff_initial_s=0.01,
            backoff_max_s=0.02,
        )
        sup.max_consecutive_failures = 3
        sup._set_state(EnclaveState.RESTARTING)  # it was up, and was lost
        watch = asyncio.create_task(sup._watch())
        try:
            for _ in range(500):
                if sup.state is EnclaveState.DOWN:
                    break
                await asyncio.sleep(0.01)
            assert sup.state is EnclaveState.DOWN
            assert "no enclave socket" in sup.health().reason
            tried = sup.counters.failed_starts
            assert tried >= 3
            await asyncio.sleep(0.1)
            assert sup.counters.failed_starts > tried  # still trying
            assert not watch.done()
        finally:
            watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watch
