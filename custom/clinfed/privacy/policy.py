"""A site's own privacy policy: what it requires of every job, whatever the job asks.

It is the ``privacy`` section of the site's ``local/clinfed_site.json`` (:mod:`clinfed.site_config`;
in the simulator, of ``<site data folder>/clinfed_site.json``), written at provisioning from the
consortium definition and then the site's to edit. The job may ask for more privacy, never less::

    "privacy": {
      "secure_aggregation": {"min_participants": 3, "min_threshold_fraction": 0.5},
      "studies": {
        "clinfed-tumour-seg": {
          "dp_sgd": {"unit": "patient", "epsilon": 8.0, "delta": 1e-5, "max_grad_norm": 1.0},
          "update_dp": {"unit": "site", "epsilon": 20.0, "delta": 1e-5, "noise_multiplier": 1.0,
                        "clip_norm": 0.5, "noise": "distributed"}}}}

- ``secure_aggregation.min_participants`` (default 3): fewest sites a round's list may name, at
  every stage; ``min_threshold_fraction`` (default 0.5): the dropout threshold t must be more than
  this fraction of the list.
- ``release`` (:mod:`clinfed.privacy.release`): ``count_bucket`` (default 5) rounds up every count
  a site releases (cohort sizes, FedAvg weights); ``metric_decimals`` (default 2) rounds the
  validation scores it releases.
- ``studies.<study>.dp_sgd``: DP-SGD in local training (unit protected: one patient). ``epsilon``
  is the study's budget over all jobs (default 8); a job's ``dp_target_epsilon`` may ask for less
  and spends it against this budget, a job asking for more is refused. ``delta`` defaults to the
  smaller of 1e-5 and 1/(10 n) at the study's first job; ``max_grad_norm`` (default 1.0) is the
  largest per-sample clipping bound a job may use. The defaults apply to every study the site has
  no section for.
- ``studies.<study>.update_dp``: update-level DP inside the mask (unit protected: the site's whole
  contribution to a round). ``epsilon`` is the study's budget at ``delta``, over all jobs; a round
  must carry at least ``noise_multiplier`` and at most ``clip_norm``; ``noise`` is ``distributed``
  (each site adds its share: trusts the other sites' software) or ``local`` (adds all of it).
  Without this section the site requires no update-level DP (and accounts what it adds, uncapped).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

from clinfed.errors import ConfigError
from clinfed.privacy.release import ReleasePolicy
from clinfed.privacy.secagg import NOISE_MODES, SecAggPolicy, UpdateDPRequirement

DEFAULT_DELTA = 1e-5
DEFAULT_DP_SGD_EPSILON = 8.0
UNITS = {"dp_sgd": "patient", "update_dp": "site"}


@dataclass(frozen=True)
class UpdateDPBudget:
    epsilon: float
    delta: float
    requirement: UpdateDPRequirement


@dataclass(frozen=True)
class DPSGDBudget:
    """A site's DP-SGD budget for a study. ``delta`` None: min(1e-5, 1/(10 n)) at the first job."""

    epsilon: float = DEFAULT_DP_SGD_EPSILON
    delta: float | None = None
    max_grad_norm: float = 1.0
    field: str = "privacy.studies.<study>.dp_sgd"  # the policy field, for refusal messages
    source: str = ""                               # the file it came from (or "default")

    def delta_for(self, n: int) -> float:
        return self.delta if self.delta is not None else min(DEFAULT_DELTA, 1.0 / (10 * max(n, 1)))


@dataclass(frozen=True)
class SitePrivacyPolicy:
    secagg: SecAggPolicy
    update_dp: dict[str, UpdateDPBudget]  # by study
    dp_sgd: dict[str, DPSGDBudget]        # by study; studies without a section get the defaults
    release: ReleasePolicy
    source: str

    def dp_sgd_for(self, study: str) -> DPSGDBudget:
        return self.dp_sgd.get(study) or DPSGDBudget(field=f"privacy.studies.{study}.dp_sgd",
                                                     source=f"default; {self.source}")

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
    section = _object(section or {}, f"{source}: privacy", {"secure_aggregation", "studies", "release"})
    where = f"{source}: privacy.release"
    raw_release = _object(section.get("release", {}), where, {"count_bucket", "metric_decimals"})
    release = ReleasePolicy(_number(raw_release, "count_bucket", where, 5, minimum=1, integer=True),
                            _number(raw_release, "metric_decimals", where, 2, minimum=0, below=7, integer=True))
    where = f"{source}: privacy.secure_aggregation"
    secure = _object(section.get("secure_aggregation", {}), where, {"min_participants", "min_threshold_fraction"})
    secagg = SecAggPolicy(_number(secure, "min_participants", where, 3, minimum=2, integer=True),
                          float(_number(secure, "min_threshold_fraction", where, 0.5, minimum=0.5, below=1)))
    update_dp, dp_sgd = {}, {}
    studies = _object(section.get("studies", {}), f"{source}: privacy.studies", set(section.get("studies", {})))
    for study, mechanisms in studies.items():
        where = f"{source}: privacy.studies.{study}"
        mechanisms = _object(mechanisms, where, set(UNITS))
        for mechanism, raw in mechanisms.items():
            unit = _object(raw, f"{where}.{mechanism}", set(raw)).get("unit", UNITS[mechanism])
            if unit != UNITS[mechanism]:
                raise ConfigError(f"{where}.{mechanism}: field 'unit' must be '{UNITS[mechanism]}' (what "
                                  f"{mechanism} protects), got {unit!r}")
        if "dp_sgd" in mechanisms:
            field = f"{where}.dp_sgd"
            raw = _object(mechanisms["dp_sgd"], field, {"unit", "epsilon", "delta", "max_grad_norm"})
            dp_sgd[study] = DPSGDBudget(
                epsilon=float(_number(raw, "epsilon", field, DEFAULT_DP_SGD_EPSILON, minimum=1e-9)),
                delta=None if raw.get("delta") is None else float(_number(raw, "delta", field, minimum=1e-300,
                                                                            below=1)),
                max_grad_norm=float(_number(raw, "max_grad_norm", field, 1.0, minimum=1e-12)),
                field=f"privacy.studies.{study}.dp_sgd", source=source)
        if "update_dp" in mechanisms:
            where += ".update_dp"
            raw = _object(mechanisms["update_dp"], where,
                          {"unit", "epsilon", "delta", "noise_multiplier", "clip_norm", "noise"})
            noise = raw.get("noise", "distributed")
            if noise not in NOISE_MODES:
                raise ConfigError(f"{where}: field 'noise' must be one of {', '.join(NOISE_MODES)}, got {noise!r}")
            update_dp[study] = UpdateDPBudget(
                epsilon=float(_number(raw, "epsilon", where, minimum=1e-9)),
                delta=float(_number(raw, "delta", where, DEFAULT_DELTA, minimum=1e-300, below=1)),
                requirement=UpdateDPRequirement(float(_number(raw, "noise_multiplier", where, minimum=1e-9)),
                                                float(_number(raw, "clip_norm", where, minimum=1e-12)), noise))
    return SitePrivacyPolicy(secagg, update_dp, dp_sgd, release, source)


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
