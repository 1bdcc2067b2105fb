"""Is a job's chain on the ledger complete, and is this model file the one it records?"""

from __future__ import annotations

from dataclasses import dataclass, field

from .base import ContractLedger
from .records import JobRecords


@dataclass
class JobVerification:
    job_id: str
    rounds: int = 0
    records: int = 0
    final_round: int | None = None
    model_round: int | None = None
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
    """Check a job's records; see :func:`verify_records`."""
    return verify_records(ledger.job(job_id), job_id, model_sha256, model_round)


def verify_records(job: JobRecords, job_id: str, model_sha256: str | None = None,
                   model_round: int | None = None) -> JobVerification:
    """Check that every round from 0 to the last has its global model, that each participant of a
    round recorded its contribution and each other expected site was recorded absent, and, given
    ``model_sha256``, that it is the hash recorded for ``model_round`` (default: the final round).
    """
    result = JobVerification(job_id=job_id,
                             records=len(job.contributions) + len(job.global_models) + len(job.absences))
    models = {m.round: m for m in job.global_models}
    if not models:
        result.problems.append(f"job {job_id}: no global model is recorded")
        return result
    contributed = {(c.round, c.site) for c in job.contributions}
    absent = {(a.round, a.site) for a in job.absences}
    result.final_round = max(models)
    result.rounds = len(models)
    for round_ in range(result.final_round + 1):
        model = models.get(round_)
        if model is None:
            result.problems.append(f"round {round_}: no global model recorded")
            continue
        for site in model.participants:
            if (round_, site) not in contributed:
                result.problems.append(f"round {round_}: participant {site} has no contribution recorded")
            if (round_, site) in absent:
                result.problems.append(f"round {round_}: participant {site} is also recorded absent")
        for site in model.expected_sites or model.participants:
            if site not in model.participants and (round_, site) not in absent:
                result.problems.append(f"round {round_}: expected site {site} neither contributed to the model "
                                       f"nor was recorded absent")
    for round_, site in sorted(contributed):
        model = models.get(round_)
        if model is not None and site not in model.participants:
            result.notes.append(f"round {round_}: {site} recorded a contribution that the global model did not use")
    if model_sha256 is not None:
        target = result.final_round if model_round is None else model_round
        result.model_round = target
        recorded = models.get(target)
        if recorded is None:
            result.problems.append(f"round {target}: no global model recorded to compare the model file with")
        elif recorded.model_sha256 != model_sha256.lower():
            matches = [r for r, m in sorted(models.items()) if m.model_sha256 == model_sha256.lower()]
            also = f"; it matches round {matches[0]} instead" if matches else ""
            result.problems.append(f"round {target}: model file sha256 {model_sha256} differs from the recorded "
                                   f"{recorded.model_sha256}{also}")
    return result
