"""The study definition is validated on load: each bad definition is refused naming the field."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from clinfed.data.study import SHIPPED_STUDIES_DIR, load_study, parse_study, read_yaml
from clinfed.errors import ConfigError

LIVER = read_yaml(SHIPPED_STUDIES_DIR / "clinfed-tumour-seg.yml")


def refused(data: dict, tmp_path: Path) -> str:
    path = tmp_path / "bad-study.yml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    with pytest.raises(ConfigError) as caught:
        load_study(path)
    message = str(caught.value)
    assert str(path) in message  # the file is named
    return message


def edited(**changes) -> dict:
    data = copy.deepcopy(LIVER)
    for dotted, value in changes.items():
        node = data
        *parents, last = dotted.split("__")
        for key in parents:
            node = node[key]
        if value is KeyError:
            del node[last]
        else:
            node[last] = value
    return data


def test_both_shipped_studies_load_with_their_features():
    liver, brain = load_study("clinfed-tumour-seg"), load_study("brain-mr-tumour")
    assert liver.feature_names == ("age", "sex_female", "glucose", "creatinine", "diabetes", "hypertension")
    assert liver.ehr_size == 12 and liver.fhir.consent.kind == "study_reference"
    assert brain.fhir.consent.kind == "broad_research" and brain.imaging.series.modalities == ("MR",)
    assert ("http://loinc.org", "21858-5") in brain.fhir.outcome.codes.codes


def test_unknown_code_system_is_refused_naming_the_field(tmp_path):
    data = edited()
    data["features"]["diagnoses"]["diabetes"]["codes"]["snowmed"] = ["44054006"]
    message = refused(data, tmp_path)
    assert "field 'features.diagnoses.diabetes.codes.snowmed'" in message and "unknown code system" in message


def test_lab_codes_outside_loinc_are_refused_naming_the_field(tmp_path):
    data = edited()
    data["features"]["labs"]["glucose"]["codes"] = {"snomed": ["123"]}
    assert "field 'features.labs.glucose.codes.snomed'" in refused(data, tmp_path)


def test_unit_that_cannot_be_converted_is_refused_naming_the_field(tmp_path):
    data = edited()
    data["features"]["labs"]["glucose"]["units"] = ["mg/dL", "mg"]  # a mass, not a concentration
    message = refused(data, tmp_path)
    assert "field 'features.labs.glucose.units[1]'" in message and "cannot be converted" in message


def test_canonical_unit_that_is_not_ucum_is_refused_naming_the_field(tmp_path):
    data = edited()
    data["features"]["labs"]["creatinine"]["unit"] = "furlong"
    assert "field 'features.labs.creatinine.unit'" in refused(data, tmp_path)


def test_overlapping_value_sets_are_refused_naming_both(tmp_path):
    data = edited()
    data["features"]["labs"]["creatinine"]["codes"]["loinc"].append("2345-7")  # also glucose
    message = refused(data, tmp_path)
    assert "features.labs.creatinine.codes" in message and "features.labs.glucose.codes" in message
    data = edited()
    data["features"]["diagnoses"]["hypertension"]["codes"]["icd10"].append("E11")  # also diabetes
    message = refused(data, tmp_path)
    assert "features.diagnoses.hypertension.codes" in message and "overlaps" in message


def test_empty_consent_rule_is_refused_naming_the_field(tmp_path):
    assert "field 'consent'" in refused(edited(consent={}), tmp_path)
    message = refused(edited(consent={"revoking_statuses": ["inactive"]}), tmp_path)
    assert "field 'consent'" in message and "exactly one consent rule" in message
    assert "field 'consent.broad_research'" in refused(edited(consent={"broad_research": {}}), tmp_path)


@pytest.mark.parametrize("missing", ["id", "imaging", "outcome", "imaging__roi", "features__labs__glucose__range",
                                     "outcome__classes"])
def test_missing_field_is_refused_naming_it(tmp_path, missing):
    message = refused(edited(**{missing: KeyError}), tmp_path)
    assert f"field '{missing.replace('__', '.')}'" in message and "missing" in message


def test_unknown_field_and_bad_values_are_refused_naming_them(tmp_path):
    assert "field 'imaging.spacing'" in refused(edited(imaging__spacing=[1, 1, 1]), tmp_path)
    assert "field 'imaging.roi'" in refused(edited(imaging__roi=[30, 32, 16]), tmp_path)
    assert "field 'imaging.studies_per_patient'" in refused(edited(imaging__studies_per_patient="middle"), tmp_path)
    assert "field 'consent.revoking_statuses'" in refused(
        edited(consent={"study_reference": {}, "revoking_statuses": ["active"]}), tmp_path)


def test_outcome_none_makes_a_segmentation_only_study(tmp_path):
    path = tmp_path / "seg-only.yml"
    path.write_text(yaml.safe_dump(edited(outcome="none")))
    assert load_study(path).segmentation_only


def test_yaml_aliases_and_duplicate_keys_are_refused(tmp_path):
    text = (SHIPPED_STUDIES_DIR / "clinfed-tumour-seg.yml").read_text()
    path = tmp_path / "dup.yml"
    path.write_text(text + "\nid: another-study\n")
    with pytest.raises(ConfigError, match="duplicate key 'id'"):
        load_study(path)
    path.write_text("a: &x [1, 2]\nb: *x\n")
    with pytest.raises(ConfigError, match="anchors and aliases"):
        load_study(path)


def test_parse_refuses_a_non_mapping():
    with pytest.raises(ConfigError, match="must be a mapping"):
        parse_study(["not", "a", "study"])
