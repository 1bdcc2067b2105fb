"""The clinfed audit contract: who contributed what to which model, under which consent.

Every record is canonical JSON (sorted keys, no spaces, UTF-8) under a composite key:

==============  ==========================================  =============================
record          composite key                               written by
==============  ==========================================  =============================
consortium      ``consortium``                              the coordinator, once
site key        ``sitekey / site``                          that site (X25519 public key, versioned)
consent         ``consent / study / pseudonym``             the patient's site
contribution    ``contribution / job / round / site``       that site
global model    ``model / job / round``                     the coordinator
absence         ``absence / job / round / site``            the coordinator
==============  ==========================================  =============================

Rounds are zero-padded in keys so that a prefix scan returns them in order. Every write checks
the caller's MSP ID first, validates every field (unknown fields are refused, so nothing but a
pseudonym can identify a patient), writes once, and emits one chaincode event whose payload is
the stored record. Contributions, global models and absences are never overwritten: a second
write of the same key is refused, with ``CLINFED_DUPLICATE`` when it repeats the stored record
(a retry of a write that did commit) and ``CLINFED_CONFLICT`` when it differs. A consent changes status over
time; its earlier states stay in the key's history, and a write that changes nothing is a
duplicate. Times come from the transaction header, which every endorser sees alike.

Errors are raised as :class:`ChaincodeError`; their text starts with ``CLINFED_<CODE>:`` so a
client can tell a duplicate (safe to treat as done) from a refusal.
"""

from __future__ import annotations

import base64
import binascii
import datetime as _dt
import json
import math
import re
from typing import Any

from ._shim import Contract, TransactionContext

CONTRACT_NAME = "clinfed"

# Error codes, the word after ``CLINFED_`` in every error message.
INVALID = "INVALID"
ACCESS_DENIED = "ACCESS_DENIED"
UNKNOWN_MSP = "UNKNOWN_MSP"
DUPLICATE = "DUPLICATE"
NOT_FOUND = "NOT_FOUND"
NOT_INITIALISED = "NOT_INITIALISED"
CONFLICT = "CONFLICT"

# Event names, one per write transaction.
EVENT_CONSORTIUM = "ConsortiumInitialised"
EVENT_SITE_KEY = "SiteKeyRegistered"
EVENT_CONSENT = "ConsentRecorded"
EVENT_CONTRIBUTION = "ContributionRecorded"
EVENT_MODEL = "GlobalModelRecorded"
EVENT_ABSENCE = "AbsenceRecorded"

# Key object types.
K_CONSORTIUM = "consortium"
K_SITE_KEY = "sitekey"
K_CONSENT = "consent"
K_CONTRIBUTION = "contribution"
K_MODEL = "model"
K_ABSENCE = "absence"
KEY_PARTS = {  # object type -> names of its key attributes, for GetHistory
    K_CONSORTIUM: (),
    K_SITE_KEY: ("site",),
    K_CONSENT: ("study", "pseudonym"),
    K_CONTRIBUTION: ("job_id", "round", "site"),
    K_MODEL: ("job_id", "round"),
    K_ABSENCE: ("job_id", "round", "site"),
}

_META = ("tx_id", "timestamp", "recorded_by")  # added to every record by _write

CONSENT_STATUSES = ("active", "revoked")
HASH_STAGES = ("after_dp", "after_masking")
ROUND_DIGITS = 8
MAX_ROUND = 10**ROUND_DIGITS - 1
MAX_METRICS = 32
MAX_SITES = 1000

_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")
_SITE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_MSP = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_PSEUDONYM = re.compile(r"p-[0-9a-f]{32}")  # clinfed.data.pseudonym: "p-" + 128-bit HMAC, hex
_METRIC = re.compile(r"[a-z][a-z0-9_./]{0,63}")  # names like val_dice; no room for identifiers like MRNs
_REASON = re.compile(r"[A-Za-z0-9 _.,:;()/-]{0,200}")


