"""Child process for the multi-process ledger tests (run as a script, not collected by pytest).

    ledger_worker.py contribute DB MSP SITE JOB N
        record rounds 0..N-1 of SITE's contributions to JOB, reading back after each write.
    ledger_worker.py outbox DB OUTBOX DOWN_FLAG MSP SITE JOB FIRST LAST [--lose-ack R] [--down-from R] [--crash]
        record rounds FIRST..LAST through an async OutboxLedger whose backend is unreachable while
        DOWN_FLAG exists; --lose-ack makes the write of round R commit but report the ledger
        unreachable; --down-from creates DOWN_FLAG before round R; --crash exits without closing
        (as a killed process would).
"""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

from clinfed.ledger import Contribution, LedgerUnavailable, LocalLedger, OutboxLedger


def _contribution(job: str, site: str, round_: int) -> Contribution:
    return Contribution(job_id=job, round=round_, site=site,
                        update_sha256=hashlib.sha256(f"{job}/{site}/{round_}".encode()).hexdigest(),
                        n_samples=10 + round_, metrics={"loss": 1.0 / (round_ + 1)})


def contribute(db, msp, site, job, n):
    ledger = LocalLedger(db, msp)
    for round_ in range(int(n)):
        ledger.record_contribution(_contribution(job, site, round_))
        assert any(c.round == round_ and c.site == site for c in ledger.contributions(job))
    ledger.close()


class FlakyLedger(LocalLedger):
    """LocalLedger that is unreachable while a flag file exists, and can lose one commit's answer."""

    def __init__(self, db, msp, down_flag: Path, lose_ack_round: int | None):
        super().__init__(db, msp)
        self.down_flag, self.lose_ack_round = down_flag, lose_ack_round

    def submit(self, function, *args):
        if self.down_flag.exists():
            raise LedgerUnavailable("ledger unreachable (test flag)")
        result = super().submit(function, *args)
        if self.lose_ack_round is not None and f'"round":{self.lose_ack_round},' in args[0]:
            self.lose_ack_round = None
            raise LedgerUnavailable("connection lost after commit (test)")
        return result


def outbox(db, outbox_path, down_flag, msp, site, job, first, last, *options):
    lose_ack = int(options[options.index("--lose-ack") + 1]) if "--lose-ack" in options else None
    down_from = int(options[options.index("--down-from") + 1]) if "--down-from" in options else None
    backend = FlakyLedger(db, msp, Path(down_flag), lose_ack)
    ledger = OutboxLedger(backend, outbox_path, policy="async", background=False)
    ledger.flush()  # what a previous run left queued goes first
    for round_ in range(int(first), int(last) + 1):
        if round_ == down_from:
            Path(down_flag).touch()
        ledger.record_contribution(_contribution(job, site, round_))
        ledger.flush()
    if "--crash" in options:
        os._exit(0)
    print(ledger.close())


if __name__ == "__main__":
    command, *arguments = sys.argv[1:]
    {"contribute": contribute, "outbox": outbox}[command](*arguments)
