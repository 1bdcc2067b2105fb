"""Fabric client identities: an MSP ID, an X.509 certificate and, to sign, its P-256 private key.

Signatures follow the official fabric-gateway clients (``identity/ecdsa.go``): ECDSA over the
SHA-256 of the message, DER-encoded, with S normalised to the lower half of the curve order,
since Fabric rejects high-S signatures as malleable.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature, encode_dss_signature

from clinfed.errors import ConfigError

# Orders of the curves Fabric's ECDSA identities use.
_CURVE_ORDERS = {
    "secp256r1": 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551,
    "secp384r1": int("FFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFF"
                     "C7634D81F4372DDF581A0DB248B0A77AECEC196ACCC52973", 16),
}


def curve_order(key: ec.EllipticCurvePrivateKey | ec.EllipticCurvePublicKey) -> int:
    try:
        return _CURVE_ORDERS[key.curve.name]
    except KeyError:
        raise ConfigError(f"unsupported curve {key.curve.name}; Fabric identities use P-256 or P-384") from None


def to_low_s(signature: bytes, order: int) -> bytes:
    """The same DER ECDSA signature with S in the lower half of the curve order ((r, n-s) is
    equally valid, and Fabric accepts only the low form)."""
    r, s = decode_dss_signature(signature)
    return encode_dss_signature(r, order - s) if s > order // 2 else signature


def sign_low_s(key: ec.EllipticCurvePrivateKey, message: bytes) -> bytes:
    """DER ECDSA signature of sha256(message) with S <= n/2."""
    return to_low_s(key.sign(message, ec.ECDSA(hashes.SHA256())), curve_order(key))


@dataclass(frozen=True)
class Identity:
    """Who a transaction comes from: ``creator`` is the serialized ``msp.SerializedIdentity``."""

    msp_id: str
    certificate_pem: bytes

    @property
    def creator(self) -> bytes:
        from fabric_protos.msp import identities_pb2

        return identities_pb2.SerializedIdentity(mspid=self.msp_id, id_bytes=self.certificate_pem).SerializeToString()


@dataclass(frozen=True)
class SigningIdentity(Identity):
    private_key: ec.EllipticCurvePrivateKey | None = None

    def sign(self, message: bytes) -> bytes:
        if self.private_key is None:
            raise ConfigError(f"identity of {self.msp_id} has no private key to sign with")
        return sign_low_s(self.private_key, message)

    @property
    def public_key(self) -> ec.EllipticCurvePublicKey:
        return x509.load_pem_x509_certificate(self.certificate_pem).public_key()


def load_msp_identity(msp_dir: str | Path, msp_id: str) -> SigningIdentity:
    """The user identity in an MSP folder as cryptogen or fabric-ca write it.

    Reads the one certificate in ``signcerts/`` and the one private key in ``keystore/`` (PEM,
    PKCS#8 or SEC1), and checks that they belong together.
    """
    msp_dir = Path(msp_dir)
    cert_path = _only_file(msp_dir / "signcerts", "certificate")
    key_path = _only_file(msp_dir / "keystore", "private key")
    cert_pem = cert_path.read_bytes()
    try:
        certificate = x509.load_pem_x509_certificate(cert_pem)
    except ValueError as exc:
        raise ConfigError(f"{cert_path}: not a PEM X.509 certificate ({exc})") from None
    try:
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{key_path}: not an unencrypted PEM private key ({exc})") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ConfigError(f"{key_path}: Fabric identities need an ECDSA key, found {type(key).__name__}")
    cert_pub = certificate.public_key().public_bytes(serialization.Encoding.DER,
                                                     serialization.PublicFormat.SubjectPublicKeyInfo)
    key_pub = key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    if cert_pub != key_pub:
        raise ConfigError(f"{key_path}: this key does not belong to the certificate {cert_path}")
    curve_order(key)
    return SigningIdentity(msp_id=msp_id, certificate_pem=cert_pem, private_key=key)


def _only_file(folder: Path, what: str) -> Path:
    if not folder.is_dir():
        raise ConfigError(f"{folder}: MSP folder has no {folder.name}/ with the {what}")
    files = sorted(p for p in folder.iterdir() if p.is_file())
    if len(files) != 1:
        raise ConfigError(f"{folder}: expected exactly one {what} file, found {len(files)}")
    return files[0]
