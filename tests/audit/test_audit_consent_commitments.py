"""The consent records on the ledger are keyed commitments: nobody without the site's secret can
recompute them from the hospital's FHIR export, and the site can still prove which Consent it
relied on by opening one record."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from clinfed import audit
from clinfed.data.pseudonym import Pseudonymiser
from clinfed.data.study import load_study
from clinfed.data.synth import synthesise
from clinfed.ledger import LocalLedger
from fhir_adapter import consent_sha256, harmonise_site

STUDY = "clinfed-tumour-seg"


@pytest.fixture(scope="module")
def synced(tmp_path_factory):
    root = tmp_path_factory.mktemp("commitments")
    synthesise(root, 1, 8, (16, 16, 8), 2)
    site_dir = root / "site-1"
    ledger_path = root / "ledger.sqlite"
    audit.init_consortium(ledger_path, ["site-1", "site-2"])
    with LocalLedger(ledger_path, "Site1MSP") as ledger:
        assert audit.sync_consents(site_dir, ledger, "site-1").published > 0
        records = {c.pseudonym: c for c in ledger.consents(STUDY, site="site-1")}
    return site_dir, ledger_path, records


def _consents_in_export(site_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (site_dir / "fhir" / "Consent.ndjson").read_text().splitlines()]


def test_consent_commitments_cannot_be_recomputed_from_the_fhir_file_without_the_site_key(synced, tmp_path):
    site_dir, _, records = synced
    commitments = {r.consent_commitment for r in records.values()}
    resources = _consents_in_export(site_dir)
    # What an outsider holding the FHIR file (but not the site's secret) can compute from it:
    candidates = set()
    for resource in resources:
        digest = consent_sha256(resource)
        candidates |= {digest, hashlib.sha256(json.dumps(resource, sort_keys=True).encode()).hexdigest(),
                       hashlib.sha256(json.dumps(resource).encode()).hexdigest()}
        # ... and the same construction under a guessed key, and under another site's secret.
        for key in (b"", bytes(32), audit.commitment_key(bytes(32))):
            for pseudonym in records:
                candidates.add(audit.consent_commitment(key, STUDY, pseudonym, digest))
    assert commitments and not commitments & candidates
    # With the site's secret, the site itself recomputes every one.
    key = audit.commitment_key(Pseudonymiser.for_site(site_dir)._key)
    harmonised = harmonise_site(site_dir / "fhir", load_study(STUDY).fhir, Pseudonymiser.for_site(site_dir))
    assert {audit.consent_commitment(key, STUDY, p, d.consent_sha256) for p, d in harmonised.consents.items()
            if p in records} == commitments


def test_one_record_is_opened_without_revealing_the_others(synced):
    site_dir, _, records = synced
    key = audit.commitment_key(Pseudonymiser.for_site(site_dir)._key)
    harmonised = harmonise_site(site_dir / "fhir", load_study(STUDY).fhir, Pseudonymiser.for_site(site_dir))
    pseudonym, decision = next((p, d) for p, d in harmonised.consents.items() if p in records)
    resource = next(r for r in _consents_in_export(site_dir) if consent_sha256(r) == decision.consent_sha256)
    opening = audit.consent_opening(key, STUDY, pseudonym, decision.consent_sha256)
    assert audit.commitment_opens(records[pseudonym].consent_commitment, opening, resource)
    others = [r for p, r in records.items() if p != pseudonym]
    assert not any(audit.commitment_opens(r.consent_commitment, opening, resource) for r in others)
    changed = dict(resource, dateTime="2031-01-01T00:00:00Z")
    assert not audit.commitment_opens(records[pseudonym].consent_commitment, opening, changed)


def test_no_plain_hash_of_a_consent_resource_is_on_the_ledger(synced):
    site_dir, ledger_path, _ = synced
    stored = b"".join(p.read_bytes() for p in ledger_path.parent.glob("ledger.sqlite*") if p.is_file())
    for resource in _consents_in_export(site_dir):
        assert consent_sha256(resource).encode() not in stored
