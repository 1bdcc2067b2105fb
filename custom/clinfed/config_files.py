"""Reading the files a person edits, with the same safety rules for every one of them.

The consortium definition, study definitions, each participant's ``local/clinfed_site.json``,
ledger JSON configurations and job folders' ``meta.json`` are all read here:

- **Size.** A configuration file is small; one over ``MAX_BYTES`` (1 MiB) is refused unread.
- **Duplicate keys are refused**, naming the key and the line of both occurrences. PyYAML and
  Python's ``json`` silently keep the last one, so a second ``study:`` would change the study.
- **YAML anchors and aliases are bounded.** An alias shares a node, and a few nested aliases
  expand exponentially (an alias bomb). Anchors stay usable for repeated blocks, but the document
  with every alias expanded may hold at most ``MAX_NODES`` nodes; recursive aliases are refused.
  The count runs on the composed node graph before anything is built, memoised per node, so a
  bomb is refused in time and memory linear in the file.
- **JSON** ``NaN``/``Infinity`` are refused (not JSON, and never a sensible setting); so is
  nesting too deep to parse.

Every refusal is a :class:`clinfed.errors.ConfigFileError` naming the file (and line where known).
Why by hand: neither PyYAML nor ruamel.yaml bounds alias expansion, and PyYAML has no switch for
duplicate keys; both are a few lines on top of PyYAML's safe loader.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml
from yaml.nodes import MappingNode, Node, SequenceNode

from clinfed.errors import ConfigError, ConfigFileError

MAX_BYTES = 1 << 20
# Nodes of the document with every alias expanded: a study definition with large value sets has
# tens of thousands; an alias bomb has billions.
MAX_NODES = 200_000
_MERGE_TAG = "tag:yaml.org,2002:merge"


class _Refusal(Exception):
    def __init__(self, problem: str, line: int | None = None):
        self.problem = problem
        self.line = line
        super().__init__(problem)


def _line(node: Node) -> int:
    return node.start_mark.line + 1


def read_text(path: str | Path, max_bytes: int = MAX_BYTES) -> str:
    """The file's text (UTF-8), refused when unreadable or larger than ``max_bytes``."""
    path = Path(path)
    try:
        with path.open("rb") as handle:
            data = handle.read(max_bytes + 1)
    except OSError as err:
        raise ConfigFileError(path, f"cannot read it ({err.strerror or err})") from None
    if len(data) > max_bytes:
        raise ConfigFileError(path, f"larger than {max_bytes} bytes; a configuration file is never this big")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ConfigFileError(path, f"not UTF-8 text (byte {err.start})") from None


# --------------------------------------------------------------------------- YAML


class _StrictLoader(yaml.SafeLoader):
    """PyYAML's safe loader that refuses a key given twice in one mapping."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, MappingNode):
            first_line: dict = {}
            for key_node, _ in node.value:
                if key_node.tag == _MERGE_TAG:  # "<<: *base": explicit keys may override merged ones
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    seen = first_line.get(key)
                except TypeError:
                    raise _Refusal("a mapping key must be a plain value", _line(key_node)) from None
                if seen is not None:
                    raise _Refusal(f"duplicate key {key!r} (first given at line {seen})", _line(key_node))
                first_line[key] = _line(key_node)
        return super().construct_mapping(node, deep=deep)


def _check_expansion(root: Node, max_nodes: int) -> None:
    """Refuse a document whose alias-expanded size exceeds ``max_nodes`` or that contains itself."""
    sizes: dict[int, int] = {}
    open_nodes: set[int] = set()

    def size(node: Node) -> int:
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in open_nodes:
            raise _Refusal("a recursive alias: a node contains itself", _line(node))
        open_nodes.add(key)
        if isinstance(node, SequenceNode):
            children = node.value
        elif isinstance(node, MappingNode):
            children = [part for pair in node.value for part in pair]
        else:
            children = []
        total = 1
        for child in children:
            total += size(child)
            if total > max_nodes:
                raise _Refusal(f"anchors and aliases expand the document past {max_nodes} nodes "
                               f"(an alias bomb?); write the repeated blocks out or use fewer nested aliases",
                               _line(node))
        open_nodes.discard(key)
        sizes[key] = total
        return total

    size(root)


def yaml_from_text(text: str, source: str | Path, max_nodes: int = MAX_NODES) -> Any:
    """One YAML document, with duplicate keys and unbounded aliases refused."""
    loader = _StrictLoader(text)
    try:
        root = loader.get_single_node()
        if root is None:
            return None
        _check_expansion(root, max_nodes)
        return loader.construct_document(root)
    except _Refusal as refusal:
        raise ConfigFileError(source, refusal.problem, refusal.line) from None
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        problem = " ".join(p for p in (err.context, err.problem) if p)
        raise ConfigFileError(source, f"not valid YAML: {problem}", mark.line + 1 if mark else None) from None
    except yaml.YAMLError as err:
        raise ConfigFileError(source, f"not valid YAML: {err}") from None
    except RecursionError:
        raise ConfigFileError(source, "nested too deeply to be a configuration file") from None
    finally:
        loader.dispose()


def load_yaml(path: str | Path, *, max_bytes: int = MAX_BYTES, max_nodes: int = MAX_NODES) -> Any:
    """A YAML file a person edits (see the module docstring for what is refused)."""
    return yaml_from_text(read_text(path, max_bytes), path, max_nodes)


# --------------------------------------------------------------------------- JSON


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict:
    result: dict = {}
    for key, value in pairs:
        if key in result:
            raise _Refusal(f"duplicate key {key!r} in one object")
        result[key] = value
    return result


def _no_constant(name: str):
    raise _Refusal(f"{name} is not a JSON number")


def json_from_text(text: str, source: str | Path) -> Any:
    """One JSON document, with duplicate keys, NaN and Infinity refused."""
    try:
        return json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_no_constant)
    except json.JSONDecodeError as err:
        raise ConfigFileError(source, f"not valid JSON: {err.msg} (column {err.colno})", err.lineno) from None
    except _Refusal as refusal:
        raise ConfigFileError(source, refusal.problem, refusal.line) from None
    except RecursionError:
        raise ConfigFileError(source, "nested too deeply to be a configuration file") from None


def load_json(path: str | Path, *, max_bytes: int = MAX_BYTES) -> Any:
    """A JSON file a person edits (see the module docstring for what is refused)."""
    return json_from_text(read_text(path, max_bytes), path)


def read_json_object(path: str | Path, where: str | None = None) -> dict:
    """A configuration file holding one JSON object; a ConfigError naming it (as ``where``) otherwise."""
    try:
        content = load_json(path)
    except ConfigFileError as err:
        if where is None:
            raise
        raise ConfigFileError(where, err.problem, err.line) from None
    if not isinstance(content, dict):
        raise ConfigError(f"{where or path}: must hold a JSON object, not a {type(content).__name__}")
    return content
