"""Evidence formats: the attestation document and the signed verification result.

Attestation document: a COSE_Sign1 (ES384, by the per-boot leaf key) over a CBOR map shaped
like an AWS Nitro Enclaves attestation document, plus simulation markers::

    module_id    "sim-<16 hex>"          per boot; the "sim-" prefix marks simulation
    timestamp    uint, ms since epoch
    digest       "SHA384"
    pcrs         {0: measurement, 1: code, 2: model+config}   48 bytes each
    certificate  DER of the per-boot leaf (its key signs this document)
    cabundle     [root DER, platform CA DER]                  root first, as Nitro
    public_key   DER SubjectPublicKeyInfo of the per-boot key that signs verification results
    user_data    bytes or null (<= 512)
    nonce        bytes (the verifier's challenge, 8..512)
    simulated    true                    never set by real hardware
    fides        {"protocol": 1, "model_version", "memory_budget_bytes",
                  "model_footprint_bytes", "paging", "transition_us"}

Verification result: one COSE_Sign1 per batch (ES256, by the P-256 key in ``public_key``; ES384
by a P-384 key in evidence from before issue 25, still accepted) over::

    {"type": "fides-verification/1", "module_id", "measurement": pcr0, "seq", "timestamp",
     "count": n requests, "root": Merkle root (32 bytes), "simulated": true}

Each request is a Merkle leaf, so that one signature covers a batch of 32 while each client
gets only its own entry and a proof (other clients' outputs stay private)::

    entry = {"index": i, "id": request id, "nonce": bytes,
             "inputs": {name: SHA-256 of canonical tensor bytes}, "outputs": {name: tensor}}
    leaf  = SHA-256(0x00 || CBOR_canonical(entry))
    node  = SHA-256(0x01 || left || right)    an odd node at the end of a level moves up as is

Per-request evidence (what ``integrity_evidence`` carries, base64)::

    {"v": 1, "result": COSE_Sign1 bytes, "entry": entry, "proof": [sibling hashes, bottom up]}
"""

from __future__ import annotations

import hashlib
from typing import Any

import cbor2

EVIDENCE_VERSION = 1
RESULT_TYPE = "fides-verification/1"
MAX_NONCE = 512
MIN_NONCE = 8
MAX_USER_DATA = 512


def leaf_hash(entry: dict[str, Any]) -> bytes:
    return hashlib.sha256(b"\x00" + cbor2.dumps(entry, canonical=True)).digest()


def _node(left: bytes, right: bytes) -> bytes:
    return hashlib.sha256(b"\x01" + left + right).digest()


def merkle_tree(leaves: list[bytes]) -> tuple[bytes, list[list[bytes]]]:
    """The root and, for each leaf, its proof (sibling hashes, bottom up)."""
    if not leaves:
        raise ValueError("a Merkle tree needs at least one leaf")
    proofs: list[list[bytes]] = [[] for _ in leaves]
    positions = list(range(len(leaves)))  # leaf -> index in the current level
    level = list(leaves)
    while len(level) > 1:
        for leaf, pos in enumerate(positions):
            sibling = pos ^ 1
            if sibling < len(level):
                proofs[leaf].append(level[sibling])
            positions[leaf] = pos // 2
        level = [
            _node(level[i], level[i + 1]) if i + 1 < len(level) else level[i]
            for i in range(0, len(level), 2)
        ]
    return level[0], proofs


def merkle_root_from_proof(leaf: bytes, index: int, count: int, proof: list[bytes]) -> bytes:
    """The root that ``leaf`` at ``index`` of ``count`` leaves and ``proof`` lead to."""
    if not 0 <= index < count:
        raise ValueError(f"leaf index {index} outside 0..{count - 1}")
    node, pos, size, used = leaf, index, count, 0
    while size > 1:
        sibling = pos ^ 1
        if sibling < size:
            if used >= len(proof):
                raise ValueError("Merkle proof too short")
            other = proof[used]
            used += 1
            node = _node(other, node) if pos & 1 else _node(node, other)
        pos, size = pos // 2, (size + 1) // 2
    if used != len(proof):
        raise ValueError("Merkle proof too long")
    return node
