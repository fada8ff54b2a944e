"""The MAC session agreed at attestation (fides_core.session): the key exchange, the enclave's
side, and the gateway's check of a batch by its MAC, with every binding still checked."""

from __future__ import annotations

import dataclasses
import os

import cbor2
import numpy as np
import pytest

from enclave_sim import core as core_module
from enclave_sim.core import EnclaveCore
from fides_core import cose
from fides_core.attestation import (
    AttestedEnclave,
    BindingError,
    Policy,
    SignatureError,
    check_verification,
    verify_attestation,
)
from fides_core.enclave_errors import InvalidRequest
from fides_core.session import (
    MAC_SIZE,
    SessionError,
    SessionKey,
    SessionOffer,
    accept_offer,
)
from fides_core.verify import VerifiedItem, VerifyRequest
from gateway.enclave_client import VerifyResult, check_batch
from tests.enclave_sim.helpers import EnclaveFiles


def _attest_session(
    core: EnclaveCore, files: EnclaveFiles
) -> tuple[AttestedEnclave, SessionKey, bytes]:
    nonce, offer = os.urandom(32), SessionOffer.new()
    attested = verify_attestation(
        core.attest(nonce, session_key=offer.public),
        root=files.root_pem,
        policy=Policy.of(core.measurement.pcr0, allow_simulated=True),
        nonce=nonce,
    )
    session = offer.complete(
        attested.claims["fides"]["session"], nonce=nonce, module_id=attested.module_id
    )
    return attested, session, nonce


def _requests(n: int) -> list[VerifyRequest]:
    return [
        VerifyRequest(f"s-{i}", os.urandom(16), {"input": np.full((1, 4), i / 3, dtype=np.float32)})
        for i in range(n)
    ]


def _result(core: EnclaveCore, session: SessionKey, requests: list[VerifyRequest]) -> VerifyResult:
    out = core.verify(requests)
    return VerifyResult(out.seq, out.items, core.session_mac(session.id, out.result))


def test_both_sides_agree_on_a_key_and_only_the_offerer_can_complete() -> None:
    offer = SessionOffer.new()
    enclave_side, answer = accept_offer(offer.public, nonce=b"n" * 32, module_id="sim-1")
    gateway_side = offer.complete(answer, nonce=b"n" * 32, module_id="sim-1")
    assert gateway_side == enclave_side
    assert len(gateway_side.mac(b"x")) == MAC_SIZE
    # the key depends on the nonce and the boot: a replayed answer gives another key
    assert offer.complete(answer, nonce=b"m" * 32, module_id="sim-1").key != enclave_side.key
    assert offer.complete(answer, nonce=b"n" * 32, module_id="sim-2").key != enclave_side.key
    # a host that swapped the gateway's public key in transit: the answer names another offer
    stranger = SessionOffer.new()
    with pytest.raises(SessionError, match="another offer"):
        stranger.complete(answer, nonce=b"n" * 32, module_id="sim-1")
    with pytest.raises(SessionError, match="no session"):
        offer.complete(None, nonce=b"n" * 32, module_id="sim-1")


@pytest.mark.parametrize(
    ("public", "message"),
    [
        (b"short", "32-byte"),
        ("a string", "32-byte"),
        (bytes(32), "no key agreement"),  # a low-order point: an all-zero shared secret
    ],
)
def test_bad_offers_are_refused(public: object, message: str) -> None:
    with pytest.raises(SessionError, match=message):
        accept_offer(public, nonce=b"n" * 32, module_id="sim-1")


def test_mac_check_is_exact() -> None:
    key = SessionKey(b"i" * 16, b"k" * 32)
    mac = key.mac(b"signed result")
    assert key.check(b"signed result", mac)
    assert not key.check(b"signed resulT", mac)
    assert not key.check(b"signed result", mac[:-1] + bytes([mac[-1] ^ 1]))
    assert not key.check(b"signed result", None)
    assert not SessionKey(b"i" * 16, b"K" * 32).check(b"signed result", mac)


def test_the_attestation_document_carries_the_session(
    core: EnclaveCore, module_files: EnclaveFiles
) -> None:
    attested, session, _ = _attest_session(core, module_files)
    answer = attested.claims["fides"]["session"]
    assert set(answer) == {"initiator", "public_key"}
    # without an offer the document carries none (and nothing changes for clients)
    nonce = os.urandom(32)
    plain = verify_attestation(
        core.attest(nonce),
        root=module_files.root_pem,
        policy=Policy.of(core.measurement.pcr0, allow_simulated=True),
        nonce=nonce,
    )
    assert "session" not in plain.claims["fides"]
    with pytest.raises(InvalidRequest, match="session_key"):
        core.attest(os.urandom(32), session_key=b"x" * 5)
    assert core.session_mac(session.id, b"data") == session.mac(b"data")
    assert core.session_mac(b"unknown-session!", b"data") is None


