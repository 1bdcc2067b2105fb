"""The audit trail as a site operator reads it, consent publication, and where every participant
finds its ledger and identity.

Which ledger, as whom
=====================

Every participant (each site, and the FLARE server acting as the consortium's coordinator)
resolves its ledger the same way, first match wins:

1. an explicit ``--ledger`` on the command line (CLI only);
2. the ``"ledger"`` section of ``local/clinfed_site.json`` in the participant's FLARE workspace
   (the same file that tells the executor where the site's data live)::

       {"data_dir": "/data/clinfed", "secret_file": "/secure/site_secret.key",
        "ledger": {"backend": "fabric", "msp_id": "Hospital1MSP", "endpoint": "peer0.h1:7051",
                   "msp_dir": "users/flare@h1/msp", "tls_root_cert": "tls/ca.pem",
                   "outbox": "clinfed_ledger_outbox.jsonl", "policy": "async"}}

   The section is an :func:`clinfed.ledger.open_ledger` mapping; relative paths are resolved
   against the file's folder. ``msp_id`` defaults to :func:`msp_id_for` of the participant and
   ``outbox`` to ``clinfed_ledger_outbox.jsonl`` beside the file (``""`` turns the outbox off);
3. ``$CLINFED_LEDGER``, for the simulator and single-machine runs, where all participants share
   one ledger: either the path of a LocalLedger SQLite file (MSP IDs by convention, one outbox
   journal per participant in ``<file>.outbox/``), or the path of a JSON file::

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
import base64
import dataclasses
import json
import os
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

from clinfed.errors import ConfigError
from clinfed.site_config import SITE_CONFIG_FILE, read_json_object
from clinfed.ledger import (Consent, ContractLedger, DuplicateRecord, JobVerification, LedgerEvent, open_ledger,
                            sha256_file, verify_records)

LEDGER_ENV = "CLINFED_LEDGER"
JOB_ID_ENV = "CLINFED_JOB_ID"
COORDINATOR = "coordinator"
COORDINATOR_MSP = "CoordinatorMSP"
DEFAULT_OUTBOX = "clinfed_ledger_outbox.jsonl"


def msp_id_for(participant: str) -> str:
    """The conventional MSP ID of a participant: ``site-1`` -> ``Site1MSP``, ``coordinator`` ->
    ``CoordinatorMSP`` (what ``provisioning/`` generates for the Fabric orgs)."""
    if participant == COORDINATOR:
        return COORDINATOR_MSP
    parts = [p for p in re.split(r"[^A-Za-z0-9]+", participant) if p]
    if not parts:
        raise ConfigError(f"participant name {participant!r} has no letters or digits to derive an MSP ID from")
    return "".join(p[:1].upper() + p[1:] for p in parts) + "MSP"


# --------------------------------------------------------------------------- configuration


@dataclass(frozen=True)
class LedgerSettings:
    """A resolved ledger configuration: the :func:`open_ledger` mapping and where it came from."""

    participant: str
    config: Mapping[str, Any]
    base_dir: Path
    source: str

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
    config.setdefault("msp_id", msp_id_for(participant))
    config.setdefault("outbox", DEFAULT_OUTBOX)
    if not config["outbox"]:
        config.pop("outbox")
    return LedgerSettings(participant, config, config_file.parent, str(config_file))


def _from_ledger_path(participant: str, path: Path, source: str) -> LedgerSettings:
    path = path.expanduser().resolve()
    if path.suffix.lower() != ".json":
        # A LocalLedger file shared by every participant on this machine.
        outbox = path.with_name(path.name + ".outbox") / f"{participant}.jsonl"
        config = {"backend": "local", "path": str(path), "msp_id": msp_id_for(participant), "outbox": str(outbox)}
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


# --------------------------------------------------------------------------- consortium and consent


def init_consortium(ledger_path: str | os.PathLike, sites: Iterable[str]) -> None:
    """Initialise a LocalLedger file for ``sites`` (MSP IDs by convention) as the coordinator;
    nothing happens if it already holds this consortium."""
    from clinfed.ledger import LocalLedger

    sites = {site: msp_id_for(site) for site in sites}
    with LocalLedger(ledger_path, COORDINATOR_MSP) as ledger:
        try:
            ledger.init_consortium(sites, COORDINATOR_MSP)
        except DuplicateRecord:
            pass


def register_masking_key(ledger: ContractLedger, site: str, key_file: str | os.PathLike) -> tuple[str, bool]:
    """Make ``key_file`` the site's masking key (created, mode 0600, when missing) and publish its
    public half on the ledger unless that exact key is registered already. Returns the public key
    (hex) and whether it was newly registered. A different registered key is replaced: the
    ledger keeps the old one in the key's history."""
    from clinfed.privacy.masking import generate_private_key_file, load_private_key, public_key_bytes

    key_file = Path(key_file)
    public = public_key_bytes(load_private_key(key_file)) if key_file.exists() else generate_private_key_file(key_file)
    registered = ledger.site_keys().get(site)
    if registered is not None and registered.public_key == base64.b64encode(public).decode("ascii"):
        return public.hex(), False
    ledger.register_site_key(site, public)
    return public.hex(), True


