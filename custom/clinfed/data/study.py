"""The study definition: what a consortium's protocol asks of each site's data.

One YAML file per study, ``provisioning/studies/<study>.yml`` (schema:
``provisioning/studies/README.md``), validated on load: a bad definition is refused with a
:class:`~clinfed.errors.ConfigError` naming the file and the field. It drives ingestion (which
Consents count, which series and label, which features and outcome) and training (spacing,
ROI, intensity normalisation). The FHIR parts become :class:`fhir_adapter.rules.FhirRules`.

Where a study is found (:func:`find_study`): an explicit path; else ``<name>.yml`` in each of
the ``search`` folders given (a site's ``local/studies``), ``$CLINFED_STUDIES_DIR``, and the
studies shipped with the bundle (``provisioning/studies``, installed as ``clinfed/studies``).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from clinfed.errors import ConfigError
from fhir_adapter import terminology as t
from fhir_adapter.rules import (
    CONSENT_RULE_KINDS,
    CONSENT_STATUSES,
    HISTORY_ORDERS,
    CodedFeature,
    ConsentRule,
    Demographics,
    DiagnosisFeature,
    FhirRules,
    LabFeature,
    OutcomeRule,
    ValueSet,
    Window,
)
from fhir_adapter.units import UnitError, conversion_factor, parse_ucum

STUDIES_ENV = "CLINFED_STUDIES_DIR"
# ``clinfed/studies`` links to ``provisioning/studies`` in the repository and is installed as
# package data, so an installed bundle (not only a checkout) ships the consortium's studies.
SHIPPED_STUDIES_DIR = Path(__file__).resolve().parent.parent / "studies"
MAX_DEFINITION_BYTES = 256 * 1024
MODALITIES = ("CT", "MR")
STUDY_CHOICES = ("first", "last", "all")
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


@dataclass(frozen=True)
class SeriesChoice:
    """Which series of an imaging study is the one to train on."""

    modalities: tuple[str, ...]
    description: re.Pattern | None = None  # SeriesDescription must match (search, case-insensitive)
    body_part: str | None = None  # BodyPartExamined must equal (case-insensitive)


@dataclass(frozen=True)
class LabelChoice:
    """Which SEG segment is the label: by its label, or by its segmented property type code."""

    segment_label: str | None = None
    property_code: tuple[str, str] | None = None  # (coding scheme designator, code value), e.g. ("SCT", "108369006")


@dataclass(frozen=True)
class Intensity:
    """Per-modality normalisation: CT by a HU window scaled to [0, 1], MR by a z-score over
    non-zero voxels."""

    ct_window: tuple[float, float] = (-200.0, 300.0)
    mr_zscore_nonzero: bool = True


@dataclass(frozen=True)
class ImagingSpec:
    series: SeriesChoice
    label: LabelChoice
    studies_per_patient: str  # first | last | all
    spacing_mm: tuple[float, float, float]
    roi: tuple[int, int, int]
    intensity: Intensity


@dataclass(frozen=True)
class StudyDefinition:
    id: str
    title: str
    imaging: ImagingSpec
    fhir: FhirRules
    source: Path | None = None

    @property
    def feature_names(self) -> tuple[str, ...]:
        return self.fhir.feature_names

    @property
    def ehr_size(self) -> int:
        """Length of the model's EHR input: each feature's value and its missing-indicator."""
        return 2 * len(self.fhir.feature_names)

    @property
    def segmentation_only(self) -> bool:
        return self.fhir.outcome is None


# --------------------------------------------------------------------------------- loading


class _StrictLoader(yaml.SafeLoader):
    """YAML without anchors or aliases (no expansion bombs) and without duplicate keys."""


def _refuse_alias(loader, node):
    raise yaml.constructor.ConstructorError(None, None, "anchors and aliases are not allowed", node.start_mark)


def _mapping(loader, node, deep=False):
    seen = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
        seen.add(key)
    return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping)


def _compose_node(self, parent, index):
    if self.check_event(yaml.events.AliasEvent) or getattr(self.peek_event(), "anchor", None):
        raise yaml.composer.ComposerError(None, None, "anchors and aliases are not allowed",
                                          self.peek_event().start_mark)
    return yaml.SafeLoader.compose_node(self, parent, index)


_StrictLoader.compose_node = _compose_node


def read_yaml(path: Path) -> Any:
    """A person-edited YAML file: size-limited, no anchors/aliases, no duplicate keys."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: study definition not found")
    if path.stat().st_size > MAX_DEFINITION_BYTES:
        raise ConfigError(f"{path}: {path.stat().st_size} bytes, more than a study definition may hold "
                          f"({MAX_DEFINITION_BYTES})")
    try:
        return yaml.load(path.read_text(encoding="utf-8"), Loader=_StrictLoader)  # noqa: S506 (strict safe loader)
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid YAML for a study definition: {exc}") from None


