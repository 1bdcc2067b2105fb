"""Helpers the audit tests share (a module of its own: several test folders have a conftest)."""

from __future__ import annotations

import copy
import json
import uuid
from pathlib import Path


from clinfed.data.pseudonym import Pseudonymiser

SITES = ["site-1", "site-2"]


def revoke_in_fhir_export(site_dir: Path, pseudonym: str, when: str = "2030-01-02T09:00:00Z") -> None:
    """Append to the site's FHIR export the Consent a hospital writes when a patient opts out:
    the patient's grant for the study, turned into a later ``deny``."""
    pseudonymise = Pseudonymiser.for_site(site_dir)
    patient_id = None
    for line in (site_dir / "fhir" / "Patient.ndjson").read_text(encoding="utf-8").splitlines():
        patient = json.loads(line)
        if any(pseudonymise(str(i["value"])) == pseudonym for i in patient["identifier"]):
            patient_id = patient["id"]
    assert patient_id is not None, f"{pseudonym} is not a patient of {site_dir}"
    consent_file = site_dir / "fhir" / "Consent.ndjson"
    grants = [json.loads(line) for line in consent_file.read_text(encoding="utf-8").splitlines()]
    grant = next(c for c in grants if c["patient"]["reference"] == f"Patient/{patient_id}")
    revocation = copy.deepcopy(grant)
    revocation["id"] = str(uuid.uuid4())
    revocation["dateTime"] = when
    revocation["policyRule"]["coding"][0]["code"] = "OPTOUT"
    revocation["provision"]["type"] = "deny"
    revocation["provision"]["period"] = {"start": when[:10]}
    with consent_file.open("a", encoding="utf-8") as handle:
        handle.write(json.dumps(revocation, separators=(",", ":")) + "\n")


def read_jsonl(path: Path) -> list[dict]:
    lines = []
    for line in path.read_text().splitlines():
        try:
            lines.append(json.loads(line))
        except ValueError:  # a line being written
            break
    return lines
