"""The client SDK (``fides_client``) against the REAL gateway process and its real enclave
process: a client that does not trust the gateway checks the evidence and runs the detector
itself. A lying gateway is simulated honestly: an httpx transport in front of the real one
rewrites the real gateway's answers, as a provider that lies would.

The enforce mode and the ``fail_open`` outage run in-process (FakeEnclaveClient) with the async
client, which they cover as well."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cbor2
import httpx
import numpy as np
import onnxruntime as ort
import pytest

from enclave_sim.pki import ROOT_CERT, init_ca
from fides_client import (
    AsyncFidesClient,
    CheckedInference,
    FidesClient,
    FidesClientError,
    IntegrityModels,
)
from fides_core.attestation import (
    BindingError,
    ChainError,
    MeasurementMismatch,
    NonceUnknown,
    SignatureError,
    SimulatedEvidenceRejected,
)
from fides_core.tensors import encode_tensor
from gateway.app import create_app
from gateway.enclave_client import EnclaveUnavailable
from gateway.settings import Settings
from tests.conftest import ADMIN_KEY, USER_KEY
from tests.e2e.conftest import GatewayProcess, running_gateway
from tests.gateway.integrity.conftest import Fakes, set_integrity
from tests.integrity_factory import Digits

pytestmark = [pytest.mark.e2e]

README = Path(__file__).resolve().parents[3] / "README.md"
DRILL = "/v2/admin/models/digits/drill"
Body = dict[str, Any]


@dataclass
class Live:
    gateway: GatewayProcess
    models: IntegrityModels
    root: Path  # the platform's root.pem: what clients pin
    platform: Path


@pytest.fixture(scope="module")
def live(
    tmp_path_factory: pytest.TempPathFactory, trained_repository: tuple[Path, dict[str, Any]]
) -> Iterator[Live]:
    """One real gateway (and its enclave process) on a copy of the trained repository."""
    base = tmp_path_factory.mktemp("client")
    repo = base / "repo"
    shutil.copytree(trained_repository[0], repo)
    platform = base / "platform"
    runtime = Path(tempfile.mkdtemp(prefix="fsdk-", dir="/tmp"))  # socket paths are short
    env = {
        "FIDES_ENCLAVE_PLATFORM_DIR": str(platform),
        "FIDES_ENCLAVE_RUNTIME_DIR": str(runtime),
        "FIDES_ENCLAVE_INIT_PLATFORM": "1",
        "FIDES_ENCLAVE_ALLOW_SIMULATED": "1",
    }
    try:
        with running_gateway(repo, base / "logs", env=env) as gw:
            yield Live(
                gw, IntegrityModels.from_repository(repo, "digits"), platform / ROOT_CERT, platform
            )
    finally:
        shutil.rmtree(runtime, ignore_errors=True)


class Liar(httpx.BaseTransport):
    """The real transport, with hooks that rewrite the gateway's answers (a lying provider)."""

    def __init__(self) -> None:
        self.inner = httpx.HTTPTransport()
        self.on_infer: Callable[[Body], Body] | None = None
        self.on_attestation: Callable[[Body], Body] | None = None
        self.attestations = 0

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        response = self.inner.handle_request(request)
        path = request.url.path
        hook = None
        if path.endswith("/attestation"):
            self.attestations += 1
            hook = self.on_attestation
        elif path.endswith("/infer"):
            hook = self.on_infer
        if hook is None:
            return response
        response.read()
        response.close()
        return httpx.Response(response.status_code, json=hook(json.loads(response.content)))

    def close(self) -> None:
        self.inner.close()


def client(live: Live, transport: httpx.BaseTransport | None = None, **kw: Any) -> FidesClient:
    args: dict[str, Any] = {
        "root": live.root,
        "measurements": [live.models.measurement],
        "allow_simulated": True,
        "models": live.models,
        "api_key": USER_KEY,
        "transport": transport,
        **kw,
    }
    return FidesClient(live.gateway.base_url, "digits", **args)


