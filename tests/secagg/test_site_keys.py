"""Masking keys published on the ledger: each site registers its own; peers pin them from there."""

from __future__ import annotations

import stat

import pytest

from clinfed import audit
from clinfed.ledger import LedgerError, LocalLedger
from clinfed.ledger.settings import COORDINATOR_MSP, ledger_settings
from clinfed.privacy.errors import SecAggRefused
from clinfed.privacy.secagg import SiteRegistry, load_private_key, public_key_bytes

SITES = ["site-1", "site-2", "site-3"]


@pytest.fixture
def ledger_path(tmp_path):
    path = tmp_path / "ledger.sqlite"
    audit.init_consortium(path, SITES)
    return path


def _as(ledger_path, participant):
    return ledger_settings(participant, ledger=ledger_path).open(outbox=False)


def test_registered_keys_are_what_peers_read_and_registration_is_idempotent(ledger_path, tmp_path):
    for site in SITES:
        with _as(ledger_path, site) as ledger:
            public, new = audit.register_masking_key(ledger, site, tmp_path / site / "masking_key.pem")
            assert new
            assert audit.register_masking_key(ledger, site, tmp_path / site / "masking_key.pem") == (public, False)
        key_file = tmp_path / site / "masking_key.pem"
        assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    with _as(ledger_path, "site-1") as ledger:
        registry = SiteRegistry.from_ledger(ledger)
    assert sorted(registry.sites) == SITES
    for site in SITES:
        assert registry.public_key(site) == public_key_bytes(load_private_key(tmp_path / site / "masking_key.pem"))


def test_a_site_cannot_register_a_key_for_another_site(ledger_path, tmp_path):
    with _as(ledger_path, "site-2") as ledger, pytest.raises(LedgerError, match="site-1"):
        audit.register_masking_key(ledger, "site-1", tmp_path / "stolen.pem")
    with LocalLedger(ledger_path, COORDINATOR_MSP) as ledger:
        assert "site-1" not in ledger.site_keys()


def test_a_site_without_a_registered_key_is_refused_by_name(ledger_path):
    with _as(ledger_path, "site-1") as ledger:
        registry = SiteRegistry.from_ledger(ledger)
    with pytest.raises(SecAggRefused, match="'site-2' has no masking key registered before the job started"):
        registry.public_key("site-2")
