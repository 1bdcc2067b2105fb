"""``clinfed jobs check JOB_DIR``: a job folder checked, as FLARE will read it, before it is submitted.

FLARE's ``submit_job`` reports a broken ``meta.json`` as ``invalid job definition: Expecting ','
delimiter: line 3 column 5``, without the file's name, and an argument a component refuses only at
deploy, in the log of the participant that built it. This check names the file, the field and
what is wrong, for every problem at once:

- ``meta.json``: readable (the :mod:`clinfed.config_files` rules: duplicate keys refused, ...)
  and holding ``name``, a ``deploy_map`` whose apps exist, ``min_clients`` >= 1, ``scope`` a name;
- every app's ``config/config_fed_server.json`` and ``config_fed_client.json``: readable JSON
  objects, ``format_version`` 2;
- no ``app/custom`` folder (a BYOC job, which every site of a clinfed consortium refuses);
- every component's class can be imported, and every ``clinfed.`` component is built with its
  arguments, exactly as FLARE will build it at deploy, so an argument its ``__init__`` refuses
  (``num_rounds: must be >= 1, got -1``) is named here instead.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from clinfed.config_files import read_json_object
from clinfed.errors import ConfigError

CONFIG_FILES = ("config_fed_server.json", "config_fed_client.json")
# Where FLARE's config files list components (server and client configs, format_version 2).
COMPONENT_LISTS = ("workflows", "components", "executors", "task_data_filters", "task_result_filters")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclass
class JobCheck:
    job_dir: Path
    problems: list[str] = field(default_factory=list)
    components: int = 0  # components whose class was loaded (and built, for ours)

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict:
        return {"job_dir": str(self.job_dir), "ok": self.ok, "components": self.components,
                "problems": self.problems}


def check_job_folder(job_dir: str | Path) -> JobCheck:
    """Every problem of a job folder, each naming its file and field (empty: FLARE can deploy it)."""
    job_dir = Path(job_dir)
    check = JobCheck(job_dir)
    if not job_dir.is_dir():
        check.problems.append(f"{job_dir}: not a folder")
        return check
    meta_file = job_dir / "meta.json"
    try:
        meta = read_json_object(meta_file)
    except ConfigError as err:
        check.problems.append(str(err))
        return check
    apps = _check_meta(meta_file, meta, check)
    for app in apps:
        app_dir = job_dir / app
        if (app_dir / "custom").exists():
            check.problems.append(f"{app_dir / 'custom'}: custom code makes this a BYOC job, which every site "
                                  f"refuses; export jobs with set_app_packages (installed classes only)")
        present = [name for name in CONFIG_FILES if (app_dir / "config" / name).is_file()]
        if not present:
            check.problems.append(f"{app_dir / 'config'}: no {' or '.join(CONFIG_FILES)}")
        for name in present:
            _check_config(app_dir / "config" / name, check)
    return check


def _check_meta(meta_file: Path, meta: dict, check: JobCheck) -> list[str]:
    """The apps the deploy map names (those that exist), after checking the meta fields."""
    problem = check.problems.append
    name = meta.get("name")
    if not isinstance(name, str) or not _NAME.match(name):
        problem(f"{meta_file}: field 'name' must be a job name (letters, digits, . _ -), got {name!r}")
    if "min_clients" in meta:
        value = meta["min_clients"]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            problem(f"{meta_file}: field 'min_clients' must be an integer >= 1, got {value!r}")
    if "scope" in meta and (not isinstance(meta["scope"], str) or not _NAME.match(meta["scope"])):
        problem(f"{meta_file}: field 'scope' must be a privacy scope name, got {meta['scope']!r}")
    if "resource_spec" in meta and not isinstance(meta["resource_spec"], dict):
        problem(f"{meta_file}: field 'resource_spec' must be an object")
    deploy_map = meta.get("deploy_map")
    if not isinstance(deploy_map, dict) or not deploy_map:
        problem(f"{meta_file}: field 'deploy_map' must map app folders to sites, e.g. {{\"app\": [\"@ALL\"]}}")
        return []
    apps = []
    for app, sites in deploy_map.items():
        if not isinstance(sites, list) or not sites or not all(isinstance(s, str) and s for s in sites):
            problem(f"{meta_file}: field 'deploy_map.{app}' must be a non-empty list of site names or \"@ALL\"")
        if not (meta_file.parent / app).is_dir():
            problem(f"{meta_file}: field 'deploy_map' names app {app!r}, and {meta_file.parent / app} is not a folder")
        else:
            apps.append(app)
    return apps


def _check_config(config_file: Path, check: JobCheck) -> None:
    try:
        config = read_json_object(config_file)
    except ConfigError as err:
        check.problems.append(str(err))
        return
    if config.get("format_version") != 2:
        check.problems.append(f"{config_file}: field 'format_version' must be 2, got {config.get('format_version')!r}")
    for list_name in COMPONENT_LISTS:
        entries = config.get(list_name, [])
        if not isinstance(entries, list):
            check.problems.append(f"{config_file}: field '{list_name}' must be a list")
            continue
        for i, entry in enumerate(entries):
            where = f"{list_name}[{i}]"
            if list_name == "executors":
                entry, where = (entry or {}).get("executor") if isinstance(entry, dict) else None, f"{where}.executor"
                _component(config_file, where, entry, check)
            elif list_name in ("task_data_filters", "task_result_filters"):
                filters = entry.get("filters", []) if isinstance(entry, dict) else None
                if not isinstance(filters, list):
                    check.problems.append(f"{config_file}: field '{where}.filters' must be a list")
                    continue
                for j, spec in enumerate(filters):
                    _component(config_file, f"{where}.filters[{j}]", spec, check)
            else:
                _component(config_file, where, entry, check)


def _component(config_file: Path, where: str, spec: Any, check: JobCheck) -> None:
    if not isinstance(spec, dict) or not isinstance(spec.get("path"), str):
        check.problems.append(f"{config_file}: field '{where}' must be a component {{\"path\": CLASS, \"args\": {{}}}}")
        return
    try:
        _build(spec, instantiate=spec["path"].startswith("clinfed."))
        check.components += 1
    except _Refused as refused:
        check.problems.append(f"{config_file}: field '{where}' ({spec['path']}): {refused}")


class _Refused(Exception):
    pass


def _build(spec: dict, instantiate: bool) -> Any:
    """Load a component's class; build it (and the components in its arguments) if ``instantiate``."""
    from nvflare.fuel.utils.class_loader import load_class

    try:
        cls = load_class(spec["path"])
    except Exception as err:  # noqa: BLE001 - FLARE wraps any import failure in TypeError
        raise _Refused(f"class cannot be loaded: {err}") from None
    args = spec.get("args", {})
    if not isinstance(args, dict):
        raise _Refused("'args' must be an object")
    built = {key: _build(value, instantiate) if isinstance(value, dict) and "path" in value else value
             for key, value in args.items()}
    if not instantiate:
        return None
    try:
        return cls(**built)
    except Exception as err:  # noqa: BLE001 - whatever __init__ refuses, FLARE would refuse at deploy
        raise _Refused(f"{type(err).__name__}: {err}") from None