def find_study(name_or_path: str | os.PathLike, search: list[Path] | tuple[Path, ...] = ()) -> Path:
    """The file of a study: a path as given, else ``<name>.yml`` in the search folders."""
    candidate = Path(name_or_path)
    if candidate.suffix in (".yml", ".yaml") or candidate.is_file():
        if not candidate.is_file():
            raise ConfigError(f"{candidate}: study definition not found")
        return candidate
    folders = [Path(p) for p in search]
    if os.environ.get(STUDIES_ENV):
        folders.append(Path(os.environ[STUDIES_ENV]))
    folders.append(SHIPPED_STUDIES_DIR)
    for folder in folders:
        path = folder / f"{name_or_path}.yml"
        if path.is_file():
            return path
    raise ConfigError(f"study {str(name_or_path)!r}: no definition {name_or_path}.yml in "
                      + ", ".join(str(f) for f in folders))


def load_study(name_or_path: str | os.PathLike, search: list[Path] | tuple[Path, ...] = ()) -> StudyDefinition:
    """Find, read and validate a study definition (see the module docstring)."""
    path = find_study(name_or_path, search)
    return parse_study(read_yaml(path), path)


def parse_study(data: Any, source: Path | None = None) -> StudyDefinition:
    """Validate a decoded study definition; raises ConfigError naming the field."""
    f = _Fields(source)
    top = f.mapping(data, "", required=("id", "title", "consent", "imaging", "features", "outcome"),
                    optional=("patients",))
    study_id = f.text(top["id"], "id")
    if not _ID.match(study_id):
        f.fail("id", "must be 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit")
    patients = f.mapping(top.get("patients") or {}, "patients", optional=("mrn_systems",))
    mrn_systems = frozenset(f.text(s, f"patients.mrn_systems[{i}]")
                            for i, s in enumerate(f.sequence(patients.get("mrn_systems") or [], "patients.mrn_systems")))
    consent = _consent(f, top["consent"], study_id)
    imaging = _imaging(f, top["imaging"])
    demographics, labs, coded, diagnoses = _features(f, top["features"])
    outcome = None if top["outcome"] in (None, "none") else _outcome(f, top["outcome"])
    _no_overlaps(f, labs, coded, diagnoses, outcome)
    rules = FhirRules(consent=consent, demographics=demographics, labs=labs, coded=coded, diagnoses=diagnoses,
                      outcome=outcome, mrn_systems=mrn_systems)
    return StudyDefinition(study_id, f.text(top["title"], "title"), imaging, rules, source)