def drill(live: Live, on: bool) -> None:
    with httpx.Client(base_url=live.gateway.base_url, headers={"X-API-Key": ADMIN_KEY}) as admin:
        r = admin.put(DRILL, json={"attack": "switch", "rate": 1.0}) if on else admin.delete(DRILL)
        assert r.status_code == 200, r.text


def switch_top2(probs: Body) -> Body:
    """A switch attack done by the proxy: the top two classes of every row trade places."""
    p = np.asarray(probs["data"], dtype=np.float32).reshape(probs["shape"])
    top = np.argsort(p, axis=1)[:, -2:]
    rows = np.arange(len(p))
    p[rows, top[:, 0]], p[rows, top[:, 1]] = p[rows, top[:, 1]], p[rows, top[:, 0]].copy()
    return {**probs, "data": p.ravel().tolist()}


# -- honest gateway ---------------------------------------------------------------------------


def test_a_verified_answer_checks_out(live: Live, digits: Digits) -> None:
    with client(live) as c:
        r = c.infer({"input": digits.images[:1]})
        assert r.verdict == r.gateway_verdict == "verified"
        assert r.trusted, r.mismatches
        assert int(r.probabilities.argmax()) == digits.labels[0]
        assert r.evidence is not None
        assert r.evidence.request_id == r.request_id
        assert r.verifier_probabilities is not None
        # q: from the signed evidence
        assert int(r.verifier_probabilities.argmax()) == digits.labels[0]
        assert r.score == pytest.approx(r.gateway_score, abs=1e-4)
        assert c.handshakes == 1
        assert c.attested is not None
        assert c.attested.simulated
        assert c.attested.measurement.hex() == live.models.measurement

        x = digits.take(4, seed=1)
        batch = c.infer({"input": x}, request_id="my-batch-1")
        assert batch.request_id == "my-batch-1"
        assert batch.verdict == batch.gateway_verdict == "verified"
        assert batch.scores is not None
        assert batch.scores.shape == (4,)
        assert batch.probabilities.shape == (4, 10)


def test_a_drill_is_an_attack_for_the_client_and_the_gateway_alike(
    live: Live, digits: Digits
) -> None:
    x = digits.take(8, seed=2)
    drill(live, True)
    try:
        with client(live) as c:
            results = [c.infer({"input": x[i : i + 1]}) for i in range(len(x))]
    finally:
        drill(live, False)
    attacks = [r for r in results if r.verdict == "attack"]
    assert len(attacks) >= 7
    for r in results:
        assert r.verdict == r.gateway_verdict
        assert not r.mismatch, r.mismatches
    for r in attacks:
        assert r.reclassified == r.gateway_reclassified
        assert r.reclassified is not None
        assert r.reclassified[0] != int(r.probabilities.argmax())


# -- a lying gateway --------------------------------------------------------------------------


def test_a_gateway_that_calls_a_drilled_answer_verified_is_caught(
    live: Live, digits: Digits
) -> None:
    def lie(body: Body) -> Body:
        params = body["parameters"]
        params.update(integrity_verdict="verified", integrity_score=0.01)
        params.pop("integrity_reclassified", None)
        return body

    liar = Liar()
    liar.on_infer = lie
    x = digits.take(8, seed=3)
    drill(live, True)
    try:
        with client(live, liar) as c:
            results = [c.infer({"input": x[i : i + 1]}) for i in range(len(x))]
    finally:
        drill(live, False)
    attacks = [r for r in results if r.verdict == "attack"]
    assert len(attacks) >= 7
    for r in attacks:
        assert r.gateway_verdict == "verified"
        assert any(m.startswith("verdict") for m in r.mismatches)
    for r in results:  # the forged score gives the rest away
        assert r.mismatch
        assert not r.trusted


