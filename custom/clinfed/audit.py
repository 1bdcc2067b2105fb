"""The audit trail as a site operator reads it, and what is published on it outside a job: the
consortium, the sites' masking keys, their patients' consents.

Consents are published as keyed commitments, never as plain hashes of a patient's resource: a
FHIR Consent is determined by few facts (MRN, study, dates), so its plain SHA-256 could be found
by trying them. For each consent the site derives an *opening*, HMAC-SHA256 under its commitment
key (HKDF-SHA256 of its pseudonymisation secret, which never leaves the site) of the study, the
pseudonym and the Consent's SHA-256, and publishes ``HMAC-SHA256(opening, consent SHA-256)``.
Nobody without the site's secret can recompute a commitment from a FHIR file; the site proves
which Consent it relied on by showing that Consent and the one record's opening
(:func:`consent_opening`, :func:`commitment_opens`), which discloses nothing about other records.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import hmac
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from clinfed.errors import ConfigError
from clinfed.ledger import (Consent, ContractLedger, DuplicateRecord, LedgerEvent, sha256_file, verify_job)
from clinfed.ledger.settings import COORDINATOR, COORDINATOR_MSP, msp_id_for

COMMITMENT_KEY_INFO = b"clinfed consent commitment v1"


# --------------------------------------------------------------------------- consortium and consent


def init_consortium(ledger_path: str | os.PathLike, sites: Iterable[str]) -> None:
    """Make a simulator's LocalLedger for ``sites``: a throwaway CA and one identity per participant
    beside the file (:func:`clinfed.ledger.pki.create_simulation_identities`), the genesis block,
    and the consortium initialised as the coordinator. Nothing happens if the file already holds
    this consortium. (A provisioned consortium's ledger is made by ``consortium provision`` from
    the startup kits instead.)"""
    from clinfed.ledger import LocalLedger
    from clinfed.ledger.pki import create_simulation_identities, simulation_identity_files, simulation_membership

    sites = {site: msp_id_for(site) for site in sites}
    participants = {COORDINATOR: COORDINATOR_MSP, **sites}
    create_simulation_identities(ledger_path, participants)
    if not Path(ledger_path).exists():
        files = simulation_identity_files(ledger_path, COORDINATOR)
        LocalLedger.create(ledger_path, files.load(COORDINATOR_MSP), simulation_membership(ledger_path),
                           head_file=files.head_file).close()
    with LocalLedger(ledger_path, COORDINATOR_MSP) as ledger:
        try:
            ledger.init_consortium(sites, COORDINATOR_MSP)
        except DuplicateRecord:
            pass


def commitment_key(site_secret: bytes) -> bytes:
    """The site's consent-commitment key, derived from its pseudonymisation secret."""
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=COMMITMENT_KEY_INFO).derive(site_secret)


def consent_opening(key: bytes, study: str, pseudonym: str, consent_sha256: str) -> bytes:
    """The per-record key that opens one consent's commitment (what the site shows to prove it)."""
    message = "\0".join((study, pseudonym, consent_sha256)).encode("utf-8")
    return hmac.new(key, message, hashlib.sha256).digest()


def consent_commitment(key: bytes, study: str, pseudonym: str, consent_sha256: str) -> str:
    """The commitment published for a consent (64 hex digits)."""
    opening = consent_opening(key, study, pseudonym, consent_sha256)
    return hmac.new(opening, consent_sha256.encode("ascii"), hashlib.sha256).hexdigest()


def commitment_opens(commitment: str, opening: bytes, consent_resource: dict) -> bool:
    """Whether ``opening`` shows that ``commitment`` was made to this FHIR Consent resource."""
    from fhir_adapter import consent_sha256

    expected = hmac.new(opening, consent_sha256(consent_resource).encode("ascii"), hashlib.sha256).hexdigest()
    return hmac.compare_digest(expected, commitment)


def register_masking_key(ledger: ContractLedger, site: str, key_file: str | os.PathLike) -> tuple[str, bool]:
    """Make ``key_file`` the site's masking key (created, mode 0600, when missing) and publish its
    public half on the ledger unless that exact key is registered already. Returns the public key
    (hex) and whether it was newly registered. A different registered key is replaced: the
    ledger keeps the old one in the key's history."""
    from clinfed.privacy.secagg import generate_private_key_file, load_private_key, public_key_bytes

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
    pseudonym, the deciding status (active / revoked) and the keyed commitment to that Consent
    resource (see the module docstring).

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
    pseudonymiser = Pseudonymiser.for_site(site_dir, secret_file)
    # The secret stays in this process; only commitments derived from it reach the ledger.
    key = commitment_key(pseudonymiser._key)
    harmonised = harmonise_site(site_dir / "fhir", study, pseudonymiser)
    on_ledger = {c.pseudonym: c for c in ledger.consents(study, site=site) if isinstance(c, Consent)}
    report = ConsentSync(site=site, study=study)
    for pseudonym, decision in sorted(harmonised.consents.items()):
        if decision.status not in ("active", "revoked") or not decision.consent_sha256:
            report.no_consent += 1
            continue
        setattr(report, decision.status, getattr(report, decision.status) + 1)
        commitment = consent_commitment(key, study, pseudonym, decision.consent_sha256)
        recorded = on_ledger.get(pseudonym)
        if recorded is not None and (recorded.status, recorded.consent_commitment) == (decision.status, commitment):
            report.unchanged += 1
            continue
        try:
            ledger.put_consent(Consent(pseudonym=pseudonym, study=study, site=site, status=decision.status,
                                       consent_commitment=commitment))
            report.published += 1
        except DuplicateRecord:
            report.unchanged += 1
    report.missing_from_export = len(set(on_ledger) - {p for p, d in harmonised.consents.items()
                                                       if d.status in ("active", "revoked")})
    return report


