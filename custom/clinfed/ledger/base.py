"""The ledger interface clinfed uses, and the mapping of it onto the contract's transactions.

Backends differ only in how a transaction reaches the contract: :class:`~clinfed.ledger.local.LocalLedger`
runs it in-process over SQLite, :class:`~clinfed.ledger.fabric.FabricLedger` sends it through a
peer's Gateway service. Both subclass :class:`ContractLedger`, so each method below means the same
transaction on either, and :class:`~clinfed.ledger.outbox.OutboxLedger` wraps either one.
"""

from __future__ import annotations

import base64
import json
from abc import ABC, abstractmethod
from typing import Iterator, Mapping, Protocol, runtime_checkable

from clinfed_chaincode import ChaincodeError, canonical_json
from clinfed_chaincode.contract import MAX_PAGE_SIZE

from .records import (Absence, Consent, ConsentCommitment, Consortium, Contribution, GlobalModel, HistoryEntry,
                      JobRecords, LedgerEvent, SiteKey)

CONTRACT = "clinfed"


def _json(value) -> str:
    from .errors import InvalidRecord

    try:
        return canonical_json(value)
    except ChaincodeError as exc:
        raise InvalidRecord(str(exc)) from None


@runtime_checkable
class Ledger(Protocol):
    """What clinfed reads from and writes to the audit ledger, as one caller (``msp_id``).

    Writes return the record as committed (with ``tx_id``, ``timestamp``, ``recorded_by``) and raise
    a :class:`~clinfed.ledger.errors.LedgerRejected` subclass when the contract refuses them
    (:class:`~clinfed.ledger.errors.DuplicateRecord` when the record already exists) or
    :class:`~clinfed.ledger.errors.LedgerUnavailable` when the ledger cannot be reached.
    """

    msp_id: str

    # writes
    def init_consortium(self, sites: Mapping[str, str], coordinator_msp: str) -> Consortium: ...
    def register_site_key(self, site: str, public_key: bytes) -> SiteKey: ...
    def put_consent(self, consent: Consent) -> Consent: ...
    def record_contribution(self, contribution: Contribution) -> Contribution: ...
    def record_global_model(self, model: GlobalModel) -> GlobalModel: ...
    def record_absence(self, absence: Absence) -> Absence: ...

    # reads
    def consortium(self) -> Consortium: ...
    def site_keys(self) -> dict[str, SiteKey]: ...
    def consent(self, study: str, pseudonym: str) -> Consent | None: ...
    def consents(self, study: str, site: str | None = None) -> list[Consent | ConsentCommitment]: ...
    def consent_counts(self, study: str) -> dict[str, dict[str, int]]: ...
    def consents_of(self, pseudonym: str) -> list[Consent]: ...
    def contributions(self, job_id: str) -> list[Contribution]: ...
    def contributions_by_site(self, site: str) -> list[Contribution]: ...
    def global_models(self, job_id: str) -> list[GlobalModel]: ...
    def absences(self, job_id: str) -> list[Absence]: ...
    def job(self, job_id: str) -> JobRecords: ...
    def history(self, record_type: str, **key) -> list[HistoryEntry]: ...
    def events(self, start_block: int = 0, follow: bool = False,
               timeout: float | None = None) -> Iterator[LedgerEvent]: ...

    # generic
    def submit(self, function: str, *args: str) -> str | None: ...
    def evaluate(self, function: str, *args: str) -> str: ...
    def close(self) -> None: ...


