"""The durable outbox: nothing lost while the ledger is unreachable or the process restarts, nothing doubled."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from clinfed.ledger import (AccessDenied, Contribution, DuplicateRecord, LedgerUnavailable, LocalLedger, Outbox,
                            OutboxLedger)
from ledger_helpers import COORDINATOR, SITES, digest, new_local_ledger, subprocess_env
from ledger_worker import FlakyLedger

WORKER = Path(__file__).with_name("ledger_worker.py")
JOB = "job-outbox"


@pytest.fixture
def ledger_path(tmp_path) -> Path:
    return new_local_ledger(tmp_path / "ledger.sqlite")


def run_worker(*args: str) -> str:
    result = subprocess.run([sys.executable, str(WORKER), "outbox", *args], env=subprocess_env(),
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout


def contribution(round_: int, site: str = "site-1") -> Contribution:
    return Contribution(JOB, round_, site, digest(f"{site}/{round_}"), 10)


def test_writes_survive_an_unreachable_ledger_and_a_restart_without_duplicates(ledger_path, tmp_path):
    journal, down = tmp_path / "outbox" / "site-1.jsonl", tmp_path / "ledger-down"
    common = [str(ledger_path), str(journal), str(down), "Site1MSP", "site-1", JOB]

    # First run: round 2 commits but its answer is lost, the ledger then goes away for rounds 3-5,
    # and the process dies without shutting down.
    run_worker(*common, "0", "5", "--lose-ack", "2", "--down-from", "3", "--crash")
    reader = LocalLedger(ledger_path, COORDINATOR)
    assert [c.round for c in reader.contributions(JOB)] == [0, 1, 2]
    queued = [json.loads(e.args[0])["round"] for e in Outbox(journal).pending()]
    assert queued == [2, 3, 4, 5]  # round 2 committed, but this process never heard so

    # Second run, ledger back: the queue is delivered first, in order, then the new rounds.
    down.unlink()
    assert run_worker(*common, "6", "7").strip() == "0"

    records = reader.contributions(JOB)
    assert [c.round for c in records] == list(range(8))
    assert reader.height() == 1 + 8  # the consortium plus exactly one transaction per round
    for round_ in range(8):
        assert len(reader.history("contribution", job_id=JOB, round=round_, site="site-1")) == 1
    assert Outbox(journal).pending() == []
    ordered = [e.payload["round"] for e in reader.events() if e.name == "ContributionRecorded"]
    assert ordered == list(range(8))


def test_strict_policy_waits_for_the_commit_and_keeps_the_write_queued_on_timeout(ledger_path, tmp_path):
    down = tmp_path / "down"
    down.touch()
    ledger = OutboxLedger(FlakyLedger(ledger_path, "Site1MSP", down, None), tmp_path / "strict.jsonl",
                          policy="strict", retry_interval=0.05, strict_timeout=0.3)
    with pytest.raises(LedgerUnavailable, match=r"was not committed within 0 s .*stays queued in .*strict.jsonl"):
        ledger.record_contribution(contribution(0))
    assert ledger.pending() == 1
    down.unlink()
    written = ledger.record_contribution(contribution(1))  # delivers round 0 first, then its own
    assert written.tx_id and written.round == 1
    assert [c.round for c in ledger.contributions(JOB)] == [0, 1]
    assert ledger.close() == 0


def test_strict_policy_raises_the_callers_own_duplicate_and_refusals(ledger_path, tmp_path):
    ledger = OutboxLedger(LocalLedger(ledger_path, "Site1MSP"), tmp_path / "strict.jsonl", policy="strict")
    ledger.record_contribution(contribution(0))
    with pytest.raises(DuplicateRecord):
        ledger.record_contribution(contribution(0))
    with pytest.raises(AccessDenied):
        ledger.record_contribution(contribution(0, site="site-2"))
    assert ledger.pending() == 0


def test_a_refused_write_is_kept_for_the_operator_and_does_not_block_the_queue(ledger_path, tmp_path):
    refused = []
    ledger = OutboxLedger(LocalLedger(ledger_path, "Site1MSP"), tmp_path / "async.jsonl", background=False,
                          on_rejected=lambda entry, error: refused.append((entry.seq, error.code)))
    assert ledger.record_contribution(contribution(0, site="site-2")).tx_id is None  # queued, not yet sent
    ledger.record_contribution(contribution(1))
    assert ledger.flush() == 0
    assert refused == [(1, "ACCESS_DENIED")]
    assert [c.round for c in ledger.contributions(JOB)] == [1]
    [kept] = Outbox(tmp_path / "async.jsonl").entries()  # delivered entries are compacted away
    assert (kept.outcome, kept.detail.split(":")[0]) == ("rejected", "CLINFED_ACCESS_DENIED")


def test_background_delivery_catches_up_when_the_ledger_returns(ledger_path, tmp_path):
    down = tmp_path / "down"
    down.touch()
    ledger = OutboxLedger(FlakyLedger(ledger_path, "Site1MSP", down, None), tmp_path / "bg.jsonl",
                          retry_interval=0.05)
    for round_ in range(3):
        ledger.record_contribution(contribution(round_))
    time.sleep(0.2)
    assert ledger.pending() == 3
    down.unlink()
    deadline = time.monotonic() + 10
    while ledger.pending() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert [c.round for c in ledger.contributions(JOB)] == [0, 1, 2]
    assert ledger.close() == 0


def test_a_torn_last_line_from_a_crash_is_skipped(tmp_path):
    journal = tmp_path / "torn.jsonl"
    outbox = Outbox(journal)
    outbox.append("RecordContribution", ['{"round":0}'])
    with open(journal, "ab") as handle:
        handle.write(b'{"put":2,"function":"RecordContri')  # the process died mid-append
    reopened = Outbox(journal)
    assert [e.seq for e in reopened.pending()] == [1]
    reopened.append("RecordContribution", ['{"round":1}'])
    fresh = Outbox(journal)
    assert [e.args for e in fresh.pending()] == [['{"round":0}'], ['{"round":1}']]
    assert fresh.torn_lines == 1


def test_ledger_is_opened_from_a_job_config(ledger_path, tmp_path):
    from clinfed.errors import ConfigError
    from clinfed.ledger import open_ledger

    ledger = open_ledger({"backend": "local", "path": ledger_path.name, "msp_id": "Site1MSP",
                          "outbox": "outbox/site-1.jsonl", "policy": "strict"}, base_dir=ledger_path.parent)
    assert isinstance(ledger, OutboxLedger) and ledger.policy == "strict"
    assert ledger.record_contribution(contribution(0)).tx_id
    ledger.close()
    with pytest.raises(ConfigError, match="field 'msp_id' is required"):
        open_ledger({"path": "x.sqlite"})
    with pytest.raises(ConfigError, match="unknown field.*pathh"):
        open_ledger({"pathh": "x.sqlite", "msp_id": "M"})
