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


class PrivacyStateError(PrivacyError):
    """A persisted privacy-budget file is unreadable or disagrees with the configuration."""


class MaskingError(PrivacyError):
    """Secure masking cannot proceed safely (keys, participant list, context reuse, layout)."""


class KeyDirectoryError(MaskingError):
    """The site key directory (public X25519 keys) or a private key file is missing or invalid."""


class MaskedRoundIncomplete(MaskingError):
    """A listed participant's masked update is missing: the sum cannot be unmasked. Redo the
    round without the missing sites (fresh masks: the attempt number goes up)."""

    def __init__(self, *, round_: int, attempt: int, missing: list[str], received: list[str]):
        self.round = round_
        self.attempt = attempt
        self.missing = sorted(missing)
        self.received = sorted(received)
        super().__init__(f"round {round_} attempt {attempt}: no masked update from {self.missing} "
                         f"(received {self.received}); the masked sum cannot be opened and is discarded")


class MaskRangeExceeded(MaskingError):
    """The sites' clear weights add up to more than the round's ``total_weight``: the ring sum may
    have wrapped. Redo with the weights now known."""
