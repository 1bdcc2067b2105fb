"""Who may sign on the local ledger: the consortium's CA and which certificate acts for which MSP ID.

A Fabric channel binds each MSP ID to its organisation's CA. The local ledger keeps the same
binding in its genesis block (:class:`Membership`): the consortium's CA certificate(s) and, per
MSP ID, the common names of the certificates that act for it. In a provisioned consortium the CA
is FLARE's root CA (``rootCA.pem`` in every startup kit) and the certificates are the kits' own
(``server.crt`` for the coordinator, ``client.crt`` for a site), so one PKI serves FLARE's mutual
TLS and the ledger, and a participant signs with the key its kit already holds.

A simulator run has no startup kits: :func:`create_simulation_identities` makes a throwaway CA and
one identity per participant beside the ledger file (``<ledger>.identities/``). Every participant
of a simulator runs on the one machine, so all their keys are there by construction; a
provisioned ledger has no such folder, and a participant signs only with its own kit.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from clinfed.errors import ConfigError

from .errors import IdentityRejected
from .identity import SigningIdentity, load_identity

IDENTITIES_SUFFIX = ".identities"
IDENTITIES_INDEX = "identities.json"
CA_FILE = "ca.pem"
HEAD_FILE = "ledger_head.json"


def common_name(certificate: x509.Certificate) -> str:
    names = certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(names[0].value) if names else ""


@dataclass(frozen=True)
class Membership:
    """The local ledger's channel configuration: trusted CAs and MSP ID -> certificate common names."""

    ca_certificates: tuple[bytes, ...]
    members: Mapping[str, tuple[str, ...]]

    def to_json(self) -> dict:
        return {"ca_certificates": [pem.decode("ascii") for pem in self.ca_certificates],
                "members": {msp: list(names) for msp, names in sorted(self.members.items())}}

    @classmethod
    def from_json(cls, value: Mapping) -> "Membership":
        return cls(tuple(pem.encode("ascii") for pem in value["ca_certificates"]),
                   {msp: tuple(names) for msp, names in value["members"].items()})

    def _cas(self) -> list[x509.Certificate]:
        return [x509.load_pem_x509_certificate(pem) for pem in self.ca_certificates]

    def authenticate(self, msp_id: str, certificate_pem: bytes, at: _dt.datetime) -> x509.Certificate:
        """The certificate, once it is shown to be issued by a consortium CA, valid at ``at``, and a
        member of ``msp_id``; :class:`IdentityRejected` naming what is wrong otherwise."""
        try:
            certificate = x509.load_pem_x509_certificate(certificate_pem)
        except ValueError:
            raise IdentityRejected("the request's creator carries no readable X.509 certificate") from None
        subject = certificate.subject.rfc4514_string()
        if not any(_issued_by(certificate, ca) for ca in self._cas()):
            raise IdentityRejected(f"the request is signed by {subject}, whose certificate no CA of this "
                                   f"consortium issued (issuer {certificate.issuer.rfc4514_string()}); "
                                   f"only identities from the consortium's provisioning may use this ledger")
        if not certificate.not_valid_before_utc <= at <= certificate.not_valid_after_utc:
            raise IdentityRejected(f"the certificate of {subject} is not valid at {at:%Y-%m-%dT%H:%M:%SZ} "
                                   f"(valid {certificate.not_valid_before_utc:%Y-%m-%d} to "
                                   f"{certificate.not_valid_after_utc:%Y-%m-%d})")
        name = common_name(certificate)
        if msp_id not in self.members:
            raise IdentityRejected(f"the request claims MSP {msp_id}, which is not a member of this ledger "
                                   f"(members: {', '.join(sorted(self.members))})")
        if name not in self.members[msp_id]:
            owners = sorted(m for m, names in self.members.items() if name in names)
            raise IdentityRejected(f"the request is signed by the certificate of {name!r}, which may not act "
                                   f"as {msp_id}" + (f"; it belongs to {', '.join(owners)}" if owners else ""))
        return certificate


