"""What a study asks of the FHIR record, as typed rules: the adapter holds no code list of its own.

``clinfed.data.study`` reads these from the study definition (``provisioning/studies/*.yml``)
and validates them; the adapter only applies them. Every window is in days relative to the
imaging study's date (negative = before).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from fhir_adapter import terminology as t

Coding = tuple[str, str]  # (system URL, code)


@dataclass(frozen=True)
class ValueSet:
    """Codes by system; ICD-10 entries are category prefixes matched in every ICD-10 variant
    (``-cm``, German ``-gm``), dots ignored, so E11 matches E11.9 and E1165."""

    codes: frozenset[Coding] = frozenset()
    icd10_prefixes: tuple[str, ...] = ()

    def matches(self, system: str | None, code: str | None) -> bool:
        if not code:
            return False
        if (system, code) in self.codes:
            return True
        if self.icd10_prefixes and system in t.ICD10_SYSTEMS:
            plain = code.replace(".", "").upper()
            return any(plain.startswith(p) for p in self.icd10_prefixes)
        return False

    def matches_concept(self, concept) -> bool:
        return concept is not None and any(self.matches(c.system, c.code) for c in concept.coding or ())

    def __bool__(self) -> bool:
        return bool(self.codes or self.icd10_prefixes)


@dataclass(frozen=True)
class Window:
    """Days relative to the imaging date; ``None`` on a side means unbounded."""

    before: int | None
    after: int | None

    def contains(self, offset_days: int) -> bool:
        return ((self.before is None or offset_days >= -self.before)
                and (self.after is None or offset_days <= self.after))


@dataclass(frozen=True)
class LabFeature:
    """A quantity Observation coded in ``codes``, converted to ``unit`` (UCUM)."""

    name: str
    codes: ValueSet
    unit: str
    plausible: tuple[float, float]  # in ``unit``; outside is an issue and counts as missing
    centre: float  # model input = (value - centre) / scale
    scale: float
    window: Window
    molar_mass_g_per_mol: float | None = None


@dataclass(frozen=True)
class CodedFeature:
    """An Observation coded in ``codes`` whose valueCodeableConcept maps to a number (staging)."""

    name: str
    codes: ValueSet
    values: dict[Coding, float]
    window: Window
    centre: float = 0.0
    scale: float = 1.0


@dataclass(frozen=True)
class DiagnosisFeature:
    """1 when a Condition coded in ``codes`` is recorded within ``window`` (0 otherwise)."""

    name: str
    codes: ValueSet
    window: Window


@dataclass(frozen=True)
class Demographics:
    age: bool = True
    age_range: tuple[float, float] = (0.0, 120.0)
    age_centre: float = 60.0
    age_scale: float = 10.0
    sex: bool = True


@dataclass(frozen=True)
class OutcomeRule:
    """The outcome class read from an Observation coded in ``codes`` within ``window``."""

    name: str
    codes: ValueSet
    classes: dict[Coding, int]
    window: Window


CONSENT_RULE_KINDS = ("study_reference", "broad_research", "policy_codes")
CONSENT_STATUSES = ("draft", "proposed", "active", "rejected", "inactive", "entered-in-error")
HISTORY_ORDERS = ("dateTime", "period.start")


@dataclass(frozen=True)
class ConsentRule:
    """Which Consents count for the study (see :mod:`fhir_adapter.consent`).

    Args:
        kind: ``study_reference`` (``provision.data`` names the study's identifier, at any
            provision depth), ``broad_research`` (scope, purpose, permit, and a period that
            covers the imaging date) or ``policy_codes`` (``policyRule`` or ``provision.code``
            in ``policy_codes``, e.g. the MII broad-consent module codes).
        revoking_statuses: Consent statuses that withdraw consent.
        history_order: what orders a patient's Consents (the latest decides; on a tie, revoking
            wins).
    """

    kind: str
    study_identifier: Coding | None = None
    scopes: frozenset[Coding] = frozenset({(t.CONSENT_SCOPE, "research")})
    purposes: frozenset[Coding] = frozenset()
    policy_codes: ValueSet = field(default_factory=ValueSet)
    period_must_cover_imaging: bool = True
    revoking_statuses: frozenset[str] = frozenset({"inactive", "rejected"})
    history_order: str = "dateTime"


@dataclass(frozen=True)
class FhirRules:
    """Everything the adapter applies for one study."""

    consent: ConsentRule
    demographics: Demographics = field(default_factory=Demographics)
    labs: tuple[LabFeature, ...] = ()
    coded: tuple[CodedFeature, ...] = ()
    diagnoses: tuple[DiagnosisFeature, ...] = ()
    outcome: OutcomeRule | None = None
    mrn_systems: frozenset[str] = frozenset()

    @property
    def feature_names(self) -> tuple[str, ...]:
        """Model features in order: demographics, labs, coded observations, diagnoses."""
        names = (["age"] if self.demographics.age else []) + (["sex_female"] if self.demographics.sex else [])
        return tuple(names + [f.name for f in self.labs] + [f.name for f in self.coded]
                     + [f.name for f in self.diagnoses])

    def scaling(self) -> dict[str, tuple[float, float]]:
        """(centre, scale) of each feature's model input."""
        scales: dict[str, tuple[float, float]] = {}
        if self.demographics.age:
            scales["age"] = (self.demographics.age_centre, self.demographics.age_scale)
        if self.demographics.sex:
            scales["sex_female"] = (0.0, 1.0)
        scales.update({f.name: (f.centre, f.scale) for f in self.labs})
        scales.update({f.name: (f.centre, f.scale) for f in self.coded})
        scales.update({f.name: (0.0, 1.0) for f in self.diagnoses})
        return scales
