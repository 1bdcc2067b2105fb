"""Privacy accounting that spans rounds, jobs and client restarts.

A mechanism's releases are a history of events ``(noise_multiplier, sample_rate, steps)``, the
format of Opacus's accountants. ``compose_epsilon`` turns a history into epsilon at a delta with
Opacus's own PRV or RDP accountant, or, for un-subsampled Gaussian releases (sample rate 1), with
the exact Gaussian-mechanism formula; ``skellam`` composes un-subsampled releases whose RDP is
bounded by a Gaussian's at integer orders only (the Skellam noise of secure aggregation, see
:func:`clinfed.privacy.secagg.skellam_noise_multiplier`).

``PrivacyBudget`` keeps one site's spend for one study and one mechanism in a JSON file:

```json
{"format": "clinfed.privacy_budget/1", "mechanism": "dp_sgd", "site": "site-1",
 "study": "clinfed-tumour-seg", "accountant": "prv", "delta": 0.001, "target_epsilon": 8.0,
 "history": [[0.93, 0.2, 40]],            # committed releases, merged like Opacus's accountants
 "pending": [{"id": "...", "job_id": "...", "round": 5, "events": [[0.93, 0.2, 10]]}],
                                          # reserved for rounds in progress: counted as spent
 "plans": {"<job id>": {"noise_multiplier": 0.93, "sample_rate": 0.2, ...}},
 "rounds": [{"job_id": "...", "round": 0, "steps": 10, "epsilon_round": 3.1, "epsilon_total": 3.1}]}
```

A round's steps are reserved before it starts and committed when it ends, so a client that
dies mid-round leaves its reservation in the file, counted as spent for good.
"""

from __future__ import annotations

import fcntl
import functools
import json
import math
import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Sequence

from clinfed.privacy.errors import PrivacyBudgetExceeded, PrivacyStateError

ACCOUNTANTS = ("prv", "rdp", "gaussian", "skellam")
# Integer RDP orders for the skellam accountant (its bound is proven for integer orders).
SKELLAM_ORDERS = tuple(range(2, 257))
BUDGET_FORMAT = "clinfed.privacy_budget/1"
# Budget comparisons allow for float noise in the accountants, nothing more.
_EPSILON_SLACK = 1e-9

Event = tuple[float, float, int]


def merge_history(events: Iterable[Sequence]) -> list[Event]:
    """Consecutive events with the same (noise, sample rate) become one, as in Opacus's accountants."""
    merged: list[Event] = []
    for sigma, q, steps in events:
        sigma, q, steps = float(sigma), float(q), int(steps)
        if steps <= 0:
            continue
        if merged and merged[-1][0] == sigma and merged[-1][1] == q:
            merged[-1] = (sigma, q, merged[-1][2] + steps)
        else:
            merged.append((sigma, q, steps))
    return merged


def gaussian_epsilon(mu: float, delta: float) -> float:
    """Exact epsilon of a mu-GDP mechanism (a Gaussian mechanism, or any composition of them:
    mu = sqrt(sum(steps / sigma^2))) at ``delta`` (Balle & Wang 2018; Dong, Roth & Su 2019)."""
    from scipy.optimize import brentq
    from scipy.stats import norm

    if mu <= 0:
        return 0.0

    def delta_at(eps: float) -> float:
        return float(norm.cdf(-eps / mu + mu / 2) - math.exp(eps + norm.logcdf(-eps / mu - mu / 2)))

    if delta_at(0.0) <= delta:
        return 0.0
    high = 1.0
    while delta_at(high) > delta:
        high *= 2
    return float(brentq(lambda e: delta_at(e) - delta, 0.0, high, xtol=1e-12))


def compose_epsilon(history: Iterable[Sequence], delta: float, accountant: str = "prv") -> float:
    """Epsilon at ``delta`` of all events in ``history`` together."""
    if accountant not in ACCOUNTANTS:
        raise ValueError(f"accountant must be one of {ACCOUNTANTS}, got {accountant!r}")
    return _compose(tuple(merge_history(history)), float(delta), accountant)


