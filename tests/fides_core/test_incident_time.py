"""Incident bundles and time (issue 21, backdating): a bundle is checked at the VERIFICATION
time (now, or a time an auditor names), never at the times it claims. A document made under a
leaked or expired enclave key and dated back to when its certificate was valid is refused; a
bundle older than its certificates' lifetime fails with a named error until the auditor names
a time; every answer must be signed within its boot's attestation validity and nothing may be
dated after the verification time. Real signatures and chains (enclave_sim) with clocks and
certificates the tests set."""

from __future__ import annotations

import base64
import copy
import datetime as dt
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fides_core.incident import (
    AttestationExpired,
    AttestationTimeError,
    IncidentError,
)
from tests.fides_core.conftest import check as _check
from tests.fides_core.incident_kit import DAY, Boot, Platform, bundle


def _run(boot: Boot, start: float, batches: int = 3) -> tuple[bytes, list[Any]]:
    """The boot's document dated ``start``, then ``batches`` signed batches a minute apart."""
    boot.now = start
    doc = boot.attest()
    answers = []
    for _ in range(batches):
        boot.now += 60
        answers += boot.sign(3)
    return doc, answers


def test_a_fresh_bundle_is_checked_now(platform: Platform) -> None:
    boot = platform.boot(time.time() - 3600)
    doc, answers = _run(boot, time.time() - 3000)
    b = bundle(answers, {boot.module_id: doc})
    check = _check(b, platform)
    assert check.requests == 9
    assert not check.at_chosen
    assert abs(check.checked_at - time.time()) < 60
    assert "every boot attested by a document whose certificates are valid now" in check.summary()
    assert "signed within its boot's attestation validity" in check.summary()


def test_a_bundle_older_than_its_certificates_fails_now_and_proves_at_a_time_named(
    platform: Platform,
) -> None:
    """Thirty days old: the per-boot certificate (7 days) has expired. Checked now it is
    refused with the named error, which says how to re-check; at a time the auditor names
    (when they trust the chain) it proves, and says whose time it was."""
    then = time.time() - 30 * DAY
    boot = platform.boot(then)
    doc, answers = _run(boot, then + 600)
    b = bundle(answers, {boot.module_id: doc})
    with pytest.raises(AttestationExpired) as err:
        _check(b, platform)
    assert err.value.part == f"attestation {boot.module_id}"
    assert "not at the verification time" in str(err.value)
    assert "--at" in str(err.value)
    assert isinstance(err.value, IncidentError)  # callers catching IncidentError still do

    chosen = then + 3600  # after every answer, within the certificate
    check = _check(b, platform, at=chosen)
    assert check.at_chosen
    assert check.checked_at == chosen
    assert "the time the checker chose" in check.summary()
    as_datetime = _check(b, platform, at=dt.datetime.fromtimestamp(chosen, dt.UTC))
    assert as_datetime.checked_at == pytest.approx(chosen)
    naive = dt.datetime.fromtimestamp(chosen, dt.UTC).replace(tzinfo=None)  # read as UTC
    assert _check(b, platform, at=naive).checked_at == pytest.approx(chosen)
    # a time after the certificate's end is refused like now
    with pytest.raises(AttestationExpired):
        _check(b, platform, at=then + 8 * DAY)


