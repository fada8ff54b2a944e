"""Evidence and frames from another party are checked before cbor2 builds them: cbor2's C
decoder evaluates its built-in tags itself (a rational of two bignums costs a gcd quadratic in
their size), so a gateway could stall a client's evidence check, or an enclave the gateway's."""

from __future__ import annotations

from fractions import Fraction

import cbor2
import pytest

from fides_core import cose
from fides_core.attestation import MalformedEvidence, decode_attestation, decode_result_evidence
from fides_core.plain_cbor import UnsafeCbor, check_plain

# a rational (tag 30) of two 2 KB numbers: cbor2 would build a Fraction from it
RATIONAL = cbor2.dumps(Fraction(3**4000 + 1, 7**3000 + 2))


def test_a_rational_is_refused_before_it_is_built() -> None:
    assert RATIONAL[:2] == b"\xd8\x1e"  # tag 30, one-byte argument
    with pytest.raises(UnsafeCbor, match="tag 30 at byte 0; no tags are used"):
        check_plain(RATIONAL, what="evidence")


def test_plain_documents_pass_and_allowed_tags_only() -> None:
    check_plain(cbor2.dumps({"v": 1, "a": [1, 2.5, b"x", "y", None, True]}))
    signed = cbor2.dumps(cbor2.CBORTag(18, [b"", {}, b"payload", b"sig"]))
    check_plain(signed, allowed_tags=frozenset({18}))
    with pytest.raises(UnsafeCbor, match="only tag\\(s\\) 18 are used"):
        check_plain(cbor2.dumps(cbor2.CBORTag(18, [Fraction(1, 3)])), allowed_tags=frozenset({18}))
    with pytest.raises(UnsafeCbor, match="bytes after its first item"):
        check_plain(cbor2.dumps(1) + b"\x00")
    with pytest.raises(UnsafeCbor, match="more than 3 CBOR items"):
        check_plain(cbor2.dumps([1, 2, 3]), max_items=3)


def test_result_evidence_holding_a_tag_is_malformed() -> None:
    evidence = cbor2.dumps({"v": 1, "result": b"", "entry": {"index": RATIONAL}, "proof": []})
    evidence = evidence.replace(cbor2.dumps(RATIONAL), RATIONAL)  # the tag itself, not bytes
    with pytest.raises(MalformedEvidence, match="evidence holds CBOR tag 30"):
        decode_result_evidence(evidence)


def test_a_sign1_with_a_tag_inside_is_refused() -> None:
    sign1 = cbor2.dumps(cbor2.CBORTag(18, [b"", {4: b"kid"}, b"payload", b"s" * 96]))
    tagged = sign1.replace(cbor2.dumps(b"kid"), RATIONAL)
    with pytest.raises(cose.CoseError, match="COSE_Sign1 holds CBOR tag 30"):
        cose.split_sign1(tagged)
    with pytest.raises(MalformedEvidence, match="CBOR tag 30"):
        decode_attestation(tagged)


def test_an_attestation_payload_with_a_tag_is_refused() -> None:
    protected = cbor2.dumps({1: cose.ES384})
    payload = cbor2.dumps({"module_id": "i-1", "timestamp": 0}).replace(cbor2.dumps(0), RATIONAL)
    sign1 = cbor2.dumps([protected, {}, payload, b"s" * 96])
    with pytest.raises(MalformedEvidence, match="attestation payload holds CBOR tag 30"):
        decode_attestation(sign1)
