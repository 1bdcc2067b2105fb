"""Read FHIR R4 exports (NDJSON bulk data and Bundles) into pseudonymised rows under a study's rules.

This package does not import ``clinfed``; ``clinfed`` builds on it. The rules come from the
study definition (``clinfed.data.study``), typed in :mod:`fhir_adapter.rules`.
"""

from fhir_adapter.errors import FhirInputError
from fhir_adapter.harmonise import (
    ConsentDecision,
    HarmonisedRow,
    HarmonisedSite,
    canonical_json,
    consent_sha256,
    harmonise_site,
)
from fhir_adapter.reader import (
    ParsedResource,
    fhir_files,
    iter_fhir_dir,
    iter_fhir_file,
    iter_json_file,
    iter_ndjson,
    validate_resource,
)
from fhir_adapter.rules import FhirRules

__all__ = [
    "ConsentDecision",
    "FhirInputError",
    "FhirRules",
    "HarmonisedRow",
    "HarmonisedSite",
    "ParsedResource",
    "canonical_json",
    "consent_sha256",
    "fhir_files",
    "harmonise_site",
    "iter_fhir_dir",
    "iter_fhir_file",
    "iter_json_file",
    "iter_ndjson",
    "validate_resource",
]
