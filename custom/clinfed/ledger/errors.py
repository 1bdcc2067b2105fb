"""Ledger errors. A refusal by the contract keeps its code, so callers can tell a duplicate from a denial."""

from __future__ import annotations

import re

from clinfed.errors import ClinfedError


class LedgerError(ClinfedError):
    """Base class of ledger errors."""


class LedgerNotFound(LedgerError):
    """The ledger file does not exist (only provisioning and the demo create ledgers)."""


class LedgerTampered(LedgerError):
    """The local ledger's chain does not verify from ``block`` on; nothing from there is trusted."""

    def __init__(self, path, block: int, reason: str):
        self.block = block
        super().__init__(f"{path}: block {block} fails verification: {reason}; the ledger has been altered or "
                         f"damaged, and nothing from block {block} on is trusted")


class LedgerUnavailable(LedgerError):
    """The ledger could not be reached or gave no answer; the write may be retried (see the outbox)."""


class LedgerRejected(LedgerError):
    """The contract refused the transaction. ``code`` is the contract's error code (e.g. ``DUPLICATE``)."""

    code = "REJECTED"

    def __init__(self, message: str, code: str | None = None):
        if code is not None:
            self.code = code
        super().__init__(message)


class InvalidRecord(LedgerRejected):
    code = "INVALID"


class AccessDenied(LedgerRejected):
    code = "ACCESS_DENIED"


class UnknownMsp(LedgerRejected):
    code = "UNKNOWN_MSP"


class DuplicateRecord(LedgerRejected):
    """The record is already on the ledger. For a retried write this means it was committed before."""

    code = "DUPLICATE"


class RecordNotFound(LedgerRejected):
    code = "NOT_FOUND"


class NotInitialised(LedgerRejected):
    code = "NOT_INITIALISED"


class LedgerConflict(LedgerRejected):
    code = "CONFLICT"


class ClockSkew(LedgerRejected):
    """The transaction's header time is too far from the executing node's clock."""

    code = "CLOCK_SKEW"


class IdentityRejected(LedgerRejected):
    """The request's signer is not who it claims, or not of this consortium."""

    code = "IDENTITY"

    def __init__(self, message: str):
        super().__init__(message if message.startswith("CLINFED_") else f"CLINFED_IDENTITY: {message}")


class ReplayedRequest(LedgerRejected):
    """A signed request that was already committed was sent again."""

    code = "REPLAY"


_BY_CODE = {cls.code: cls for cls in (InvalidRecord, AccessDenied, UnknownMsp, DuplicateRecord, RecordNotFound,
                                      NotInitialised, LedgerConflict, ClockSkew, IdentityRejected, ReplayedRequest)}
_CODE = re.compile(r"CLINFED_([A-Z_]+): ")


def rejection_from_message(message: str) -> LedgerRejected:
    """The exception for a chaincode error message, wherever the peer or gateway embedded it."""
    match = _CODE.search(message or "")
    if match is None:
        return LedgerRejected(message or "the chaincode refused the transaction without a message")
    code = match.group(1)
    text = message[match.start():]
    cls = _BY_CODE.get(code)
    return cls(text) if cls is not None else LedgerRejected(text, code=code)
