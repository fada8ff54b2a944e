"""Simulated trusted execution module: SIMULATED, it protects nothing (see README.md here).

The enclave is its own process behind a Unix socket (:mod:`enclave_sim.server`,
:mod:`fides_core.enclave_wire`). At boot it measures its code, verifier model and config
(:mod:`fides_core.measurement`) and opens a verifier sealed for that measurement
(:mod:`enclave_sim.sealing`). It answers attestation challenges with Nitro-shaped COSE_Sign1
evidence chained to a simulated root CA (:mod:`enclave_sim.pki`, :mod:`fides_core.evidence`),
and it runs the verifier and signs results bound to the exact inputs (:mod:`enclave_sim.core`).
Relying parties check all of it with :mod:`fides_core.attestation`. The command line is
``fides enclave {init-ca, measure, seal, run}`` (:mod:`enclave_sim.cli`).
"""

import os as _os

# onnxruntime's telemetry writes a device id and an event database under ~/.cache (XDG cache)
# at import: a server process writes only where its settings point (a read-only container
# root), so it is off unless the environment says otherwise.
_os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
