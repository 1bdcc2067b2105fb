"""Helpers for the site-level data tests: pseudonyms of ground truth, and what a site must yield."""

from __future__ import annotations

from pathlib import Path

from clinfed.data.ingest import CONSENT_REVOKED, NO_CONSENT, SiteIngestion
from clinfed.data.pseudonym import Pseudonymiser
from clinfed.data.synth import SyntheticCase

CONSENT_REASON = {"revoked": CONSENT_REVOKED, "none": NO_CONSENT}


def pseudonyms(site_dir: Path, truth: list[SyntheticCase]) -> list[str]:
    """Pseudonym of each ground-truth patient under the site's own key, in truth order."""
    pseudonymise = Pseudonymiser.for_site(site_dir)
    return [pseudonymise(case.patient.mrn) for case in truth]


def active_indices(truth: list[SyntheticCase]) -> list[int]:
    return [i for i, case in enumerate(truth) if case.patient.consent == "active"]


def assert_only_these_excluded(result: SiteIngestion, site_dir: Path, truth: list[SyntheticCase],
                               broken: dict[int, str], subjects: dict[int, str] | None = None) -> None:
    """Every consented patient not in ``broken`` is a usable case; exclusions are exactly the
    consent ones from the ground truth plus ``broken`` (index -> reason), listed under the
    patient's pseudonym or under ``subjects[index]`` where given."""
    subjects = subjects or {}
    names = pseudonyms(site_dir, truth)
    expected_cases = {names[i] for i in active_indices(truth) if i not in broken}
    assert {case.pseudonym for case in result.cases} == expected_cases
    assert len(result.cases) == len(expected_cases), "a patient was ingested twice"
    expected = {(names[i], CONSENT_REASON[c.patient.consent]) for i, c in enumerate(truth)
                if c.patient.consent != "active"}
    expected |= {(subjects.get(i, names[i]), reason) for i, reason in broken.items()}
    actual = [(e.subject, e.reason) for e in result.exclusions]
    assert sorted(actual) == sorted(expected)


def exclusion_of(result: SiteIngestion, subject: str):
    found = [e for e in result.exclusions if e.subject == subject]
    assert len(found) == 1, f"expected one exclusion for {subject}, got {found}"
    return found[0]
