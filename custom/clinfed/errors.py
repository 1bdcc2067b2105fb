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


class ConfigFileError(ConfigError):
    """A configuration file cannot be read safely: unreadable, too large, not valid JSON/YAML, a
    duplicate key, an alias expanding too far. ``line`` is 1-based, None when the whole file is meant."""

    def __init__(self, path, problem: str, line: int | None = None):
        self.path = str(path)
        self.line = line
        self.problem = problem
        super().__init__(f"{self.path}:{line}: {problem}" if line is not None else f"{self.path}: {problem}")


class ArgumentError(ConfigError, ValueError):
    """A component's constructor argument is invalid (a job config sets it). The message starts with
    the argument's name, so FLARE's deploy error and ``consortium status`` name it too."""

    def __init__(self, argument: str, problem: str):
        self.argument = argument
        self.problem = problem
        super().__init__(f"{argument}: {problem}")
