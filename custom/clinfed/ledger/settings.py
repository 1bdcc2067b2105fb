"""Which ledger, as whom: where every participant finds its ledger and identity, and the
process's shared ledger clients.

Every participant (each site, and the FLARE server acting as the consortium's coordinator)
resolves its ledger the same way, first match wins:

1. an explicit ``--ledger`` on the command line (CLI only);
2. the ``"ledger"`` section of ``local/clinfed_site.json`` in the participant's FLARE workspace
   (the same file that tells the executor where the site's data live)::

       {"data_dir": "/data/clinfed", "secret_file": "/secure/site_secret.key",
        "ledger": {"participant": "site-1", "backend": "local", "msp_id": "Site1MSP",
                   "path": "/var/lib/clinfed/ledger.sqlite", "cert": "../startup/client.crt",
                   "key": "../startup/client.key", "ca": "../startup/rootCA.pem",
                   "head_file": "clinfed_ledger_head.json",
                   "outbox": "clinfed_ledger_outbox.jsonl", "policy": "async"}}

   or, on Fabric, ``"backend": "fabric", "endpoint": "peer0.h1:7051", "msp_dir": "users/flare@h1/msp",
   "tls_root_cert": "tls/ca.pem"``. The section is an :func:`clinfed.ledger.open_ledger` mapping
   plus ``participant``, the name whose identity it holds; relative paths are resolved against
   the file's folder. ``msp_id`` defaults to :func:`msp_id_for` of the participant, ``outbox`` to
   ``clinfed_ledger_outbox.jsonl`` beside the file (``""`` turns the outbox off), and a local
   ledger identity's ``head_file`` to ``clinfed_ledger_head.json`` beside it;
3. ``$CLINFED_LEDGER``, for the simulator and single-machine runs, where all participants share
   one ledger: either the path of a LocalLedger SQLite file (each participant signs with its
   simulator identity beside it, ``<file>.identities/``, and has one outbox journal in
   ``<file>.outbox/``), or the path of a JSON file::

       {"backend": "local", "path": "ledger.sqlite",
        "msp_ids": {"coordinator": "CoordinatorMSP", "site-1": "Site1MSP"},
        "outbox_dir": "outbox", "policy": "async",
        "participants": {"site-1": {"...": "per-participant overrides of any field"}}}

The server always acts as ``coordinator`` (never under its FLARE host name), a site under its
FLARE site name. Job configs carry neither paths nor identities: a job only says *that* it
records, each participant decides *where* and *as whom*.

Simulator runs all have FLARE job ID ``simulate_job``; ``$CLINFED_JOB_ID`` gives such a run the
ID under which its records are kept (the demo sets a fresh one per run).
"""

from __future__ import annotations

import atexit
import dataclasses
import json
import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from clinfed.errors import ConfigError
from clinfed.config_files import read_json_object
from clinfed.site_config import SITE_CONFIG_FILE

from .base import ContractLedger
from .config import open_ledger

LEDGER_ENV = "CLINFED_LEDGER"
JOB_ID_ENV = "CLINFED_JOB_ID"
COORDINATOR = "coordinator"
COORDINATOR_MSP = "CoordinatorMSP"
DEFAULT_OUTBOX = "clinfed_ledger_outbox.jsonl"
DEFAULT_HEAD_FILE = "clinfed_ledger_head.json"


def msp_id_for(participant: str) -> str:
    """The conventional MSP ID of a participant: ``site-1`` -> ``Site1MSP``, ``coordinator`` ->
    ``CoordinatorMSP`` (what ``provisioning/`` generates for the Fabric orgs)."""
    if participant == COORDINATOR:
        return COORDINATOR_MSP
    parts = [p for p in re.split(r"[^A-Za-z0-9]+", participant) if p]
    if not parts:
        raise ConfigError(f"participant name {participant!r} has no letters or digits to derive an MSP ID from")
    return "".join(p[:1].upper() + p[1:] for p in parts) + "MSP"


@dataclass(frozen=True)
class LedgerSettings:
    """A resolved ledger configuration: the :func:`open_ledger` mapping and where it came from.

    ``identity_of`` is the participant whose identity the configuration holds, when it says (a
    site configuration's ``participant``)."""

    participant: str
    config: Mapping[str, Any]
    base_dir: Path
    source: str
    identity_of: str | None = None

    @property
    def msp_id(self) -> str:
        return self.config["msp_id"]

    @property
    def backend(self) -> str:
        return self.config.get("backend", "local")

    def with_policy(self, policy: str | None) -> "LedgerSettings":
        """The same settings with the outbox policy a job asks for (no effect without an outbox)."""
        if not policy or not self.config.get("outbox"):
            return self
        return dataclasses.replace(self, config={**self.config, "policy": policy})

    def open(self, outbox: bool = True) -> ContractLedger:
        """A new client; ``outbox=False`` talks to the ledger directly (interactive commands, where
        a refusal or an unreachable ledger should be reported at once)."""
        config = dict(self.config)
        if not outbox:
            for name in ("outbox", "policy", "retry_interval", "strict_timeout"):
                config.pop(name, None)
        return open_ledger(config, base_dir=self.base_dir)

    def describe(self) -> str:
        where = self.config.get("path") or self.config.get("endpoint") or "?"
        return f"{self.backend} ledger {where} as {self.msp_id} ({self.source})"


