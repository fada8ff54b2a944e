"""Signed verification results, their client-side binding checks, and enclave resources."""

from __future__ import annotations

import dataclasses
import time

import cbor2
import numpy as np
import pytest

from enclave_sim.core import EnclaveCore
from enclave_sim.pki import PlatformIdentity
from enclave_sim.resources import ResourceSettings, estimate_footprint
from fides_core import cose
from fides_core.attestation import (
    AttestedEnclave,
    BindingError,
    MalformedEvidence,
    MeasurementMismatch,
    NonceReplayed,
    NonceStore,
    Policy,
    SequenceError,
    SignatureError,
    TimestampError,
    check_verification,
    verify_attestation,
)
from fides_core.enclave_config import EnclaveModelConfig
from fides_core.enclave_errors import BatchTooLarge, InvalidRequest, ModelTooLarge
from fides_core.evidence import merkle_root_from_proof, merkle_tree
from fides_core.tensors import canonical_bytes, tensor_digest
from fides_core.verify import RejectedItem, VerifiedItem, VerifyRequest
from tests.enclave_sim.helpers import EnclaveFiles
from tests.model_factory import tiny_expected


@pytest.fixture(scope="module")
def attested(core: EnclaveCore, module_files: EnclaveFiles) -> AttestedEnclave:
    nonce = b"a" * 32
    return verify_attestation(
        core.attest(nonce),
        root=module_files.root_pem,
        policy=Policy.of(core.measurement.pcr0, allow_simulated=True),
        nonce=nonce,
    )


def _request(i: int, rows: int = 1) -> VerifyRequest:
    x = np.arange(rows * 4, dtype=np.float32).reshape(rows, 4) / (i + 1)
    return VerifyRequest(f"req-{i}", bytes([i]) * 16, {"input": x})


def test_verify_runs_the_model_and_binds_each_request(
    core: EnclaveCore, attested: AttestedEnclave
) -> None:
    requests = [_request(i, rows=1 + i % 3) for i in range(5)]
    out = core.verify(requests)
    seqs = []
    for req, item in zip(requests, out.items, strict=True):
        logits, probs = tiny_expected(req.inputs["input"])
        np.testing.assert_allclose(item.outputs["probabilities"], probs, rtol=1e-5)
        np.testing.assert_allclose(item.outputs["logits"], logits, rtol=1e-5)
        checked = check_verification(
            item.evidence,
            attested=attested,
            inputs=req.inputs,
            nonce=req.nonce,
            request_id=req.id,
            outputs=item.outputs,
        )
        assert checked.request_id == req.id
        assert checked.seq == out.seq
        seqs.append(checked.seq)
        # a client gets its own entry only: no other request's outputs in its evidence
        doc = cbor2.loads(item.evidence)
        assert doc["entry"]["id"] == req.id
    assert len(set(seqs)) == 1


def test_results_are_signed_es256_and_the_alg_is_the_keys(
    core: EnclaveCore, attested: AttestedEnclave
) -> None:
    """Results: ES256 by the attested P-256 key (on every answer's path); the attestation
    document: ES384 (once per boot, as Nitro). A result whose header claims another alg than
    the attested key's is refused before any signature check, whatever its bytes."""
    req = _request(3)
    item = core.verify([req]).items[0]
    assert isinstance(item, VerifiedItem)
    doc = cbor2.loads(item.evidence)
    protected, _ = cose.split_sign1(doc["result"], alg=None)
    assert protected[1] == cose.ES256
    assert attested.public_key.curve.name == "secp256r1"
    assert cose.split_sign1(attested.document)[0][1] == cose.ES384
    tag = cbor2.loads(doc["result"])
    relabelled = cbor2.dumps(
        cbor2.CBORTag(18, [cbor2.dumps({1: cose.ES384}), *tag.value[1:3], bytes(96)])
    )
    with pytest.raises(SignatureError, match="must carry alg ES256"):
        check_verification(
            cbor2.dumps({**doc, "result": relabelled}),
            attested=attested,
            inputs=req.inputs,
            nonce=req.nonce,
        )


