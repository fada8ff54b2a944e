"""Fides integrity verification in the gateway.

For a model whose ``config.yaml`` has an ``integrity:`` block, each verified request runs the
service model and the enclave's verifier concurrently; the attack detector and re-classifier
(pair models in the same repository) then decide the verdict. See :mod:`.pipeline`.
"""
