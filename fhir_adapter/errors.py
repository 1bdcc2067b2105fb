"""The adapter's one error type. ``clinfed.errors`` re-exports it, so there is a single type."""

from __future__ import annotations


class FhirInputError(Exception):
    """A FHIR resource cannot be used. The message names the file, line and resource.

    Args:
        path: the file the resource came from.
        line: 1-based line in that file (for a Bundle, the line where the entry starts);
            None when the whole file is affected.
        problem: what is wrong and what was expected. Never carries patient data.
        resource: ``"Type/id"`` when known.
    """

    def __init__(self, path, line: int | None, problem: str, resource: str | None = None):
        self.path = str(path)
        self.line = line
        self.resource = resource
        self.problem = problem
        where = f"{self.path}:{line}" if line is not None else self.path
        what = f" ({resource})" if resource else ""
        super().__init__(f"{where}{what}: {problem}")

    def __reduce__(self):
        return (type(self), (self.path, self.line, self.problem, self.resource))