def test_es384_results_from_before_the_switch_still_verify(
    module_files: EnclaveFiles, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An enclave whose result key is P-384 (every boot before issue 25) signs ES384 results:
    its evidence, incident bundles included, checks as before."""
    import enclave_sim.core
    from enclave_sim.pki import new_key

    monkeypatch.setattr(enclave_sim.core, "new_result_key", new_key)  # the old key
    old = EnclaveCore.boot(module_files.sealed_path, module_files.platform_dir)
    nonce = b"b" * 32
    attested = verify_attestation(
        old.attest(nonce),
        root=module_files.root_pem,
        policy=Policy.of(old.measurement.pcr0, allow_simulated=True),
        nonce=nonce,
    )
    assert attested.public_key.curve.name == "secp384r1"
    req = _request(4)
    item = old.verify([req]).items[0]
    assert isinstance(item, VerifiedItem)
    signed = cbor2.loads(item.evidence)["result"]
    assert cose.split_sign1(signed, alg=None)[0][1] == cose.ES384
    checked = check_verification(
        item.evidence, attested=attested, inputs=req.inputs, nonce=req.nonce, request_id=req.id
    )
    assert checked.request_id == req.id


def test_sequence_numbers_increase(core: EnclaveCore, attested: AttestedEnclave) -> None:
    a = core.verify([_request(1)])
    b = core.verify([_request(1)])
    assert b.seq > a.seq
    req = _request(1)
    check_verification(
        b.items[0].evidence, attested=attested, inputs=req.inputs, nonce=req.nonce, after_seq=a.seq
    )
    with pytest.raises(SequenceError):
        check_verification(
            a.items[0].evidence,
            attested=attested,
            inputs=req.inputs,
            nonce=req.nonce,
            after_seq=b.seq,
        )


def test_input_hash_mismatch(core: EnclaveCore, attested: AttestedEnclave) -> None:
    req = _request(2)
    item = core.verify([req]).items[0]
    other = req.inputs["input"].copy()
    other[0, 0] = np.nextafter(other[0, 0], np.float32(1e9))  # one ulp
    with pytest.raises(BindingError, match="input hash mismatch"):
        check_verification(
            item.evidence, attested=attested, inputs={"input": other}, nonce=req.nonce
        )
    # the same values as another dtype or shape are other bytes too
    with pytest.raises(BindingError):
        check_verification(
            item.evidence,
            attested=attested,
            inputs={"input": req.inputs["input"].astype(np.float64)},
            nonce=req.nonce,
        )


def test_reported_output_must_be_the_signed_output(
    core: EnclaveCore, attested: AttestedEnclave
) -> None:
    req = _request(3)
    item = core.verify([req]).items[0]
    lie = {k: v.copy() for k, v in item.outputs.items()}
    lie["probabilities"][0] = lie["probabilities"][0][::-1]  # the "switch" attack
    with pytest.raises(BindingError, match="differs from the enclave-signed"):
        check_verification(
            item.evidence, attested=attested, inputs=req.inputs, nonce=req.nonce, outputs=lie
        )


def test_other_nonce_request_id_and_replay(core: EnclaveCore, attested: AttestedEnclave) -> None:
    store = NonceStore()
    nonce = store.issue()
    req = VerifyRequest("mine", nonce, _request(4).inputs)
    item = core.verify([req]).items[0]
    with pytest.raises(BindingError, match="another nonce"):
        check_verification(item.evidence, attested=attested, inputs=req.inputs, nonce=b"z" * 32)
    with pytest.raises(BindingError, match="request"):
        check_verification(
            item.evidence, attested=attested, inputs=req.inputs, nonce=nonce, request_id="yours"
        )
    kwargs = {"attested": attested, "inputs": req.inputs, "nonce": nonce, "nonce_store": store}
    check_verification(item.evidence, **kwargs)  # type: ignore[arg-type]
    with pytest.raises(NonceReplayed):
        check_verification(item.evidence, **kwargs)  # type: ignore[arg-type]


def test_entry_swapped_between_batches_breaks_the_merkle_proof(
    core: EnclaveCore, attested: AttestedEnclave
) -> None:
    a = cbor2.loads(core.verify([_request(0), _request(1)]).items[1].evidence)
    b = cbor2.loads(core.verify([_request(5), _request(6)]).items[1].evidence)
    a["entry"] = b["entry"]
    req = _request(6)
    with pytest.raises(BindingError, match="Merkle"):
        check_verification(cbor2.dumps(a), attested=attested, inputs=req.inputs, nonce=req.nonce)


def test_result_from_another_boot_fails_the_signature(
    module_files: EnclaveFiles, platform_identity: PlatformIdentity, attested: AttestedEnclave
) -> None:
    other = EnclaveCore(
        module_files.model_bytes, module_files.config, module_files.measurement, platform_identity
    )
    req = _request(7)
    item = other.verify([req]).items[0]
    with pytest.raises(SignatureError):
        check_verification(item.evidence, attested=attested, inputs=req.inputs, nonce=req.nonce)


def test_result_with_another_measurement(attested: AttestedEnclave, core: EnclaveCore) -> None:
    req = _request(8)
    item = core.verify([req]).items[0]
    fake = dataclasses.replace(attested, measurement=b"\x03" * 48)
    with pytest.raises(MeasurementMismatch):
        check_verification(item.evidence, attested=fake, inputs=req.inputs, nonce=req.nonce)


def test_malformed_result_evidence(attested: AttestedEnclave) -> None:
    for bad in (b"", b"\x00", cbor2.dumps({"v": 9}), cbor2.dumps({"v": 1, "result": b"x"})):
        with pytest.raises(MalformedEvidence):
            check_verification(bad, attested=attested, inputs={}, nonce=b"n" * 16)


def test_stale_result(core: EnclaveCore, attested: AttestedEnclave) -> None:
    req = _request(9)
    item = core.verify([req]).items[0]
    with pytest.raises(TimestampError):
        check_verification(
            item.evidence,
            attested=attested,
            inputs=req.inputs,
            nonce=req.nonce,
            now=time.time() + 3600,
        )


@pytest.mark.parametrize("count", [1, 2, 3, 5, 8, 9, 32])
def test_merkle_proofs(count: int) -> None:
    leaves = [bytes([i]) * 32 for i in range(count)]
    root, proofs = merkle_tree(leaves)
    for i, leaf in enumerate(leaves):
        assert merkle_root_from_proof(leaf, i, count, proofs[i]) == root
        if count > 1:  # the same proof at another index: another root, or no root at all
            try:
                moved = merkle_root_from_proof(leaf, (i + 1) % count, count, proofs[i])
            except ValueError:
                continue
            assert moved != root


def test_canonical_tensor_bytes_name_type_and_shape() -> None:
    x = np.arange(4, dtype=np.float32)
    assert canonical_bytes(x).startswith(b"fides-tensor/1;FP32;4;")
    assert tensor_digest(x) != tensor_digest(x.reshape(2, 2))
    assert tensor_digest(x) != tensor_digest(x.view(np.int32))
    assert tensor_digest(x) == tensor_digest(x.astype(">f4"))  # byte order does not matter


def test_bad_requests_are_refused_each_alone(core: EnclaveCore) -> None:
    good = _request(0).inputs["input"]
    bad = [
        VerifyRequest("a", b"n" * 16, {"other": good}),
        VerifyRequest("b", b"n" * 16, {"input": good.astype(np.float64)}),
        VerifyRequest("c", b"n" * 16, {"input": np.zeros((1, 5), np.float32)}),
        VerifyRequest("d", b"short", {"input": good}),
        VerifyRequest("", b"n" * 16, {"input": good}),
        VerifyRequest("x" * 257, b"n" * 16, {"input": good}),
    ]
    for request in bad:
        out = core.verify([request])
        (item,) = out.items
        assert isinstance(item, RejectedItem), request.id
        assert item.code == "bad_request"
        assert out.result == b""  # nothing signed
    # beside good requests: only the bad one is refused; the others are signed together
    mixed = [_request(0), bad[0], _request(1), bad[5], _request(2)]
    out = core.verify(mixed)
    assert [type(i).__name__ for i in out.items] == [
        "VerifiedItem",
        "RejectedItem",
        "VerifiedItem",
        "RejectedItem",
        "VerifiedItem",
    ]
    assert out.items[3].id is None or len(out.items[3].id) == 257
    for item in out.items:
        if isinstance(item, VerifiedItem):
            doc = cbor2.loads(item.evidence)
            assert doc["result"] == out.result  # one signature over the three good ones
    indices = [
        cbor2.loads(i.evidence)["entry"]["index"] for i in out.items if isinstance(i, VerifiedItem)
    ]
    assert indices == [0, 1, 2]
    # what concerns the whole call still refuses it whole
    with pytest.raises(InvalidRequest):
        core.verify([])
    with pytest.raises(BatchTooLarge):
        core.verify([_request(0, rows=65)])


def test_memory_budget_refuses_a_model_too_large(
    module_files: EnclaveFiles, platform_identity: PlatformIdentity
) -> None:
    footprint = estimate_footprint(module_files.model_bytes, 64)
    # W [4,3] + B [3] = 15 floats; activations at batch 64: input, mm, logits, probabilities
    assert footprint.parameter_bytes == 15 * 4
    assert footprint.activation_bytes == 64 * (4 + 3 + 3 + 3) * 4
    assert footprint.unresolved_tensors == 0
    small = ResourceSettings(memory_budget_bytes=1000)
    with pytest.raises(ModelTooLarge, match="paging"):
        EnclaveCore(
            module_files.model_bytes,
            module_files.config,
            module_files.measurement,
            platform_identity,
            resources=small,
        )


def test_paging_and_transition_costs(
    module_files: EnclaveFiles, platform_identity: PlatformIdentity
) -> None:
    paged = EnclaveCore(
        module_files.model_bytes,
        EnclaveModelConfig(max_batch_size=64),
        module_files.measurement,
        platform_identity,
        resources=ResourceSettings(
            memory_budget_bytes=1000, paging=True, paging_penalty_us_per_mib=20_000
        ),
    )
    assert paged.penalty_us == 20_000  # one MiB (rounded up) over the budget
    assert paged.info()["paging_penalty_us"] == 20_000
    t0 = time.perf_counter()
    paged.verify([_request(0)])
    assert time.perf_counter() - t0 >= 0.02  # a lower bound only: never an upper one
    slow = EnclaveCore(
        module_files.model_bytes,
        module_files.config,
        module_files.measurement,
        platform_identity,
        resources=ResourceSettings(transition_us=10_000),
    )
    t0 = time.perf_counter()
    slow.verify([_request(0)])
    assert time.perf_counter() - t0 >= 0.01
