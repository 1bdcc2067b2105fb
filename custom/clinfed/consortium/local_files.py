"""What each participant's ``local/`` folder gets: authorization, privacy scopes, class allow-list,
clinfed site configuration. Pure functions of the consortium definition, so they are unit-tested
without running ``nvflare provision``.
"""

from __future__ import annotations

import json
from pathlib import Path

from clinfed.ledger.settings import COORDINATOR, DEFAULT_OUTBOX
from clinfed.site_config import SITE_CONFIG_FILE

from .definition import Consortium, Site

# FLARE 2.9 rights (nvflare.fuel.sec.authz / authorization.json.default).
RIGHTS = ("submit_job", "clone_job", "manage_job", "download_job", "view", "operate", "shell_commands", "byoc",
          "server-predeployed-flwr")
RELEASE_GUARD_FILTER = "clinfed.filters.release_guard.ReleaseGuard"


def authorization(consortium: Consortium | None = None) -> dict:
    """``local/authorization.json``: FLARE's default policy with BYOC refused to every role (jobs
    run the installed bundle, admitted by the class allow-list) and nothing but ``view`` for a member.

    ``project_admin`` keeps every other right, spelled out (the default ``"any"`` would include BYOC).
    """
    project_admin = {right: "any" for right in RIGHTS}
    project_admin.update({"byoc": "none", "server-predeployed-flwr": "none"})
    return {
        "format_version": "1.0",
        "permissions": {
            "project_admin": project_admin,
            "org_admin": {"submit_job": "none", "clone_job": "none", "manage_job": "o:submitter",
                          "download_job": "o:submitter", "view": "any", "operate": "o:site",
                          "shell_commands": "o:site", "byoc": "none", "server-predeployed-flwr": "none"},
            "lead": {"submit_job": "any", "clone_job": "n:submitter", "manage_job": "n:submitter",
                     "download_job": "n:submitter", "view": "any", "operate": "o:site", "shell_commands": "o:site",
                     "byoc": "none", "server-predeployed-flwr": "none"},
            "member": {"submit_job": "none", "clone_job": "none", "manage_job": "none", "download_job": "none",
                       "view": "any", "operate": "none", "shell_commands": "none", "byoc": "none",
                       "server-predeployed-flwr": "none"},
        },
    }


def privacy(site: Site, study: str) -> dict:
    """``local/privacy.json`` of a site: the scopes it accepts and its default.

    FLARE applies a scope's filters to every task of the job, before the job's own filters.

    - ``public``: no site filters; the job's own components decide (the site's privacy policy in
      ``clinfed_site.json`` still binds clinfed's secure aggregation, whatever the scope).
    - ``strict``: :class:`clinfed.filters.release_guard.ReleaseGuard` in and out: only masked
      inputs of secure aggregation, its protocol messages and metrics leave the site. A job
      without secure aggregation, or the local model that cross-site evaluation asks for, gets an
      error reply instead.
    """
    guard = [{"path": RELEASE_GUARD_FILTER, "args": {}}]
    scopes = []
    for name in site.privacy.scopes:
        filters = guard if name == "strict" else []
        scopes.append({"name": name, "properties": {"study": study}, "task_data_filters": list(filters),
                       "task_result_filters": list(filters)})
    return {"format_version": 2, "scopes": scopes, "default_scope": site.privacy.default_scope}


def privacy_policy(site: Site, study: str) -> dict:
    """The ``privacy`` section of a site's ``clinfed_site.json`` (:mod:`clinfed.privacy.policy`):
    the site's floor on secure aggregation and the update-level DP it requires."""
    policy: dict = {"secure_aggregation": {"min_participants": site.privacy.min_participants,
                                           "min_threshold_fraction": site.privacy.min_threshold_fraction}}
    dp = site.privacy.update_dp
    if dp is not None:
        policy["studies"] = {study: {"update_dp": {"epsilon": dp.epsilon, "delta": dp.delta,
                                                   "noise_multiplier": dp.noise_multiplier,
                                                   "clip_norm": dp.clip_norm, "noise": dp.noise}}}
    return policy


