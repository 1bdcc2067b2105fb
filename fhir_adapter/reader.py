"""Streaming FHIR R4 readers: NDJSON line by line, and JSON files (a Bundle or one resource).

Every resource is validated with ``fhir.resources.R4B`` (the package's default import is R5,
which rejects valid R4 Consents). A resource that cannot be used is reported once through
``on_issue`` as a :class:`FhirInputError` naming file, line and ``Type/id``, and skipped; the
rest of the file is still read.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fhir.resources.R4B import get_fhir_model_class

from fhir_adapter.errors import FhirInputError

OnIssue = Callable[[FhirInputError], None]

FHIR_FILE_SUFFIXES = (".ndjson", ".json")
_MAX_ERRORS_SHOWN = 3
_WS = " \t\n\r"


@dataclass(frozen=True)
class ParsedResource:
    """One valid R4 resource and where it came from."""

    path: Path
    line: int  # 1-based; for a Bundle entry, the line where the entry starts
    raw: dict[str, Any]  # the JSON object exactly as read
    model: Any  # the fhir.resources.R4B model instance
    full_url: str | None = None  # Bundle.entry.fullUrl, for resolving urn:uuid references

    @property
    def resource_type(self) -> str:
        return self.raw["resourceType"]

    @property
    def label(self) -> str:
        return resource_label(self.raw)


def resource_label(raw: Any) -> str | None:
    """``"Type/id"`` (or just ``"Type"``) of a raw resource, None if it has no resourceType."""
    if not isinstance(raw, dict) or not isinstance(raw.get("resourceType"), str):
        return None
    rid = raw.get("id")
    return f"{raw['resourceType']}/{rid}" if isinstance(rid, str) and rid else raw["resourceType"]


def validate_resource(raw: Any, path: Path, line: int, on_issue: OnIssue,
                      full_url: str | None = None) -> ParsedResource | None:
    """Validate one decoded JSON value as an R4 resource; report and return None if it is not."""
    label = resource_label(raw)
    if label is None:
        on_issue(FhirInputError(path, line, "not a FHIR resource: expected a JSON object with a "
                                            "string resourceType"))
        return None
    rtype = raw["resourceType"]
    try:
        cls = get_fhir_model_class(rtype)
    except (ValueError, KeyError, AttributeError):
        on_issue(FhirInputError(path, line, f"unknown resourceType {rtype[:40]!r} (expected an "
                                            "R4 resource type such as Patient)", label))
        return None
    try:
        model = cls.model_validate(raw)
    # The model library raises several exception types on malformed input; one bad resource
    # must never stop the rest of the site's data.
    except Exception as exc:  # noqa: BLE001
        on_issue(FhirInputError(path, line, f"invalid R4 {rtype}: {_describe(exc)}", label))
        return None
    return ParsedResource(path=path, line=line, raw=raw, model=model, full_url=full_url)


def _describe(exc: Exception) -> str:
    """Field paths and messages of a validation error, without the offending values (PHI)."""
    errors = getattr(exc, "errors", None)
    if not callable(errors):
        return type(exc).__name__
    items = errors()
    parts = [f"{'.'.join(str(p) for p in e.get('loc', ())) or '(resource)'}: {e.get('msg', '')}"
             for e in items[:_MAX_ERRORS_SHOWN]]
    more = len(items) - _MAX_ERRORS_SHOWN
    return "; ".join(parts) + (f" (+{more} more)" if more > 0 else "")


def iter_ndjson(path: Path, on_issue: OnIssue) -> Iterator[ParsedResource]:
    """Resources of an NDJSON file, read one line at a time. Blank lines are allowed.

    A line holding a Bundle yields the Bundle's entries (each reported at that line). A file
    that is one pretty-printed JSON document rather than NDJSON is read as such, with one issue
    saying so; one that is neither gets one issue, not one per line.
    """
    path = Path(path)
    with path.open("rb") as fh:
        for lineno, data in enumerate(fh, start=1):
            if not data.strip():
                continue
            try:
                raw = json.loads(data.decode("utf-8"))
            except UnicodeDecodeError:
                on_issue(FhirInputError(path, lineno, "line is not valid UTF-8"))
                continue
            except json.JSONDecodeError as exc:
                if data.strip() in (b"{", b"["):  # the first line of a pretty-printed document
                    yield from _pretty_printed(path, on_issue)
                    return
                on_issue(FhirInputError(path, lineno, f"invalid JSON: {exc.msg} at column {exc.colno}"))
                continue
            if isinstance(raw, dict) and raw.get("resourceType") == "Bundle" and isinstance(raw.get("entry"), list):
                yield from _bundle_entries(raw, path, lambda _pos, line=lineno: line, on_issue)
                continue
            parsed = validate_resource(raw, path, lineno, on_issue)
            if parsed is not None:
                yield parsed


def _pretty_printed(path: Path, on_issue: OnIssue) -> Iterator[ParsedResource]:
    issues: list[FhirInputError] = []
    resources = list(iter_json_file(path, issues.append))
    if issues and any("invalid JSON" in i.problem or "not valid UTF-8" in i.problem for i in issues):
        first = issues[0]
        on_issue(FhirInputError(path, first.line, "not NDJSON (one resource per line) and not a valid JSON "
                                                  f"document either: {first.problem}; the file is skipped"))
        return
    on_issue(FhirInputError(path, None, "holds one pretty-printed JSON document, not NDJSON (one resource per "
                                        "line); it was read as a JSON file"))
    for issue in issues:
        on_issue(issue)
    yield from resources


def iter_json_file(path: Path, on_issue: OnIssue) -> Iterator[ParsedResource]:
    """Resources of a JSON file: the entries of a Bundle, or the single resource it holds.

    Bundle entries are decoded one at a time, so each keeps the line it starts on; a Bundle
    inside a Bundle is yielded as one resource, not opened. Entries without a resource
    (e.g. a transaction's DELETE) are skipped.
    """
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError:
        on_issue(FhirInputError(path, None, "file is not valid UTF-8"))
        return
    lines = _LineCounter(text)
    try:
        fields, entries, start = _scan_object(text)
    except json.JSONDecodeError as exc:
        on_issue(FhirInputError(path, exc.lineno, f"invalid JSON: {exc.msg} at column {exc.colno}"))
        return
    first_line = lines.line_at(start)
    if fields.get("resourceType") != "Bundle":
        if entries is not None:  # e.g. List.entry: not a Bundle, keep the field as it was
            fields["entry"] = [value for _, value in entries]
        parsed = validate_resource(fields, path, first_line, on_issue)
        if parsed is not None:
            yield parsed
        return
    yield from _bundle_entries({**fields, "entry": entries or []}, path, lines.line_at, on_issue,
                               positioned=True)


def _bundle_entries(bundle: dict, path: Path, line_of, on_issue: OnIssue,
                    positioned: bool = False) -> Iterator[ParsedResource]:
    """Validated resources of a Bundle's entries; ``line_of(position)`` gives an entry's line."""
    for item in bundle["entry"]:
        pos, entry = item if positioned else (None, item)
        line = line_of(pos)
        if not isinstance(entry, dict):
            on_issue(FhirInputError(path, line, "Bundle.entry is not a JSON object", resource_label(bundle)))
            continue
        if "resource" not in entry:
            continue
        full_url = entry.get("fullUrl") if isinstance(entry.get("fullUrl"), str) else None
        parsed = validate_resource(entry["resource"], path, line, on_issue, full_url)
        if parsed is not None:
            yield parsed


def iter_fhir_file(path: Path, on_issue: OnIssue) -> Iterator[ParsedResource]:
    """Resources of one ``.ndjson`` or ``.json`` file."""
    path = Path(path)
    if path.suffix.lower() == ".ndjson":
        yield from iter_ndjson(path, on_issue)
    elif path.suffix.lower() == ".json":
        yield from iter_json_file(path, on_issue)
    else:
        on_issue(FhirInputError(path, None, "not a FHIR file: expected .ndjson or .json"))


def fhir_files(fhir_dir: Path) -> tuple[list[Path], list[tuple[Path, str]]]:
    """The ``.ndjson`` and ``.json`` files directly in ``fhir_dir`` in name order, and every other
    file there with why it is ignored (hidden files such as ``.DS_Store`` are passed over)."""
    fhir_dir = Path(fhir_dir)
    if not fhir_dir.is_dir():
        raise FhirInputError(fhir_dir, None, "FHIR folder does not exist or is not a folder")
    read, ignored = [], []
    for path in sorted(fhir_dir.iterdir()):
        if path.name.startswith("."):
            continue
        if path.is_file() and path.suffix.lower() in FHIR_FILE_SUFFIXES:
            read.append(path)
        elif path.name.lower().endswith((".ndjson.gz", ".json.gz")):
            ignored.append((path, "a compressed export is not read; decompress it (gunzip) into this folder"))
        else:
            ignored.append((path, "not a FHIR export file (expected .ndjson or .json)"))
    return read, ignored


def iter_fhir_dir(fhir_dir: Path, on_issue: OnIssue) -> Iterator[ParsedResource]:
    """Resources of every FHIR file in ``fhir_dir`` (see :func:`fhir_files`); each other file
    is reported once as ignored."""
    read, ignored = fhir_files(fhir_dir)
    for path, why in ignored:
        on_issue(FhirInputError(path, None, f"ignored: {why}"))
    for path in read:
        yield from iter_fhir_file(path, on_issue)


class _LineCounter:
    """1-based line of a character offset; offsets must be asked for in increasing order."""

    def __init__(self, text: str):
        self._text = text
        self._pos = 0
        self._line = 1

    def line_at(self, pos: int) -> int:
        if pos < self._pos:
            self._pos, self._line = 0, 1
        self._line += self._text.count("\n", self._pos, pos)
        self._pos = pos
        return self._line


def _skip_ws(text: str, i: int) -> int:
    while i < len(text) and text[i] in _WS:
        i += 1
    return i


def _expect(text: str, i: int, chars: str, what: str) -> str:
    if i >= len(text) or text[i] not in chars:
        raise json.JSONDecodeError(f"Expecting {what}", text, i)
    return text[i]


def _scan_object(text: str) -> tuple[dict[str, Any], list[tuple[int, Any]] | None, int]:
    """Decode a top-level JSON object, keeping each element of its ``entry`` array separate.

    Returns the other fields, the ``entry`` elements with their start offsets (None when there
    is no ``entry`` array) and the object's start offset.
    """
    decoder = json.JSONDecoder()
    start = _skip_ws(text, 0)
    _expect(text, start, "{", "'{' (a FHIR resource or Bundle)")
    fields: dict[str, Any] = {}
    entries: list[tuple[int, Any]] | None = None
    i = _skip_ws(text, start + 1)
    if i < len(text) and text[i] == "}":
        i += 1
    else:
        while True:
            _expect(text, i, '"', "property name enclosed in double quotes")
            key, i = decoder.raw_decode(text, i)
            i = _skip_ws(text, i)
            _expect(text, i, ":", "':' delimiter")
            i = _skip_ws(text, i + 1)
            if key == "entry" and i < len(text) and text[i] == "[":
                entries, i = _scan_array(decoder, text, i)
            else:
                fields[key], i = decoder.raw_decode(text, i)
            i = _skip_ws(text, i)
            if _expect(text, i, ",}", "',' or '}'") == "}":
                i += 1
                break
            i = _skip_ws(text, i + 1)
    if _skip_ws(text, i) != len(text):
        raise json.JSONDecodeError("Extra data", text, _skip_ws(text, i))
    return fields, entries, start


def _scan_array(decoder: json.JSONDecoder, text: str, i: int) -> tuple[list[tuple[int, Any]], int]:
    items: list[tuple[int, Any]] = []
    i = _skip_ws(text, i + 1)
    if i < len(text) and text[i] == "]":
        return items, i + 1
    while True:
        value, end = decoder.raw_decode(text, i)
        items.append((i, value))
        i = _skip_ws(text, end)
        if _expect(text, i, ",]", "',' or ']'") == "]":
            return items, i + 1
        i = _skip_ws(text, i + 1)