class _Fields:
    """Typed access to the decoded YAML that names the field in every error."""

    def __init__(self, source: Path | None):
        self.where = f"{source}: " if source else ""

    def fail(self, field: str, problem: str):
        raise ConfigError(f"{self.where}field '{field or '(top level)'}': {problem}")

    def mapping(self, value, field: str, required=(), optional=()) -> dict:
        if not isinstance(value, dict):
            self.fail(field, f"must be a mapping, got {type(value).__name__}")
        for key in required:
            if key not in value:
                self.fail(_join(field, key), "missing (required)")
        unknown = sorted(str(k) for k in value if k not in required and k not in optional)
        if unknown and (required or optional):
            self.fail(_join(field, unknown[0]), f"unknown field (expected {', '.join(list(required) + list(optional))})")
        return value

    def sequence(self, value, field: str, non_empty: bool = False) -> list:
        if not isinstance(value, list):
            self.fail(field, f"must be a list, got {type(value).__name__}")
        if non_empty and not value:
            self.fail(field, "must not be empty")
        return value

    def text(self, value, field: str) -> str:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = str(value)  # codes such as 1663004 read as numbers from YAML
        if not isinstance(value, str) or not value.strip():
            self.fail(field, "must be a non-empty text")
        return value.strip()

    def number(self, value, field: str, positive: bool = False) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            self.fail(field, f"must be a number, got {value!r}")
        if positive and not value > 0:
            self.fail(field, f"must be > 0, got {value!r}")
        return float(value)

    def boolean(self, value, field: str) -> bool:
        if not isinstance(value, bool):
            self.fail(field, f"must be true or false, got {value!r}")
        return value

    def choice(self, value, field: str, choices) -> str:
        value = self.text(value, field)
        if value not in choices:
            self.fail(field, f"must be one of {', '.join(choices)}, got {value!r}")
        return value

    def range(self, value, field: str) -> tuple[float, float]:
        items = self.sequence(value, field)
        if len(items) != 2:
            self.fail(field, "must be [low, high]")
        low, high = (self.number(v, f"{field}[{i}]") for i, v in enumerate(items))
        if not low < high:
            self.fail(field, f"low must be below high, got [{low:g}, {high:g}]")
        return low, high

    def window(self, value, field: str, default: tuple[int | None, int | None]) -> Window:
        """``[days_before, days_after]`` (either may be null: unbounded) or one number: days before."""
        if value is None:
            return Window(*default)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            items = [value, 0]
        else:
            items = self.sequence(value, field)
            if len(items) != 2:
                self.fail(field, "must be [days_before, days_after] or a number of days before")
        sides = []
        for i, v in enumerate(items):
            if v is None:
                sides.append(None)
                continue
            days = self.number(v, f"{field}[{i}]")
            if days < 0 or days != int(days):
                self.fail(f"{field}[{i}]", f"must be a whole number of days >= 0, got {v!r}")
            sides.append(int(days))
        return Window(*sides)

    def system(self, key, field: str, allowed: tuple[str, ...] | None = None) -> str:
        """A code system: an alias (loinc, snomed, icd10, ...) or an absolute URI; ``allowed``
        restricts to some aliases."""
        name = self.text(key, field)
        if allowed is not None:
            if name not in allowed:
                self.fail(field, f"unknown code system {name!r} here (expected {', '.join(allowed)})")
            return t.SYSTEM_ALIASES[name]
        if name in t.SYSTEM_ALIASES:
            return t.SYSTEM_ALIASES[name]
        if re.match(r"^(https?://|urn:)\S+$", name):
            return name
        self.fail(field, f"unknown code system {name!r} (expected one of {', '.join(t.SYSTEM_ALIASES)}, "
                         "or an absolute URI such as http://... or urn:...)")

    def value_set(self, value, field: str, allowed: tuple[str, ...] | None = None) -> ValueSet:
        """``{system: [code, ...]}``; ICD-10 codes are category prefixes."""
        groups = self.mapping(value, field)
        if not groups:
            self.fail(field, "must list at least one code")
        codes, prefixes = set(), []
        for key, items in groups.items():
            system = self.system(key, _join(field, key), allowed)
            for i, code in enumerate(self.sequence(items, _join(field, key), non_empty=True)):
                text = self.text(code, f"{_join(field, key)}[{i}]")
                if system == t.ICD10:
                    prefixes.append(text.replace(".", "").upper())
                else:
                    codes.add((system, text))
        return ValueSet(frozenset(codes), tuple(prefixes))

    def coding(self, value, field: str) -> tuple[str, str]:
        item = self.mapping(value, field, required=("system", "code"), optional=("class", "value"))
        return self.system(item["system"], f"{field}.system"), self.text(item["code"], f"{field}.code")


def _join(field: str, key) -> str:
    return f"{field}.{key}" if field else str(key)