def allow_list(default_resources: dict, extra: list[str] | tuple[str, ...] | None = None) -> dict:
    """``local/resources.json`` from FLARE's ``resources.json.default``: the default class allow-list
    plus ``clinfed.`` and the FLARE classes our jobs use that FLARE's list lacks; enforcement stays
    ``enforce``."""
    if extra is None:
        from clinfed.jobs.tumour_seg import EXTRA_ALLOWED_CLASSES

        extra = EXTRA_ALLOWED_CLASSES
    resources = json.loads(json.dumps(default_resources))
    allowed = list(resources.get("class_allow_list") or [])
    if not allowed:
        from nvflare.app_common.default_component_policy import DEFAULT_CLASS_ALLOW_LIST

        allowed = list(DEFAULT_CLASS_ALLOW_LIST)
    for entry in ["clinfed.", *extra]:
        if entry not in allowed:
            allowed.append(entry)
    resources["class_allow_list"] = allowed
    resources["class_list_enforcement_mode"] = "enforce"
    return resources


def move_server_storage(resources: dict, storage_root: Path) -> dict:
    """Point the server's job store and snapshots at ``storage_root`` instead of ``/tmp/nvflare``."""
    resources = json.loads(json.dumps(resources))
    storage_root = Path(storage_root)
    snapshot = resources.get("snapshot_persistor", {}).get("args", {}).get("storage", {}).get("args")
    if isinstance(snapshot, dict):
        snapshot["root_dir"] = str(storage_root / "snapshot-storage")
    for component in resources.get("components", []):
        if component.get("id") == "job_manager":
            component.setdefault("args", {})["uri_root"] = str(storage_root / "jobs-storage")
    return resources


def ledger_section(consortium: Consortium, participant: str, ledger_file: Path | None) -> dict:
    """The ``ledger`` section of a participant's ``clinfed_site.json``."""
    from clinfed.ledger.settings import msp_id_for

    config = dict(consortium.ledger)
    participants = config.pop("participants", {}) or {}
    section = {"backend": config.get("backend", "local"), "msp_id": msp_id_for(participant),
               "outbox": DEFAULT_OUTBOX, "policy": config.get("policy", "async")}
    if section["backend"] == "local":
        section["path"] = str(ledger_file)
    else:
        section.update({k: v for k, v in config.items() if k not in ("backend", "policy")})
        section.update(participants.get(participant, {}))
    return section


def site_config(consortium: Consortium, participant: str, ledger_file: Path | None,
                data_dir: str | None = None) -> dict:
    """``local/clinfed_site.json``: where the site's data live, its ledger identity and its privacy
    policy.

    The server (``coordinator``) gets only the ledger section. ``secret_file`` is left to the
    site's data folder default (``<data_dir>/site_secret.key``); ``masking_key_file`` to
    ``local/masking_key.pem``, which the site itself creates with ``clinfed keys register``."""
    config: dict = {}
    if participant != COORDINATOR:
        config["data_dir"] = data_dir or f"/data/clinfed/{participant}"
        site = next(s for s in consortium.sites if s.name == participant)
        config["privacy"] = privacy_policy(site, consortium.study)
    config["ledger"] = ledger_section(consortium, participant, ledger_file)
    return config


def fabric_orgs(consortium: Consortium) -> dict:
    """The org list ``fabric_network`` builds its crypto and channel from (MSP IDs by the
    :func:`clinfed.ledger.settings.msp_id_for` convention that ``fabric_network`` also
    follows), and the FLARE participant -> Fabric identity mapping."""
    from clinfed.ledger.settings import msp_id_for

    coordinator_msp = msp_id_for(COORDINATOR)
    return {
        "channel": consortium.ledger.get("channel", "clinfed"),
        "coordinator": {"flare_name": consortium.coordinator.name, "consortium_org": consortium.coordinator.org,
                        "fabric_org": coordinator_msp[:-3], "msp_id": coordinator_msp},
        "sites": [{"flare_name": s.name, "consortium_org": s.org, "fabric_org": s.fabric_org, "msp_id": s.msp_id}
                  for s in consortium.sites],
        # `python -m fabric_network up --sites ...` takes exactly this list.
        "fabric_network_sites": ",".join(consortium.site_names),
    }


def flare_to_fabric(consortium: Consortium) -> dict:
    """FLARE participant name -> Fabric MSP ID; the server acts as ``coordinator`` on the ledger."""
    from clinfed.ledger.settings import msp_id_for

    mapping = {consortium.coordinator.name: msp_id_for(COORDINATOR)}
    mapping.update({s.name: s.msp_id for s in consortium.sites})
    return mapping


def write_json(path: Path, content, mode: int | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(content, indent=2) + "\n")
    if mode is not None:
        path.chmod(mode)


__all__ = ["authorization", "privacy", "privacy_policy", "allow_list", "move_server_storage", "site_config",
           "fabric_orgs", "flare_to_fabric", "SITE_CONFIG_FILE"]
