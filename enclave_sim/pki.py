"""The simulated platform: a root CA, a platform key it certifies, and per-boot leaf certificates.

Chain, as on AWS Nitro (root -> ... -> per-enclave certificate)::

    root CA (self-signed, P-384)        root.pem      <- clients pin this certificate
      `- platform CA (P-384, pathlen 0) platform.pem  <- stands in for the hypervisor / NSM
           `- per-boot leaf (P-384)     in each attestation document's ``certificate``

``fides enclave init-ca`` writes the platform directory::

    root.pem, root.key         the root (the key can be moved offline: the enclave never reads it)
    platform.pem, platform.key the platform CA that issues a leaf at each enclave boot
    platform_secret            32 random bytes, the simulated fuse key that sealing derives from
    model_counter              the rollback counter (see enclave_sim.sealing)

Every secret file is created 0600 and refused if group or others can read it. SIMULATED: these
keys sit on the host's disk; real hardware keeps them in fuses and firmware.
"""

from __future__ import annotations

import datetime as dt
import os
import secrets
import stat
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from fides_core.enclave_errors import PlatformError

ROOT_CERT = "root.pem"
ROOT_KEY = "root.key"
PLATFORM_CERT = "platform.pem"
PLATFORM_KEY = "platform.key"
PLATFORM_SECRET = "platform_secret"
SECRET_SIZE = 32
CA_VALIDITY = dt.timedelta(days=3650)
LEAF_VALIDITY = dt.timedelta(days=7)
CLOCK_SLACK = dt.timedelta(minutes=5)  # certificates start a little in the past
CURVE = ec.SECP384R1()  # the CA, platform and per-boot leaf keys (ES384, as Nitro)
# The per-boot key that signs verification results: on every verified answer's path, where
# ES256 signs about 4x and verifies about 5x faster than ES384 (docs/enclave.md).
RESULT_CURVE = ec.SECP256R1()


@dataclass(frozen=True)
class PlatformIdentity:
    """What the enclave holds: the platform CA (to issue its leaf) and the root's certificate."""

    platform_key: ec.EllipticCurvePrivateKey
    platform_cert: x509.Certificate
    root_cert: x509.Certificate

    @property
    def cabundle(self) -> list[bytes]:
        """DER certificates from the root down to the leaf's issuer (Nitro's order)."""
        return [
            self.root_cert.public_bytes(serialization.Encoding.DER),
            self.platform_cert.public_bytes(serialization.Encoding.DER),
        ]

    @property
    def root_pem(self) -> bytes:
        return self.root_cert.public_bytes(serialization.Encoding.PEM)


def new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(CURVE)


def new_result_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(RESULT_CURVE)


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Fides Gateway (SIMULATED TEE)"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _ca_usage() -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=False,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=True,
        crl_sign=True,
        encipher_only=False,
        decipher_only=False,
    )


def _issue(
    subject: str,
    public_key: ec.EllipticCurvePublicKey,
    issuer_key: ec.EllipticCurvePrivateKey,
    issuer_name: x509.Name | None,
    *,
    ca_pathlen: int | None,
    validity: dt.timedelta,
    now: dt.datetime | None = None,
) -> x509.Certificate:
    """A certificate; ``ca_pathlen`` None makes a leaf that may only sign (no CA)."""
    now = now or dt.datetime.now(dt.UTC)
    name = _name(subject)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer_name or name)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SLACK)
        .not_valid_after(now + validity)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
    )
    if ca_pathlen is None:
        builder = builder.add_extension(
            x509.BasicConstraints(ca=False, path_length=None), critical=True
        ).add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
    else:
        builder = builder.add_extension(
            x509.BasicConstraints(ca=True, path_length=ca_pathlen), critical=True
        ).add_extension(_ca_usage(), critical=True)
    return builder.sign(issuer_key, hashes.SHA384())