def test_the_enclave_keeps_a_bounded_number_of_sessions(
    core: EnclaveCore, module_files: EnclaveFiles, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(core_module, "MAX_SESSIONS", 2)
    first, used = (_attest_session(core, module_files)[1] for _ in range(2))
    assert core.session_mac(first.id, b"x") == first.mac(b"x")  # used: now the most recent
    latest = _attest_session(core, module_files)[1]
    assert core.session_mac(used.id, b"x") is None  # the least recently used was dropped
    assert core.session_mac(first.id, b"x") == first.mac(b"x")
    assert core.session_mac(latest.id, b"x") == latest.mac(b"x")


def test_offering_the_gateways_key_again_does_not_replace_its_session(
    core: EnclaveCore, module_files: EnclaveFiles
) -> None:
    """Whoever reaches the socket can replay the gateway's public key in an offer of its own;
    that makes a second session beside the gateway's (the enclave's half is new), never one
    in its place, so the gateway's MACs keep checking."""
    nonce, offer = os.urandom(32), SessionOffer.new()
    evidence = core.attest(nonce, session_key=offer.public)
    claims = cbor2.loads(cose.split_sign1(evidence)[1])
    gateway = offer.complete(claims["fides"]["session"], nonce=nonce, module_id=core.module_id)
    replayed = core.attest(os.urandom(32), session_key=offer.public)
    other = cbor2.loads(cose.split_sign1(replayed)[1])["fides"]["session"]
    assert other["initiator"] == offer.public
    assert other["public_key"] != claims["fides"]["session"]["public_key"]
    assert core.session_mac(gateway.id, b"result") == gateway.mac(b"result")


def test_a_batch_checked_by_its_mac_and_the_evidence_clients_check_unchanged(
    core: EnclaveCore, module_files: EnclaveFiles
) -> None:
    attested, session, _ = _attest_session(core, module_files)
    requests = _requests(3)
    result = _result(core, session, requests)
    assert result.mac is not None
    check_batch(attested, requests, result, session)
    # the evidence is the signed one: a client checks it without any session
    for req, item in zip(requests, result.items, strict=True):
        assert isinstance(item, VerifiedItem)
        check_verification(
            item.evidence,
            attested=attested,
            inputs=req.inputs,
            nonce=req.nonce,
            request_id=req.id,
            outputs=item.outputs,
        )
    # a result without a MAC (an unknown session) is checked by its signature
    check_batch(attested, requests, dataclasses.replace(result, mac=None), session)


def test_a_wrong_mac_is_refused_never_retried_as_a_signature(
    core: EnclaveCore, module_files: EnclaveFiles
) -> None:
    attested, session, _ = _attest_session(core, module_files)
    _, other_session, _ = _attest_session(core, module_files)
    requests = _requests(2)
    result = _result(core, session, requests)
    assert result.mac is not None
    flipped = result.mac[:-1] + bytes([result.mac[-1] ^ 1])
    for bad in (flipped, other_session.mac(b"anything"), b""):
        with pytest.raises(SignatureError, match="MAC"):
            check_batch(attested, requests, dataclasses.replace(result, mac=bad), session)
    # the same result under another session's key: that session's MAC does not check here
    with pytest.raises(SignatureError, match="MAC"):
        check_batch(attested, requests, result, other_session)


def test_a_right_mac_does_not_excuse_any_binding(
    core: EnclaveCore, module_files: EnclaveFiles
) -> None:
    """The MAC stands in for the signature only: other outputs, other input bytes, another
    item's evidence and a forged result beside the MAC'd one are each refused."""
    attested, session, _ = _attest_session(core, module_files)
    requests = _requests(2)
    result = _result(core, session, requests)
    first, second = result.items
    assert isinstance(first, VerifiedItem)
    assert isinstance(second, VerifiedItem)
    # reported outputs that are not the signed ones
    changed = VerifiedItem(
        first.id, {"probabilities": first.outputs["probabilities"][:, ::-1]}, first.evidence
    )
    with pytest.raises(BindingError, match="output"):
        check_batch(
            attested, requests, dataclasses.replace(result, items=[changed, second]), session
        )
    # other input bytes than the enclave saw
    other_inputs = [
        dataclasses.replace(requests[0], inputs={"input": requests[0].inputs["input"] + 1}),
        requests[1],
    ]
    with pytest.raises(BindingError, match="input hash"):
        check_batch(attested, other_inputs, result, session)
    # the items swapped: each evidence is bound to its own request id
    swapped = [dataclasses.replace(second, id=first.id), dataclasses.replace(first, id=second.id)]
    with pytest.raises(BindingError):
        check_batch(attested, requests, dataclasses.replace(result, items=swapped), session)
    # a second item whose evidence names another result (not the MAC'd one): its signature
    # is checked, and a payload signed by nobody fails it
    doc = cbor2.loads(second.evidence)
    _, payload = cose.split_sign1(doc["result"], alg=None)
    forged_payload = cbor2.loads(payload) | {"seq": 10**9}
    message = cbor2.loads(doc["result"])
    message = message.value if isinstance(message, cbor2.CBORTag) else message
    message[2] = cbor2.dumps(forged_payload)
    doc["result"] = cbor2.dumps(cbor2.CBORTag(18, message))
    forged = dataclasses.replace(second, evidence=cbor2.dumps(doc))
    with pytest.raises(SignatureError, match="signature"):
        check_batch(attested, requests, dataclasses.replace(result, items=[first, forged]), session)