@dataclass
class ConsentSync:
    """What ``consent sync`` did: counts only (pseudonyms stay in the ledger and the site log)."""

    site: str
    study: str
    published: int = 0
    unchanged: int = 0
    active: int = 0
    revoked: int = 0
    no_consent: int = 0
    # On the ledger but without a deciding Consent in the export any more: left as recorded.
    missing_from_export: int = 0

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def sync_consents(site_dir: str | os.PathLike, ledger: ContractLedger, site: str, study: str | None = None,
                  secret_file: str | os.PathLike | None = None) -> ConsentSync:
    """Publish the site's FHIR Consents for ``study`` to the ledger: for each patient, the
    pseudonym, the deciding status (active / revoked) and the sha256 of that Consent resource.

    Only what changed is written; a patient without a Consent for the study is not published
    (the executor treats "not on the ledger" as "not consented").
    """
    from clinfed.data.profiles import STUDY_ID
    from clinfed.data.pseudonym import Pseudonymiser
    from fhir_adapter import harmonise_site

    site_dir = Path(site_dir)
    study = study or STUDY_ID
    if not (site_dir / "fhir").exists():
        raise ConfigError(f"{site_dir}: no fhir/ folder with the site's FHIR export")
    harmonised = harmonise_site(site_dir / "fhir", study, Pseudonymiser.for_site(site_dir, secret_file))
    on_ledger = {c.pseudonym: c for c in ledger.consents(study, site=site)}
    report = ConsentSync(site=site, study=study)
    for pseudonym, decision in sorted(harmonised.consents.items()):
        if decision.status not in ("active", "revoked") or not decision.consent_sha256:
            report.no_consent += 1
            continue
        setattr(report, decision.status, getattr(report, decision.status) + 1)
        recorded = on_ledger.get(pseudonym)
        if recorded is not None and (recorded.status, recorded.consent_sha256) == (decision.status,
                                                                                   decision.consent_sha256):
            report.unchanged += 1
            continue
        try:
            ledger.put_consent(Consent(pseudonym=pseudonym, study=study, site=site, status=decision.status,
                                       consent_sha256=decision.consent_sha256))
            report.published += 1
        except DuplicateRecord:
            report.unchanged += 1
    report.missing_from_export = len(set(on_ledger) - {p for p, d in harmonised.consents.items()
                                                       if d.status in ("active", "revoked")})
    return report


# --------------------------------------------------------------------------- audit queries


def contributions(ledger: ContractLedger, job_id: str) -> list[dict]:
    return [_clean(dataclasses.asdict(c)) for c in sorted(ledger.contributions(job_id), key=lambda c: (c.round, c.site))]