def _issued_by(certificate: x509.Certificate, ca: x509.Certificate) -> bool:
    try:
        certificate.verify_directly_issued_by(ca)
    except (ValueError, TypeError, Exception):  # noqa: BLE001 - InvalidSignature and friends
        return False
    return True


# ---------------------------------------------------------------------- simulator identities


def identities_dir(ledger_path: str | os.PathLike) -> Path:
    path = Path(ledger_path)
    return path.with_name(path.name + IDENTITIES_SUFFIX)


def create_simulation_identities(ledger_path: str | os.PathLike, participants: Mapping[str, str]) -> Path:
    """A throwaway CA and one certificate and key per participant (name -> MSP ID) beside the
    ledger file, for a simulator run where every participant runs on this machine. Returns the
    folder. Made once: a second call with the same participants reuses it."""
    folder = identities_dir(ledger_path)
    index_file = folder / IDENTITIES_INDEX
    if index_file.exists():
        existing = json.loads(index_file.read_text())
        if existing != dict(participants):
            raise ConfigError(f"{folder}: holds identities for {sorted(existing)}, not {sorted(participants)}")
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    os.chmod(folder, 0o700)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "clinfed simulation CA")])
    ca_cert = _certificate(ca_name, ca_name, ca_key.public_key(), ca_key, is_ca=True)
    (folder / CA_FILE).write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    for participant in participants:
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, participant)])
        cert = _certificate(subject, ca_name, key.public_key(), ca_key, is_ca=False)
        own = folder / participant
        own.mkdir(exist_ok=True)
        (own / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_file = own / "key.pem"
        fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as handle:
            handle.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    index_file.write_text(json.dumps(dict(participants), indent=2, sort_keys=True) + "\n")
    return folder


def _certificate(subject, issuer, public_key, signing_key, is_ca: bool) -> x509.Certificate:
    now = _dt.datetime.now(_dt.timezone.utc)
    builder = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).public_key(public_key)
               .serial_number(x509.random_serial_number())
               .not_valid_before(now - _dt.timedelta(days=1)).not_valid_after(now + _dt.timedelta(days=3650))
               .add_extension(x509.BasicConstraints(ca=is_ca, path_length=None), critical=True))
    return builder.sign(signing_key, hashes.SHA256())


def simulation_participants(ledger_path: str | os.PathLike) -> dict[str, str] | None:
    """participant -> MSP ID of the simulator identities beside a ledger file (None without them)."""
    index_file = identities_dir(ledger_path) / IDENTITIES_INDEX
    if not index_file.is_file():
        return None
    return json.loads(index_file.read_text())


@dataclass(frozen=True)
class IdentityFiles:
    """Where a participant's ledger identity lives: certificate, key, trusted CA and last-seen head."""

    cert: Path
    key: Path
    ca: Path
    head_file: Path | None = None

    def load(self, msp_id: str) -> SigningIdentity:
        return load_identity(self.cert, self.key, msp_id)

    def ca_pem(self) -> bytes:
        try:
            return self.ca.read_bytes()
        except OSError as exc:
            raise ConfigError(f"{self.ca}: the consortium CA certificate is not readable ({exc.strerror})") from None


def simulation_identity_files(ledger_path: str | os.PathLike, participant: str) -> IdentityFiles | None:
    """The simulator identity of ``participant`` beside a ledger file, or None if it has none."""
    folder = identities_dir(ledger_path)
    own = folder / participant
    if not (own / "key.pem").is_file():
        return None
    return IdentityFiles(own / "cert.pem", own / "key.pem", folder / CA_FILE, own / HEAD_FILE)


def simulation_membership(ledger_path: str | os.PathLike) -> Membership:
    """The genesis membership for the simulator identities beside a ledger file."""
    participants = simulation_participants(ledger_path)
    if participants is None:
        raise ConfigError(f"{identities_dir(ledger_path)}: no simulator identities")
    ca = (identities_dir(ledger_path) / CA_FILE).read_bytes()
    return Membership((ca,), {msp: (name,) for name, msp in participants.items()})