def test_a_tampered_answer_called_verified_is_caught(live: Live, digits: Digits) -> None:
    """The gateway swaps the served answer after the (honest) verification, keeps 'verified'."""
    liar = Liar()
    liar.on_infer = lambda body: {
        **body,
        "outputs": [switch_top2(o) if o["name"] == "probabilities" else o for o in body["outputs"]],
    }
    x = digits.take(8, seed=4)
    with client(live, liar) as c:
        results = [c.infer({"input": x[i : i + 1]}) for i in range(len(x))]
    caught = [r for r in results if r.mismatch]
    assert len(caught) >= 7
    for r in caught:
        assert r.gateway_verdict == "verified"
        assert r.verdict == "attack"


def test_stripped_evidence_is_never_verified(live: Live, digits: Digits) -> None:
    liar = Liar()
    liar.on_infer = lambda body: {
        **body,
        "parameters": {k: v for k, v in body["parameters"].items() if k != "integrity_evidence"},
    }
    with client(live, liar) as c:
        r = c.infer({"input": digits.images[:1]})
    assert r.gateway_verdict == "verified"
    assert r.verdict == "unverified"
    assert r.evidence is None
    assert r.mismatches[0].startswith("evidence")


def test_an_output_named_twice_is_refused_not_collapsed(live: Live, digits: Digits) -> None:
    """Two 'probabilities' with the real evidence: the client would check one and a reader
    of the JSON that keeps the first would be given the other. Neither is silently dropped."""

    def twice(body: Body) -> Body:
        served = next(o for o in body["outputs"] if o["name"] == "probabilities")
        body["outputs"] = [switch_top2(served), *body["outputs"]]
        return body

    liar = Liar()
    liar.on_infer = twice
    with client(live, liar) as c, pytest.raises(FidesClientError, match="'probabilities' twice"):
        c.infer({"input": digits.images[:1]})


def test_probabilities_that_are_not_numbers_are_a_client_error(live: Live, digits: Digits) -> None:
    def as_text(body: Body) -> Body:
        for o in body["outputs"]:
            if o["name"] == "probabilities":
                o.update(datatype="BYTES", data=[f"p{v}" for v in o["data"]])
        return body

    liar = Liar()
    liar.on_infer = as_text
    with client(live, liar) as c, pytest.raises(FidesClientError, match="not class probabilities"):
        c.infer({"input": digits.images[:1]})


def test_a_score_past_float_range_is_a_mismatch_not_a_crash(live: Live, digits: Digits) -> None:
    """JSON integers have no limit: 10**400 is a number the gateway claims, and a false one."""
    liar = Liar()
    liar.on_infer = lambda body: {
        **body,
        "parameters": {**body["parameters"], "integrity_score": 10**400},
    }
    with client(live, liar) as c:
        r = c.infer({"input": digits.images[:1]})
    assert r.gateway_score == float("inf")
    assert r.verdict == "verified"
    assert not r.trusted
    assert any(m.startswith("score") for m in r.mismatches)


def _edit_evidence(body: Body, edit: Callable[[dict[str, Any]], None]) -> Body:
    params = body["parameters"]
    doc = cbor2.loads(base64.b64decode(params["integrity_evidence"]))
    edit(doc)
    params["integrity_evidence"] = base64.b64encode(cbor2.dumps(doc)).decode()
    return body


def test_a_forged_signature_fails_after_one_new_handshake(live: Live, digits: Digits) -> None:
    def forge(doc: dict[str, Any]) -> None:
        signed = bytearray(doc["result"])
        signed[-5] ^= 0x01  # inside the ES256 signature, the last field of the COSE_Sign1
        doc["result"] = bytes(signed)

    liar = Liar()
    with client(live, liar) as c:
        assert c.infer({"input": digits.images[:1]}).trusted
        liar.on_infer = lambda body: _edit_evidence(body, forge)
        with pytest.raises(SignatureError):
            c.infer({"input": digits.images[:1]})
    assert liar.attestations == 2  # the first, then one re-handshake: then it gave up