def models(ledger: ContractLedger, job_id: str) -> list[dict]:
    job = ledger.job(job_id)
    absent: dict[int, list] = {}
    for a in job.absences:
        absent.setdefault(a.round, []).append({"site": a.site, "reason": a.reason})
    rows = []
    for m in sorted(job.global_models, key=lambda m: m.round):
        row = _clean(dataclasses.asdict(m))
        row["absent"] = sorted(absent.pop(m.round, []), key=lambda a: a["site"])
        rows.append(row)
    for round_, sites in sorted(absent.items()):  # absences of rounds without a model: show them too
        rows.append({"round": round_, "model_sha256": None, "participants": [], "absent": sites})
    return rows


def consents(ledger: ContractLedger, study: str, site: str | None = None, pseudonym: str | None = None) -> list[dict]:
    if pseudonym:
        return [dict(_clean(e.value or {}), tx_id=e.tx_id, timestamp=e.timestamp)
                for e in ledger.history("consent", study=study, pseudonym=pseudonym)]
    return [_clean(dataclasses.asdict(c)) for c in sorted(ledger.consents(study, site=site),
                                                          key=lambda c: (c.site, c.pseudonym))]


@dataclass
class ModelVerification:
    """``audit verify``: the job's chain and, given a model file, whether it is on the ledger."""

    job: JobVerification
    model_file: str | None = None
    model_sha256: str | None = None
    matched_rounds: list = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.job.ok

    def to_dict(self) -> dict:
        return {**self.job.to_dict(), "model_file": self.model_file, "model_sha256": self.model_sha256,
                "matched_rounds": self.matched_rounds}


def verify(ledger: ContractLedger, job_id: str, model_file: str | os.PathLike | None = None,
           model_round: int | None = None) -> ModelVerification:
    """Check the job's chain on the ledger and that ``model_file`` is a recorded global model.

    The model's hash is the sha256 of the file's bytes exactly as the server's persistor saved
    them (see :mod:`clinfed.widgets.ledger_recorder`). Without ``model_round`` the file is
    checked against the round it matches (the final round if it matches none, so a changed file
    is reported against the final model).
    """
    job = ledger.job(job_id)
    digest = None
    matched: list[int] = []
    if model_file is not None:
        path = Path(model_file)
        if not path.is_file():
            raise ConfigError(f"{path}: model file not found")
        digest = sha256_file(path)
        matched = sorted(m.round for m in job.global_models if m.model_sha256 == digest)
        if model_round is None and matched:
            model_round = matched[-1]
    result = verify_records(job, job_id, digest, model_round)
    if matched and result.final_round is not None and matched[-1] != result.final_round:
        result.notes.append(f"the model file is the global model of round {matched[-1]}, not of the final round "
                            f"{result.final_round}")
    return ModelVerification(result, str(model_file) if model_file is not None else None, digest, matched)


def watch(ledger: ContractLedger, start_block: int = 0, follow: bool = True, timeout: float | None = None,
          emit: Callable[[LedgerEvent], None] = print) -> int:
    """Pass chaincode events to ``emit`` as they are committed; returns how many were seen."""
    seen = 0
    for event in ledger.events(start_block, follow=follow, timeout=timeout):
        emit(event)
        seen += 1
    return seen


# --------------------------------------------------------------------------- presentation


def _clean(record: dict) -> dict:
    return {k: v for k, v in record.items() if v not in (None, {}, []) or k in ("participants",)}


def _short(digest: str | None) -> str:
    return "-" if not digest else digest[:16]


def _time(timestamp: str | None) -> str:
    """Transaction time to the second (the ledger keeps nanoseconds; --json shows them)."""
    return "-" if not timestamp else timestamp[:19].replace("T", " ") + "Z"


