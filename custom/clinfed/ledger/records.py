"""The records the ledger holds, as typed values.

Which fields a write sends (``_required``/``_optional``) comes from the contract's own
``RECORD_FIELDS`` (``chaincode/clinfed_chaincode/contract.py``); importing this module checks that
each dataclass declares them. A record read back from the ledger also carries ``tx_id``,
``timestamp`` (RFC 3339 UTC with nanoseconds, taken from the transaction header) and
``recorded_by`` (the writer's MSP ID); a record being written leaves them ``None``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from clinfed_chaincode.contract import (K_ABSENCE, K_CONSENT, K_CONSORTIUM, K_CONTRIBUTION, K_MODEL, K_SITE_KEY,
                                        RECORD_FIELDS)


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


class _Record:
    """Shared conversions. ``_kind`` names the contract's record type, whose fields it accepts."""

    _kind: str = ""

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if cls._kind:
            cls._required, cls._optional = RECORD_FIELDS[cls._kind]

    def to_request(self) -> dict:
        """The JSON object the contract's write transaction takes (no ledger metadata, no ``None``)."""
        values = dataclasses.asdict(self)
        request = {name: values[name] for name in self._required}
        request.update({name: values[name] for name in self._optional if values[name] not in (None, {}, [])})
        return request

    @classmethod
    def from_record(cls, record: Mapping[str, Any]):
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in record.items() if k in names})


@dataclass(frozen=True)
class Contribution(_Record):
    """One site's update to one round: the sha256 of exactly the bytes it sent."""

    job_id: str
    round: int
    site: str
    update_sha256: str
    n_samples: int
    metrics: dict = field(default_factory=dict)
    patient_epsilon: float | None = None  # DP-SGD, cumulative on the study: protects one patient
    patient_delta: float | None = None
    site_epsilon: float | None = None     # update-level DP under secure aggregation: protects the site
    site_delta: float | None = None
    hash_stage: str = "after_dp"
    tx_id: str | None = None
    timestamp: str | None = None
    recorded_by: str | None = None

    _kind = K_CONTRIBUTION


@dataclass(frozen=True)
class GlobalModel(_Record):
    """The coordinator's aggregate of one round."""

    job_id: str
    round: int
    model_sha256: str
    participants: list
    aggregation: str
    expected_sites: list | None = None
    n_samples: int | None = None
    patient_epsilon: float | None = None
    site_epsilon: float | None = None
    metrics: dict = field(default_factory=dict)
    tx_id: str | None = None
    timestamp: str | None = None
    recorded_by: str | None = None

    _kind = K_MODEL


@dataclass(frozen=True)
class Absence(_Record):
    """An expected site that did not contribute to a round, as recorded by the coordinator."""

    job_id: str
    round: int
    site: str
    reason: str = ""
    tx_id: str | None = None
    timestamp: str | None = None
    recorded_by: str | None = None

    _kind = K_ABSENCE


@dataclass(frozen=True)
class Consent(_Record):
    """A patient's research consent for a study, by pseudonym only; ``consent_commitment`` is the
    site's keyed commitment to the FHIR Consent it relied on (see :mod:`clinfed.audit`)."""

    pseudonym: str
    study: str
    site: str
    status: str
    consent_commitment: str
    tx_id: str | None = None
    timestamp: str | None = None
    recorded_by: str | None = None

    _kind = K_CONSENT

    @property
    def active(self) -> bool:
        return self.status == "active"


@dataclass(frozen=True)
class ConsentCommitment:
    """What a reader other than the patient's site sees of a consent: its commitment, not who."""

    study: str
    site: str
    consent_commitment: str
    tx_id: str | None = None
    timestamp: str | None = None
    recorded_by: str | None = None

    @classmethod
    def from_record(cls, record: Mapping[str, Any]):
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in record.items() if k in names})


@dataclass(frozen=True)
class SiteKey(_Record):
    """A site's X25519 public key for secure aggregation (``public_key`` is base64 of 32 bytes).
    ``version`` counts the site's registrations: a rotation is a new version, and the key applies
    from the next job a site starts (running jobs keep the key they pinned)."""

    site: str
    public_key: str
    version: int = 1
    tx_id: str | None = None
    timestamp: str | None = None
    recorded_by: str | None = None

    _kind = K_SITE_KEY

    @property
    def raw(self) -> bytes:
        import base64

        return base64.b64decode(self.public_key)


@dataclass(frozen=True)
class Consortium(_Record):
    coordinator_msp: str
    sites: dict
    tx_id: str | None = None
    timestamp: str | None = None
    recorded_by: str | None = None

    _kind = K_CONSORTIUM


@dataclass(frozen=True)
class HistoryEntry:
    """One committed version of a record (``value`` is the record as it was, ``None`` for a delete)."""

    tx_id: str
    timestamp: str
    is_delete: bool
    value: dict | None


@dataclass(frozen=True)
class JobRecords:
    contributions: list
    global_models: list
    absences: list


@dataclass(frozen=True)
class LedgerEvent:
    """A chaincode event: ``name`` (e.g. ``ContributionRecorded``) and the stored record as ``payload``."""

    block: int
    tx_id: str
    name: str
    payload: dict

    @classmethod
    def from_bytes(cls, block: int, tx_id: str, name: str, payload: bytes) -> "LedgerEvent":
        return cls(block=block, tx_id=tx_id, name=name, payload=json.loads(payload) if payload else {})


def _check_fields_match_the_contract() -> None:
    for cls in (Contribution, GlobalModel, Absence, Consent, SiteKey, Consortium):
        missing = set(cls._required + cls._optional) - {f.name for f in dataclasses.fields(cls)}
        if missing:
            raise TypeError(f"{cls.__name__} lacks the contract's field(s) {sorted(missing)}")


_check_fields_match_the_contract()
