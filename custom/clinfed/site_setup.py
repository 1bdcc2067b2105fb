"""What a site operator does at the site before it joins jobs: publish its patients' consents for
a study (``clinfed consent sync``) and register its masking key (``clinfed keys register``).

Each step acts with the site's own ledger identity (``settings``, from its site configuration).
The CLI commands call these functions; the demo calls the same ones for each simulated site.
"""

from __future__ import annotations

import os
from pathlib import Path

from clinfed import audit
from clinfed.ledger.settings import LedgerSettings


def consent_sync(settings: LedgerSettings, site_dir: str | os.PathLike, site: str, study: str | None = None,
                 secret_file: str | os.PathLike | None = None) -> audit.ConsentSync:
    """Publish the site's FHIR Consents for ``study`` (see :func:`clinfed.audit.sync_consents`)."""
    with settings.open(outbox=False) as ledger:
        return audit.sync_consents(site_dir, ledger, site, study, secret_file)


def keys_register(settings: LedgerSettings, site: str, key_file: str | os.PathLike) -> tuple[str, bool]:
    """Create the site's masking key if missing and publish its public half (see
    :func:`clinfed.audit.register_masking_key`); returns the public key (hex) and whether it was
    newly registered."""
    if Path(key_file).exists():  # a bad key file is named before any ledger is touched
        from clinfed.privacy.secagg import load_private_key

        load_private_key(key_file)
    with settings.open(outbox=False) as ledger:
        return audit.register_masking_key(ledger, site, key_file)
