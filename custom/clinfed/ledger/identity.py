"""Ledger client identities: an MSP ID, an X.509 certificate and, to sign, its private key.

On Fabric the key is ECDSA (P-256/P-384) and signatures follow the official fabric-gateway
clients (``identity/ecdsa.go``): ECDSA over the SHA-256 of the message, DER-encoded, with S
normalised to the lower half of the curve order, since Fabric rejects high-S signatures as
malleable. The local ledger also accepts the RSA keys of FLARE's startup kits (PKCS#1 v1.5 over
SHA-256), so one PKI, the consortium's FLARE provisioning, serves FLARE and the ledger.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
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


def sign(key, message: bytes) -> bytes:
    """The signature a ledger expects from ``key``: low-S ECDSA, or RSA PKCS#1 v1.5, over SHA-256."""
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return sign_low_s(key, message)
    if isinstance(key, rsa.RSAPrivateKey):
        return key.sign(message, padding.PKCS1v15(), hashes.SHA256())
    raise ConfigError(f"unsupported key type {type(key).__name__}; ledger identities use ECDSA or RSA keys")


def signature_valid(public_key, message: bytes, signature: bytes) -> bool:
    """Whether ``signature`` (as :func:`sign` makes it) is ``public_key``'s over ``message``; high-S
    ECDSA signatures are refused, as Fabric refuses them."""
    try:
        if isinstance(public_key, ec.EllipticCurvePublicKey):
            if to_low_s(signature, curve_order(public_key)) != signature:
                return False
            public_key.verify(signature, message, ec.ECDSA(hashes.SHA256()))
        elif isinstance(public_key, rsa.RSAPublicKey):
            public_key.verify(signature, message, padding.PKCS1v15(), hashes.SHA256())
        else:
            return False
    except (InvalidSignature, ValueError, ConfigError):
        return False
    return True


@dataclass(frozen=True)
class SigningIdentity(Identity):
    private_key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | None = None

    def sign(self, message: bytes) -> bytes:
        if self.private_key is None:
            raise ConfigError(f"identity of {self.msp_id} has no private key to sign with")
        return sign(self.private_key, message)

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


def load_identity(cert_file: str | Path, key_file: str | Path, msp_id: str) -> SigningIdentity:
    """An identity from a PEM certificate and its unencrypted PEM private key (a FLARE startup kit's
    ``client.crt``/``client.key`` or ``server.crt``/``server.key``, or a cryptogen user)."""
    cert_file, key_file = Path(cert_file), Path(key_file)
    try:
        cert_pem = cert_file.read_bytes()
        certificate = x509.load_pem_x509_certificate(cert_pem)
    except OSError as exc:
        raise ConfigError(f"{cert_file}: ledger identity certificate not readable ({exc.strerror})") from None
    except ValueError as exc:
        raise ConfigError(f"{cert_file}: not a PEM X.509 certificate ({exc})") from None
    try:
        key = serialization.load_pem_private_key(key_file.read_bytes(), password=None)
    except OSError as exc:
        raise ConfigError(f"{key_file}: ledger identity key not readable ({exc.strerror})") from None
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{key_file}: not an unencrypted PEM private key ({exc})") from None
    if not isinstance(key, (ec.EllipticCurvePrivateKey, rsa.RSAPrivateKey)):
        raise ConfigError(f"{key_file}: ledger identities need an ECDSA or RSA key, found {type(key).__name__}")
    if _public_der(certificate.public_key()) != _public_der(key.public_key()):
        raise ConfigError(f"{key_file}: this key does not belong to the certificate {cert_file}")
    return SigningIdentity(msp_id=msp_id, certificate_pem=cert_pem, private_key=key)


def _public_der(key) -> bytes:
    return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def _only_file(folder: Path, what: str) -> Path:
    if not folder.is_dir():
        raise ConfigError(f"{folder}: MSP folder has no {folder.name}/ with the {what}")
    files = sorted(p for p in folder.iterdir() if p.is_file())
    if len(files) != 1:
        raise ConfigError(f"{folder}: expected exactly one {what} file, found {len(files)}")
    return files[0]