def create_root(
    common_name: str = "Fides Simulated Root CA (SIMULATED, NOT A REAL TEE)",
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = new_key()
    cert = _issue(common_name, key.public_key(), key, None, ca_pathlen=1, validity=CA_VALIDITY)
    return key, cert


def create_platform(
    root_key: ec.EllipticCurvePrivateKey, root_cert: x509.Certificate
) -> PlatformIdentity:
    key = new_key()
    cert = _issue(
        "Fides Simulated Platform CA (SIMULATED)",
        key.public_key(),
        root_key,
        root_cert.subject,
        ca_pathlen=0,
        validity=CA_VALIDITY,
    )
    return PlatformIdentity(key, cert, root_cert)


def create_identity() -> tuple[ec.EllipticCurvePrivateKey, PlatformIdentity]:
    """A fresh in-memory root and platform (for the in-process fake and tests)."""
    root_key, root_cert = create_root()
    return root_key, create_platform(root_key, root_cert)


def issue_leaf(
    identity: PlatformIdentity, public_key: ec.EllipticCurvePublicKey, module_id: str
) -> x509.Certificate:
    """The per-boot certificate for the key that signs attestation documents."""
    return _issue(
        module_id,
        public_key,
        identity.platform_key,
        identity.platform_cert.subject,
        ca_pathlen=None,
        validity=LEAF_VALIDITY,
    )


# -- files -------------------------------------------------------------------------------


def write_secret_file(path: Path, data: bytes) -> None:
    """Create ``path`` with mode 0600 from the start (never readable by others, even briefly)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, data)
    finally:
        os.close(fd)


def read_secret_file(path: Path) -> bytes:
    try:
        st = path.stat()
    except FileNotFoundError:
        raise PlatformError(
            f"{path} is missing; create the simulated platform with `fides enclave init-ca`"
        ) from None
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise PlatformError(
            f"{path} is accessible by group or others (mode {stat.S_IMODE(st.st_mode):o}); "
            "it must be 0600"
        )
    return path.read_bytes()


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def init_ca(platform_dir: Path, *, force: bool = False) -> list[Path]:
    """Create the simulated root CA, platform CA and platform secret in ``platform_dir``."""
    platform_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    names = (ROOT_CERT, ROOT_KEY, PLATFORM_CERT, PLATFORM_KEY, PLATFORM_SECRET)
    existing = [n for n in names if (platform_dir / n).exists()]
    if existing and not force:
        raise PlatformError(
            f"{platform_dir} already holds {', '.join(existing)}; use --force to replace them "
            "(every sealed model and pinned root becomes invalid)"
        )
    root_key, identity = create_identity()
    write_secret_file(platform_dir / ROOT_KEY, _key_pem(root_key))
    write_secret_file(platform_dir / PLATFORM_KEY, _key_pem(identity.platform_key))
    write_secret_file(platform_dir / PLATFORM_SECRET, secrets.token_bytes(SECRET_SIZE))
    (platform_dir / ROOT_CERT).write_bytes(identity.root_pem)
    (platform_dir / PLATFORM_CERT).write_bytes(
        identity.platform_cert.public_bytes(serialization.Encoding.PEM)
    )
    return [platform_dir / n for n in names]


def load_identity(platform_dir: Path) -> PlatformIdentity:
    """The platform CA and root certificate; checks the platform CA chains to the root."""
    try:
        root_cert = x509.load_pem_x509_certificate((platform_dir / ROOT_CERT).read_bytes())
        platform_cert = x509.load_pem_x509_certificate((platform_dir / PLATFORM_CERT).read_bytes())
    except FileNotFoundError as exc:
        raise PlatformError(
            f"{exc.filename} is missing; create the platform with `fides enclave init-ca`"
        ) from None
    except ValueError as exc:
        raise PlatformError(f"bad certificate in {platform_dir}: {exc}") from None
    key = serialization.load_pem_private_key(
        read_secret_file(platform_dir / PLATFORM_KEY), password=None
    )
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise PlatformError(f"{platform_dir / PLATFORM_KEY} is not an EC private key")
    try:
        platform_cert.verify_directly_issued_by(root_cert)
    except Exception as exc:
        raise PlatformError(f"{PLATFORM_CERT} is not issued by {ROOT_CERT}: {exc}") from None
    if platform_cert.public_key() != key.public_key():
        raise PlatformError(f"{PLATFORM_KEY} does not match {PLATFORM_CERT}")
    return PlatformIdentity(key, platform_cert, root_cert)


def load_platform_secret(platform_dir: Path) -> bytes:
    secret = read_secret_file(platform_dir / PLATFORM_SECRET)
    if len(secret) != SECRET_SIZE:
        raise PlatformError(f"{platform_dir / PLATFORM_SECRET} must hold {SECRET_SIZE} bytes")
    return secret