def _consent(f: _Fields, value, study_id: str) -> ConsentRule:
    if not value:
        f.fail("consent", "is empty: give one of " + ", ".join(CONSENT_RULE_KINDS))
    c = f.mapping(value, "consent", optional=(*CONSENT_RULE_KINDS, "revoking_statuses", "history_order"))
    kinds = [k for k in CONSENT_RULE_KINDS if k in c]
    if len(kinds) != 1:
        f.fail("consent", f"must give exactly one consent rule ({', '.join(CONSENT_RULE_KINDS)}), got "
                          f"{', '.join(kinds) or 'none'}")
    kind = kinds[0]
    revoking = frozenset(f.choice(s, f"consent.revoking_statuses[{i}]", CONSENT_STATUSES) for i, s in
                         enumerate(f.sequence(c.get("revoking_statuses", ["inactive", "rejected"]),
                                              "consent.revoking_statuses")))
    if revoking & {"active", "draft", "proposed"}:
        f.fail("consent.revoking_statuses", "active, draft and proposed cannot revoke a consent")
    history = f.choice(c.get("history_order", "dateTime"), "consent.history_order", HISTORY_ORDERS)
    body = c[kind]
    if not body:
        f.fail(f"consent.{kind}", "is empty")
    if kind == "study_reference":
        ref = f.mapping(body, "consent.study_reference", optional=("system", "value"))
        identifier = (f.text(ref.get("system", t.STUDY_IDENTIFIER_SYSTEM), "consent.study_reference.system"),
                      f.text(ref.get("value", study_id), "consent.study_reference.value"))
        return ConsentRule(kind, study_identifier=identifier, revoking_statuses=revoking, history_order=history)
    if kind == "broad_research":
        b = f.mapping(body, "consent.broad_research", required=("purposes",),
                      optional=("scopes", "period_must_cover_imaging"))
        scopes = f.value_set(b.get("scopes", {"consentscope": ["research"]}), "consent.broad_research.scopes")
        purposes = f.value_set(b["purposes"], "consent.broad_research.purposes")
        cover = f.boolean(b.get("period_must_cover_imaging", True), "consent.broad_research.period_must_cover_imaging")
        return ConsentRule(kind, scopes=scopes.codes, purposes=purposes.codes, period_must_cover_imaging=cover,
                           revoking_statuses=revoking, history_order=history)
    codes = f.value_set(body, "consent.policy_codes")
    return ConsentRule(kind, policy_codes=codes, revoking_statuses=revoking, history_order=history)


def _imaging(f: _Fields, value) -> ImagingSpec:
    im = f.mapping(value, "imaging", required=("modalities", "label", "spacing_mm", "roi"),
                   optional=("series", "studies_per_patient", "intensity"))
    modalities = tuple(f.choice(m, f"imaging.modalities[{i}]", MODALITIES)
                       for i, m in enumerate(f.sequence(im["modalities"], "imaging.modalities", non_empty=True)))
    series = f.mapping(im.get("series") or {}, "imaging.series", optional=("description", "body_part"))
    pattern = None
    if series.get("description") is not None:
        try:
            pattern = re.compile(f.text(series["description"], "imaging.series.description"), re.IGNORECASE)
        except re.error as exc:
            f.fail("imaging.series.description", f"not a regular expression: {exc}")
    body_part = f.text(series["body_part"], "imaging.series.body_part") if series.get("body_part") else None
    label = f.mapping(im["label"], "imaging.label", optional=("segment_label", "property_code"))
    if len(label) != 1:
        f.fail("imaging.label", "must give exactly one of segment_label, property_code")
    if "segment_label" in label:
        label_choice = LabelChoice(segment_label=f.text(label["segment_label"], "imaging.label.segment_label"))
    else:
        code = f.mapping(label["property_code"], "imaging.label.property_code", required=("scheme", "code"))
        label_choice = LabelChoice(property_code=(f.text(code["scheme"], "imaging.label.property_code.scheme"),
                                                  f.text(code["code"], "imaging.label.property_code.code")))
    spacing = f.sequence(im["spacing_mm"], "imaging.spacing_mm")
    if len(spacing) != 3:
        f.fail("imaging.spacing_mm", "must be three spacings [x, y, z] in mm")
    spacing_mm = tuple(f.number(s, f"imaging.spacing_mm[{i}]", positive=True) for i, s in enumerate(spacing))
    roi = f.sequence(im["roi"], "imaging.roi")
    if len(roi) != 3 or any(isinstance(r, bool) or not isinstance(r, int) or r < 16 or r % 16 for r in roi):
        f.fail("imaging.roi", f"must be three patch sizes [x, y, z], each a multiple of 16 (the model pools four "
                              f"times), got {roi!r}")
    intensity = f.mapping(im.get("intensity") or {}, "imaging.intensity", optional=("CT", "MR"))
    ct = f.mapping(intensity.get("CT") or {"window": [-200, 300]}, "imaging.intensity.CT", required=("window",))
    mr = f.mapping(intensity.get("MR") or {"zscore": "nonzero"}, "imaging.intensity.MR", required=("zscore",))
    zscore = f.choice(mr["zscore"], "imaging.intensity.MR.zscore", ("nonzero", "all"))
    return ImagingSpec(
        series=SeriesChoice(modalities, pattern, body_part), label=label_choice,
        studies_per_patient=f.choice(im.get("studies_per_patient", "last"), "imaging.studies_per_patient",
                                     STUDY_CHOICES),
        spacing_mm=spacing_mm, roi=tuple(int(r) for r in roi),
        intensity=Intensity(f.range(ct["window"], "imaging.intensity.CT.window"), zscore == "nonzero"))