@functools.lru_cache(maxsize=256)
def _compose(events: tuple[Event, ...], delta: float, accountant: str) -> float:
    # Cached: a round's check, commit and report ask for the same compositions, and Opacus's RDP
    # takes about a second per call at the high sampling rates of small hospital cohorts.
    if not events:
        return 0.0
    if accountant == "gaussian":
        if any(q != 1.0 for _, q, _ in events):
            raise ValueError("the 'gaussian' accountant is exact only without subsampling (sample rate 1); "
                             "use 'prv' or 'rdp' for DP-SGD")
        return gaussian_epsilon(math.sqrt(sum(steps / sigma**2 for sigma, _, steps in events)), delta)
    if accountant == "skellam":
        if any(q != 1.0 for _, q, _ in events):
            raise ValueError("the 'skellam' accountant covers releases without subsampling (sample rate 1)")
        from opacus.accountants.analysis.rdp import get_privacy_spent

        inverse_variance = sum(steps / sigma**2 for sigma, _, steps in events)
        rdp = [order * inverse_variance / 2 for order in SKELLAM_ORDERS]
        return float(get_privacy_spent(orders=list(SKELLAM_ORDERS), rdp=rdp, delta=delta)[0])
    from opacus.accountants import create_accountant

    opacus_accountant = create_accountant(mechanism=accountant)
    opacus_accountant.history = list(events)
    return float(opacus_accountant.get_epsilon(delta=delta))


def noise_multiplier_for(*, target_epsilon: float, delta: float, sample_rate: float, steps: int,
                         accountant: str = "prv", history: Iterable[Sequence] = (),
                         epsilon_tolerance: float = 0.01) -> float:
    """A noise multiplier such that ``history`` plus ``steps`` releases at ``sample_rate`` end
    within ``epsilon_tolerance`` below ``target_epsilon`` (never above it)."""
    history = merge_history(history)
    spent = compose_epsilon(history, delta, accountant)
    if spent >= target_epsilon:
        raise PrivacyBudgetExceeded(
            f"the budget epsilon={target_epsilon} is already spent (epsilon={spent:.4g}); no noise level fits "
            f"{steps} more steps", epsilon_spent=spent, epsilon_after=math.inf, target_epsilon=target_epsilon)

    def excess(sigma: float) -> float:  # decreasing in sigma
        return compose_epsilon(history + [(sigma, sample_rate, steps)], delta, accountant) - target_epsilon

    # Bracket: excess(low) > 0 >= excess(high).
    low, high = 0.5, 1.0
    f_high = excess(high)
    while f_high > 0:
        low, high = high, high * 2
        if high > 1e6:
            raise PrivacyBudgetExceeded(f"the remaining budget is too small for {steps} more steps",
                                        epsilon_spent=spent, epsilon_after=math.inf, target_epsilon=target_epsilon)
        f_high = excess(high)
    f_low = excess(low) if low < high / 1.5 else math.inf
    while f_low <= 0:
        high, f_high, low = low, f_low, low / 2
        f_low = excess(low)
    # Illinois regula falsi on the bracket (a few accountant calls instead of a dozen for bisection);
    # w_low / w_high are the interpolation weights, f_high the true excess at ``high``.
    w_low, w_high, side = f_low, f_high, 0
    for _ in range(60):
        if f_high >= -epsilon_tolerance:
            break
        if math.isinf(w_low):
            mid = (low + high) / 2
        else:
            mid = high - w_high * (high - low) / (w_high - w_low)
            if not low < mid < high:
                mid = (low + high) / 2
        f_mid = excess(mid)
        if f_mid > 0:
            low, w_low = mid, f_mid
            if side == -1:
                w_high /= 2
            side = -1
        else:
            high, f_high, w_high = mid, f_mid, f_mid
            if side == 1 and not math.isinf(w_low):
                w_low /= 2
            side = 1
    return high


