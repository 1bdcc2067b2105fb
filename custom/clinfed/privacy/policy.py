"""A site's own privacy policy: what it requires of every job, whatever the job asks.

It is the ``privacy`` section of the site's ``local/clinfed_site.json`` (:mod:`clinfed.site_config`;
in the simulator, of ``<site data folder>/clinfed_site.json``), written at provisioning from the
consortium definition and then the site's to edit. The job may ask for more privacy, never less::

    "privacy": {
      "secure_aggregation": {"min_participants": 3, "min_threshold_fraction": 0.5},
      "studies": {
        "clinfed-tumour-seg": {
          "update_dp": {"epsilon": 20.0, "delta": 1e-5, "noise_multiplier": 1.0, "clip_norm": 0.5,
                        "noise": "distributed"}}}}

- ``secure_aggregation.min_participants`` (default 3): fewest sites a round's list may name, at
  every stage; ``min_threshold_fraction`` (default 0.5): the dropout threshold t must be more than
  this fraction of the list.
- ``studies.<study>.update_dp``: update-level DP inside the mask (unit protected: the site's whole
  contribution to a round). ``epsilon`` is the study's budget at ``delta``, over all jobs; a round
  must carry at least ``noise_multiplier`` and at most ``clip_norm``; ``noise`` is ``distributed``
  (each site adds its share: trusts the other sites' software) or ``local`` (adds all of it).
  Without this section the site requires no update-level DP.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

from clinfed.errors import ConfigError
from clinfed.privacy.secagg import NOISE_MODES, SecAggPolicy, UpdateDPRequirement

DEFAULT_DELTA = 1e-5


@dataclass(frozen=True)
class UpdateDPBudget:
    epsilon: float
    delta: float
    requirement: UpdateDPRequirement


@dataclass(frozen=True)
class SitePrivacyPolicy:
    secagg: SecAggPolicy
    update_dp: dict[str, UpdateDPBudget]  # by study
    source: str

    def secagg_for(self, study: str) -> SecAggPolicy:
        """The secure-aggregation floor for a study's rounds (its update-DP requirement included)."""
        budget = self.update_dp.get(study)
        return SecAggPolicy(self.secagg.min_participants, self.secagg.min_threshold_fraction,
                            budget.requirement if budget else None)


def _number(section: dict, name: str, where: str, default=None, *, minimum=None, below=None, integer=False):
    value = section.get(name, default)
    if value is None:
        raise ConfigError(f"{where}: field '{name}' is missing")
    kind = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kind) or not math.isfinite(value) or (
            minimum is not None and value < minimum) or (below is not None and value >= below):
        bounds = (f" >= {minimum}" if minimum is not None else "") + (f" and < {below}" if below is not None else "")
        raise ConfigError(f"{where}: field '{name}' must be {'an integer' if integer else 'a number'}{bounds}, "
                          f"got {value!r}")
    return value


def _object(value, where: str, allowed: set[str]) -> dict:
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: must be an object")
    unknown = sorted(set(value) - allowed)
    if unknown:
        raise ConfigError(f"{where}: unknown field(s) {', '.join(unknown)}; allowed: {', '.join(sorted(allowed))}")
    return value


def parse_policy(section: dict | None, source: str) -> SitePrivacyPolicy:
    """Validate a ``privacy`` section; errors name the field."""
    section = _object(section or {}, f"{source}: privacy", {"secure_aggregation", "studies"})
    where = f"{source}: privacy.secure_aggregation"
    secure = _object(section.get("secure_aggregation", {}), where, {"min_participants", "min_threshold_fraction"})
    secagg = SecAggPolicy(_number(secure, "min_participants", where, 3, minimum=2, integer=True),
                          float(_number(secure, "min_threshold_fraction", where, 0.5, minimum=0.5, below=1)))
    update_dp = {}
    studies = _object(section.get("studies", {}), f"{source}: privacy.studies", set(section.get("studies", {})))
    for study, mechanisms in studies.items():
        where = f"{source}: privacy.studies.{study}"
        mechanisms = _object(mechanisms, where, {"update_dp"})
        if "update_dp" in mechanisms:
            where += ".update_dp"
            raw = _object(mechanisms["update_dp"], where,
                          {"epsilon", "delta", "noise_multiplier", "clip_norm", "noise"})
            noise = raw.get("noise", "distributed")
            if noise not in NOISE_MODES:
                raise ConfigError(f"{where}: field 'noise' must be one of {', '.join(NOISE_MODES)}, got {noise!r}")
            update_dp[study] = UpdateDPBudget(
                epsilon=float(_number(raw, "epsilon", where, minimum=1e-9)),
                delta=float(_number(raw, "delta", where, DEFAULT_DELTA, minimum=1e-300, below=1)),
                requirement=UpdateDPRequirement(float(_number(raw, "noise_multiplier", where, minimum=1e-9)),
                                                float(_number(raw, "clip_norm", where, minimum=1e-12)), noise))
    return SitePrivacyPolicy(secagg, update_dp, source)


def site_policy(site: str, site_config_dir: str | os.PathLike) -> SitePrivacyPolicy:
    """The site's policy from its ``clinfed_site.json`` (deployed) or its simulator data folder;
    the defaults when the file has no ``privacy`` section."""
    from clinfed.site_config import DATA_ROOT_ENV, SITE_CONFIG_FILE, read_json_object

    config_file = Path(site_config_dir) / SITE_CONFIG_FILE
    if not config_file.is_file() and os.environ.get(DATA_ROOT_ENV):
        config_file = Path(os.environ[DATA_ROOT_ENV]) / site / SITE_CONFIG_FILE
    if not config_file.is_file():
        return parse_policy(None, f"site {site} (no {SITE_CONFIG_FILE}: defaults)")
    return parse_policy(read_json_object(config_file).get("privacy"), str(config_file))
