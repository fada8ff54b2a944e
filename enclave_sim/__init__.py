"""Simulated trusted execution module (its own process, measurement, sealing, attestation).
Filled by the enclave issue."""
