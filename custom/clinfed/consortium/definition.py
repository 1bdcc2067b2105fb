"""The one consortium definition (``provisioning/consortium.yml``): load and validate it.

Every refusal names the field it is about (``sites[1].privacy.update_dp.epsilon``), so an
operator can fix the file without reading this code. See ``provisioning/README.md`` for the schema.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from clinfed.config_files import load_yaml
from clinfed.errors import ConfigError
from clinfed.ledger.settings import COORDINATOR, msp_id_for

# FLARE 2.9 admin roles (nvflare.lighter: project_admin, org_admin, lead, member).
ROLES = ("project_admin", "org_admin", "lead", "member")
# The privacy scopes a site may take; what each applies is in clinfed.consortium.local_files.
SCOPES = ("public", "strict")
LEDGER_BACKENDS = ("local", "fabric")
UPDATE_DP_FIELDS = {"epsilon": None, "delta": 1e-5, "noise_multiplier": None, "clip_norm": None}
SECURE_AGGREGATION_FIELDS = {"min_participants": 3, "min_threshold_fraction": 0.5}
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def _flare_pattern(entity_type: str) -> re.Pattern:
    """FLARE's own name rule for an entity (nvflare.apis.utils.format_check), so provisioning
    never fails on a name we accepted."""
    from nvflare.apis.utils.format_check import type_pattern_mapping

    return re.compile(type_pattern_mapping[entity_type])


class ConsortiumError(ConfigError):
    """The consortium definition is invalid; ``field`` is the path of the offending field."""

    def __init__(self, source: str, field_path: str, problem: str):
        self.source = source
        self.field = field_path
        self.problem = problem
        super().__init__(f"{source}: field '{field_path}': {problem}")


@dataclass(frozen=True)
class UpdateDP:
    """Update-level DP the site requires in every securely aggregated round (site level)."""

    epsilon: float
    delta: float
    noise_multiplier: float
    clip_norm: float
    noise: str = "distributed"


@dataclass(frozen=True)
class SitePrivacy:
    scopes: tuple[str, ...]
    default_scope: str
    update_dp: UpdateDP | None
    min_participants: int
    min_threshold_fraction: float


@dataclass(frozen=True)
class Site:
    name: str
    org: str
    privacy: SitePrivacy
    data_dir: str | None = None

    @property
    def msp_id(self) -> str:
        return msp_id_for(self.name)

    @property
    def fabric_org(self) -> str:
        return self.msp_id[:-3]


@dataclass(frozen=True)
class Admin:
    name: str
    org: str
    role: str


@dataclass(frozen=True)
class Coordinator:
    name: str            # the FLARE server participant (its certificate's CN)
    org: str
    host: str            # what clients and admins dial
    fed_learn_port: int
    admin_port: int
    # Seconds the server waits, after a job's last round, for every deployed site to report its
    # end of run; a site that died mid-job holds the job in RUNNING this long (FLARE: 900).
    client_outcome_wait_timeout: float | None = None

    @property
    def msp_id(self) -> str:
        return msp_id_for(COORDINATOR)


@dataclass(frozen=True)
class Org:
    name: str
    description: str = ""


@dataclass(frozen=True)
class Consortium:
    name: str
    study: str
    coordinator: Coordinator
    orgs: tuple[Org, ...]
    sites: tuple[Site, ...]
    admins: tuple[Admin, ...]
    ledger: dict = field(default_factory=dict)
    source: str = "consortium.yml"

    def site(self, name: str) -> Site:
        for site in self.sites:
            if site.name == name:
                return site
        raise KeyError(name)

    @property
    def site_names(self) -> list[str]:
        return [s.name for s in self.sites]

    @property
    def leads(self) -> list[Admin]:
        return [a for a in self.admins if a.role in ("lead", "project_admin")]

    def with_port(self, port: int) -> "Consortium":
        """The same consortium with the server on another port (tests, a second trial)."""
        import dataclasses

        coordinator = dataclasses.replace(self.coordinator, fed_learn_port=port, admin_port=port)
        return dataclasses.replace(self, coordinator=coordinator)


# --------------------------------------------------------------------------- loading


class _Reader:
    def __init__(self, source: str):
        self.source = source

    def fail(self, path: str, problem: str):
        raise ConsortiumError(self.source, path, problem)

    def mapping(self, value, path: str) -> dict:
        if not isinstance(value, dict):
            self.fail(path, f"must be a mapping, got {type(value).__name__}")
        return value

    def seq(self, value, path: str) -> list:
        if not isinstance(value, list) or not value:
            self.fail(path, "must be a non-empty list")
        return value

    def text(self, obj: dict, key: str, path: str, default: str | None = None, pattern: re.Pattern | None = None,
             what: str = "") -> str:
        value = obj.get(key, default)
        where = f"{path}.{key}" if path else key
        if value is None or (isinstance(value, str) and not value.strip()):
            self.fail(where, "is missing")
        if not isinstance(value, str):
            self.fail(where, f"must be a string, got {type(value).__name__}")
        if pattern is not None and not pattern.match(value):
            self.fail(where, f"{value!r} is not a valid {what or 'name'}")
        return value

    def optional_text(self, obj: dict, key: str, path: str) -> str:
        value = obj.get(key, "")
        if value is None:
            return ""
        if not isinstance(value, str):
            self.fail(f"{path}.{key}" if path else key, f"must be a string, got {type(value).__name__}")
        return value

    def number(self, obj: dict, key: str, path: str, default: float, positive: bool = True,
               integer: bool = False) -> float:
        value = obj.get(key, default)
        where = f"{path}.{key}"
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            self.fail(where, f"must be a number, got {value!r}")
        if integer and int(value) != value:
            self.fail(where, f"must be an integer, got {value!r}")
        if positive and value <= 0:
            self.fail(where, f"must be > 0, got {value!r}")
        return int(value) if integer else float(value)

    def unknown(self, obj: dict, known: set[str], path: str) -> None:
        extra = sorted(set(obj) - known)
        if extra:
            self.fail(f"{path}.{extra[0]}" if path else extra[0],
                      f"unknown field (known: {', '.join(sorted(known))})")


def load_consortium(path: str | Path) -> Consortium:
    """Read and validate a consortium file (read by :mod:`clinfed.config_files`: size limit,
    duplicate keys refused, aliases bounded)."""
    return parse_consortium(load_yaml(path), source=str(path))


def parse_consortium(raw: Any, source: str = "consortium.yml") -> Consortium:
    """Validate a consortium definition already read into Python objects."""
    r = _Reader(source)
    if not isinstance(raw, dict):
        r.fail("<top>", "the file must hold a mapping")
    r.unknown(raw, {"name", "description", "study", "coordinator", "orgs", "sites", "admins", "ledger"}, "")
    name = r.text(raw, "name", "", pattern=_NAME, what="consortium name")
    r.optional_text(raw, "description", "")
    study = r.text(raw, "study", "")

    orgs: list[Org] = []
    for i, entry in enumerate(r.seq(raw.get("orgs"), "orgs")):
        where = f"orgs[{i}]"
        entry = r.mapping(entry, where)
        r.unknown(entry, {"name", "description"}, where)
        org = Org(r.text(entry, "name", where, pattern=_flare_pattern("org"), what="FLARE org name (letters, digits, _)"),
                  r.optional_text(entry, "description", where))
        if any(o.name == org.name for o in orgs):
            r.fail(f"{where}.name", f"duplicate org {org.name!r}")
        orgs.append(org)
    org_names = {o.name for o in orgs}

    def org_of(entry: dict, where: str) -> str:
        org = r.text(entry, "org", where)
        if org not in org_names:
            r.fail(f"{where}.org", f"org {org!r} is not declared under 'orgs' ({', '.join(sorted(org_names))})")
        return org

    where = "coordinator"
    coord = r.mapping(raw.get("coordinator"), where) if raw.get("coordinator") is not None else r.fail(
        where, "is missing")
    r.unknown(coord, {"name", "org", "host", "fed_learn_port", "admin_port", "client_outcome_wait_timeout"}, where)
    outcome_wait = (r.number(coord, "client_outcome_wait_timeout", where, 900.0)
                    if coord.get("client_outcome_wait_timeout") is not None else None)
    port = r.number(coord, "fed_learn_port", where, 8002, integer=True)
    admin_port = r.number(coord, "admin_port", where, port, integer=True)
    for key, value in (("fed_learn_port", port), ("admin_port", admin_port)):
        if not 1 <= value <= 65535:
            r.fail(f"{where}.{key}", f"must be a TCP port (1-65535), got {value}")
    coordinator = Coordinator(name=r.text(coord, "name", where, pattern=_flare_pattern("server"), what="server name (a host name)"),
                              org=org_of(coord, where), host=r.text(coord, "host", where, default="localhost", pattern=_flare_pattern("host_name"), what="host name"),
                              fed_learn_port=port, admin_port=admin_port,
                              client_outcome_wait_timeout=outcome_wait)

    sites: list[Site] = []
    msp_ids: dict[str, str] = {}
    for i, entry in enumerate(r.seq(raw.get("sites"), "sites")):
        where = f"sites[{i}]"
        entry = r.mapping(entry, where)
        r.unknown(entry, {"name", "org", "privacy", "data_dir"}, where)
        site_name = r.text(entry, "name", where, pattern=_flare_pattern("client"), what="FLARE site name (letters, digits, - and _)")
        if any(s.name == site_name for s in sites):
            r.fail(f"{where}.name", f"duplicate site {site_name!r}")
        if site_name in (coordinator.name, COORDINATOR):
            r.fail(f"{where}.name", f"{site_name!r} is the coordinator's name, not a site's")
        msp = msp_id_for(site_name)
        if msp in msp_ids:
            r.fail(f"{where}.name", f"site {site_name!r} maps to Fabric MSP {msp}, as site {msp_ids[msp]!r} does")
        msp_ids[msp] = site_name
        org = org_of(entry, where)
        privacy = _privacy(r, entry.get("privacy", {}), f"{where}.privacy")
        data_dir = entry.get("data_dir")
        if data_dir is not None and not isinstance(data_dir, str):
            r.fail(f"{where}.data_dir", "must be a path string")
        sites.append(Site(site_name, org, privacy, data_dir))

    admins: list[Admin] = []
    for i, entry in enumerate(r.seq(raw.get("admins"), "admins")):
        where = f"admins[{i}]"
        entry = r.mapping(entry, where)
        r.unknown(entry, {"name", "org", "role"}, where)
        admin_name = r.text(entry, "name", where, pattern=_flare_pattern("admin"), what="admin name (an e-mail address)")
        if any(a.name == admin_name for a in admins):
            r.fail(f"{where}.name", f"duplicate admin {admin_name!r}")
        role = r.text(entry, "role", where)
        if role not in ROLES:
            r.fail(f"{where}.role", f"unknown role {role!r}; FLARE knows {', '.join(ROLES)}")
        admins.append(Admin(admin_name, org_of(entry, where), role))
    if not any(a.role in ("lead", "project_admin") for a in admins):
        r.fail("admins", "no admin with role 'lead' or 'project_admin': nobody could submit a job")

    ledger = raw.get("ledger") or {"backend": "local"}
    ledger = dict(r.mapping(ledger, "ledger"))
    backend = ledger.get("backend", "local")
    if backend not in LEDGER_BACKENDS:
        r.fail("ledger.backend", f"must be one of {', '.join(LEDGER_BACKENDS)}, got {backend!r}")
    if backend == "fabric":
        participants = ledger.get("participants")
        if not isinstance(participants, dict):
            r.fail("ledger.participants", "a fabric ledger needs, per participant (coordinator and each site), "
                                          "its open_ledger fields: endpoint, msp_dir, tls_root_cert")
        for who in [COORDINATOR] + [s.name for s in sites]:
            section = participants.get(who)
            if not isinstance(section, dict) or not section.get("endpoint") or not section.get("msp_dir"):
                r.fail(f"ledger.participants.{who}", "needs 'endpoint' and 'msp_dir'")
    ledger["backend"] = backend
    return Consortium(name=name, study=study, coordinator=coordinator, orgs=tuple(orgs), sites=tuple(sites),
                      admins=tuple(admins), ledger=ledger, source=source)


def _privacy(r: _Reader, raw: Any, where: str) -> SitePrivacy:
    raw = r.mapping(raw, where)
    r.unknown(raw, {"scopes", "default_scope", "update_dp", "secure_aggregation"}, where)
    scopes = raw.get("scopes", ["public", "strict"])
    if not isinstance(scopes, list) or not scopes:
        r.fail(f"{where}.scopes", "must be a non-empty list of scope names")
    for j, scope in enumerate(scopes):
        if scope not in SCOPES:
            r.fail(f"{where}.scopes[{j}]", f"unknown scope {scope!r}; clinfed defines {', '.join(SCOPES)}")
    if len(set(scopes)) != len(scopes):
        r.fail(f"{where}.scopes", "lists a scope twice")
    default_scope = raw.get("default_scope", scopes[0])
    if default_scope not in scopes:
        r.fail(f"{where}.default_scope", f"{default_scope!r} is not one of this site's scopes ({', '.join(scopes)})")
    update_dp = None
    if raw.get("update_dp") is not None:
        section = r.mapping(raw["update_dp"], f"{where}.update_dp")
        r.unknown(section, set(UPDATE_DP_FIELDS) | {"noise"}, f"{where}.update_dp")
        values = {k: r.number(section, k, f"{where}.update_dp", d) for k, d in UPDATE_DP_FIELDS.items()}
        if not values["delta"] < 1:
            r.fail(f"{where}.update_dp.delta", f"must be in (0, 1), got {values['delta']}")
        noise = section.get("noise", "distributed")
        if noise not in ("distributed", "local"):
            r.fail(f"{where}.update_dp.noise", f"must be 'distributed' or 'local', got {noise!r}")
        update_dp = UpdateDP(**values, noise=noise)
    secure = r.mapping(raw.get("secure_aggregation", {}), f"{where}.secure_aggregation")
    r.unknown(secure, set(SECURE_AGGREGATION_FIELDS), f"{where}.secure_aggregation")
    min_participants = r.number(secure, "min_participants", f"{where}.secure_aggregation",
                                SECURE_AGGREGATION_FIELDS["min_participants"], integer=True)
    if min_participants < 2:
        r.fail(f"{where}.secure_aggregation.min_participants", f"must be >= 2, got {min_participants}")
    fraction = r.number(secure, "min_threshold_fraction", f"{where}.secure_aggregation",
                        SECURE_AGGREGATION_FIELDS["min_threshold_fraction"])
    if not 0.5 <= fraction < 1:
        r.fail(f"{where}.secure_aggregation.min_threshold_fraction", f"must be in [0.5, 1), got {fraction}")
    return SitePrivacy(tuple(scopes), default_scope, update_dp, min_participants, fraction)
