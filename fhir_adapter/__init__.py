"""Read FHIR R4 exports (NDJSON bulk data and Bundles) into pseudonymised feature rows.

This package does not import ``clinfed``; ``clinfed`` builds on it.
"""

from fhir_adapter.errors import FhirInputError
from fhir_adapter.harmonise import (
    CONSENT_STATUSES,
    FEATURE_COLUMNS,
    ConsentDecision,
    HarmonisedRow,
    HarmonisedSite,
    canonical_json,
    consent_sha256,
    harmonise_site,
)
from fhir_adapter.reader import (
    ParsedResource,
    iter_fhir_dir,
    iter_fhir_file,
    iter_json_file,
    iter_ndjson,
    validate_resource,
)

__all__ = [
    "CONSENT_STATUSES",
    "FEATURE_COLUMNS",
    "ConsentDecision",
    "FhirInputError",
    "HarmonisedRow",
    "HarmonisedSite",
    "ParsedResource",
    "canonical_json",
    "consent_sha256",
    "harmonise_site",
    "iter_fhir_dir",
    "iter_fhir_file",
    "iter_json_file",
    "iter_ndjson",
    "validate_resource",
]
