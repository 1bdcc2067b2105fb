"""Is a job's chain on the ledger complete, and is this model file the one it records?

The check streams: global models, contributions and absences are read page by page in round
order and merged one round at a time, so a long job is never held in memory (only each round's
model hash is kept, to match a model file against).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Iterator

from .base import ContractLedger
from .records import Absence, Contribution, GlobalModel, JobRecords


@dataclass
class JobVerification:
    job_id: str
    rounds: int = 0
    records: int = 0
    final_round: int | None = None
    model_round: int | None = None
    matched_rounds: list = field(default_factory=list)  # rounds whose recorded model is the file given
    problems: list = field(default_factory=list)
    notes: list = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict:
        return {"job_id": self.job_id, "verified": self.ok, "rounds": self.rounds, "records": self.records,
                "final_round": self.final_round, "model_round": self.model_round, "problems": list(self.problems),
                "notes": list(self.notes)}


def verify_job(ledger: ContractLedger, job_id: str, model_sha256: str | None = None,
               model_round: int | None = None) -> JobVerification:
    """Check a job's records as they stream from the ledger; see :func:`verify_streams`."""
    return verify_streams(ledger.iter_global_models(job_id), ledger.iter_contributions(job_id),
                          ledger.iter_absences(job_id), job_id, model_sha256, model_round)


def verify_records(job: JobRecords, job_id: str, model_sha256: str | None = None,
                   model_round: int | None = None) -> JobVerification:
    """The same check on records already in memory."""
    by_round = lambda r: (r.round, getattr(r, "site", ""))  # noqa: E731
    return verify_streams(sorted(job.global_models, key=by_round), sorted(job.contributions, key=by_round),
                          sorted(job.absences, key=by_round), job_id, model_sha256, model_round)


class _Rounds:
    """One ordered stream of (round, site) records, taken a round at a time."""

    def __init__(self, records: Iterable):
        self._records: Iterator = iter(records)
        self._next = next(self._records, None)
        self.count = 0

    def take(self, round_: int) -> list:
        """The records of ``round_``, after skipping (and counting) those of earlier rounds."""
        taken = []
        while self._next is not None and self._next.round <= round_:
            if self._next.round == round_:
                taken.append(self._next)
            self.count += 1
            self._next = next(self._records, None)
        return taken

    def drain(self) -> None:
        while self._next is not None:
            self.count += 1
            self._next = next(self._records, None)


def verify_streams(models: Iterable[GlobalModel], contributions: Iterable[Contribution], absences: Iterable[Absence],
                   job_id: str, model_sha256: str | None = None, model_round: int | None = None) -> JobVerification:
    """Check that every round from 0 to the last has its global model, that each participant of a
    round recorded its contribution and each other expected site was recorded absent, and, given
    ``model_sha256``, that it is the hash recorded for ``model_round`` (default: the last round it
    matches, or the final round if it matches none). Each stream must be in (round, site) order,
    as the ledger returns them.
    """
    result = JobVerification(job_id=job_id)
    contributed, absent = _Rounds(contributions), _Rounds(absences)
    hashes: dict[int, str] = {}
    next_round = 0
    for model in models:
        for missing in range(next_round, model.round):
            result.problems.append(f"round {missing}: no global model recorded")
        round_ = model.round
        sites = {c.site for c in contributed.take(round_)}
        away = {a.site for a in absent.take(round_)}
        for site in model.participants:
            if site not in sites:
                result.problems.append(f"round {round_}: participant {site} has no contribution recorded")
            if site in away:
                result.problems.append(f"round {round_}: participant {site} is also recorded absent")
        for site in model.expected_sites or model.participants:
            if site not in model.participants and site not in away:
                result.problems.append(f"round {round_}: expected site {site} neither contributed to the model "
                                       f"nor was recorded absent")
        for site in sorted(sites - set(model.participants)):
            result.notes.append(f"round {round_}: {site} recorded a contribution that the global model did not use")
        hashes[round_] = model.model_sha256
        result.rounds += 1
        next_round = round_ + 1
    contributed.drain()
    absent.drain()
    result.records = result.rounds + contributed.count + absent.count
    if not hashes:
        result.problems.insert(0, f"job {job_id}: no global model is recorded")
        return result
    result.final_round = max(hashes)
    if model_sha256 is not None:
        digest = model_sha256.lower()
        result.matched_rounds = sorted(r for r, h in hashes.items() if h == digest)
        target = model_round if model_round is not None else (
            result.matched_rounds[-1] if result.matched_rounds else result.final_round)
        result.model_round = target
        recorded = hashes.get(target)
        if recorded is None:
            result.problems.append(f"round {target}: no global model recorded to compare the model file with")
        elif recorded != digest:
            also = f"; it matches round {result.matched_rounds[0]} instead" if result.matched_rounds else ""
            result.problems.append(f"round {target}: model file sha256 {model_sha256} differs from the recorded "
                                   f"{recorded}{also}")
        elif target != result.final_round:
            result.notes.append(f"the model file is the global model of round {target}, not of the final round "
                                f"{result.final_round}")
    return result