# --------------------------------------------------------------------------- audit queries


def contributions(ledger: ContractLedger, job_id: str) -> list[dict]:
    return [_clean(dataclasses.asdict(c)) for c in ledger.iter_contributions(job_id)]


def models(ledger: ContractLedger, job_id: str) -> list[dict]:
    absent: dict[int, list] = {}
    for a in ledger.iter_absences(job_id):
        absent.setdefault(a.round, []).append({"site": a.site, "reason": a.reason})
    rows = []
    for m in ledger.iter_global_models(job_id):
        row = _clean(dataclasses.asdict(m))
        row["absent"] = sorted(absent.pop(m.round, []), key=lambda a: a["site"])
        rows.append(row)
    for round_, sites in sorted(absent.items()):  # absences of rounds without a model: show them too
        rows.append({"round": round_, "model_sha256": None, "participants": [], "absent": sites})
    return rows


def consents(ledger: ContractLedger, study: str, site: str | None = None, pseudonym: str | None = None) -> list[dict]:
    """A study's consents as the caller may read them: its own site's in full, other sites' as
    commitments only; with ``pseudonym``, the full history of one of the caller's own patients."""
    if pseudonym:
        return [dict(_clean(e.value or {}), tx_id=e.tx_id, timestamp=e.timestamp)
                for e in ledger.history("consent", study=study, pseudonym=pseudonym)]
    return [_clean(dataclasses.asdict(c)) for c in ledger.iter_consents(study, site=site)]


def consent_counts(ledger: ContractLedger, study: str) -> dict[str, dict[str, int]]:
    """Active and revoked consents per site, which every participant may read."""
    return ledger.consent_counts(study)


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
    is reported against the final model). The job's records are streamed, a page at a time.
    """
    digest = None
    if model_file is not None:
        path = Path(model_file)
        if not path.is_file():
            raise ConfigError(f"{path}: model file not found")
        digest = sha256_file(path)
    result = verify_job(ledger, job_id, digest, model_round)
    return ModelVerification(result, str(model_file) if model_file is not None else None, digest,
                             list(result.matched_rounds))


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
    return table(["round", "site", "update sha256", "stage", "n", "eps patient", "eps site", "excluded", "metrics",
                  "recorded"],
                 [[r["round"], r["site"], _short(r["update_sha256"]), r.get("hash_stage", "-"), r["n_samples"],
                   _number(r.get("patient_epsilon")), _number(r.get("site_epsilon")),
                   _number((r.get("metrics") or {}).get("consent_excluded")),
                   ", ".join(f"{k}={_number(v)}" for k, v in sorted((r.get("metrics") or {}).items())
                             if k != "consent_excluded") or "-",
                   _time(r.get("timestamp"))] for r in rows])


def models_table(rows: list[dict]) -> str:
    if not rows:
        return "no global models recorded"
    return table(["round", "model sha256", "aggregation", "participants", "absent", "n", "eps patient", "eps site",
                  "recorded"],
                 [[r["round"], _short(r.get("model_sha256")), r.get("aggregation", "-"),
                   ",".join(r.get("participants") or []) or "-",
                   ",".join(f"{a['site']} ({a['reason']})" if a.get("reason") else a["site"]
                            for a in r.get("absent", [])) or "-",
                   _number(r.get("n_samples")), _number(r.get("patient_epsilon")), _number(r.get("site_epsilon")),
                   _time(r.get("timestamp"))] for r in rows])


def consents_table(rows: list[dict]) -> str:
    if not rows:
        return "no consents recorded"
    return table(["pseudonym", "study", "site", "status", "commitment", "recorded"],
                 [[r.get("pseudonym", "(another site's)"), r.get("study", "-"), r.get("site", "-"),
                   r.get("status", "-"), _short(r.get("consent_commitment")), _time(r.get("timestamp"))]
                  for r in rows])


def consent_counts_table(counts: dict[str, dict[str, int]]) -> str:
    if not counts:
        return "no consents recorded"
    return table(["site", "active", "revoked"], [[site, c.get("active", 0), c.get("revoked", 0)]
                                                 for site, c in sorted(counts.items())])


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
