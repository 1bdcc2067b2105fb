"""Consent policy: which Consents count for a study, and which one decides a patient's consent.

A Consent counts when it matches the study's :class:`~fhir_adapter.rules.ConsentRule`:

- ``study_reference``: a provision (at any depth) whose ``data`` references the study's
  identifier; the most deeply nested such provision's ``type`` applies (inherited from its
  parent when absent; permit at the top).
- ``broad_research``: ``scope`` is one of the rule's scopes and a provision (at any depth) has a
  ``purpose`` in the rule's purposes (with no purposes listed, the top provision counts).
- ``policy_codes``: ``policyRule`` or a provision's ``code`` is in the rule's code list (the
  German MII broad consent codes its modules this way); the most deeply nested coded provision
  decides.

Its state: ``entered-in-error`` is ignored; a status in ``revoking_statuses`` revokes;
``active`` with permit grants, with deny revokes; ``draft`` and ``proposed`` are reported as
such and grant nothing. The patient's Consents are ordered by ``history_order`` (``dateTime`` or
the deciding provision's ``period.start``; none counts as earliest); the latest granting or
revoking one decides, and on a tie the revoking one wins. A grant's period (the deciding
provision's, else its parent's) must cover the imaging date when the rule asks for it.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

from fhir_adapter.rules import ConsentRule

IN_FORCE = ("active", "revoked")
NOT_YET = ("draft", "proposed")
_UTC = dt.timezone.utc
_EARLIEST = dt.datetime.min.replace(tzinfo=_UTC)


@dataclass(frozen=True)
class ConsentFact:
    """One Consent that concerns the study, reduced to what the decision needs."""

    status: str  # active | revoked | draft | proposed
    ordered_at: dt.datetime | None
    period: tuple[dt.date | None, dt.date | None] | None  # the deciding provision's period
    order: int  # position in the export, for stable ties
    resource: dict  # the Consent exactly as read (the site's evidence of what it relied on)
    source: str  # "file:line" of the Consent


def read_consent(model: Any, raw: dict, rule: ConsentRule, order: int, source: str) -> ConsentFact | None:
    """The Consent's state for the study, or None when it does not concern the study."""
    if model.status == "entered-in-error":
        return None
    found = _deciding_provision(model, rule)
    if found is None:
        return None
    provision_type, period = found
    if model.status in rule.revoking_statuses:
        status = "revoked"
    elif model.status == "active":
        status = "revoked" if provision_type == "deny" else "active"
    elif model.status in NOT_YET:
        status = model.status
    else:  # a status the rule does not treat as revoking (e.g. rejected when not listed)
        return None
    if rule.history_order == "period.start":
        ordered_at = _to_utc(period[0]) if period and period[0] else None
    else:
        ordered_at = _to_utc(model.dateTime)
    return ConsentFact(status, ordered_at, period, order, raw, source)


@dataclass(frozen=True)
class Decision:
    status: str  # active | revoked | draft | proposed | none
    fact: ConsentFact | None  # the deciding Consent (None for none)

    def covers(self, day: dt.date | None, rule: ConsentRule) -> bool:
        """Whether a grant's period covers ``day`` (always true when the rule does not ask)."""
        if self.status != "active" or not rule.period_must_cover_imaging or self.fact.period is None:
            return self.status == "active"
        if day is None:
            return False
        start, end = self.fact.period
        return (start is None or start <= day) and (end is None or day <= end)


def decide(facts: list[ConsentFact]) -> Decision:
    """The patient's consent: the latest granting or revoking Consent, else a draft/proposed one."""
    in_force = [f for f in facts if f.status in IN_FORCE]
    if in_force:
        latest = max(in_force, key=lambda f: (f.ordered_at or _EARLIEST, f.status == "revoked", f.order))
        return Decision(latest.status, latest)
    pending = [f for f in facts if f.status in NOT_YET]
    if pending:
        latest = max(pending, key=lambda f: (f.ordered_at or _EARLIEST, f.order))
        return Decision(latest.status, latest)
    return Decision("none", None)


def _deciding_provision(consent: Any, rule: ConsentRule):
    """(type, period) of the provision that makes this Consent concern the study, or None."""
    if rule.kind == "broad_research":
        scope_codes = {(c.system, c.code) for c in (consent.scope.coding or ())} if consent.scope else set()
        if not scope_codes & rule.scopes:
            return None
        if not rule.purposes:
            top = consent.provision
            return ((top.type if top else None) or "permit", _period(top.period) if top else None)
        return _walk(consent.provision, lambda p: any((c.system, c.code) in rule.purposes for c in p.purpose or ()))
    if rule.kind == "policy_codes":
        found = _walk(consent.provision, lambda p: any(rule.policy_codes.matches_concept(c) for c in p.code or ()))
        if found is not None:
            return found
        if rule.policy_codes.matches_concept(consent.policyRule):
            top = consent.provision
            return ((top.type if top else None) or "permit", _period(top.period) if top else None)
        return None
    system, value = rule.study_identifier

    def names_study(p) -> bool:
        for data in p.data or ():
            ident = data.reference.identifier if data.reference is not None else None
            if ident is not None and ident.system == system and ident.value == value:
                return True
        return False

    return _walk(consent.provision, names_study)


def _walk(provision, matches, inherited_type=None, inherited_period=None):
    """(type, period) of the most deeply nested provision for which ``matches`` holds."""
    if provision is None:
        return None
    own_type = provision.type or inherited_type or "permit"
    own_period = _period(provision.period) or inherited_period
    for child in provision.provision or ():
        found = _walk(child, matches, own_type, own_period)
        if found is not None:
            return found
    return (own_type, own_period) if matches(provision) else None


def _period(period) -> tuple[dt.date | None, dt.date | None] | None:
    if period is None or (period.start is None and period.end is None):
        return None
    return (_to_date(period.start), _to_date(period.end))


def _to_date(value) -> dt.date | None:
    if isinstance(value, dt.datetime):
        return value.date()
    if isinstance(value, dt.date):
        return value
    if isinstance(value, str):  # partial date "2020" or "2020-05": its first day
        parts = [int(p) for p in value.split("-")[:2]]
        return dt.date(parts[0], parts[1] if len(parts) > 1 else 1, 1)
    return None


def _to_utc(value) -> dt.datetime | None:
    if isinstance(value, dt.datetime):
        return value.astimezone(_UTC) if value.tzinfo else value.replace(tzinfo=_UTC)
    day = _to_date(value)
    return dt.datetime(day.year, day.month, day.day, tzinfo=_UTC) if day else None
