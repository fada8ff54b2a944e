"""The leaf every other package builds on: formats, protocols and checks that the gateway, the
simulated enclave, the client SDK and the training code share, and nothing else.

- the enclave boundary: the verify call (:mod:`~fides_core.verify`), its frames
  (:mod:`~fides_core.enclave_wire`), wire tensors and their digests (:mod:`~fides_core.tensors`),
  the evidence formats (:mod:`~fides_core.evidence`, :mod:`~fides_core.cose`), the client-side
  checks (:mod:`~fides_core.attestation`), the measurement (:mod:`~fides_core.measurement`) and
  the verifier's sealed config (:mod:`~fides_core.enclave_config`), with their error codes
  (:mod:`~fides_core.enclave_errors`);
- the Open Inference Protocol's datatypes and tensor codec (:mod:`~fides_core.oip`);
- the integrity vocabulary: pair-model tensor names and the verdict rule
  (:mod:`~fides_core.integrity`), the output attacks (:mod:`~fides_core.attacks`), the
  substitution statistics (:mod:`~fides_core.stats`).

It imports nothing of the project; `make lint` holds that (import-linter, pyproject.toml).
"""