def ledger_settings(participant: str, *, site_config_dir: str | os.PathLike | None = None,
                    ledger: str | os.PathLike | None = None,
                    env: Mapping[str, str] | None = None) -> LedgerSettings | None:
    """Where ``participant`` finds its ledger (see the module docstring), or None if nowhere."""
    env = os.environ if env is None else env
    if ledger:
        return _from_ledger_path(participant, Path(ledger), "--ledger")
    if site_config_dir is not None:
        config_file = Path(site_config_dir) / SITE_CONFIG_FILE
        if config_file.is_file():
            settings = site_config_ledger(participant, config_file)
            if settings is not None:
                return settings
    if env.get(LEDGER_ENV):
        return _from_ledger_path(participant, Path(env[LEDGER_ENV]), f"${LEDGER_ENV}")
    return None


def site_config_ledger(participant: str, config_file: Path) -> LedgerSettings | None:
    """The ``ledger`` section of a participant's ``clinfed_site.json`` (None if it has none)."""
    site_config = read_json_object(config_file)
    section = site_config.get("ledger")
    if section is None:
        return None
    if not isinstance(section, dict):
        raise ConfigError(f"{config_file}: field 'ledger' must be an object (an open_ledger configuration)")
    config = dict(section)
    owner = config.pop("participant", None)
    if "msp_id" not in config:
        config["msp_id"] = msp_id_for(owner or participant)
    config.setdefault("outbox", DEFAULT_OUTBOX)
    if not config["outbox"]:
        config.pop("outbox")
    if config.get("backend", "local") == "local" and config.get("cert"):
        config.setdefault("head_file", DEFAULT_HEAD_FILE)
    return LedgerSettings(participant, config, config_file.parent, str(config_file), owner)


def _from_ledger_path(participant: str, path: Path, source: str) -> LedgerSettings:
    path = path.expanduser().resolve()
    if path.suffix.lower() != ".json":
        # A LocalLedger file shared by every participant on this machine (their simulator identities beside it).
        from .pki import simulation_participants

        outbox = path.with_name(path.name + ".outbox") / f"{participant}.jsonl"
        msp_id = (simulation_participants(path) or {}).get(participant) or msp_id_for(participant)
        config = {"backend": "local", "path": str(path), "msp_id": msp_id, "outbox": str(outbox)}
        return LedgerSettings(participant, config, path.parent, f"{source}={path}")
    shared = read_json_object(path, f"{path} ({source})")
    msp_ids = shared.pop("msp_ids", {}) or {}
    outbox_dir = shared.pop("outbox_dir", None)
    overrides = (shared.pop("participants", {}) or {}).get(participant, {})
    if not isinstance(msp_ids, dict) or not isinstance(overrides, dict):
        raise ConfigError(f"{path}: fields 'msp_ids' and 'participants' must be objects")
    config = {**shared, **overrides}
    config.setdefault("msp_id", msp_ids.get(participant) or msp_id_for(participant))
    if outbox_dir and "outbox" not in config:
        config["outbox"] = str(Path(outbox_dir) / f"{participant}.jsonl")
    return LedgerSettings(participant, config, path.parent, f"{source}={path}")


def ledger_job_id(flare_job_id: str | None, env: Mapping[str, str] | None = None) -> str:
    """The ID a job's records carry: ``$CLINFED_JOB_ID`` if set (simulator runs), else FLARE's."""
    env = os.environ if env is None else env
    return env.get(JOB_ID_ENV) or str(flare_job_id or "")


# One client per participant and configuration in a process, shared by the executor and the
# filters, so a participant has one outbox journal and one delivery thread.
_SHARED: dict[str, ContractLedger] = {}
_SHARED_LOCK = threading.Lock()


def _shared_key(settings: LedgerSettings) -> str:
    return json.dumps([settings.participant, str(settings.base_dir), dict(settings.config)], sort_keys=True,
                      default=str)


def shared_ledger(settings: LedgerSettings) -> ContractLedger:
    """The process's client for ``settings``, opened on first use and flushed at process exit."""
    key = _shared_key(settings)
    with _SHARED_LOCK:
        ledger = _SHARED.get(key)
        if ledger is None:
            ledger = settings.open()
            _SHARED[key] = ledger
        return ledger


def release_shared_ledger(settings: LedgerSettings) -> int:
    """Flush and close the shared client (END_RUN); returns the writes left queued in its outbox."""
    with _SHARED_LOCK:
        ledger = _SHARED.pop(_shared_key(settings), None)
    if ledger is None:
        return 0
    remaining = ledger.close()
    return remaining if isinstance(remaining, int) else 0


def deliver_now(ledger: ContractLedger) -> int:
    """Try to deliver an outbox's queued writes now; returns how many stay queued (0 without one)."""
    flush = getattr(ledger, "flush", None)
    return flush() if callable(flush) else 0


@atexit.register
def _close_shared() -> None:
    with _SHARED_LOCK:
        ledgers = list(_SHARED.values())
        _SHARED.clear()
    for ledger in ledgers:
        try:
            ledger.close()
        except Exception:  # noqa: BLE001 - exiting; the outbox keeps what was not delivered
            pass
