"""``fides incident export`` and ``fides incident verify``: fetch the incident bundle of an
integrity alarm from a gateway (admin routes), and check one offline with the SDK
(:func:`fides_client.incident.verify_incident`)."""

from __future__ import annotations

import datetime as dt
import json
import math
import os
from pathlib import Path
from typing import Any

import httpx
from rich.console import Console

__all__ = ["IncidentCommandError", "export_incident", "parse_time", "verify_command"]

ADMIN_KEY_ENV = "FIDES_ADMIN_KEY"


class IncidentCommandError(Exception):
    """The command could not do its job (gateway unreachable, refused, nothing to export)."""


def parse_time(text: str) -> float:
    """``--at``: an ISO 8601 time (``2026-12-07T10:00:00Z``; without a zone it is UTC) or
    seconds since 1970 -> seconds since 1970."""
    value = text.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = dt.datetime.fromisoformat(value.replace("Z", "+00:00").replace("z", "+00:00"))
        except ValueError:
            raise IncidentCommandError(
                f"--at {text!r} is neither an ISO 8601 time (2026-12-07T10:00:00Z) nor seconds "
                "since 1970"
            ) from None
        if when.tzinfo is None:
            when = when.replace(tzinfo=dt.UTC)
        seconds = when.timestamp()
    if not math.isfinite(seconds):
        raise IncidentCommandError(f"--at {text!r} is not a time")
    return seconds


def _get(client: httpx.Client, path: str) -> Any:
    try:
        r = client.get(path)
    except httpx.HTTPError as exc:
        raise IncidentCommandError(
            f"the gateway at {client.base_url} did not answer: {exc}"
        ) from None
    if r.status_code != 200:
        try:
            message = r.json().get("error", r.text)
        except ValueError:
            message = r.text
        hint = f" (is {ADMIN_KEY_ENV} an admin key?)" if r.status_code in (401, 403) else ""
        raise IncidentCommandError(f"GET {path}: HTTP {r.status_code}: {message}{hint}")
    return r.json()


def export_incident(
    model: str,
    incident_id: str | None,
    *,
    url: str,
    out: Path | None,
    list_only: bool,
    console: Console,
) -> Path | None:
    key = os.environ.get(ADMIN_KEY_ENV)
    headers = {"X-API-Key": key} if key else {}
    base = f"/v2/admin/models/{model}/integrity/incidents"
    with httpx.Client(base_url=url, headers=headers, timeout=30.0) as client:
        listed = _get(client, base)["incidents"]
        if list_only:
            for inc in listed:
                console.print(
                    f"{inc['id']}  {inc['scope']:<5} {inc.get('client') or '':<16} "
                    f"{inc['requests']:>5} requests  raised {inc['raised_at']}"
                )
            if not listed:
                console.print(f"no incidents kept for {model}")
            return None
        if incident_id is None:
            if not listed:
                raise IncidentCommandError(f"no incidents kept for {model}: no alarm has fired")
            incident_id = listed[-1]["id"]
        bundle = _get(client, f"{base}/{incident_id}")
    path = out or Path(f"{incident_id}.incident.json")
    path.write_text(json.dumps(bundle, indent=1))
    console.print(
        f"incident {incident_id} of {model}: {len(bundle.get('answers', []))} signed requests "
        f"-> {path}"
    )
    return path


def verify_command(
    bundle_path: Path,
    *,
    root: Path,
    measurements: list[str],
    repository: Path | None,
    model: str | None,
    allow_simulated: bool,
    console: Console,
    max_alpha: float = 1e-5,
    at: str | float | None = None,
) -> bool:
    """``at``: the verification time (``--at``: ISO 8601 or seconds since 1970), default now;
    every attestation's certificates must be valid then (an auditor re-checking an old bundle
    names a time at which they trust the chain)."""
    from fides_client.client import IntegrityModels
    from fides_client.incident import load_bundle, verify_incident
    from fides_core.incident import AttestationExpired, IncidentError

    try:
        bundle = load_bundle(bundle_path)
    except IncidentError as exc:
        console.print(f"[red]NOT PROVEN[/red] ({exc.part}): {exc}")
        return False
    models = None
    if repository is not None:
        name = model or bundle.get("model")
        if not isinstance(name, str):
            raise IncidentCommandError("name the model with --model (the bundle names none)")
        try:
            models = IntegrityModels.from_repository(repository, name)
        except (OSError, ValueError) as exc:
            raise IncidentCommandError(f"cannot read {repository}/{name}: {exc}") from None
        if models.measurement and models.measurement not in measurements:
            measurements = [*measurements, models.measurement]
    if not measurements:
        raise IncidentCommandError("give --measurement or --repository (the verifier to measure)")
    at_s = parse_time(at) if isinstance(at, str) else at
    try:
        root_pem = root.read_bytes()
    except OSError as exc:
        raise IncidentCommandError(f"cannot read the root certificate {root}: {exc}") from None
    try:
        check = verify_incident(
            bundle,
            root=root_pem,
            measurements=measurements,
            max_alpha=max_alpha,
            allow_simulated=allow_simulated,
            models=models,
            at=at_s,
        )
    except AttestationExpired as exc:
        console.print(f"[red]NOT PROVEN[/red] ({exc.part}, attestation expired): {exc}")
        return False
    except IncidentError as exc:
        console.print(f"[red]NOT PROVEN[/red] ({exc.part}): {exc}")
        return False
    console.print(f"[green]PROVEN[/green]: {check.summary()}")
    return True
