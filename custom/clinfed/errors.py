"""Exception types a site operator can act on: each names the file or record and what is wrong."""

# FHIR errors are raised by fhir_adapter, which does not depend on clinfed: one type, defined there.
from fhir_adapter.errors import FhirInputError  # noqa: F401  (re-exported)


class ClinfedError(Exception):
    """Base class of every error clinfed raises on purpose."""


class DicomInputError(ClinfedError):
    """A DICOM file or series cannot be used. The message names the file or folder."""

    def __init__(self, path, problem: str):
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


class ConfigError(ClinfedError):
    """A configuration file is invalid. The message names the field."""