def _number(value, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def table(headers: list[str], rows: list[list]) -> str:
    """A plain fixed-width table."""
    text = [[str(c) for c in row] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in text]) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths)).rstrip(),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in text]
    return "\n".join(lines)


def contributions_table(rows: list[dict]) -> str:
    if not rows:
        return "no contributions recorded"
    return table(["round", "site", "update sha256", "stage", "n", "epsilon", "excluded", "metrics", "recorded"],
                 [[r["round"], r["site"], _short(r["update_sha256"]), r.get("hash_stage", "-"), r["n_samples"],
                   _number(r.get("epsilon")), _number((r.get("metrics") or {}).get("consent_excluded")),
                   ", ".join(f"{k}={_number(v)}" for k, v in sorted((r.get("metrics") or {}).items())
                             if k != "consent_excluded") or "-",
                   _time(r.get("timestamp"))] for r in rows])


def models_table(rows: list[dict]) -> str:
    if not rows:
        return "no global models recorded"
    return table(["round", "model sha256", "aggregation", "participants", "absent", "n", "epsilon", "recorded"],
                 [[r["round"], _short(r.get("model_sha256")), r.get("aggregation", "-"),
                   ",".join(r.get("participants") or []) or "-",
                   ",".join(f"{a['site']} ({a['reason']})" if a.get("reason") else a["site"]
                            for a in r.get("absent", [])) or "-",
                   _number(r.get("n_samples")), _number(r.get("epsilon")), _time(r.get("timestamp"))] for r in rows])


def consents_table(rows: list[dict]) -> str:
    if not rows:
        return "no consents recorded"
    return table(["pseudonym", "study", "site", "status", "consent sha256", "recorded"],
                 [[r.get("pseudonym", "-"), r.get("study", "-"), r.get("site", "-"), r.get("status", "-"),
                   _short(r.get("consent_sha256")), _time(r.get("timestamp"))] for r in rows])


def verification_text(result: ModelVerification) -> str:
    job = result.job
    lines = [f"job {job.job_id}: {'VERIFIED' if job.ok else 'NOT VERIFIED'}",
             f"  rounds with a global model: {job.rounds} (final round {job.final_round}); records: {job.records}"]
    if result.model_file is not None:
        where = (f"recorded as the global model of round {', '.join(map(str, result.matched_rounds))}"
                 if result.matched_rounds else "not recorded for any round")
        lines.append(f"  model file {result.model_file}")
        lines.append(f"    sha256 {result.model_sha256}: {where}")
    lines += [f"  problem: {p}" for p in job.problems]
    lines += [f"  note: {n}" for n in job.notes]
    return "\n".join(lines)


def event_line(event: LedgerEvent) -> str:
    p = event.payload
    detail = {
        "ContributionRecorded": lambda: f"job {p.get('job_id')} round {p.get('round')} {p.get('site')} "
                                        f"update {_short(p.get('update_sha256'))} n={p.get('n_samples')}",
        "GlobalModelRecorded": lambda: f"job {p.get('job_id')} round {p.get('round')} model "
                                       f"{_short(p.get('model_sha256'))} from {','.join(p.get('participants', []))}",
        "AbsenceRecorded": lambda: f"job {p.get('job_id')} round {p.get('round')} {p.get('site')} absent "
                                   f"({p.get('reason') or 'no reason given'})",
        "ConsentRecorded": lambda: f"{p.get('site')} {p.get('pseudonym')} study {p.get('study')} {p.get('status')}",
        "SiteKeyRegistered": lambda: f"{p.get('site')} masking key registered",
        "ConsortiumInitialised": lambda: f"sites {', '.join(sorted(p.get('sites', {})))}, coordinator "
                                         f"{p.get('coordinator_msp')}",
    }.get(event.name, lambda: "")()
    return f"block {event.block:>6}  {p.get('timestamp', '-')}  {p.get('recorded_by', '-'):<16} {event.name:<22} {detail}"
