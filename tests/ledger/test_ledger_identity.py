"""Every write is signed by its writer, and the ledger refuses the opponent's attempts, on every
backend (see conftest.BACKENDS): a key from outside the consortium, one site's key claiming
another site, the coordinator writing a site's record, a replayed request, a request dated
outside the allowed clock skew."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import time

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from clinfed.ledger import AccessDenied, ClockSkew, Contribution, LedgerError
from clinfed.ledger.identity import SigningIdentity
from clinfed_chaincode.contract import MAX_CLOCK_SKEW
from ledger_helpers import COORDINATOR, SITES, digest

JOB = "job-identity"


def contribution(site="site-1", round_=0) -> Contribution:
    return Contribution(job_id=JOB, round=round_, site=site, update_sha256=digest(f"{JOB}/{round_}/{site}"),
                        n_samples=12)


def foreign_identity(msp_id: str, name: str) -> SigningIdentity:
    """A certificate with a site's name and MSP ID, from a CA the consortium never heard of."""
    from cryptography.hazmat.primitives import serialization

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(days=1))
            .not_valid_after(now + dt.timedelta(days=30)).sign(key, hashes.SHA256()))
    return SigningIdentity(msp_id=msp_id, certificate_pem=cert.public_bytes(serialization.Encoding.PEM),
                           private_key=key)


def _assert_nothing_recorded(consortium):
    assert consortium.coordinator.contributions(JOB) == []


def test_a_key_from_outside_the_consortium_cannot_write(consortium):
    outsider = consortium.open_with(foreign_identity(SITES["site-1"], "site-1"))
    with pytest.raises(LedgerError) as err:
        outsider.record_contribution(contribution())
    message = str(err.value)
    if consortium.backend == "local":
        assert "no CA of this consortium issued" in message
    else:  # the peer's MSP refuses the creator before the contract runs
        assert "access denied" in message or "creator" in message
    _assert_nothing_recorded(consortium)


def test_site_1s_key_cannot_claim_to_be_site_2(consortium):
    own = consortium.identity(SITES["site-1"])
    claiming = dataclasses.replace(own, msp_id=SITES["site-2"])
    with pytest.raises(LedgerError) as err:
        consortium.open_with(claiming).record_contribution(contribution("site-2"))
    message = str(err.value)
    if consortium.backend == "local":
        assert "the certificate of 'site-1', which may not act as Site2MSP; it belongs to Site1MSP" in message
    else:
        assert "access denied" in message or "creator" in message
    # With its own identity, site-1 still cannot write site-2's record: the contract refuses.
    with pytest.raises(AccessDenied, match="MSP Site1MSP may not record contributions of site site-2"):
        consortium.site("site-1").record_contribution(contribution("site-2"))
    _assert_nothing_recorded(consortium)


def test_the_coordinators_key_cannot_write_a_sites_contribution(consortium):
    with pytest.raises(AccessDenied, match="MSP CoordinatorMSP may not record contributions of site site-1"):
        consortium.coordinator.record_contribution(contribution())
    _assert_nothing_recorded(consortium)


def test_a_replayed_signed_request_is_refused(consortium):
    site = consortium.site("site-1")
    signed = site.sign_request("RecordContribution", json.dumps(contribution().to_request()))
    first = site.submit_signed(signed)
    with pytest.raises(LedgerError) as err:
        site.submit_signed(signed)
    message = str(err.value)
    if consortium.backend == "local":
        assert "was already committed in block" in message and "replayed request" in message
    else:
        assert "duplicate" in message.lower()
    assert [c.tx_id for c in consortium.coordinator.contributions(JOB)] == [json.loads(first)["tx_id"]]


@pytest.mark.parametrize("offset", [-2 * MAX_CLOCK_SKEW, 2 * MAX_CLOCK_SKEW])
def test_a_request_dated_outside_the_allowed_skew_is_refused(consortium, offset):
    skewed = consortium.open(SITES["site-1"], clock=lambda: time.time() + offset)
    with pytest.raises(ClockSkew, match=r"CLINFED_CLOCK_SKEW: the transaction is dated .* at most 300 s is "
                                        r"allowed: check the submitter's clock"):
        skewed.record_contribution(contribution())
    _assert_nothing_recorded(consortium)
    assert consortium.site("site-1").record_contribution(contribution()).recorded_by == SITES["site-1"]


def test_every_record_names_the_identity_that_signed_it(consortium):
    written = consortium.site("site-2").record_contribution(contribution("site-2"))
    assert written.recorded_by == SITES["site-2"]
    assert consortium.coordinator.consortium().coordinator_msp == COORDINATOR
