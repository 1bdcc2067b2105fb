"""Privacy errors a site operator or the coordinator can act on: each names the file, site or round."""

from __future__ import annotations

from clinfed.errors import ClinfedError


class PrivacyError(ClinfedError):
    """Base class of the privacy package's errors."""


class PrivacyBudgetExceeded(PrivacyError):
    """The next release would take a site's spend for a study past its budget: the site declines."""

    def __init__(self, message: str, *, epsilon_spent: float, epsilon_after: float, target_epsilon: float):
        self.epsilon_spent = epsilon_spent
        self.epsilon_after = epsilon_after
        self.target_epsilon = target_epsilon
        super().__init__(message)


class PrivacyPolicyRefused(PrivacyError):
    """A job asks for more than the site's own privacy policy allows (the message names the field)."""


class PrivacyStateError(PrivacyError):
    """A persisted privacy-budget file is unreadable or disagrees with the configuration."""


class SecAggRefused(PrivacyError):
    """A site (or the server) refuses a secure-aggregation step; the message names the reason
    (a list that is not the consortium's, a key that does not authenticate, a second request)."""


class KeyDirectoryError(SecAggRefused):
    """A site's masking key file, or the keys registered on the ledger, are missing or invalid."""
