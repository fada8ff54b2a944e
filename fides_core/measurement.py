"""Measurement: SHA-384 over the enclave's code, the verifier model and its configuration.

The analogue of SGX MRENCLAVE or Nitro PCR0-2, computed by the enclave at boot from the files it
runs and, offline, by ``fides enclave measure`` for a client's policy. Three registers, shaped
like Nitro PCRs (48 bytes each)::

    pcr1 = SHA384(CBOR(["fides-code/1", [[relative path, SHA384(file bytes)], ...sorted]]))
    pcr2 = SHA384(CBOR(["fides-model/1", SHA384(model bytes), SHA384(canonical config)]))
    pcr0 = SHA384(CBOR(["fides-measurement/1", pcr1, pcr2]))   # "the measurement"

Code = every ``*.py`` file of the packages the enclave process runs, ``enclave_sim`` (its
runtime) and ``fides_core`` (the formats and checks it shares with the gateway and clients),
``__pycache__`` excluded, so a modified code file changes pcr1 and pcr0. The paths are relative
to the source root (``enclave_sim/core.py``). Not measured (a real image would cover them): the
Python interpreter, numpy, onnxruntime and cryptography, and the bytecode actually loaded (files
are hashed from disk at boot).

The files hashed are those under ``CODE_ROOT``, the root this ``fides_core`` was imported from;
:func:`check_loaded_code` refuses a boot where a module of either package was imported from
anywhere else (an ``enclave_sim/`` shadowing the measured one on ``sys.path``), so the code
measured and the code running are one tree.
"""

from __future__ import annotations

import hashlib
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import cbor2

from fides_core.enclave_config import EnclaveModelConfig
from fides_core.enclave_errors import BootError

CODE_ROOT = Path(__file__).resolve().parents[1]  # the source root: <root>/<package>/*.py
MEASURED_PACKAGES = ("enclave_sim", "fides_core")
DIGEST_SIZE = 48


def sha384(data: bytes) -> bytes:
    return hashlib.sha384(data).digest()


def code_files(root: Path = CODE_ROOT) -> list[Path]:
    """The measured code files, sorted by their path relative to ``root``."""
    files = [
        p
        for package in MEASURED_PACKAGES
        for p in (root / package).rglob("*.py")
        if "__pycache__" not in p.relative_to(root).parts
    ]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


class CodeNotMeasured(BootError):
    """A module of a measured package was loaded from outside the measured files: the
    measurement would describe other code than the code that runs."""

    code = "code_not_measured"


def check_loaded_code(
    root: Path = CODE_ROOT, modules: Mapping[str, ModuleType | None] | None = None
) -> None:
    """Refuse (:class:`CodeNotMeasured`) unless every loaded module of ``MEASURED_PACKAGES``
    is one of the measured files under ``root`` and every such package's ``__path__`` lies
    under ``root``, so that a submodule imported later comes from the same tree. ``modules``
    defaults to ``sys.modules``. Run by the enclave at boot, before it measures."""
    measured = {p.resolve() for p in code_files(root)}
    roots = {(root / package).resolve() for package in MEASURED_PACKAGES}
    loaded = sys.modules if modules is None else modules
    for key, module in sorted(loaded.items()):
        spec = getattr(module, "__spec__", None)
        # ``python -m enclave_sim.cli`` runs that module as __main__
        name = spec.name if key == "__main__" and spec is not None else key
        if name.split(".")[0] not in MEASURED_PACKAGES or module is None:
            continue
        file = getattr(module, "__file__", None)
        if not isinstance(file, str) or Path(file).resolve() not in measured:
            raise CodeNotMeasured(
                f"module {name} was loaded from {file or 'no file'}, not from the measured code "
                f"under {root}: refusing to boot (an {name.split('.')[0]}/ earlier on sys.path "
                "shadows the measured one; start the enclave with `python -I` from the "
                "installed tree)"
            )
        for entry in getattr(module, "__path__", None) or ():
            path = Path(entry).resolve()
            if not any(path == r or r in path.parents for r in roots):
                raise CodeNotMeasured(
                    f"package {name} searches {entry} for its modules, outside the measured "
                    f"code under {root}: refusing to boot"
                )


def code_digest(root: Path = CODE_ROOT) -> bytes:
    entries = [[p.relative_to(root).as_posix(), sha384(p.read_bytes())] for p in code_files(root)]
    return sha384(cbor2.dumps(["fides-code/1", entries]))


def model_digest(model: bytes, config: EnclaveModelConfig) -> bytes:
    return sha384(cbor2.dumps(["fides-model/1", sha384(model), sha384(config.canonical_bytes())]))


def combine(pcr1: bytes, pcr2: bytes) -> bytes:
    return sha384(cbor2.dumps(["fides-measurement/1", pcr1, pcr2]))


@dataclass(frozen=True)
class Measurement:
    pcr0: bytes  # the measurement a policy pins
    pcr1: bytes  # enclave code
    pcr2: bytes  # verifier model and config

    @property
    def value(self) -> bytes:
        return self.pcr0

    @property
    def hex(self) -> str:
        return self.pcr0.hex()

    def pcrs(self) -> dict[int, bytes]:
        return {0: self.pcr0, 1: self.pcr1, 2: self.pcr2}

    @classmethod
    def from_parts(cls, pcr1: bytes, pcr2: bytes) -> Measurement:
        return cls(combine(pcr1, pcr2), pcr1, pcr2)


def measure(model: bytes, config: EnclaveModelConfig, code_root: Path = CODE_ROOT) -> Measurement:
    """The expected measurement of an enclave running ``model`` with ``config``."""
    return Measurement.from_parts(code_digest(code_root), model_digest(model, config))
