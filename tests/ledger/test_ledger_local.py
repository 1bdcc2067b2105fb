"""LocalLedger as a store: several processes, durability, what is kept, what never is."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from clinfed.ledger import Consent, Contribution, DuplicateRecord, InvalidRecord, LocalLedger
from ledger_helpers import COORDINATOR, SITES, digest, new_local_ledger, pseudonym, subprocess_env

WORKER = Path(__file__).with_name("ledger_worker.py")


@pytest.fixture
def ledger_path(tmp_path) -> Path:
    return new_local_ledger(tmp_path / "ledger.sqlite")


def test_two_processes_write_the_same_ledger_file_concurrently(ledger_path):
    n = 25
    workers = [subprocess.Popen([sys.executable, str(WORKER), "contribute", str(ledger_path), SITES[site], site,
                                 "job-mp", str(n)], env=subprocess_env(), stderr=subprocess.PIPE, text=True)
               for site in ("site-1", "site-2")]
    for worker in workers:
        _, err = worker.communicate(timeout=120)
        assert worker.returncode == 0, err
    ledger = LocalLedger(ledger_path, COORDINATOR)
    records = ledger.contributions("job-mp")
    assert sorted((c.site, c.round) for c in records) == [(s, r) for s in ("site-1", "site-2") for r in range(n)]
    assert ledger.height() == 1 + 2 * n  # the consortium plus one block per write, none lost
    assert [e.block for e in ledger.events()] == list(range(1, 2 * n + 2))


def test_records_survive_reopening_the_file(ledger_path):
    written = LocalLedger(ledger_path, "Site1MSP").record_contribution(
        Contribution("job-d", 0, "site-1", digest("u"), 5))
    reopened = LocalLedger(ledger_path, "Site2MSP")
    assert reopened.contributions("job-d") == [written]
    assert reopened.block_of(written.tx_id)["creator_msp"] == "Site1MSP"


def test_refused_and_read_only_transactions_leave_nothing_behind(ledger_path):
    ledger = LocalLedger(ledger_path, "Site1MSP")
    ledger.record_contribution(Contribution("job-r", 0, "site-1", digest("u"), 5))
    height = ledger.height()
    with pytest.raises(DuplicateRecord):
        ledger.record_contribution(Contribution("job-r", 0, "site-1", digest("u"), 5))
    ledger.contributions("job-r")
    ledger.submit("GetContributions", "job-r", "10", "")  # a query sent as a transaction commits an empty block, as on Fabric
    assert ledger.height() == height + 1
    assert len(list(ledger.events())) == height


def test_no_patient_identifier_other_than_the_pseudonym_is_stored(ledger_path):
    mrn, name, birth = "HOSPMRN-00017", "Vandersloot", "1957-03-01"
    site = LocalLedger(ledger_path, "Site1MSP")
    for bad in (mrn, f"{name}, Ottilie", birth):
        with pytest.raises(InvalidRecord):
            site.put_consent(Consent(bad, "STUDY-1", "site-1", "active", digest("c")))
    with pytest.raises(InvalidRecord):
        site.record_contribution(Contribution("job-p", 0, "site-1", digest("u"), 5, metrics={mrn: 1.0}))
    with pytest.raises(InvalidRecord):
        site.submit("PutConsent", '{"pseudonym":"%s","study":"S","site":"site-1","status":"active",'
                                  '"consent_commitment":"%s","mrn":"%s"}' % (pseudonym(1), digest("c"), mrn))
    site.put_consent(Consent(pseudonym(1), "STUDY-1", "site-1", "active", digest("c")))
    site.record_contribution(Contribution("job-p", 0, "site-1", digest("u"), 5, metrics={"dice": 0.5}))
    site.close()

    stored = b"".join(p.read_bytes() for p in ledger_path.parent.glob("ledger.sqlite*") if p.is_file())
    for identifier in (mrn, name, birth):
        assert identifier.encode() not in stored
    [record] = [e.payload for e in LocalLedger(ledger_path, COORDINATOR).events() if e.name == "ConsentRecorded"]
    assert set(record) == {"type", "pseudonym", "study", "site", "status", "consent_commitment", "tx_id", "timestamp",
                           "recorded_by"}
    assert record["pseudonym"] == pseudonym(1)


def test_event_stream_follows_new_commits(ledger_path):
    reader = LocalLedger(ledger_path, COORDINATOR)
    start = reader.height() + 1

    def write_later():
        time.sleep(0.3)
        LocalLedger(ledger_path, "Site2MSP").record_contribution(Contribution("job-e", 0, "site-2", digest("u"), 5))

    thread = threading.Thread(target=write_later)
    thread.start()
    events = []
    for event in reader.events(start_block=start, follow=True, timeout=5, poll_interval=0.05):
        events.append(event)
        break
    thread.join()
    assert [(e.name, e.payload["site"]) for e in events] == [("ContributionRecorded", "site-2")]


def test_importing_the_chaincode_leaves_logging_alone(tmp_path):
    """fabric-chaincode-python sets the root logger to DEBUG and logs every put_state value."""
    script = f"""
import logging, io
stream = io.StringIO()
logging.basicConfig(level=logging.WARNING, stream=stream)
root = logging.getLogger()
before = (root.level, list(root.handlers))
from clinfed import audit
from clinfed.ledger import LocalLedger, Consent
audit.init_consortium({str(tmp_path / 'l.sqlite')!r}, ['site-1'])
LocalLedger({str(tmp_path / 'l.sqlite')!r}, 'Site1MSP').put_consent(
    Consent('p-' + 'a' * 32, 'S1', 'site-1', 'active', 'b' * 64))
assert (root.level, list(root.handlers)) == before, (root.level, root.handlers)
assert 'p-' + 'a' * 32 not in stream.getvalue(), stream.getvalue()
"""
    result = subprocess.run([sys.executable, "-c", script], env=subprocess_env(), capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    assert "put_state" not in result.stderr


def test_ledger_in_use_by_another_writer_reports_unavailable_after_timeout(ledger_path):
    from clinfed.ledger import LedgerUnavailable

    blocker = sqlite3.connect(ledger_path, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    try:
        ledger = LocalLedger(ledger_path, "Site1MSP", busy_timeout=0.2)
        with pytest.raises(LedgerUnavailable, match="busy"):
            ledger.record_contribution(Contribution("job-b", 0, "site-1", digest("u"), 5))
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    ledger.record_contribution(Contribution("job-b", 0, "site-1", digest("u"), 5))
