"""The records the ledger holds, as typed values.

The fields match the contract's JSON (``chaincode/clinfed_chaincode/contract.py``). A record read
back from the ledger also carries ``tx_id``, ``timestamp`` (RFC 3339 UTC with nanoseconds, taken
from the transaction header) and ``recorded_by`` (the writer's MSP ID); a record being written
leaves them ``None``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

_META = ("tx_id", "timestamp", "recorded_by")


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


class _Record:
    """Shared conversions. ``_required``/``_optional`` name the fields the contract accepts."""

    _required: tuple[str, ...] = ()
    _optional: tuple[str, ...] = ()

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
    epsilon: float | None = None
    delta: float | None = None
    hash_stage: str = "after_dp"
    tx_id: str | None = None
    timestamp: str | None = None
    recorded_by: str | None = None

    _required = ("job_id", "round", "site", "update_sha256", "n_samples")
    _optional = ("metrics", "epsilon", "delta", "hash_stage")


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
    epsilon: float | None = None
    metrics: dict = field(default_factory=dict)
    tx_id: str | None = None
    timestamp: str | None = None
    recorded_by: str | None = None

    _required = ("job_id", "round", "model_sha256", "participants", "aggregation")
    _optional = ("expected_sites", "n_samples", "epsilon", "metrics")


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

    _required = ("job_id", "round", "site")
    _optional = ("reason",)


@dataclass(frozen=True)
class Consent(_Record):
    """A patient's research consent for a study, by pseudonym only."""

    pseudonym: str
    study: str
    site: str
    status: str
    consent_sha256: str
    tx_id: str | None = None
    timestamp: str | None = None
    recorded_by: str | None = None

    _required = ("pseudonym", "study", "site", "status", "consent_sha256")

    @property
    def active(self) -> bool:
        return self.status == "active"


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