class ContractLedger(ABC):
    """The typed API on top of two primitives a backend provides: ``submit`` and ``evaluate``.

    ``submit(function, *args)`` commits a write transaction and returns the contract's result
    string; ``evaluate`` runs a query without committing. Both raise the errors named in
    :class:`Ledger`.
    """

    msp_id: str

    @abstractmethod
    def submit(self, function: str, *args: str) -> str:
        """Commit a write transaction; the contract's result string."""

    @abstractmethod
    def evaluate(self, function: str, *args: str) -> str:
        """Run a query without committing."""

    @abstractmethod
    def events(self, start_block: int = 0, follow: bool = False,
               timeout: float | None = None) -> Iterator[LedgerEvent]:
        """Chaincode events from ``start_block`` on."""

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ------------------------------------------------------------------ writes
    # ``submit`` returns ``None`` when the write was queued rather than committed (an
    # OutboxLedger); the record is then returned as given, with ``tx_id`` None.

    def init_consortium(self, sites: Mapping[str, str], coordinator_msp: str) -> Consortium:
        config = {"coordinator_msp": coordinator_msp, "sites": dict(sites)}
        return _parsed(Consortium, self.submit("InitConsortium", _json(config)), config)

    def register_site_key(self, site: str, public_key: bytes) -> SiteKey:
        encoded = base64.b64encode(bytes(public_key)).decode("ascii")
        return _parsed(SiteKey, self.submit("RegisterSiteKey", site, encoded), {"site": site, "public_key": encoded})

    def put_consent(self, consent: Consent) -> Consent:
        return _parsed(Consent, self.submit("PutConsent", _json(consent.to_request())), consent)

    def record_contribution(self, contribution: Contribution) -> Contribution:
        return _parsed(Contribution, self.submit("RecordContribution", _json(contribution.to_request())), contribution)

    def record_global_model(self, model: GlobalModel) -> GlobalModel:
        return _parsed(GlobalModel, self.submit("RecordGlobalModel", _json(model.to_request())), model)

    def record_absence(self, absence: Absence) -> Absence:
        return _parsed(Absence, self.submit("RecordAbsence", _json(absence.to_request())), absence)

    # ------------------------------------------------------------------ reads

    def consortium(self) -> Consortium:
        return Consortium.from_record(json.loads(self.evaluate("GetConsortium")))

    def site_keys(self) -> dict[str, SiteKey]:
        return {site: SiteKey.from_record(r) for site, r in json.loads(self.evaluate("GetSiteKeys")).items()}

    def consent(self, study: str, pseudonym: str) -> Consent | None:
        """One of the caller's own patients' consent (None when the caller's site recorded none)."""
        from .errors import RecordNotFound

        try:
            return Consent.from_record(json.loads(self.evaluate("GetConsent", study, pseudonym)))
        except RecordNotFound:
            return None

    def pages(self, function: str, *args: str, page_size: int = MAX_PAGE_SIZE) -> Iterator[dict]:
        """The records of a paginated query, one page at a time from the ledger (never all at once)."""
        bookmark = ""
        while True:
            page = json.loads(self.evaluate(function, *args, str(page_size), bookmark))
            yield from page["records"]
            bookmark = page["bookmark"]
            if not bookmark:
                return

    def iter_consents(self, study: str, site: str | None = None) -> Iterator[Consent | ConsentCommitment]:
        """A study's consents: the caller's own site's in full, other sites' as commitments."""
        for r in self.pages("GetConsents", study, site or ""):
            yield Consent.from_record(r) if "pseudonym" in r else ConsentCommitment.from_record(r)

    def consents(self, study: str, site: str | None = None) -> list[Consent | ConsentCommitment]:
        return list(self.iter_consents(study, site))

    def consent_counts(self, study: str) -> dict[str, dict[str, int]]:
        """``{site: {"active": n, "revoked": n}}``; anyone in the consortium may read it."""
        return json.loads(self.evaluate("GetConsentCounts", study))

    def consents_of(self, pseudonym: str) -> list[Consent]:
        return [Consent.from_record(r) for r in self.pages("GetConsentsByPseudonym", pseudonym)]

    def iter_contributions(self, job_id: str) -> Iterator[Contribution]:
        """A job's contributions in (round, site) order, streamed page by page."""
        return (Contribution.from_record(r) for r in self.pages("GetContributions", job_id))

    def contributions(self, job_id: str) -> list[Contribution]:
        return list(self.iter_contributions(job_id))

    def contributions_by_site(self, site: str) -> list[Contribution]:
        return [Contribution.from_record(r) for r in self.pages("GetContributionsBySite", site)]

    def iter_global_models(self, job_id: str) -> Iterator[GlobalModel]:
        return (GlobalModel.from_record(r) for r in self.pages("GetGlobalModels", job_id))

    def global_models(self, job_id: str) -> list[GlobalModel]:
        return list(self.iter_global_models(job_id))

    def iter_absences(self, job_id: str) -> Iterator[Absence]:
        return (Absence.from_record(r) for r in self.pages("GetAbsences", job_id))

    def absences(self, job_id: str) -> list[Absence]:
        return list(self.iter_absences(job_id))

    def job(self, job_id: str) -> JobRecords:
        """Everything recorded for a job, in memory (for small jobs and tests; ``audit verify``
        streams instead, see :func:`clinfed.ledger.verify.verify_job`)."""
        return JobRecords(contributions=self.contributions(job_id), global_models=self.global_models(job_id),
                          absences=self.absences(job_id))

    def history(self, record_type: str, **key) -> list[HistoryEntry]:
        """Every committed version of one record, oldest first.

        ``record_type`` is ``consent`` (key ``study``, ``pseudonym``), ``contribution`` (``job_id``,
        ``round``, ``site``), ``model`` (``job_id``, ``round``), ``absence`` (``job_id``, ``round``,
        ``site``), ``sitekey`` (``site``) or ``consortium``.
        """
        return [HistoryEntry(**e) for e in json.loads(self.evaluate("GetHistory", record_type, _json(key)))]


def _parsed(cls, result: str | None, given):
    if result is None:
        return given if isinstance(given, cls) else cls.from_record(given)
    return cls.from_record(json.loads(result))
