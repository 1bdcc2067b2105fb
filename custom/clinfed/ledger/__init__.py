"""The audit ledger: one interface, an embedded backend and a Fabric Gateway backend, and an outbox."""

from .base import Ledger, ContractLedger
from .config import open_ledger
from .errors import (AccessDenied, DuplicateRecord, InvalidRecord, LedgerConflict, LedgerError, LedgerRejected,
                     LedgerUnavailable, NotInitialised, RecordNotFound, UnknownMsp)
from .local import LocalLedger
from .outbox import Outbox, OutboxLedger
from .records import (Absence, Consent, Consortium, Contribution, GlobalModel, HistoryEntry, JobRecords, LedgerEvent,
                      SiteKey, sha256_bytes, sha256_file)
from .verify import JobVerification, verify_job, verify_records


def __getattr__(name):
    # FabricLedger pulls in grpc channels; load it only when asked for.
    if name == "FabricLedger":
        from .fabric import FabricLedger

        return FabricLedger
    raise AttributeError(name)


__all__ = [
    "Ledger", "ContractLedger", "LocalLedger", "FabricLedger", "Outbox", "OutboxLedger", "open_ledger",
    "JobVerification", "verify_job", "verify_records",
    "Absence", "Consent", "Consortium", "Contribution", "GlobalModel", "HistoryEntry", "JobRecords", "LedgerEvent",
    "SiteKey", "sha256_bytes", "sha256_file",
    "LedgerError", "LedgerUnavailable", "LedgerRejected", "InvalidRecord", "AccessDenied", "UnknownMsp",
    "DuplicateRecord", "RecordNotFound", "NotInitialised", "LedgerConflict",
]