def test_a_forged_verifier_output_breaks_the_signed_binding(live: Live, digits: Digits) -> None:
    """The gateway tampers with the answer AND rewrites q in the evidence to match it."""

    def lie(body: Body) -> Body:
        out = switch_top2(body["outputs"][0])
        body["outputs"] = [out]
        forged = np.asarray(out["data"], dtype=np.float32).reshape(out["shape"])

        def edit(doc: dict[str, Any]) -> None:
            doc["entry"]["outputs"]["probabilities"] = encode_tensor(forged)

        return _edit_evidence(body, edit)

    liar = Liar()
    liar.on_infer = lie
    with client(live, liar) as c, pytest.raises(BindingError, match="Merkle"):
        c.infer({"input": digits.images[:1]})


def test_replayed_evidence_for_a_new_nonce_is_refused(live: Live, digits: Digits) -> None:
    liar = Liar()
    old: list[Body] = []
    liar.on_infer = lambda body: old[0] if old else old.append(body) or body
    with client(live, liar) as c:
        first = c.infer({"input": digits.images[:1]}, request_id="same-id")
        assert first.trusted
        # the same request again (same id, same input): the gateway replays the old answer
        with pytest.raises(BindingError, match="nonce"):
            c.infer({"input": digits.images[:1]}, request_id="same-id")


# -- the handshake ----------------------------------------------------------------------------


def test_the_handshake_refuses_a_wrong_root_measurement_or_simulation(
    live: Live, digits: Digits, tmp_path: Path
) -> None:
    init_ca(tmp_path / "other")
    with client(live, root=tmp_path / "other" / ROOT_CERT) as c, pytest.raises(ChainError):
        c.attest()
    with client(live, measurements=["ab" * 48]) as c, pytest.raises(MeasurementMismatch):
        c.infer({"input": digits.images[:1]})
    with client(live, allow_simulated=False) as c, pytest.raises(SimulatedEvidenceRejected):
        c.attest()


def test_a_replayed_attestation_document_is_refused(live: Live, digits: Digits) -> None:
    liar = Liar()
    old: list[Body] = []
    liar.on_attestation = lambda body: old[0] if old else old.append(body) or body
    with client(live, liar) as c:
        c.attest()
        with pytest.raises(NonceUnknown):
            c.attest()


