"""A kit for incident-bundle tests that need times of their own: an enclave boot (a real
:class:`enclave_sim.core.EnclaveCore` on a tiny verifier) whose clock and certificate the test
sets, answers it signs that drive the alarm (a service far from the signed verifier output,
high detector scores), and the bundle over them. The time checks of
:func:`fides_core.incident.check_incident` are then tested on real signatures and chains."""

from __future__ import annotations

import datetime as dt
import secrets
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from enclave_sim import pki
from enclave_sim.core import EnclaveCore
from fides_core.attestation import Policy
from fides_core.enclave_config import EnclaveModelConfig
from fides_core.incident import IncidentAnswer, build_bundle
from fides_core.measurement import measure
from fides_core.stats import kl_divergence
from fides_core.verify import VerifiedItem, VerifyRequest
from tests.model_factory import tiny_classifier

OUTPUT = "probabilities"
DAY = 86_400.0
ALPHA = 1e-5
DELTA = 1e-5
RNG = np.random.default_rng(0)
# clean calibration: detector scores well below the attacked answers' 0.999, KL spread
CAL_SCORES = RNG.uniform(0.0, 0.6, 2000)
CAL_KL = RNG.exponential(0.05, 2000)


class Boot:
    """One enclave boot of the simulated platform ``identity``: ``now`` is its clock (the
    dates of its documents and signed batches); :meth:`certify` issues its per-boot
    certificate as of a time (its validity: 5 minutes before, to 7 days after)."""

    def __init__(self, model: bytes, identity: pki.PlatformIdentity, *, issued_at: float) -> None:
        config = EnclaveModelConfig(outputs=(OUTPUT,), max_batch_size=64)
        self.now = issued_at
        self.identity = identity
        self.core = EnclaveCore(
            model, config, measure(model, config), identity, clock=lambda: self.now
        )
        self.certify(issued_at)

    @property
    def module_id(self) -> str:
        return self.core.module_id

    def certify(self, at: float) -> None:
        """A per-boot certificate issued at ``at`` (the platform's doing: a renewal)."""
        self.core._leaf = pki._issue(
            self.module_id,
            self.core._attestation_key.public_key(),
            self.identity.platform_key,
            self.identity.platform_cert.subject,
            ca_pathlen=None,
            validity=pki.LEAF_VALIDITY,
            now=dt.datetime.fromtimestamp(at, dt.UTC),
        )

    def attest(self) -> bytes:
        return self.core.attest(secrets.token_bytes(32))

    def sign(self, requests: int, *, client: str = "key-000000000000") -> list[IncidentAnswer]:
        """One signed batch of ``requests`` requests (two rows each), as the gateway records
        them: every row fed, the service's answer the verifier's least likely class."""
        reqs = [
            VerifyRequest(
                f"r{i}", secrets.token_bytes(16), {"input": RNG.normal(size=(2, 4)).astype("f4")}
            )
            for i in range(requests)
        ]
        out = []
        for item in self.core.verify(reqs).items:
            assert isinstance(item, VerifiedItem)
            q = np.asarray(item.outputs[OUTPUT], np.float32)
            p = np.full_like(q, 0.01)
            p[np.arange(len(q)), q.argmin(axis=1)] = 0.98
            out.append(
                IncidentAnswer(
                    item.id,
                    client,
                    item.evidence,
                    np.arange(len(q)),
                    p,
                    np.full(len(q), 0.999),
                    kl_divergence(p, q),
                )
            )
        return out


class Platform:
    """The simulated platform (a fresh root, issued a year ago) and its boots, on a tiny
    verifier."""

    def __init__(self, tmp_path: Path) -> None:
        path = tmp_path / "tiny.onnx"
        tiny_classifier(path)
        self.model = path.read_bytes()
        # the root and platform CA issued a year ago (valid ten years): boots may be dated
        # back within that
        when = dt.datetime.now(dt.UTC) - dt.timedelta(days=365)
        root_key, platform_key = pki.new_key(), pki.new_key()
        root = pki._issue(
            "Fides Simulated Root CA (SIMULATED, NOT A REAL TEE)",
            root_key.public_key(),
            root_key,
            None,
            ca_pathlen=1,
            validity=pki.CA_VALIDITY,
            now=when,
        )
        platform = pki._issue(
            "Fides Simulated Platform CA (SIMULATED)",
            platform_key.public_key(),
            root_key,
            root.subject,
            ca_pathlen=0,
            validity=pki.CA_VALIDITY,
            now=when,
        )
        self.identity = pki.PlatformIdentity(platform_key, platform, root)

    @property
    def root_pem(self) -> bytes:
        return self.identity.root_pem

    def boot(self, issued_at: float) -> Boot:
        return Boot(self.model, self.identity, issued_at=issued_at)

    def policy(self) -> Policy:
        config = EnclaveModelConfig(outputs=(OUTPUT,), max_batch_size=64)
        return Policy.of(measure(self.model, config).pcr0, allow_simulated=True)


def bundle(
    answers: Sequence[IncidentAnswer],
    attestations: dict[str, bytes | list[bytes]],
    *,
    scope: str = "model",
    client: str | None = None,
) -> dict[str, Any]:
    return build_bundle(
        model="tiny",
        scope=scope,
        client=client,
        raised_at=dt.datetime.now(dt.UTC).isoformat(),
        verifier_output=OUTPUT,
        detector_threshold=0.9,
        calibration_scores=CAL_SCORES,
        calibration_kl=CAL_KL,
        alpha=ALPHA,
        delta=DELTA,
        attestations=attestations,
        answers=answers,
        live={},
    )
