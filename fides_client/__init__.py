"""The client SDK: talk to a Fides gateway without trusting it.

``FidesClient`` (and ``AsyncFidesClient``) does its own attestation handshake, binds each
request to its own nonce and id, checks the enclave-signed evidence, and runs the detector,
re-classifier and novelty check itself; see :mod:`fides_client.client`. It needs neither torch,
transformers nor onnxruntime (``pip install fides-gateway`` installs just this and the shared
:mod:`fides_core`; onnxruntime, when present, runs the detector faster).
"""

from fides_client.client import (
    AsyncFidesClient,
    CheckedInference,
    FidesClient,
    FidesClientError,
    FidesHTTPError,
    FidesTransportError,
    IntegrityModels,
)
from fides_client.incident import verify_incident
from fides_core.integrity import Verdict

__all__ = [
    "AsyncFidesClient",
    "CheckedInference",
    "FidesClient",
    "FidesClientError",
    "FidesHTTPError",
    "FidesTransportError",
    "IntegrityModels",
    "Verdict",
    "verify_incident",
]