def _scaling(f: _Fields, item: dict, field: str, default=(0.0, 1.0)) -> tuple[float, float]:
    centre = f.number(item.get("centre", default[0]), f"{field}.centre")
    scale = f.number(item.get("scale", default[1]), f"{field}.scale", positive=True)
    return centre, scale


def _features(f: _Fields, value):
    feats = f.mapping(value or {}, "features", optional=("demographics", "labs", "coded", "diagnoses"))
    demo = f.mapping(feats.get("demographics") or {}, "features.demographics", optional=("age", "sex"))
    age = demo.get("age", True)
    if age is False:
        demographics = Demographics(age=False, sex=f.boolean(demo.get("sex", True), "features.demographics.sex"))
    else:
        a = f.mapping(age if isinstance(age, dict) else {}, "features.demographics.age",
                      optional=("range", "centre", "scale"))
        age_range = f.range(a.get("range", [0, 120]), "features.demographics.age.range")
        if age_range[0] < 0 or age_range[1] > 120:
            f.fail("features.demographics.age.range", "must lie within 0-120 years")
        centre, scale = _scaling(f, a, "features.demographics.age", (60.0, 10.0))
        demographics = Demographics(True, age_range, centre, scale,
                                    f.boolean(demo.get("sex", True), "features.demographics.sex"))
    labs = []
    for name, item in f.mapping(feats.get("labs") or {}, "features.labs").items():
        field = f"features.labs.{name}"
        lab = f.mapping(item, field, required=("codes", "unit", "range"),
                        optional=("units", "molar_mass_g_per_mol", "centre", "scale", "window_days"))
        codes = f.value_set(lab["codes"], f"{field}.codes", allowed=("loinc",))
        unit = f.text(lab["unit"], f"{field}.unit")
        try:
            parse_ucum(unit)
        except UnitError:
            f.fail(f"{field}.unit", f"{unit!r} is not a UCUM unit")
        molar = lab.get("molar_mass_g_per_mol")
        molar = None if molar is None else f.number(molar, f"{field}.molar_mass_g_per_mol", positive=True)
        for i, other in enumerate(f.sequence(lab.get("units") or [], f"{field}.units")):
            other = f.text(other, f"{field}.units[{i}]")
            try:
                conversion_factor(other, unit, molar)
            except UnitError as exc:
                f.fail(f"{field}.units[{i}]", f"cannot be converted: {exc}")
        centre, scale = _scaling(f, lab, field)
        labs.append(LabFeature(_feature_name(f, name, field), codes, unit, f.range(lab["range"], f"{field}.range"),
                               centre, scale, f.window(lab.get("window_days"), f"{field}.window_days", (180, 30)),
                               molar))
    coded = []
    for name, item in f.mapping(feats.get("coded") or {}, "features.coded").items():
        field = f"features.coded.{name}"
        obs = f.mapping(item, field, required=("codes", "values"), optional=("centre", "scale", "window_days"))
        values = {}
        for i, entry in enumerate(f.sequence(obs["values"], f"{field}.values", non_empty=True)):
            coding = f.coding(entry, f"{field}.values[{i}]")
            if "value" not in entry:
                f.fail(f"{field}.values[{i}].value", "missing (required)")
            if coding in values:
                f.fail(f"{field}.values[{i}]", f"{coding[1]} is mapped twice")
            values[coding] = f.number(entry["value"], f"{field}.values[{i}].value")
        centre, scale = _scaling(f, obs, field)
        coded.append(CodedFeature(_feature_name(f, name, field), f.value_set(obs["codes"], f"{field}.codes"), values,
                                  f.window(obs.get("window_days"), f"{field}.window_days", (365, 30)), centre, scale))
    diagnoses = []
    for name, item in f.mapping(feats.get("diagnoses") or {}, "features.diagnoses").items():
        field = f"features.diagnoses.{name}"
        dx = f.mapping(item, field, required=("codes",), optional=("window_days",))
        diagnoses.append(DiagnosisFeature(_feature_name(f, name, field),
                                          f.value_set(dx["codes"], f"{field}.codes", allowed=("snomed", "icd10")),
                                          f.window(dx.get("window_days"), f"{field}.window_days", (None, 0))))
    return demographics, tuple(labs), tuple(coded), tuple(diagnoses)


