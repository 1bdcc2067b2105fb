"""Pseudonymisation at ingestion: every patient identifier becomes HMAC-SHA256(site key, MRN).

The key never leaves the site, so nobody outside it can recompute or reverse a pseudonym;
the same MRN always maps to the same pseudonym at that site, so records stay linkable.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from pathlib import Path

from clinfed.errors import ConfigError

SECRET_FILE_NAME = "site_secret.key"
SECRET_ENV = "CLINFED_SITE_SECRET_FILE"
PSEUDONYM_PREFIX = "p-"


class Pseudonymiser:
    """Callable mapping an MRN to its pseudonym under one site's key."""

    def __init__(self, key: bytes):
        if len(key) < 16:
            raise ConfigError("site pseudonymisation key is shorter than 16 bytes")
        self._key = key

    def __call__(self, mrn: str) -> str:
        digest = hmac.new(self._key, mrn.strip().encode("utf-8"), hashlib.sha256).hexdigest()
        # 128 bits are ample against collisions in any hospital and keep logs readable.
        return PSEUDONYM_PREFIX + digest[:32]

    @classmethod
    def for_site(cls, site_dir: Path, secret_file: Path | None = None) -> "Pseudonymiser":
        """Key from ``secret_file``, else $CLINFED_SITE_SECRET_FILE, else SITE_DIR/site_secret.key."""
        path = Path(secret_file or os.environ.get(SECRET_ENV) or Path(site_dir) / SECRET_FILE_NAME)
        if not path.is_file():
            raise ConfigError(
                f"{path}: site pseudonymisation key not found; create one with "
                f"`python -c \"import secrets; print(secrets.token_hex(32))\" > {path}` and keep it at the site")
        try:
            key = bytes.fromhex(path.read_text().strip())
        except ValueError:  # not text at all (UnicodeDecodeError) or not hex
            raise ConfigError(f"{path}: site key must be hex-encoded (64 hex characters)") from None
        if len(key) < 16:
            raise ConfigError(f"{path}: site pseudonymisation key is shorter than 16 bytes")
        return cls(key)