def test_threads_starting_together_share_one_handshake(live: Live, digits: Digits) -> None:
    """The client is thread-safe: eight threads' first answers need one handshake, not eight."""
    liar = Liar()
    start = threading.Barrier(8)
    results: list[CheckedInference] = []

    def one(c: FidesClient, i: int) -> None:
        start.wait()
        results.append(c.infer({"input": digits.images[i : i + 1]}))

    with client(live, liar) as c:
        threads = [threading.Thread(target=one, args=(c, i)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert len(results) == 8
        assert all(r.trusted for r in results)
        assert c.handshakes == 1
    assert liar.attestations == 1


def restart_enclave(live: Live) -> str:
    """Kill the gateway's enclave process (a child of the gateway this module started) and
    wait for its next boot; that boot's module id."""
    status_url = "/v2/models/digits/integrity"
    with httpx.Client(base_url=live.gateway.base_url, headers={"X-API-Key": USER_KEY}) as http:
        before = http.get(status_url).json()["enclave"]
        os.kill(before["pid"], signal.SIGKILL)
        deadline = time.monotonic() + 30
        while True:
            now = http.get(status_url).json()["enclave"]
            if now["state"] == "up" and now["module_id"] != before["module_id"]:
                return str(now["module_id"])
            assert time.monotonic() < deadline, f"the enclave did not come back: {now}"
            time.sleep(0.1)


def test_an_enclave_restart_costs_one_new_handshake(live: Live, digits: Digits) -> None:
    with client(live) as c:
        assert c.infer({"input": digits.images[:1]}).trusted
        module_id = restart_enclave(live)
        r = c.infer({"input": digits.images[:1]})
        assert r.trusted, r.mismatches
        assert c.handshakes == 2
        assert c.attested is not None
        assert c.attested.module_id == module_id


def test_an_answer_signed_by_the_boot_it_was_sent_to_survives_another_callers_renewal(
    live: Live, digits: Digits
) -> None:
    """The enclave restarts while an answer is on its way, and another caller renews the
    handshake before the answer is checked. The answer was signed by the boot attested when
    it was sent: authentic, trusted, no further handshake. (Checked against the latest key
    only, it cost a wasted handshake and then failed with SignatureError.)"""
    liar = Liar()
    with client(live, liar) as c:
        c.attest()
        renewed: list[str] = []

        def restart_and_renew(body: Body) -> Body:
            renewed.append(restart_enclave(live))
            c.attest()  # another caller, after the restart
            return body

        liar.on_infer = restart_and_renew
        r = c.infer({"input": digits.images[:1]})
        liar.on_infer = None
        assert r.trusted, r.mismatches
        assert c.handshakes == 2
        assert c.attested is not None
        assert c.attested.module_id == renewed[0]
        # the next answer is signed by the new boot: no handshake either
        assert c.infer({"input": digits.images[1:2]}).trusted
        assert c.handshakes == 2
    assert liar.attestations == 2


# -- the README's example ---------------------------------------------------------------------


def test_the_readme_example_runs(
    live: Live, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    section = README.read_text(encoding="utf-8").split("## Client SDK", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S)
    assert code is not None, "the README's Client SDK section has no python example"
    source = code.group(1)
    for expected in ('"http://127.0.0.1:8000"', "api_key=None"):
        assert expected in source
    source = source.replace('"http://127.0.0.1:8000"', repr(live.gateway.base_url))
    source = source.replace("api_key=None", f"api_key={USER_KEY!r}")
    # the layout `make run` leaves: ./model_repository and ./.fides/enclave-platform
    (tmp_path / "model_repository").symlink_to(live.gateway.repository)
    (tmp_path / ".fides").mkdir()
    (tmp_path / ".fides" / "enclave-platform").symlink_to(live.platform)
    monkeypatch.chdir(tmp_path)
    exec(compile(source, "README.md", "exec"), {"__name__": "readme"})
    assert "verified" in capsys.readouterr().out


# -- enforce mode and fail_open (in-process gateway, async client) ----------------------------


@asynccontextmanager
async def in_process(repo: Path) -> AsyncIterator[tuple[httpx.ASGITransport, Fakes]]:
    settings = Settings(
        model_repository=repo,
        api_keys=[USER_KEY],
        admin_api_keys=[ADMIN_KEY],
        log_json=False,
        shutdown_grace_s=5,
    )
    fakes = Fakes(repo)
    app = create_app(settings, enclave_factory=fakes)
    async with app.router.lifespan_context(app):
        yield httpx.ASGITransport(app=app), fakes


def async_client(repo: Path, transport: httpx.AsyncBaseTransport, fakes: Fakes) -> AsyncFidesClient:
    fake = fakes.by_model["digits"]
    return AsyncFidesClient(
        "http://test",
        "digits",
        root=fake.root_pem,
        measurements=[fake.measurement.pcr0],
        allow_simulated=True,
        models=IntegrityModels.from_repository(repo, "digits"),
        api_key=USER_KEY,
        transport=transport,
    )


class AsyncLiar(httpx.AsyncBaseTransport):
    def __init__(self, inner: httpx.AsyncBaseTransport, lie: Callable[[Body], Body]) -> None:
        self.inner, self.lie = inner, lie
        self.attestations = 0

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        response = await self.inner.handle_async_request(request)
        self.attestations += request.url.path.endswith("/attestation")
        if not request.url.path.endswith("/infer"):
            return response
        await response.aread()
        return httpx.Response(response.status_code, json=self.lie(json.loads(response.content)))


async def test_enforce_mode_the_replacement_is_checked(
    integrity_repo: Path, digits: Digits
) -> None:
    set_integrity(integrity_repo, mode="enforce", drill={"attack": "switch", "rate": 1.0})
    async with in_process(integrity_repo) as (transport, fakes):
        async with async_client(integrity_repo, transport, fakes) as c:
            r = await c.infer({"input": digits.images[:1]})
        assert r.gateway_verdict == "attack"
        assert r.replaced
        # we never saw the original; the replacement we hold agrees with the signed verifier
        assert r.verdict == "verified"
        assert not r.mismatch, r.mismatches
        assert r.gateway_reclassified == (int(digits.labels[0]),)
        assert int(r.probabilities.argmax()) == digits.labels[0]

        # It claims it restored the honest class but serves the service's own answer with its
        # top two classes switched: the attack that typical digits are sure to be flagged for
        # (tests/integrity_factory.py), whatever this CPU's training made of the detector.
        session = ort.InferenceSession(
            str(integrity_repo / "digits" / "1" / "model.onnx"),
            providers=["CPUExecutionProvider"],
        )
        honest = np.asarray(session.run(None, {"input": digits.images[:1]})[0])  # [1, 10]
        top = np.argsort(honest[0])[-2:]
        switched = honest.copy()
        switched[0, top] = honest[0, top[::-1]]
        assert int(switched.argmax()) != digits.labels[0]

        def wrong_replacement(body: Body) -> Body:
            probs = body["outputs"][0]
            body["outputs"] = [{**probs, "data": switched.ravel().tolist()}]
            return body

        async with async_client(
            integrity_repo, AsyncLiar(transport, wrong_replacement), fakes
        ) as c:
            r = await c.infer({"input": digits.images[:1]})
        assert r.replaced
        assert r.verdict == "attack"
        assert any(m.startswith("reclassified") for m in r.mismatches)


async def test_tasks_starting_together_share_one_handshake(
    integrity_repo: Path, digits: Digits
) -> None:
    """Eight tasks' first answers need one handshake, not eight (the async client's lock is
    anyio's, so trio users get it too)."""
    async with in_process(integrity_repo) as (transport, fakes):
        counting = AsyncLiar(transport, lambda body: body)
        async with async_client(integrity_repo, counting, fakes) as c:
            results = await asyncio.gather(
                *(c.infer({"input": digits.images[i : i + 1]}) for i in range(8))
            )
            assert all(r.trusted for r in results), [r.mismatches for r in results]
            assert c.handshakes == 1
        assert counting.attestations == 1


async def test_fail_open_unverified_answers_are_never_verified(
    integrity_repo: Path, digits: Digits
) -> None:
    set_integrity(integrity_repo, failure_policy="fail_open")
    async with in_process(integrity_repo) as (transport, fakes):
        async with async_client(integrity_repo, transport, fakes) as c:
            await c.attest()
            fakes.by_model["digits"].fail = EnclaveUnavailable("simulated outage")
            r = await c.infer({"input": digits.images[:1]})
        assert r.gateway_verdict == r.verdict == "unverified"
        assert r.reason is not None
        assert r.reason.startswith("enclave_unavailable")
        assert r.evidence is None
        assert not r.mismatch
        assert not r.trusted


async def test_out_of_distribution_is_unverified_for_the_client_too(
    integrity_repo: Path, digits: Digits
) -> None:
    """The client runs the novelty check on the input it sent: it agrees with an honest
    gateway's "unverified", and catches a gateway that dodges a verdict by calling an
    ordinary input out of distribution."""
    blank = np.zeros((1, 1, 8, 8), np.float32)
    async with in_process(integrity_repo) as (transport, fakes):
        async with async_client(integrity_repo, transport, fakes) as c:
            r = await c.infer({"input": blank})
        assert r.gateway_verdict == r.verdict == "unverified"
        assert r.reason is not None
        assert r.reason.startswith("out_of_distribution")
        assert not r.mismatch, r.mismatches

        def dodge(body: Body) -> Body:
            params = body["parameters"]
            params.update(
                integrity_verdict="unverified", integrity_reason="out_of_distribution: trust me"
            )
            return body

        async with async_client(integrity_repo, AsyncLiar(transport, dodge), fakes) as c:
            r = await c.infer({"input": digits.images[:1]})
        assert r.verdict == "verified"
        assert any(m.startswith("verdict") for m in r.mismatches), r.mismatches