class ChaincodeError(Exception):
    """A refused transaction; ``str()`` is ``CLINFED_<CODE>: <what and why>``."""

    def __init__(self, code: str, message: str):
        self.code = code
        super().__init__(f"CLINFED_{code}: {message}")


def canonical_json(value: Any) -> str:
    """The one serialisation of records: sorted keys, no whitespace, UTF-8, no NaN."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


# --------------------------------------------------------------------------- validation


def _parse_json(text: str, what: str) -> Any:
    try:
        return json.loads(text)
    except (TypeError, ValueError) as exc:
        raise ChaincodeError(INVALID, f"{what} is not valid JSON: {exc}") from None


def _fields(record: Any, what: str, required: tuple[str, ...], optional: tuple[str, ...] = ()) -> dict:
    if not isinstance(record, dict):
        raise ChaincodeError(INVALID, f"{what} must be a JSON object")
    missing = [f for f in required if f not in record]
    if missing:
        raise ChaincodeError(INVALID, f"{what} lacks field(s) {', '.join(missing)}")
    unexpected = sorted(set(record) - set(required) - set(optional))
    if unexpected:
        raise ChaincodeError(
            INVALID, f"{what} has unexpected field(s) {', '.join(unexpected)}; "
            f"allowed: {', '.join(required + optional)}")
    return record


def _text(value: Any, field: str, pattern: re.Pattern, expected: str, echo: bool = True) -> str:
    """``echo=False`` for fields where a wrong value may be a patient identifier: errors end up in
    logs, so the value is not repeated."""
    if not isinstance(value, str) or not pattern.fullmatch(value):
        shown = _show(value) if echo else "a value that is not one (not shown: it may identify a patient)"
        raise ChaincodeError(INVALID, f"{field} must be {expected}, got {shown}")
    return value


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _int(value: Any, field: str, minimum: int = 0, maximum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum or (
            maximum is not None and value > maximum):
        bound = f" and at most {maximum}" if maximum is not None else ""
        raise ChaincodeError(INVALID, f"{field} must be an integer of at least {minimum}{bound}, got {_show(value)}")
    return value


def _number(value: Any, field: str, minimum: float | None = None, below: float | None = None) -> float | int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or (
            minimum is not None and value < minimum) or (below is not None and value >= below):
        raise ChaincodeError(INVALID, f"{field} must be a finite number"
                             + (f" >= {minimum}" if minimum is not None else "")
                             + (f" and < {below}" if below is not None else "") + f", got {_show(value)}")
    return value


def _optional(record: dict, field: str, check, *args):
    value = record.get(field)
    return None if value is None else check(value, field, *args)


def _metrics(value: Any, field: str) -> dict:
    if not isinstance(value, dict) or len(value) > MAX_METRICS:
        raise ChaincodeError(INVALID, f"{field} must be an object of at most {MAX_METRICS} named numbers")
    for name, number in value.items():
        _text(name, f"{field} name", _METRIC, "a lowercase name of [a-z0-9_./], starting with a letter", echo=False)
        _number(number, f"{field}.{name}")
    return value


def _site_list(value: Any, field: str) -> list:
    if not isinstance(value, list) or not value or len(value) > MAX_SITES:
        raise ChaincodeError(INVALID, f"{field} must be a non-empty list of site names")
    for site in value:
        _text(site, f"{field} entry", _SITE, "a site name")
    if len(set(value)) != len(value):
        raise ChaincodeError(INVALID, f"{field} lists a site twice: {value}")
    return sorted(value)


# --------------------------------------------------------------------------- the contract


class ClinfedContract(Contract):
    """Site registry, consents, contributions, global models and absences of a consortium."""

    Name = CONTRACT_NAME

    def get_evaluate_transactions(self) -> list:
        return [name for name in dir(self) if name.startswith("Get")]

    # ---------------------------------------------------------------- registry

    async def InitConsortium(self, ctx: TransactionContext, config: str) -> str:
        """Record the consortium once: ``{"coordinator_msp": M, "sites": {site: msp, ...}}``.

        Only the coordinator named in the config may call it.
        """
        record = _fields(_parse_json(config, "consortium config"), "consortium config",
                         ("coordinator_msp", "sites"))
        coordinator = _text(record["coordinator_msp"], "coordinator_msp", _MSP, "an MSP ID")
        sites = record["sites"]
        if not isinstance(sites, dict) or not sites or len(sites) > MAX_SITES:
            raise ChaincodeError(INVALID, "sites must be a non-empty object mapping site name to MSP ID")
        for site, msp in sites.items():
            _text(site, "site name", _SITE, "1-64 characters of [A-Za-z0-9._-]")
            _text(msp, f"MSP ID of site {site}", _MSP, "an MSP ID")
        caller = self._caller(ctx)
        if caller != coordinator:
            raise ChaincodeError(ACCESS_DENIED, f"the consortium must be initialised by its coordinator "
                                 f"{coordinator}; caller is {caller}")
        stub = ctx.get_stub()
        key = stub.create_composite_key(K_CONSORTIUM, [])
        existing = await self._get(ctx, key)
        if existing is not None:
            if existing["coordinator_msp"] == coordinator and existing["sites"] == sites:
                raise ChaincodeError(DUPLICATE, f"the consortium is already initialised with this config "
                                     f"(tx {existing['tx_id']})")
            raise ChaincodeError(CONFLICT, f"the consortium is already initialised (tx {existing['tx_id']}) "
                                 f"with a different config; it cannot be changed")
        stored = {"type": K_CONSORTIUM, "coordinator_msp": coordinator, "sites": dict(sorted(sites.items()))}
        return await self._write(ctx, key, stored, EVENT_CONSORTIUM)

    async def RegisterSiteKey(self, ctx: TransactionContext, site: str, public_key: str) -> str:
        """A site publishes its X25519 public key (base64 of the 32 raw bytes) for secure
        aggregation. A new key is a rotation: the record's ``version`` goes up by one and the earlier
        keys stay in the key's history. Sites pin the keys at the start of a job, so a key applies
        from the next job on, never in the middle of one."""
        consortium = await self._consortium(ctx)
        self._require_site_caller(ctx, consortium, site, "register the masking key of")
        try:
            raw = base64.b64decode(public_key, validate=True)
        except (binascii.Error, ValueError, TypeError):
            raw = b""
        if len(raw) != 32:
            raise ChaincodeError(INVALID, f"public_key of site {site} must be the base64 of a 32-byte "
                                 f"X25519 public key")
        key = ctx.get_stub().create_composite_key(K_SITE_KEY, [site])
        existing = await self._get(ctx, key)
        if existing is not None and existing["public_key"] == public_key:
            raise ChaincodeError(DUPLICATE, f"site {site} already registered this key (tx {existing['tx_id']})")
        version = existing["version"] + 1 if existing is not None else 1
        stored = {"type": K_SITE_KEY, "site": site, "public_key": public_key, "version": version}
        return await self._write(ctx, key, stored, EVENT_SITE_KEY)

    async def GetConsortium(self, ctx: TransactionContext) -> str:
        return canonical_json(await self._consortium(ctx))

    async def GetSiteKeys(self, ctx: TransactionContext) -> str:
        """All registered site keys as ``{site: record}``."""
        records = await self._scan(ctx, K_SITE_KEY, [])
        return canonical_json({r["site"]: r for r in records})

    # ---------------------------------------------------------------- consent

    async def PutConsent(self, ctx: TransactionContext, consent: str) -> str:
        """``{"pseudonym", "study", "site", "status": active|revoked, "consent_sha256"}``.

        The site named must be the caller's; a pseudonym's consent for a study stays with the
        site that first recorded it.
        """
        record = _fields(_parse_json(consent, "consent"), "consent",
                         ("pseudonym", "study", "site", "status", "consent_sha256"))
        pseudonym = _text(record["pseudonym"], "pseudonym", _PSEUDONYM,
                          "a clinfed pseudonym ('p-' and 32 lowercase hex digits), never a patient identifier",
                          echo=False)
        study = _text(record["study"], "study", _ID, "a study ID of [A-Za-z0-9._:-]")
        site = _text(record["site"], "site", _SITE, "a site name")
        status = record["status"]
        if status not in CONSENT_STATUSES:
            raise ChaincodeError(INVALID, f"status must be one of {', '.join(CONSENT_STATUSES)}, got {_show(status)}")
        digest = _text(record["consent_sha256"], "consent_sha256", _SHA256, "64 lowercase hex digits")
        consortium = await self._consortium(ctx)
        self._require_site_caller(ctx, consortium, site, "record consents of")
        key = ctx.get_stub().create_composite_key(K_CONSENT, [study, pseudonym])
        existing = await self._get(ctx, key)
        if existing is not None:
            if existing["site"] != site:
                raise ChaincodeError(ACCESS_DENIED, f"consent of {pseudonym} for study {study} belongs to site "
                                     f"{existing['site']}; site {site} may not change it")
            if existing["status"] == status and existing["consent_sha256"] == digest:
                raise ChaincodeError(DUPLICATE, f"consent of {pseudonym} for study {study} is already {status} "
                                     f"with this hash (tx {existing['tx_id']})")
        stored = {"type": K_CONSENT, "pseudonym": pseudonym, "study": study, "site": site, "status": status,
                  "consent_sha256": digest}
        return await self._write(ctx, key, stored, EVENT_CONSENT)

    async def GetConsent(self, ctx: TransactionContext, study: str, pseudonym: str) -> str:
        _text(study, "study", _ID, "a study ID")
        _text(pseudonym, "pseudonym", _PSEUDONYM, "a clinfed pseudonym", echo=False)
        key = ctx.get_stub().create_composite_key(K_CONSENT, [study, pseudonym])
        record = await self._get(ctx, key)
        if record is None:
            raise ChaincodeError(NOT_FOUND, f"no consent of {pseudonym} for study {study}")
        return canonical_json(record)

    async def GetConsentsByStudy(self, ctx: TransactionContext, study: str) -> str:
        _text(study, "study", _ID, "a study ID")
        return canonical_json(await self._scan(ctx, K_CONSENT, [study]))

    async def GetConsentsByPseudonym(self, ctx: TransactionContext, pseudonym: str) -> str:
        _text(pseudonym, "pseudonym", _PSEUDONYM, "a clinfed pseudonym", echo=False)
        return canonical_json([r for r in await self._scan(ctx, K_CONSENT, []) if r["pseudonym"] == pseudonym])

    # ---------------------------------------------------------------- training records

    async def RecordContribution(self, ctx: TransactionContext, contribution: str) -> str:
        """``{"job_id", "round", "site", "update_sha256", "n_samples", "metrics"?, "epsilon"?, "delta"?,
        "hash_stage"?}``, written by the site itself.

        ``epsilon``/``delta`` are the site's cumulative DP spend for the job after this round (absent
        without DP); ``hash_stage`` says which bytes were hashed (``after_dp``, the default, or
        ``after_masking``).
        """
        record = _fields(_parse_json(contribution, "contribution"), "contribution",
                         ("job_id", "round", "site", "update_sha256", "n_samples"),
                         ("metrics", "epsilon", "delta", "hash_stage"))
        stored = {
            "type": K_CONTRIBUTION,
            "job_id": _text(record["job_id"], "job_id", _ID, "a job ID of [A-Za-z0-9._:-]"),
            "round": _int(record["round"], "round", 0, MAX_ROUND),
            "site": _text(record["site"], "site", _SITE, "a site name"),
            "update_sha256": _text(record["update_sha256"], "update_sha256", _SHA256, "64 lowercase hex digits"),
            "n_samples": _int(record["n_samples"], "n_samples"),
            "metrics": _metrics(record.get("metrics") or {}, "metrics"),
            "epsilon": _optional(record, "epsilon", _number, 0.0),
            "delta": _optional(record, "delta", _number, 0.0, 1.0),
            "hash_stage": record.get("hash_stage") or HASH_STAGES[0],
        }
        if stored["hash_stage"] not in HASH_STAGES:
            raise ChaincodeError(INVALID, f"hash_stage must be one of {', '.join(HASH_STAGES)}")
        consortium = await self._consortium(ctx)
        self._require_site_caller(ctx, consortium, stored["site"], "record contributions of")
        key = self._round_key(ctx, K_CONTRIBUTION, stored["job_id"], stored["round"], stored["site"])
        await self._require_new(ctx, key, f"contribution of site {stored['site']} to job {stored['job_id']} "
                                f"round {stored['round']}", stored)
        return await self._write(ctx, key, stored, EVENT_CONTRIBUTION)

    async def RecordGlobalModel(self, ctx: TransactionContext, model: str) -> str:
        """``{"job_id", "round", "model_sha256", "participants", "aggregation", "expected_sites"?,
        "n_samples"?, "epsilon"?, "metrics"?}``, written by the coordinator.

        ``expected_sites`` (default: the participants) are the sites the round was sent to; each
        must end up with a contribution or a recorded absence for the job's chain to be complete.
        """
        record = _fields(_parse_json(model, "global model"), "global model",
                         ("job_id", "round", "model_sha256", "participants", "aggregation"),
                         ("expected_sites", "n_samples", "epsilon", "metrics"))
        participants = _site_list(record["participants"], "participants")
        expected = _site_list(record.get("expected_sites") or participants, "expected_sites")
        if not set(participants) <= set(expected):
            raise ChaincodeError(INVALID, f"participants {sorted(set(participants) - set(expected))} "
                                 f"are not among expected_sites")
        stored = {
            "type": K_MODEL,
            "job_id": _text(record["job_id"], "job_id", _ID, "a job ID of [A-Za-z0-9._:-]"),
            "round": _int(record["round"], "round", 0, MAX_ROUND),
            "model_sha256": _text(record["model_sha256"], "model_sha256", _SHA256, "64 lowercase hex digits"),
            "participants": participants,
            "expected_sites": expected,
            "aggregation": _text(record["aggregation"], "aggregation", _SITE, "a method name of [A-Za-z0-9._-]"),
            "n_samples": _optional(record, "n_samples", _int),
            "epsilon": _optional(record, "epsilon", _number, 0.0),
            "metrics": _metrics(record.get("metrics") or {}, "metrics"),
        }
        consortium = await self._consortium(ctx)
        self._require_coordinator(ctx, consortium, "record global models")
        unknown = [s for s in expected if s not in consortium["sites"]]
        if unknown:
            raise ChaincodeError(INVALID, f"site(s) {', '.join(unknown)} are not registered in the consortium")
        key = self._round_key(ctx, K_MODEL, stored["job_id"], stored["round"])
        await self._require_new(ctx, key, f"global model of job {stored['job_id']} round {stored['round']}", stored)
        return await self._write(ctx, key, stored, EVENT_MODEL)

    async def RecordAbsence(self, ctx: TransactionContext, absence: str) -> str:
        """``{"job_id", "round", "site", "reason"}``: the coordinator records that an expected site did
        not contribute to a round."""
        record = _fields(_parse_json(absence, "absence"), "absence", ("job_id", "round", "site"), ("reason",))
        stored = {
            "type": K_ABSENCE,
            "job_id": _text(record["job_id"], "job_id", _ID, "a job ID of [A-Za-z0-9._:-]"),
            "round": _int(record["round"], "round", 0, MAX_ROUND),
            "site": _text(record["site"], "site", _SITE, "a site name"),
            "reason": _text(record.get("reason") or "", "reason", _REASON,
                            "at most 200 characters of letters, digits, spaces and _.,:;()/-"),
        }
        consortium = await self._consortium(ctx)
        self._require_coordinator(ctx, consortium, "record absences")
        if stored["site"] not in consortium["sites"]:
            raise ChaincodeError(INVALID, f"site {stored['site']} is not registered in the consortium")
        key = self._round_key(ctx, K_ABSENCE, stored["job_id"], stored["round"], stored["site"])
        await self._require_new(ctx, key, f"absence of site {stored['site']} from job {stored['job_id']} "
                                f"round {stored['round']}", stored)
        return await self._write(ctx, key, stored, EVENT_ABSENCE)

    async def GetContributions(self, ctx: TransactionContext, job_id: str) -> str:
        _text(job_id, "job_id", _ID, "a job ID")
        return canonical_json(await self._scan(ctx, K_CONTRIBUTION, [job_id]))

    async def GetContributionsBySite(self, ctx: TransactionContext, site: str) -> str:
        _text(site, "site", _SITE, "a site name")
        return canonical_json([r for r in await self._scan(ctx, K_CONTRIBUTION, []) if r["site"] == site])

    async def GetGlobalModels(self, ctx: TransactionContext, job_id: str) -> str:
        _text(job_id, "job_id", _ID, "a job ID")
        return canonical_json(await self._scan(ctx, K_MODEL, [job_id]))

    async def GetAbsences(self, ctx: TransactionContext, job_id: str) -> str:
        _text(job_id, "job_id", _ID, "a job ID")
        return canonical_json(await self._scan(ctx, K_ABSENCE, [job_id]))

    async def GetJob(self, ctx: TransactionContext, job_id: str) -> str:
        """Everything recorded for a job: ``{"contributions", "global_models", "absences"}``."""
        _text(job_id, "job_id", _ID, "a job ID")
        return canonical_json({
            "contributions": await self._scan(ctx, K_CONTRIBUTION, [job_id]),
            "global_models": await self._scan(ctx, K_MODEL, [job_id]),
            "absences": await self._scan(ctx, K_ABSENCE, [job_id]),
        })

    async def GetHistory(self, ctx: TransactionContext, record_type: str, key: str) -> str:
        """Every committed version of one record, oldest first.

        ``key`` is a JSON object of the record's key fields, e.g. ``{"study": S, "pseudonym": P}``
        for a consent (see ``KEY_PARTS``).
        """
        if record_type not in KEY_PARTS:
            raise ChaincodeError(INVALID, f"record_type must be one of {', '.join(KEY_PARTS)}, "
                                 f"got {_show(record_type)}")
        parts = _fields(_parse_json(key, "key"), f"{record_type} key", KEY_PARTS[record_type])
        attrs = []
        for name in KEY_PARTS[record_type]:
            value = parts[name]
            attrs.append(f"{_int(value, name, 0, MAX_ROUND):0{ROUND_DIGITS}d}" if name == "round"
                         else _text(value, name, _ID, "an ID"))
        composite = ctx.get_stub().create_composite_key(record_type, attrs)
        entries = []
        async for mod in await ctx.get_stub().get_history_for_key(composite):
            entries.append({
                "tx_id": mod.tx_id,
                "timestamp": _rfc3339(mod.timestamp.seconds, mod.timestamp.nanos),
                "is_delete": bool(mod.is_delete),
                "value": json.loads(mod.value) if mod.value else None,
            })
        entries.reverse()  # Fabric 2.x returns history newest first
        return canonical_json(entries)

    # ---------------------------------------------------------------- helpers (not transactions)

    @staticmethod
    def _caller(ctx: TransactionContext) -> str:
        msp = ctx.get_client_identity().get_mspid()
        if not msp:
            raise ChaincodeError(UNKNOWN_MSP, "the transaction carries no creator MSP ID")
        return msp

    async def _consortium(self, ctx: TransactionContext) -> dict:
        record = await self._get(ctx, ctx.get_stub().create_composite_key(K_CONSORTIUM, []))
        if record is None:
            raise ChaincodeError(NOT_INITIALISED, "the consortium is not initialised; the coordinator must "
                                 "call InitConsortium first")
        return record

    def _known_caller(self, ctx: TransactionContext, consortium: dict) -> str:
        caller = self._caller(ctx)
        if caller != consortium["coordinator_msp"] and caller not in consortium["sites"].values():
            raise ChaincodeError(UNKNOWN_MSP, f"MSP {caller} is neither a site nor the coordinator of this "
                                 f"consortium")
        return caller

    def _require_site_caller(self, ctx: TransactionContext, consortium: dict, site: str, action: str) -> None:
        caller = self._known_caller(ctx, consortium)
        owner = consortium["sites"].get(site)
        if owner is None:
            raise ChaincodeError(INVALID, f"site {site} is not registered in the consortium "
                                 f"(sites: {', '.join(sorted(consortium['sites']))})")
        if caller != owner:
            raise ChaincodeError(ACCESS_DENIED, f"MSP {caller} may not {action} site {site}, "
                                 f"which belongs to MSP {owner}")

    def _require_coordinator(self, ctx: TransactionContext, consortium: dict, action: str) -> None:
        caller = self._known_caller(ctx, consortium)
        if caller != consortium["coordinator_msp"]:
            raise ChaincodeError(ACCESS_DENIED, f"only the coordinator {consortium['coordinator_msp']} may "
                                 f"{action}; caller is {caller}")

    @staticmethod
    def _round_key(ctx: TransactionContext, kind: str, job_id: str, round_: int, *rest: str) -> str:
        return ctx.get_stub().create_composite_key(kind, [job_id, f"{round_:0{ROUND_DIGITS}d}", *rest])

    async def _require_new(self, ctx: TransactionContext, key: str, what: str, record: dict) -> None:
        """Refuse a second write of ``key``: DUPLICATE if it repeats the stored record (a retry that
        already committed), CONFLICT if it differs."""
        existing = await self._get(ctx, key)
        if existing is None:
            return
        same = {k: v for k, v in existing.items() if k not in _META} == record
        raise ChaincodeError(DUPLICATE if same else CONFLICT,
                             f"{what} is already recorded (tx {existing['tx_id']}, {existing['timestamp']})"
                             + ("" if same else " with different content") + "; records are never overwritten")

    @staticmethod
    async def _get(ctx: TransactionContext, key: str) -> dict | None:
        raw = await ctx.get_stub().get_state(key)
        return json.loads(raw) if raw else None

    @staticmethod
    async def _scan(ctx: TransactionContext, kind: str, attrs: list) -> list:
        records = []
        async for kv in await ctx.get_stub().get_state_by_partial_composite_key(kind, attrs):
            if kv.value:
                records.append(json.loads(kv.value))
        return records

    async def _write(self, ctx: TransactionContext, key: str, record: dict, event: str) -> str:
        stub = ctx.get_stub()
        stamp = stub.get_tx_timestamp()
        if stamp is None:
            raise ChaincodeError(INVALID, "the transaction has no header timestamp")
        record = dict(record, tx_id=stub.get_txid(), timestamp=_rfc3339(stamp.seconds, stamp.nanos),
                      recorded_by=self._caller(ctx))
        payload = canonical_json(record)
        await stub.put_state(key, payload.encode("utf-8"))
        stub.set_event(event, payload.encode("utf-8"))
        return payload


def _rfc3339(seconds: int, nanos: int) -> str:
    base = _dt.datetime.fromtimestamp(seconds, tz=_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S")
    return f"{base}.{nanos:09d}Z"
