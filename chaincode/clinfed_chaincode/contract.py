"""The clinfed audit contract: who contributed what to which model, under which consent.

Every record is canonical JSON (RFC 8785, the PyPI package ``rfc8785``) under a composite key:

==============  ==========================================  =============================
record          composite key                               written by
==============  ==========================================  =============================
consortium      ``consortium``                              the coordinator, once
site key        ``sitekey / site``                          that site (X25519 public key, versioned)
consent         ``consent / study / pseudonym``             the patient's site
consent count   ``consentcount / study / site``             kept by PutConsent
contribution    ``contribution / job / round / site``       that site
global model    ``model / job / round``                     the coordinator
absence         ``absence / job / round / site``            the coordinator
==============  ==========================================  =============================

Secondary indexes are composite keys whose value is one zero byte (Fabric's convention), so a
lookup by site or by pseudonym is one range query over the index, never a scan of the namespace:
``contribution~site / site / job / round``, ``consent~site / study / site / pseudonym`` and
``consent~pseudonym / site / pseudonym / study``.

Rounds are zero-padded in keys so that a prefix scan returns them in order. Every write checks
the caller first (its MSP ID, authenticated by the peer, or by LocalLedger, from the signed
request), refuses a transaction whose header time is more than ``MAX_CLOCK_SKEW`` seconds from
the executing node's clock, validates every field (unknown fields are refused, so nothing but a
pseudonym can identify a patient), writes once, and emits one chaincode event whose payload is
the stored record. Contributions, global models and absences are never overwritten: a second
write of the same key is refused, with ``CLINFED_DUPLICATE`` when it repeats the stored record
(a retry of a write that did commit) and ``CLINFED_CONFLICT`` when it differs. A consent changes
status over time; its earlier states stay in the key's history, and a write that changes
nothing is a duplicate.

Reads are paginated (``page_size`` at most ``MAX_PAGE_SIZE``; a page answers ``{"records",
"bookmark"}``, and the bookmark, empty at the end, fetches the next page). Every reader must be
a member of the consortium. A site reads its own consents in full; everyone else reads only
their commitments and the per-site counts (``GetConsentCounts``).

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
import time
from typing import Any

import rfc8785

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
CLOCK_SKEW = "CLOCK_SKEW"

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
K_CONSENT_COUNT = "consentcount"
K_CONTRIBUTION = "contribution"
K_MODEL = "model"
K_ABSENCE = "absence"
IX_CONTRIBUTION_BY_SITE = "contribution~site"
IX_CONSENT_BY_SITE = "consent~site"
IX_CONSENT_BY_PSEUDONYM = "consent~pseudonym"
KEY_PARTS = {  # object type -> names of its key attributes, for GetHistory
    K_CONSORTIUM: (),
    K_SITE_KEY: ("site",),
    K_CONSENT: ("study", "pseudonym"),
    K_CONTRIBUTION: ("job_id", "round", "site"),
    K_MODEL: ("job_id", "round"),
    K_ABSENCE: ("job_id", "round", "site"),
}
_INDEX_VALUE = b"\x00"

# What each write transaction accepts: (required fields, optional fields). clinfed.ledger.records
# takes its field lists from here.
RECORD_FIELDS = {
    K_CONSORTIUM: (("coordinator_msp", "sites"), ()),
    K_SITE_KEY: (("site", "public_key"), ()),
    K_CONSENT: (("pseudonym", "study", "site", "status", "consent_commitment"), ()),
    K_CONTRIBUTION: (("job_id", "round", "site", "update_sha256", "n_samples"),
                     ("metrics", "patient_epsilon", "patient_delta", "site_epsilon", "site_delta", "hash_stage")),
    K_MODEL: (("job_id", "round", "model_sha256", "participants", "aggregation"),
              ("expected_sites", "n_samples", "patient_epsilon", "site_epsilon", "metrics")),
    K_ABSENCE: (("job_id", "round", "site"), ("reason",)),
}
META_FIELDS = ("tx_id", "timestamp", "recorded_by")  # added to every record by _write
# What a reader other than the patient's site sees of a consent.
CONSENT_COMMITMENT_VIEW = ("type", "study", "site", "consent_commitment", "tx_id", "timestamp", "recorded_by")

CONSENT_STATUSES = ("active", "revoked")
HASH_STAGES = ("after_dp", "after_masking")
ROUND_DIGITS = 8
MAX_ROUND = 10**ROUND_DIGITS - 1
MAX_METRICS = 32
MAX_SITES = 1000
DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 500
# A transaction's header time (the submitter's clock) may differ this much from the clock of the
# node that executes it; beyond, it is refused. Fabric peers allow 15 min by default.
MAX_CLOCK_SKEW = 300.0

_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")
_SITE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_MSP = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_PSEUDONYM = re.compile(r"p-[0-9a-f]{32}")  # clinfed.data.pseudonym: "p-" + 128-bit HMAC, hex
_METRIC = re.compile(r"[a-z][a-z0-9_./]{0,63}")  # names like val_dice; no room for identifiers like MRNs
_REASON = re.compile(r"[A-Za-z0-9 _.,:;()/-]{0,200}")
_MAX_RUNE = "\U0010FFFF"


class ChaincodeError(Exception):
    """A refused transaction; ``str()`` is ``CLINFED_<CODE>: <what and why>``."""

    def __init__(self, code: str, message: str):
        self.code = code
        super().__init__(f"CLINFED_{code}: {message}")


def canonical_json(value: Any) -> str:
    """The one serialisation of records: RFC 8785 (JCS); NaN and infinities are refused."""
    try:
        return rfc8785.dumps(value).decode("utf-8")
    except rfc8785.CanonicalizationError as exc:
        raise ChaincodeError(INVALID, f"value cannot be canonicalised: {exc}") from None


# --------------------------------------------------------------------------- validation


def _parse_json(text: str, what: str) -> Any:
    try:
        return json.loads(text)
    except (TypeError, ValueError) as exc:
        raise ChaincodeError(INVALID, f"{what} is not valid JSON: {exc}") from None


def _fields(record: Any, what: str, kind: str) -> dict:
    required, optional = RECORD_FIELDS[kind]
    return _check_fields(record, what, required, optional)


def _check_fields(record: Any, what: str, required: tuple[str, ...], optional: tuple[str, ...] = ()) -> dict:
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


def _page_size(value: str) -> int:
    if value in ("", None):
        return DEFAULT_PAGE_SIZE
    try:
        size = int(value)
    except (TypeError, ValueError):
        size = 0
    if not 1 <= size <= MAX_PAGE_SIZE:
        raise ChaincodeError(INVALID, f"page_size must be an integer from 1 to {MAX_PAGE_SIZE}, got {_show(value)}")
    return size


def _encode_bookmark(key: str) -> str:
    return base64.urlsafe_b64encode(key.encode("utf-8")).decode("ascii")


def _decode_bookmark(bookmark: str, prefix: str) -> str:
    """The key a bookmark points at; it must lie inside the query's own range, so a bookmark can
    never reach records the query would not return."""
    try:
        key = base64.urlsafe_b64decode(bookmark.encode("ascii")).decode("utf-8")
    except (binascii.Error, ValueError, UnicodeError):
        key = ""
    if not key.startswith(prefix):
        raise ChaincodeError(INVALID, "bookmark does not belong to this query; pass back the bookmark the "
                             "previous page returned")
    return key


# --------------------------------------------------------------------------- the contract


class ClinfedContract(Contract):
    """Site registry, consents, contributions, global models and absences of a consortium."""

    Name = CONTRACT_NAME
    # The executing node's clock, for the skew check (LocalLedger replays a block with the time the
    # block was committed).
    _clock = staticmethod(time.time)

    def get_evaluate_transactions(self) -> list:
        return [name for name in dir(self) if name.startswith("Get")]

    # ---------------------------------------------------------------- registry

    async def InitConsortium(self, ctx: TransactionContext, config: str) -> str:
        """Record the consortium once: ``{"coordinator_msp": M, "sites": {site: msp, ...}}``.

        Only the coordinator named in the config may call it.
        """
        record = _fields(_parse_json(config, "consortium config"), "consortium config", K_CONSORTIUM)
        coordinator = _text(record["coordinator_msp"], "coordinator_msp", _MSP, "an MSP ID")
        sites = record["sites"]
        if not isinstance(sites, dict) or not sites or len(sites) > MAX_SITES:
            raise ChaincodeError(INVALID, "sites must be a non-empty object mapping site name to MSP ID")
        for site, msp in sites.items():
            _text(site, "site name", _SITE, "1-64 characters of [A-Za-z0-9._-]")
            _text(msp, f"MSP ID of site {site}", _MSP, "an MSP ID")
        if coordinator in sites.values():
            raise ChaincodeError(INVALID, f"the coordinator's MSP {coordinator} cannot also be a site's")
        if len(set(sites.values())) != len(sites):
            raise ChaincodeError(INVALID, "each site needs an MSP ID of its own")
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
        consortium = await self._consortium(ctx)
        self._known_caller(ctx, consortium)
        return canonical_json(consortium)

    async def GetSiteKeys(self, ctx: TransactionContext) -> str:
        """All registered site keys as ``{site: record}`` (at most one per site, so bounded by
        ``MAX_SITES``)."""
        self._known_caller(ctx, await self._consortium(ctx))
        records = await self._scan(ctx, K_SITE_KEY, [])
        return canonical_json({r["site"]: r for r in records})

    # ---------------------------------------------------------------- consent

    async def PutConsent(self, ctx: TransactionContext, consent: str) -> str:
        """``{"pseudonym", "study", "site", "status": active|revoked, "consent_commitment"}``.

        ``consent_commitment`` is the site's keyed commitment to the FHIR Consent it relied on
        (HMAC-SHA256 under a key that never leaves the site, see ``clinfed.audit``), never a plain
        hash of it. The site named must be the caller's; a pseudonym's consent for a study stays
        with the site that first recorded it.
        """
        record = _fields(_parse_json(consent, "consent"), "consent", K_CONSENT)
        pseudonym = _text(record["pseudonym"], "pseudonym", _PSEUDONYM,
                          "a clinfed pseudonym ('p-' and 32 lowercase hex digits), never a patient identifier",
                          echo=False)
        study = _text(record["study"], "study", _ID, "a study ID of [A-Za-z0-9._:-]")
        site = _text(record["site"], "site", _SITE, "a site name")
        status = record["status"]
        if status not in CONSENT_STATUSES:
            raise ChaincodeError(INVALID, f"status must be one of {', '.join(CONSENT_STATUSES)}, got {_show(status)}")
        commitment = _text(record["consent_commitment"], "consent_commitment", _SHA256,
                           "64 lowercase hex digits (an HMAC-SHA256)")
        consortium = await self._consortium(ctx)
        self._require_site_caller(ctx, consortium, site, "record consents of")
        stub = ctx.get_stub()
        key = stub.create_composite_key(K_CONSENT, [study, pseudonym])
        existing = await self._get(ctx, key)
        if existing is not None:
            if existing["site"] != site:
                raise ChaincodeError(ACCESS_DENIED, f"consent of {pseudonym} for study {study} belongs to site "
                                     f"{existing['site']}; site {site} may not change it")
            if existing["status"] == status and existing["consent_commitment"] == commitment:
                raise ChaincodeError(DUPLICATE, f"consent of {pseudonym} for study {study} is already {status} "
                                     f"with this commitment (tx {existing['tx_id']})")
        else:
            await stub.put_state(stub.create_composite_key(IX_CONSENT_BY_SITE, [study, site, pseudonym]),
                                 _INDEX_VALUE)
            await stub.put_state(stub.create_composite_key(IX_CONSENT_BY_PSEUDONYM, [site, pseudonym, study]),
                                 _INDEX_VALUE)
        count_key = stub.create_composite_key(K_CONSENT_COUNT, [study, site])
        counts = await self._get(ctx, count_key) or {s: 0 for s in CONSENT_STATUSES}
        if existing is not None:
            counts[existing["status"]] -= 1
        counts[status] += 1
        await stub.put_state(count_key, canonical_json(counts).encode("utf-8"))
        stored = {"type": K_CONSENT, "pseudonym": pseudonym, "study": study, "site": site, "status": status,
                  "consent_commitment": commitment}
        return await self._write(ctx, key, stored, EVENT_CONSENT)

    async def GetConsent(self, ctx: TransactionContext, study: str, pseudonym: str) -> str:
        """One patient's consent, for the patient's own site only."""
        _text(study, "study", _ID, "a study ID")
        _text(pseudonym, "pseudonym", _PSEUDONYM, "a clinfed pseudonym", echo=False)
        caller_site = self._caller_site(ctx, await self._consortium(ctx))
        record = await self._get(ctx, ctx.get_stub().create_composite_key(K_CONSENT, [study, pseudonym]))
        if record is None or record["site"] != caller_site:
            # The same answer whether the consent is another site's or absent: a reader learns nothing
            # about other sites' pseudonyms.
            raise ChaincodeError(NOT_FOUND, f"no consent of {pseudonym} for study {study} recorded by your site")
        return canonical_json(record)

    async def GetConsents(self, ctx: TransactionContext, study: str, site: str, page_size: str,
                          bookmark: str) -> str:
        """A page of a study's consents, of one site (``site``) or of all (``site`` empty). The
        caller's own site's records come in full, other sites' as commitments only."""
        _text(study, "study", _ID, "a study ID")
        consortium = await self._consortium(ctx)
        caller = self._known_caller(ctx, consortium)
        if site:
            _text(site, "site", _SITE, "a site name")
            page = await self._index_page(ctx, IX_CONSENT_BY_SITE, [study, site], page_size, bookmark,
                                          lambda attrs: (K_CONSENT, [attrs[0], attrs[2]]))
        else:
            page = await self._page(ctx, K_CONSENT, [study], page_size, bookmark)
        page["records"] = [r if consortium["sites"].get(r["site"]) == caller
                           else {k: r[k] for k in CONSENT_COMMITMENT_VIEW} for r in page["records"]]
        return canonical_json(page)

    async def GetConsentCounts(self, ctx: TransactionContext, study: str) -> str:
        """``{site: {"active": n, "revoked": n}}`` for a study; anyone in the consortium may read it."""
        _text(study, "study", _ID, "a study ID")
        self._known_caller(ctx, await self._consortium(ctx))
        counts = {}
        async for kv in await ctx.get_stub().get_state_by_partial_composite_key(K_CONSENT_COUNT, [study]):
            _, attrs = ctx.get_stub().split_composite_key(kv.key)
            counts[attrs[1]] = json.loads(kv.value)
        return canonical_json(counts)

    async def GetConsentsByPseudonym(self, ctx: TransactionContext, pseudonym: str, page_size: str,
                                     bookmark: str) -> str:
        """The caller's site's consents of one patient, across studies (an index lookup)."""
        _text(pseudonym, "pseudonym", _PSEUDONYM, "a clinfed pseudonym", echo=False)
        site = self._caller_site(ctx, await self._consortium(ctx))
        return canonical_json(await self._index_page(ctx, IX_CONSENT_BY_PSEUDONYM, [site, pseudonym], page_size,
                                                     bookmark, lambda attrs: (K_CONSENT, [attrs[2], attrs[1]])))

    # ---------------------------------------------------------------- training records

    async def RecordContribution(self, ctx: TransactionContext, contribution: str) -> str:
        """``{"job_id", "round", "site", "update_sha256", "n_samples", "metrics"?, "patient_epsilon"?,
        "patient_delta"?, "site_epsilon"?, "site_delta"?, "hash_stage"?}``, written by the site itself.

        The spends are the site's cumulative DP spend on the study after this round, one pair per
        unit of protection, never summed: ``patient_*`` (DP-SGD: any one patient's records) and
        ``site_*`` (update-level DP inside secure aggregation: the site's whole contribution); each
        absent when that mechanism did not run. ``hash_stage`` says which bytes were hashed
        (``after_dp``, the default, or ``after_masking``).
        """
        record = _fields(_parse_json(contribution, "contribution"), "contribution", K_CONTRIBUTION)
        stored = {
            "type": K_CONTRIBUTION,
            "job_id": _text(record["job_id"], "job_id", _ID, "a job ID of [A-Za-z0-9._:-]"),
            "round": _int(record["round"], "round", 0, MAX_ROUND),
            "site": _text(record["site"], "site", _SITE, "a site name"),
            "update_sha256": _text(record["update_sha256"], "update_sha256", _SHA256, "64 lowercase hex digits"),
            "n_samples": _int(record["n_samples"], "n_samples"),
            "metrics": _metrics(record.get("metrics") or {}, "metrics"),
            "patient_epsilon": _optional(record, "patient_epsilon", _number, 0.0),
            "patient_delta": _optional(record, "patient_delta", _number, 0.0, 1.0),
            "site_epsilon": _optional(record, "site_epsilon", _number, 0.0),
            "site_delta": _optional(record, "site_delta", _number, 0.0, 1.0),
            "hash_stage": record.get("hash_stage") or HASH_STAGES[0],
        }
        if stored["hash_stage"] not in HASH_STAGES:
            raise ChaincodeError(INVALID, f"hash_stage must be one of {', '.join(HASH_STAGES)}")
        consortium = await self._consortium(ctx)
        self._require_site_caller(ctx, consortium, stored["site"], "record contributions of")
        key = self._round_key(ctx, K_CONTRIBUTION, stored["job_id"], stored["round"], stored["site"])
        await self._require_new(ctx, key, f"contribution of site {stored['site']} to job {stored['job_id']} "
                                f"round {stored['round']}", stored)
        stub = ctx.get_stub()
        await stub.put_state(stub.create_composite_key(IX_CONTRIBUTION_BY_SITE, [
            stored["site"], stored["job_id"], f"{stored['round']:0{ROUND_DIGITS}d}"]), _INDEX_VALUE)
        return await self._write(ctx, key, stored, EVENT_CONTRIBUTION)

    async def RecordGlobalModel(self, ctx: TransactionContext, model: str) -> str:
        """``{"job_id", "round", "model_sha256", "participants", "aggregation", "expected_sites"?,
        "n_samples"?, "patient_epsilon"?, "site_epsilon"?, "metrics"?}``, written by the coordinator
        (the spends: the largest any participant reported, per unit).

        ``expected_sites`` (default: the participants) are the sites the round was sent to; each
        must end up with a contribution or a recorded absence for the job's chain to be complete.
        """
        record = _fields(_parse_json(model, "global model"), "global model", K_MODEL)
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
            "patient_epsilon": _optional(record, "patient_epsilon", _number, 0.0),
            "site_epsilon": _optional(record, "site_epsilon", _number, 0.0),
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
        record = _fields(_parse_json(absence, "absence"), "absence", K_ABSENCE)
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

    async def GetContributions(self, ctx: TransactionContext, job_id: str, page_size: str, bookmark: str) -> str:
        """A page of a job's contributions, in (round, site) order."""
        _text(job_id, "job_id", _ID, "a job ID")
        self._known_caller(ctx, await self._consortium(ctx))
        return canonical_json(await self._page(ctx, K_CONTRIBUTION, [job_id], page_size, bookmark))

    async def GetContributionsBySite(self, ctx: TransactionContext, site: str, page_size: str, bookmark: str) -> str:
        """A page of one site's contributions to every job (an index lookup), in (job, round) order."""
        _text(site, "site", _SITE, "a site name")
        self._known_caller(ctx, await self._consortium(ctx))
        return canonical_json(await self._index_page(
            ctx, IX_CONTRIBUTION_BY_SITE, [site], page_size, bookmark,
            lambda attrs: (K_CONTRIBUTION, [attrs[1], attrs[2], attrs[0]])))

    async def GetGlobalModels(self, ctx: TransactionContext, job_id: str, page_size: str, bookmark: str) -> str:
        """A page of a job's global models, in round order."""
        _text(job_id, "job_id", _ID, "a job ID")
        self._known_caller(ctx, await self._consortium(ctx))
        return canonical_json(await self._page(ctx, K_MODEL, [job_id], page_size, bookmark))

    async def GetAbsences(self, ctx: TransactionContext, job_id: str, page_size: str, bookmark: str) -> str:
        """A page of a job's recorded absences, in (round, site) order."""
        _text(job_id, "job_id", _ID, "a job ID")
        self._known_caller(ctx, await self._consortium(ctx))
        return canonical_json(await self._page(ctx, K_ABSENCE, [job_id], page_size, bookmark))

    async def GetHistory(self, ctx: TransactionContext, record_type: str, key: str) -> str:
        """Every committed version of one record, oldest first.

        ``key`` is a JSON object of the record's key fields, e.g. ``{"study": S, "pseudonym": P}``
        for a consent (see ``KEY_PARTS``). A consent's history is its own site's to read.
        """
        if record_type not in KEY_PARTS:
            raise ChaincodeError(INVALID, f"record_type must be one of {', '.join(KEY_PARTS)}, "
                                 f"got {_show(record_type)}")
        consortium = await self._consortium(ctx)
        caller = self._known_caller(ctx, consortium)
        parts = _check_fields(_parse_json(key, "key"), f"{record_type} key", KEY_PARTS[record_type])
        attrs = []
        for name in KEY_PARTS[record_type]:
            value = parts[name]
            if name == "round":
                attrs.append(f"{_int(value, name, 0, MAX_ROUND):0{ROUND_DIGITS}d}")
            elif name == "pseudonym":
                attrs.append(_text(value, name, _PSEUDONYM, "a clinfed pseudonym", echo=False))
            else:
                attrs.append(_text(value, name, _ID, "an ID"))
        stub = ctx.get_stub()
        composite = stub.create_composite_key(record_type, attrs)
        if record_type == K_CONSENT:
            current = await self._get(ctx, composite)
            if current is None or consortium["sites"].get(current["site"]) != caller:
                raise ChaincodeError(NOT_FOUND, f"no consent of {parts['pseudonym']} for study {parts['study']} "
                                     f"recorded by your site")
        entries = []
        async for mod in await stub.get_history_for_key(composite):
            entries.append({
                "tx_id": mod.tx_id,
                "timestamp": _rfc3339(mod.timestamp.seconds, mod.timestamp.nanos),
                "is_delete": bool(mod.is_delete),
                "value": json.loads(mod.value) if mod.value else None,
            })
        entries.reverse()  # Fabric returns history newest first
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

    def _caller_site(self, ctx: TransactionContext, consortium: dict) -> str:
        caller = self._known_caller(ctx, consortium)
        for site, msp in consortium["sites"].items():
            if msp == caller:
                return site
        raise ChaincodeError(ACCESS_DENIED, f"only a site reads its patients' consents in full; {caller} is the "
                             f"coordinator (it reads commitments and counts: GetConsents, GetConsentCounts)")

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
        same = {k: v for k, v in existing.items() if k not in META_FIELDS} == record
        raise ChaincodeError(DUPLICATE if same else CONFLICT,
                             f"{what} is already recorded (tx {existing['tx_id']}, {existing['timestamp']})"
                             + ("" if same else " with different content") + "; records are never overwritten")

    @staticmethod
    async def _get(ctx: TransactionContext, key: str) -> dict | None:
        raw = await ctx.get_stub().get_state(key)
        return json.loads(raw) if raw else None

    @staticmethod
    async def _scan(ctx: TransactionContext, kind: str, attrs: list) -> list:
        """All records under a prefix: only for sets bounded by design (site keys, consent counts)."""
        records = []
        async for kv in await ctx.get_stub().get_state_by_partial_composite_key(kind, attrs):
            if kv.value:
                records.append(json.loads(kv.value))
        return records

    async def _keys_page(self, ctx: TransactionContext, kind: str, attrs: list, page_size: str,
                         bookmark: str) -> tuple[list, str]:
        """At most ``page_size`` (key, value) pairs under a prefix from ``bookmark`` on, and the
        bookmark of what follows ("" at the end), from one paginated range query."""
        size = _page_size(page_size)
        stub = ctx.get_stub()
        prefix = stub.create_composite_key(kind, attrs)
        start = _decode_bookmark(bookmark, prefix) if bookmark else prefix
        iterator = await stub.get_state_by_range_with_pagination(start, prefix + _MAX_RUNE, size + 1)
        pairs, following = [], ""
        async for kv in iterator:
            if len(pairs) == size:
                following = _encode_bookmark(kv.key)
                break
            pairs.append((kv.key, kv.value))
        await iterator.aclose()
        return pairs, following

    async def _page(self, ctx: TransactionContext, kind: str, attrs: list, page_size: str, bookmark: str) -> dict:
        pairs, following = await self._keys_page(ctx, kind, attrs, page_size, bookmark)
        return {"records": [json.loads(value) for _, value in pairs if value], "bookmark": following}

    async def _index_page(self, ctx: TransactionContext, index: str, attrs: list, page_size: str, bookmark: str,
                          primary) -> dict:
        """A page through a secondary index: ``primary(index attributes)`` gives the record's
        (object type, attributes)."""
        stub = ctx.get_stub()
        pairs, following = await self._keys_page(ctx, index, attrs, page_size, bookmark)
        records = []
        for key, _ in pairs:
            kind, record_attrs = primary(stub.split_composite_key(key)[1])
            record = await self._get(ctx, stub.create_composite_key(kind, record_attrs))
            if record is not None:
                records.append(record)
        return {"records": records, "bookmark": following}

    def _check_time(self, ctx: TransactionContext):
        stamp = ctx.get_stub().get_tx_timestamp()
        if stamp is None or not stamp.seconds:
            raise ChaincodeError(INVALID, "the transaction has no header timestamp")
        header = stamp.seconds + stamp.nanos / 1e9
        now = self._clock()
        if abs(header - now) > MAX_CLOCK_SKEW:
            raise ChaincodeError(CLOCK_SKEW, f"the transaction is dated {_rfc3339(stamp.seconds, stamp.nanos)}, "
                                 f"{abs(header - now):.0f} s from this node's clock "
                                 f"({_rfc3339(int(now), int((now % 1) * 1e9))}); at most {MAX_CLOCK_SKEW:.0f} s "
                                 f"is allowed: check the submitter's clock (NTP)")
        return stamp

    async def _write(self, ctx: TransactionContext, key: str, record: dict, event: str) -> str:
        stub = ctx.get_stub()
        stamp = self._check_time(ctx)
        record = dict(record, tx_id=stub.get_txid(), timestamp=_rfc3339(stamp.seconds, stamp.nanos),
                      recorded_by=self._caller(ctx))
        payload = canonical_json(record)
        await stub.put_state(key, payload.encode("utf-8"))
        stub.set_event(event, payload.encode("utf-8"))
        return payload


def _rfc3339(seconds: int, nanos: int) -> str:
    base = _dt.datetime.fromtimestamp(seconds, tz=_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S")
    return f"{base}.{nanos:09d}Z"
