"""Building an incident bundle (issue 21) from a boot's documents, and what the check says of
the requests the gateway left out: a boot's newest document travels with the bundle (a check
after the older ones' certificates end needs it); a document that does not decode is never
chosen over a readable one; the gateway's ``answers_left_out`` is validated and reported, never
dropped silently. Real signatures and chains (enclave_sim) with clocks the tests set."""

from __future__ import annotations

import base64
import copy
import time
from typing import Any

import pytest

from fides_core.incident import (
    LEGACY_TYPE,
    IncidentError,
)
from tests.fides_core.conftest import check as _check
from tests.fides_core.incident_kit import DAY, Boot, Platform, bundle


def _signed(boot: Boot, batches: int = 3) -> list[Any]:
    answers = []
    for _ in range(batches):
        boot.now += 60
        answers += boot.sign(3)
    return answers


def _documents(b: dict[str, Any], module: str) -> list[bytes]:
    att = b["attestations"][module]
    return [base64.b64decode(d) for d in ([att] if isinstance(att, str) else att)]


def test_a_boots_renewed_document_travels_with_answers_signed_before_it(
    platform: Platform,
) -> None:
    """A boot attested at T0 (a 7-day certificate), re-attested at T0 + 6.5 days under a
    renewed certificate; every answer signed before the renewal. The bundle carries the
    renewed document too, so it proves after the first certificate's end (T0 + 7.2 days)."""
    t0 = time.time() - 6.9 * DAY
    boot = platform.boot(t0)
    boot.now = t0 + 60
    first = boot.attest()
    answers = _signed(boot)
    boot.certify(t0 + 6.5 * DAY)  # the platform renews the per-boot certificate
    boot.now = t0 + 6.5 * DAY
    renewed = boot.attest()
    b = bundle(answers, {boot.module_id: [first, renewed]})
    assert _documents(b, boot.module_id) == [first, renewed]  # oldest validity first
    check = _check(b, platform, at=t0 + 7.2 * DAY)  # after the first certificate's end
    assert check.requests == 9
    assert check.gaps() == []
    assert _check(b, platform).requests == 9  # and now
    # a boot's single document is still carried as one (no list)
    assert isinstance(bundle(answers, {boot.module_id: first})["attestations"][boot.module_id], str)


def test_a_document_that_does_not_decode_is_never_chosen_over_a_readable_one(
    platform: Platform,
) -> None:
    boot = platform.boot(time.time() - 3600)
    boot.now = time.time() - 3000
    doc = boot.attest()
    answers = _signed(boot)
    for listed in ([doc, b"\xa0not-a-document"], [b"\xa0not-a-document", doc]):
        b = bundle(answers, {boot.module_id: listed})
        assert _documents(b, boot.module_id) == [doc]
        assert _check(b, platform).requests == 9
    # with no readable one, the unreadable one is carried: the check names it, not a gap
    b = bundle(answers, {boot.module_id: [b"\xa0not-a-document"]})
    assert b["answers_left_out"] == {"no_attestation": 0, "outside_attestation": 0}
    with pytest.raises(IncidentError, match=f"attestation {boot.module_id}"):
        _check(b, platform)


def test_requests_the_gateway_left_out_are_reported_as_its_word(platform: Platform) -> None:
    """A boot signs on after its certificate's end: those answers are left out of the bundle
    (``outside_attestation``); the check proves the rest and reports them, in its gaps and
    its summary."""
    t0 = time.time() - 7.5 * DAY
    boot = platform.boot(t0)
    boot.now = t0 + 60
    doc = boot.attest()
    answers = _signed(boot)
    boot.now = t0 + 7.1 * DAY  # past the certificate: left out by the builder
    answers += _signed(boot)
    b = bundle(answers, {boot.module_id: doc})
    assert b["answers_left_out"] == {"no_attestation": 0, "outside_attestation": 9}
    check = _check(b, platform, at=t0 + 3600)
    assert check.left_out == {"no_attestation": 0, "outside_attestation": 9}
    assert check.gaps() == [
        "9 requests left out of the bundle by the gateway's word (9 outside attestation)"
    ]
    assert "the gateway says it left 9 requests out of the bundle" in check.summary()

    # none left out: said as none, no gap
    whole = bundle(answers[:9], {boot.module_id: doc})
    check = _check(whole, platform, at=t0 + 3600)
    assert check.left_out == {"no_attestation": 0, "outside_attestation": 0}
    assert check.gaps() == []
    assert "left" not in check.summary()


@pytest.mark.parametrize(
    "said",
    [
        [9],
        {"outside_attestation": -1},
        {"outside_attestation": 1.5},
        {"outside_attestation": True},
        {"outside_attestation": "9"},
        {"misplaced": 3},
    ],
)
def test_a_malformed_answers_left_out_is_refused(platform: Platform, said: Any) -> None:
    boot = platform.boot(time.time() - 3600)
    boot.now = time.time() - 3000
    b = bundle(_signed(boot), {boot.module_id: boot.attest()})
    b["answers_left_out"] = said
    with pytest.raises(IncidentError, match="answers_left_out") as err:
        _check(b, platform)
    assert err.value.part == "format"


def test_older_bundles_without_answers_left_out_check_as_before(platform: Platform) -> None:
    boot = platform.boot(time.time() - 3600)
    boot.now = time.time() - 3000
    b = bundle(_signed(boot), {boot.module_id: boot.attest()})
    for kind in (b["type"], LEGACY_TYPE):
        older = copy.deepcopy(b)
        older["type"] = kind
        del older["answers_left_out"]
        check = _check(older, platform)
        assert check.left_out is None
        assert check.requests == 9
        assert check.gaps() == []
    # a version 2 bundle naming a subset of the reasons: the others are none
    b["answers_left_out"] = {"no_attestation": 2}
    check = _check(b, platform)
    assert check.left_out == {"no_attestation": 2, "outside_attestation": 0}
    assert check.gaps() == [
        "2 requests left out of the bundle by the gateway's word (2 no attestation)"
    ]