def _feature_name(f: _Fields, name, field: str) -> str:
    if not isinstance(name, str) or not re.match(r"^[a-z][a-z0-9_]{0,40}$", name) or name in ("age", "sex_female"):
        f.fail(field, "feature names are lower-case letters, digits and '_' (not age or sex_female)")
    return name


def _outcome(f: _Fields, value) -> OutcomeRule:
    out = f.mapping(value, "outcome", required=("name", "codes", "classes"), optional=("window_days",))
    classes = {}
    for i, entry in enumerate(f.sequence(out["classes"], "outcome.classes", non_empty=True)):
        coding = f.coding(entry, f"outcome.classes[{i}]")
        if "class" not in entry:
            f.fail(f"outcome.classes[{i}].class", "missing (required)")
        cls = entry["class"]
        if cls not in (0, 1) or isinstance(cls, bool):
            f.fail(f"outcome.classes[{i}].class", f"must be 0 or 1 (the outcome is binary), got {cls!r}")
        if coding in classes:
            f.fail(f"outcome.classes[{i}]", f"{coding[1]} is mapped twice")
        classes[coding] = int(cls)
    if set(classes.values()) != {0, 1}:
        f.fail("outcome.classes", "must map codes to both classes 0 and 1")
    return OutcomeRule(f.text(out["name"], "outcome.name"), f.value_set(out["codes"], "outcome.codes"), classes,
                       f.window(out.get("window_days"), "outcome.window_days", (365, 90)))


def _no_overlaps(f: _Fields, labs, coded, diagnoses, outcome) -> None:
    """A code in two value sets would count one record twice: refuse naming both fields."""
    owner: dict[tuple[str, str], str] = {}
    sets = ([(f"features.labs.{x.name}.codes", x.codes) for x in labs]
            + [(f"features.coded.{x.name}.codes", x.codes) for x in coded]
            + ([("outcome.codes", outcome.codes)] if outcome else []))
    for field, value_set in sets:
        for coding in sorted(value_set.codes):
            if coding in owner:
                f.fail(field, f"code {coding[1]} ({coding[0]}) is also in {owner[coding]}: value sets must not overlap")
            owner[coding] = field
    dx_owner: dict[tuple[str, str], str] = {}
    prefixes: list[tuple[str, str]] = []
    for feature in diagnoses:
        field = f"features.diagnoses.{feature.name}.codes"
        for coding in sorted(feature.codes.codes):
            if coding in dx_owner:
                f.fail(field, f"code {coding[1]} ({coding[0]}) is also in {dx_owner[coding]}: value sets must not overlap")
            dx_owner[coding] = field
        for prefix in feature.codes.icd10_prefixes:
            for other, other_field in prefixes:
                if other_field != field and (prefix.startswith(other) or other.startswith(prefix)):
                    f.fail(field, f"ICD-10 {prefix} overlaps {other} in {other_field}: value sets must not overlap")
            prefixes.append((prefix, field))