class PrivacyBudget:
    """One site's privacy spend for one study and one mechanism, persisted in a JSON file.

    Args:
        path: the JSON file; created (with its folders) on the first write.
        target_epsilon: the budget. May be changed by the site's policy between jobs.
        delta: fixed for the life of the file: a file written with another delta is refused.
        accountant: ``prv``, ``rdp``, ``gaussian`` or ``skellam`` (both sample rate 1 only); fixed for the file.
        mechanism: label (``dp_sgd`` or ``update_dp``); fixed for the file.
        site, study: recorded for auditing.
    """

    def __init__(self, path: str | os.PathLike, *, target_epsilon: float, delta: float, accountant: str,
                 mechanism: str, site: str = "", study: str = ""):
        if not target_epsilon > 0:
            raise ValueError(f"target_epsilon must be > 0, got {target_epsilon}")
        if not 0 < delta < 1:
            raise ValueError(f"delta must be in (0, 1), got {delta}")
        if accountant not in ACCOUNTANTS:
            raise ValueError(f"accountant must be one of {ACCOUNTANTS}, got {accountant!r}")
        self.path = Path(path)
        self.target_epsilon = float(target_epsilon)
        self.delta = float(delta)
        self.accountant = accountant
        self.mechanism = mechanism
        self.site = site
        self.study = study
        self._state = self._read()

    # -- file handling -------------------------------------------------------------------

    def _empty(self) -> dict:
        return {"format": BUDGET_FORMAT, "mechanism": self.mechanism, "site": self.site, "study": self.study,
                "accountant": self.accountant, "delta": self.delta, "target_epsilon": self.target_epsilon,
                "history": [], "pending": [], "plans": {}, "rounds": []}

    def _read(self) -> dict:
        if not self.path.exists():
            return self._empty()
        try:
            state = json.loads(self.path.read_text())
        except (OSError, ValueError) as err:
            raise PrivacyStateError(f"{self.path}: privacy budget file is unreadable ({err}); it records spent "
                                    f"privacy and must not be deleted or edited by hand") from err
        if not isinstance(state, dict) or state.get("format") != BUDGET_FORMAT:
            raise PrivacyStateError(f"{self.path}: field 'format' must be {BUDGET_FORMAT!r}")
        for field, expected in (("mechanism", self.mechanism), ("accountant", self.accountant)):
            if state.get(field) != expected:
                raise PrivacyStateError(f"{self.path}: field '{field}' is {state.get(field)!r} but this site is "
                                        f"configured with {expected!r}; spend cannot be carried across")
        if not math.isclose(float(state.get("delta", -1)), self.delta, rel_tol=1e-12):
            raise PrivacyStateError(f"{self.path}: field 'delta' is {state.get('delta')} but the configuration "
                                    f"says {self.delta}; delta is fixed once spending has started")
        for field in ("history", "pending", "rounds"):
            if not isinstance(state.get(field), list):
                raise PrivacyStateError(f"{self.path}: field '{field}' must be a list")
        state.setdefault("plans", {})
        state["target_epsilon"] = self.target_epsilon
        return state

    def _write(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        with open(tmp, "w") as handle:
            json.dump(self._state, handle, indent=1)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, self.path)

    @contextmanager
    def _update(self):
        """Read-modify-write under a file lock: two jobs of one site may share a study's budget."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_name(self.path.name + ".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                self._state = self._read()
                yield self._state
                self._write()
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    # -- queries -------------------------------------------------------------------------

    @property
    def history(self) -> list[Event]:
        """Everything counted as spent: committed releases and reservations of unfinished rounds."""
        return merge_history(list(self._state["history"])
                             + [e for r in self._state["pending"] for e in r["events"]])

    @property
    def rounds(self) -> list[dict]:
        return [dict(r) for r in self._state["rounds"]]

    def epsilon(self, extra: Iterable[Sequence] = ()) -> float:
        """Epsilon spent so far (plus ``extra`` hypothetical events) at this budget's delta."""
        return compose_epsilon(self.history + merge_history(extra), self.delta, self.accountant)

    def would_exceed(self, events: Iterable[Sequence]) -> bool:
        return self.epsilon(events) > self.target_epsilon * (1 + _EPSILON_SLACK)

    def check(self, events: Iterable[Sequence], what: str) -> float:
        """Raise ``PrivacyBudgetExceeded`` if ``events`` would overspend; else return epsilon after them."""
        events = merge_history(events)
        after = self.epsilon(events)
        if after > self.target_epsilon * (1 + _EPSILON_SLACK):
            spent = self.epsilon()
            raise PrivacyBudgetExceeded(
                f"site {self.site or '?'} declines {what}: study {self.study or '?'} has spent epsilon={spent:.4g} "
                f"({self.mechanism}, delta={self.delta:.3g}) and this would bring it to {after:.4g}, over the "
                f"budget of {self.target_epsilon:.4g} (spend recorded in {self.path})",
                epsilon_spent=spent, epsilon_after=after, target_epsilon=self.target_epsilon)
        return after

    def plan(self, job_id: str) -> dict | None:
        plan = self._state["plans"].get(job_id)
        return dict(plan) if plan else None

    def rounds_of(self, job_id: str) -> list[dict]:
        return [dict(r) for r in self._state["rounds"] if r.get("job_id") == job_id]

    # -- spending ------------------------------------------------------------------------

    def set_plan(self, job_id: str, plan: dict) -> None:
        with self._update() as state:
            state["plans"][job_id] = dict(plan)

    def reserve(self, events: Iterable[Sequence], *, what: str, job_id: str, round_: int | None) -> str:
        """Count ``events`` as spent before they happen (write-ahead); refuse if over budget.
        Returns the reservation id that ``commit`` releases."""
        events = merge_history(events)
        reservation = os.urandom(8).hex()
        with self._update() as state:
            self.check(events, what)
            state["pending"].append({"id": reservation, "job_id": job_id, "round": round_,
                                     "events": [list(e) for e in events]})
        return reservation

    def spend(self, events: Iterable[Sequence], *, what: str, job_id: str, round_: int | None) -> float:
        """Check and record ``events`` in one locked step (a release that happens at once); returns
        the total epsilon. Raises ``PrivacyBudgetExceeded`` and records nothing if over budget."""
        return self.commit(events, job_id=job_id, round_=round_, check_as=what)

    def commit(self, events: Iterable[Sequence], *, job_id: str, round_: int | None,
               reservation: str | None = None, check_as: str | None = None) -> float:
        """Record what was actually spent (releasing ``reservation``) and return the total epsilon."""
        events = merge_history(events)
        with self._update() as state:
            if check_as is not None:
                self.check(events, check_as)
            state["pending"] = [r for r in state["pending"] if r.get("id") != reservation]
            state["history"] = [list(e) for e in merge_history(list(state["history"]) + events)]
            total = compose_epsilon(self.history, self.delta, self.accountant)
            state["rounds"].append({
                "job_id": job_id, "round": round_, "events": [list(e) for e in events],
                "steps": sum(e[2] for e in events),
                "epsilon_round": compose_epsilon(events, self.delta, self.accountant) if events else 0.0,
                "epsilon_total": total, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
        return total




def _safe_name(name: str) -> str:
    cleaned = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in str(name))
    return cleaned.strip(".") or "_"


def budget_file(folder: str | os.PathLike, *, study: str, site: str, mechanism: str) -> Path:
    """Where a site's spend for a study lives: ``<folder>/<study>/<site>.<mechanism>.json``."""
    return Path(folder) / _safe_name(study) / f"{_safe_name(site)}.{_safe_name(mechanism)}.json"


def stored_delta(path: str | os.PathLike) -> float | None:
    """The delta a budget file was started with, or None if there is no file yet."""
    path = Path(path)
    if not path.exists():
        return None
    try:
        return float(json.loads(path.read_text())["delta"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise PrivacyStateError(f"{path}: cannot read field 'delta' ({err})") from err


def default_privacy_dir(fl_ctx) -> Path:
    """The site's ``privacy_dir`` (:func:`clinfed.site_config.site_files`); for a participant
    without clinfed site files (no data of ours), ``<workspace root>/clinfed_privacy``. Outside
    every job's run folder, so spend survives jobs and restarts."""
    from clinfed.site_config import DATA_ROOT_ENV, PRIVACY_DIR_NAME, SITE_CONFIG_FILE, site_files

    workspace = fl_ctx.get_engine().get_workspace()
    local = Path(workspace.get_site_config_dir())
    if not (local / SITE_CONFIG_FILE).is_file() and not os.environ.get(DATA_ROOT_ENV):
        return Path(workspace.get_root_dir()) / PRIVACY_DIR_NAME
    return site_files(fl_ctx.get_identity_name(), local).privacy_dir