def test_a_document_backdated_under_an_expired_key_is_refused(
    platform: Platform, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Whoever holds the key of a boot whose certificate expired (leaked, or kept) can sign a
    document and answers today. Dated today, the document lies outside its own chain's
    validity; dated back to when the certificate was valid (what a check at the document's
    own time accepted), the chain is not valid at the verification time."""
    import enclave_sim.core

    # the holder has the key, not the platform: no renewed certificate
    monkeypatch.setattr(enclave_sim.core, "LEAF_RENEW_BEFORE", dt.timedelta.min)
    then = time.time() - 20 * DAY
    boot = platform.boot(then)  # its certificate: then to then + 7 days
    boot.now = time.time()  # the holder signs today, dated today
    dated_today = boot.attest()
    answers = boot.sign(4)
    with pytest.raises(AttestationTimeError) as err:
        _check(_forged(answers, boot.module_id, dated_today), platform)
    assert "outside its own certificate chain's validity" in str(err.value)

    doc, backdated = _run(boot, then + 3600)  # dated back
    with pytest.raises(AttestationExpired):
        _check(bundle(backdated, {boot.module_id: doc}), platform)


def _forged(answers: list[Any], module: str, doc: bytes) -> dict[str, Any]:
    """A bundle holding ``answers`` with ``doc``, whatever their dates: a forger's (the
    gateway's builder leaves out the answers its documents do not cover)."""
    b = bundle(answers, {module: doc})
    b["attestations"] = {module: _b64(doc)}
    b["answers"] = [
        {
            "request_id": a.request_id,
            "client": a.client,
            "module_id": module,
            "evidence": _b64(a.evidence),
            "rows": [int(r) for r in a.rows],
            "service": np.asarray(a.service, np.float64).tolist(),
            "detector": [float(x) for x in a.detector],
            "kl": [float(x) for x in a.kl],
            "excluded": {},
        }
        for a in answers
    ]
    return b


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def test_answers_outside_their_boot_attestation_validity_are_refused(
    platform: Platform,
) -> None:
    """A boot certified twice (a renewal): answers signed under the first certificate only,
    under both, and after the first expired. With both documents the bundle proves; without
    the document covering them, answers signed before the certificate's start or after its
    end are refused, named, and the gateway's builder leaves them out, counted."""
    now = time.time()
    boot = platform.boot(now - 8 * DAY)  # first certificate: to now - 1 day
    first, early = _run(boot, now - 8 * DAY + 600)
    boot.certify(now - 1.5 * DAY)  # renewed: now - 1.5 days to now + 5.5 days
    second, late = _run(boot, now - 0.5 * DAY)  # after the first certificate's end
    both = bundle(early + late, {boot.module_id: [first, second]})
    assert isinstance(both["attestations"][boot.module_id], list)
    assert both["answers_left_out"] == {"no_attestation": 0, "outside_attestation": 0}
    check = _check(both, platform)  # the second is current; the first dates the early ones
    assert check.requests == len(early) + len(late)

    only_first = copy.deepcopy(both)
    only_first["attestations"][boot.module_id] = both["attestations"][boot.module_id][0]
    with pytest.raises(AttestationExpired):  # the first alone is not current now
        _check(only_first, platform)
    at = now - 1.2 * DAY  # the first valid, the late answers not signed yet
    with pytest.raises(AttestationTimeError) as err:
        _check(only_first, platform, at=at)
    assert err.value.part.startswith(f"answer {len(early)} (request ")
    assert "outside its boot's attestation validity" in str(err.value)

    only_second = copy.deepcopy(both)
    only_second["attestations"][boot.module_id] = both["attestations"][boot.module_id][1]
    with pytest.raises(AttestationTimeError) as err:
        _check(only_second, platform)
    assert err.value.part.startswith("answer 0 (request ")
    assert "outside its boot's attestation validity" in str(err.value)
    built = bundle(early + late, {boot.module_id: second})
    assert built["answers_left_out"]["outside_attestation"] == len(early)
    assert len(built["answers"]) == len(late)

    # a document of another boot passed off as this boot's renewal
    other = platform.boot(now - 1.5 * DAY)
    stranger, _ = _run(other, now - DAY)
    mixed = copy.deepcopy(both)
    mixed["attestations"][boot.module_id] = [
        both["attestations"][boot.module_id][0],
        _b64(stranger),
    ]
    with pytest.raises(IncidentError) as err:
        _check(mixed, platform)
    assert err.value.part == f"attestation {boot.module_id}"


def test_nothing_may_be_dated_after_the_verification_time(platform: Platform) -> None:
    then = time.time() - 3 * DAY
    boot = platform.boot(then)  # certificate: then - 5 min to then + 7 days
    doc, answers = _run(boot, then + 3600)  # answers 1 to 3 minutes after the document
    b = bundle(answers, {boot.module_id: doc})
    # answers signed after the time named
    with pytest.raises(AttestationTimeError) as err:
        _check(b, platform, at=then + 3600 + 61)  # the second batch: 59 s after it (30 s skew)
    assert err.value.part.startswith("answer 3 (request ")
    assert "after the verification time" in str(err.value)
    # the document itself dated after it
    with pytest.raises(AttestationTimeError) as err:
        _check(b, platform, at=then + 1800)
    assert err.value.part == f"attestation {boot.module_id}"
    assert "after the verification time" in str(err.value)
    # a time before the chain was valid
    with pytest.raises(AttestationTimeError) as err:
        _check(b, platform, at=then - 3600)
    assert not isinstance(err.value, AttestationExpired)


def test_the_sdk_and_the_command_take_the_verification_time(
    platform: Platform, tmp_path: Path
) -> None:
    import json

    from rich.console import Console

    from fides.incident import IncidentCommandError, parse_time, verify_command
    from fides_client.incident import verify_incident

    then = time.time() - 30 * DAY
    boot = platform.boot(then)
    doc, answers = _run(boot, then + 600)
    b = bundle(answers, {boot.module_id: doc})
    measurement = platform.policy().expected_measurements
    pcr0 = next(iter(measurement)).hex()
    with pytest.raises(AttestationExpired):
        verify_incident(b, root=platform.root_pem, measurements=[pcr0], allow_simulated=True)
    ok = verify_incident(
        b, root=platform.root_pem, measurements=[pcr0], allow_simulated=True, at=then + 3600
    )
    assert ok.at_chosen

    path, root = tmp_path / "b.json", tmp_path / "root.pem"
    path.write_text(json.dumps(b))
    root.write_bytes(platform.root_pem)
    console = Console(width=400, record=True)
    kw: dict[str, Any] = {
        "root": root,
        "measurements": [pcr0],
        "repository": None,
        "model": None,
        "allow_simulated": True,
        "console": console,
    }
    assert not verify_command(path, **kw)
    assert "attestation expired" in console.export_text()
    iso = dt.datetime.fromtimestamp(then + 3600, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    assert verify_command(path, at=iso, **kw)
    assert "PROVEN" in console.export_text()
    assert parse_time(iso) == pytest.approx(int(then + 3600))
    assert parse_time(iso.removesuffix("Z")) == parse_time(iso)  # no zone: UTC
    assert parse_time("1700000000") == 1_700_000_000
    with pytest.raises(IncidentCommandError):
        parse_time("yesterday")

    # the command line: `fides incident verify --at`
    from typer.testing import CliRunner

    from fides.cli import app

    args = ["incident", "verify", str(path), "--root", str(root), "--measurement", pcr0]
    args.append("--allow-simulated")
    runner = CliRunner()
    expired = runner.invoke(app, args)
    assert expired.exit_code == 1, expired.output
    assert "attestation expired" in expired.output
    chosen = runner.invoke(app, [*args, "--at", iso])
    assert chosen.exit_code == 0, chosen.output
    bad = runner.invoke(app, [*args, "--at", "yesterday"])
    assert bad.exit_code == 2, bad.output
