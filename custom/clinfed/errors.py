"""Exception types a site operator can act on: each names the file or record and what is wrong."""


class ClinfedError(Exception):
    """Base class of every error clinfed raises on purpose."""


class DicomInputError(ClinfedError):
    """A DICOM file or series cannot be used. The message names the file or folder."""

    def __init__(self, path, problem: str):
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


class FhirInputError(ClinfedError):
    """A FHIR resource cannot be used. The message names the file, line and resource."""

    def __init__(self, path, line: int | None, problem: str, resource: str | None = None):
        self.path = str(path)
        self.line = line
        self.resource = resource
        self.problem = problem
        where = f"{self.path}:{line}" if line is not None else self.path
        what = f" ({resource})" if resource else ""
        super().__init__(f"{where}{what}: {problem}")


class ConfigError(ClinfedError):
    """A configuration file is invalid. The message names the field."""
