"""The audit ledger: one interface, an embedded backend and a Fabric Gateway backend, and an outbox."""

from .base import Ledger, ContractLedger
from .config import open_ledger
from .errors import (AccessDenied, ClockSkew, DuplicateRecord, IdentityRejected, InvalidRecord, LedgerConflict,
                     LedgerError, LedgerNotFound, LedgerRejected, LedgerTampered, LedgerUnavailable, NotInitialised,
                     RecordNotFound, ReplayedRequest, UnknownMsp)
from .local import LocalLedger
from .outbox import Outbox, OutboxLedger
from .records import (Absence, Consent, ConsentCommitment, Consortium, Contribution, GlobalModel, HistoryEntry,
                      JobRecords, LedgerEvent, SiteKey, sha256_bytes, sha256_file)
from .verify import JobVerification, verify_job, verify_records, verify_streams


def __getattr__(name):
    # FabricLedger pulls in grpc channels; load it only when asked for.
    if name == "FabricLedger":
        from .fabric import FabricLedger

        return FabricLedger
    raise AttributeError(name)


__all__ = [
    "Ledger", "ContractLedger", "LocalLedger", "FabricLedger", "Outbox", "OutboxLedger", "open_ledger",
    "JobVerification", "verify_job", "verify_records", "verify_streams",
    "Absence", "Consent", "ConsentCommitment", "Consortium", "Contribution", "GlobalModel", "HistoryEntry",
    "JobRecords", "LedgerEvent", "SiteKey", "sha256_bytes", "sha256_file",
    "LedgerError", "LedgerUnavailable", "LedgerNotFound", "LedgerTampered", "LedgerRejected", "InvalidRecord",
    "AccessDenied", "UnknownMsp", "DuplicateRecord", "RecordNotFound", "NotInitialised", "LedgerConflict",
    "ClockSkew", "IdentityRejected", "ReplayedRequest",
]
