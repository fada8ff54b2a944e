"""Offline check of an incident bundle (issue 21): does this bundle prove the alarm?

A gateway whose sequential alarm fires keeps a ``fides-incident/2`` bundle (``fides incident
export`` fetches it). :func:`verify_incident` checks it here, trusting only the pinned root,
the expected measurements and, when given, the provider's published integrity models
(:class:`~fides_client.client.IntegrityModels`): every attestation, every signed verifier
output, KL recomputed from the signed outputs, the detector scores recomputed with the
published detector, the calibration compared with the detector's card, and the statistic
recomputed to the alarm threshold. Each enclave boot needs a document whose certificates are
valid at the verification time (now, or ``at`` for an auditor re-checking an old bundle) and
every answer signed within its boot's attestation validity; the requests the gateway says it
left out of the bundle are reported (``IncidentCheck.left_out``, its word). What it proves
and what it does not: :mod:`fides_core.incident`. Needs scipy (the calibration's Beta bounds).
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from fides_client.client import IntegrityModels, _card, _LocalDetector
from fides_core.attestation import Policy, load_root

__all__ = ["load_bundle", "verify_incident"]


def load_bundle(source: Mapping[str, Any] | str | bytes | Path) -> Mapping[str, Any]:
    """A bundle from a dict, a JSON text or bytes, or a file."""
    from fides_core.incident import IncidentError

    if isinstance(source, Mapping):
        return source
    try:
        raw = source.read_bytes() if isinstance(source, Path) else source
        bundle = json.loads(raw)
    except OSError as exc:
        raise IncidentError("format", f"cannot read the bundle: {exc}") from None
    except ValueError as exc:
        raise IncidentError("format", f"the bundle is not JSON (truncated?): {exc}") from None
    if not isinstance(bundle, dict):
        raise IncidentError("format", "the bundle is not a JSON object")
    return bundle


def verify_incident(
    source: Mapping[str, Any] | str | bytes | Path,
    *,
    root: bytes | str | Path,
    measurements: Iterable[str | bytes],
    allow_simulated: bool,
    models: IntegrityModels | None = None,
    max_alpha: float = 1e-5,
    at: float | dt.datetime | None = None,
) -> Any:
    """Check an incident bundle offline; returns :class:`fides_core.incident.IncidentCheck`
    or raises :class:`fides_core.incident.IncidentError` naming the broken part.

    ``models``: the provider's published integrity models. With them the detector scores are
    recomputed and the calibration must be the detector card's; without them both are taken
    from the bundle (the check says so). ``max_alpha``: the loosest false-alarm level
    accepted (the gateway's default); a bundle computed at a looser one is refused.

    ``at``: the verification time (seconds since 1970, or a datetime; naive is UTC), default
    now: a certificate chain of each boot's documents must be valid then. A bundle older
    than its certificates' lifetime is refused now
    (:class:`fides_core.incident.AttestationExpired`); naming an earlier time at which you
    trust the chain re-checks it as of then."""
    try:
        from fides_core.incident import IncidentError, check_incident
    except ImportError as exc:  # pragma: no cover - the server extra always has scipy
        raise ImportError(f"checking an incident bundle needs scipy ({exc})") from None

    if not isinstance(allow_simulated, bool):
        raise TypeError("allow_simulated must be True or False, said explicitly")
    if isinstance(measurements, str | bytes):
        measurements = (measurements,)
    policy = Policy.of(*measurements, allow_simulated=allow_simulated)
    pinned = load_root(Path(root).read_bytes() if isinstance(root, Path) else root)
    bundle = load_bundle(source)
    score_fn = None
    calibration = None
    if models is not None:
        if bundle.get("verifier_output") not in (None, models.verifier_output):
            raise IncidentError(
                "format",
                f"the bundle's verifier output {bundle.get('verifier_output')!r} is not the "
                f"published models' {models.verifier_output!r}",
            )
        local = _LocalDetector(models)
        card = _card(models.detector)
        if "calibration_scores" not in card or "calibration_kl" not in card:
            raise IncidentError("calibration", "the detector card has no clean calibration")
        calibration = (
            np.asarray(card["calibration_scores"], np.float64),
            np.asarray(card["calibration_kl"], np.float64),
        )
        score_fn = local.scores
    return check_incident(
        bundle,
        root=pinned,
        policy=policy,
        detector_scores=score_fn,
        calibration=calibration,
        max_alpha=max_alpha,
        at=at,
    )
