"""The experiment behind the demo and ``benchmarks/quality.py``: centralised vs local-only vs
federated (FLARE SimEnv) on synthetic non-IID sites, scored the same way.

All arms train the same model with the same total epoch budget (:data:`COMPARISON_RULE`) and
each final model is scored on every site's held-out test set: patients from the same generator
as the site's training data, generated apart (``test_data/<site>``), never seen in training or
in any choice made from scores, and not split by the sites' pseudonym keys. Scores are means
over test patients with 95% bootstrap intervals (:mod:`clinfed.confidence`); federated vs each
local-only model is a paired difference over the same test patients. The outcome head is scored
as trained (fused), with the EHR vector zeroed and with the image embedding zeroed.
The validation splits only score the federated rounds as they go.

``privacy`` applies to the federated arm only (``dp``: DP-SGD at every site under a budget of
``dp_target_epsilon`` for the study; ``mask``: secure masking; ``dp+mask``): the baselines stay
non-private, as the yardstick.

The federated arm records to a LocalLedger. Before the job, what provisioning does for a real
consortium (:func:`clinfed.audit.init_consortium`) and what each site's operator does
(``clinfed consent sync``, with masking ``clinfed keys register``: :mod:`clinfed.site_setup`)
happen once per simulated site, with that site's own identity from the site configuration the
simulation writes for it. The job records contributions, global models and absences, and the
final model file is checked with ``audit verify``.
"""

from __future__ import annotations

import contextlib
import copy
import datetime as dt
import json
import os
import secrets
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

from clinfed import audit
from clinfed.confidence import auc_interval, mean_interval
from clinfed.data.ingest import Case, ingest_site
from clinfed.data.profiles import BRAIN_STUDY_ID, STUDY_ID, SiteProfile, profile_for_site
from clinfed.data.study import load_study
from clinfed.errors import ClinfedError
from clinfed.jobs.tumour_seg import (
    DEFAULT_ROUNDS,
    EXTRA_ALLOWED_CLASSES,
    FEDAVG_JOB_NAME,
    PRIVATE_JOB_NAME,
    TumourSegFedAvgRecipe,
)
from clinfed.ledger.settings import COORDINATOR, JOB_ID_ENV, LEDGER_ENV, ledger_settings, site_config_ledger
from clinfed.site_config import DATA_ROOT_ENV, MASKING_KEY_FILE, PRIVACY_DIR_NAME, SITE_CONFIG_FILE
from clinfed.site_setup import consent_sync, keys_register
from clinfed.training import (
    OUTCOME_VARIANTS,
    DEFAULT_BATCH_SIZE,
    DEFAULT_LOCAL_EPOCHS,
    DEFAULT_LR,
    TrainConfig,
    evaluate,
    finite_or_none,
    load_numpy_state,
    make_loader,
    new_model,
    split_cases,
    train_epochs,
)
from clinfed.widgets.round_log import ROUND_LOG_FILE

# Cross-site evaluation names the server's final global model by its file.
SERVER_MODEL_KEY = "SRV_FL_global_model.pt"
LEDGER_FILE = "ledger.sqlite"
# Beside the ledger: one folder per simulated site holding what its kit's local/clinfed_site.json would say.
SITES_DIR = "sites"
FLARE_WORKSPACE = "flare_workspace"
# The weights every arm starts from; the federated job's persistor loads them.
INITIAL_MODEL_FILE = "initial_model.pt"
# FLARE's log configuration without its console handler: every participant logs to files only.
FLARE_FILES_ONLY_LOG_CONFIG = "log_config_files_only.json"
# What FLARE's own code prints (not logs) during a quiet run goes here, in the workspace.
FLARE_CONSOLE_FILE = "flare_console.txt"
# Beside the sites' data folder: each site's held-out test patients (one folder per site).
TEST_DATA_DIR = "test_data"
COMPARISON_RULE = ("every arm trains the same model from the same initialisation for the same epoch budget "
                   "(rounds x local epochs); each arm's final model is scored, no round or epoch chosen by a score; "
                   "scores are on held-out test patients only")
UNITS = ("patient", "site")
# Volume size each study's synthetic sites are generated at: the liver phantoms, and a head at
# about 1 mm.
STUDY_SHAPES = {STUDY_ID: (48, 48, 24), BRAIN_STUDY_ID: (64, 64, 48)}


@dataclass(frozen=True)
class DemoConfig:
    sites: int = 3
    patients: int = 24
    test_patients: int = 24  # per site, held out: never trained on, never used to choose anything
    shape: tuple[int, int, int] | None = None  # None: the study's (STUDY_SHAPES)
    seed: int = 0
    rounds: int = DEFAULT_ROUNDS
    local_epochs: int = DEFAULT_LOCAL_EPOCHS
    batch_size: int = DEFAULT_BATCH_SIZE
    lr: float = DEFAULT_LR
    roi: tuple[int, int, int] | None = None  # None: the study's
    privacy: str = "none"  # one of clinfed.privacy.PRIVACY_MODES
    dp_target_epsilon: float = 8.0
    study: str = STUDY_ID

    @classmethod
    def quick(cls, study: str = STUDY_ID) -> "DemoConfig":
        # Batch 1: twice the optimiser steps of the default in the same time. Six rounds of two
        # epochs: on this 2-core machine, federated / centralised Dice was 0.66-0.70 after 3 rounds
        # (three runs, about 70 s each) and 0.75-1.00, mean 0.88, after 6 (four runs, 91-98 s).
        return cls(patients=12, test_patients=12, shape=(32, 32, 16) if study == STUDY_ID else None, rounds=6,
                   local_epochs=2, batch_size=1, study=study)

    @property
    def definition(self):
        return load_study(self.study)

    @property
    def volume_shape(self) -> tuple[int, int, int]:
        return self.shape or STUDY_SHAPES.get(self.study, (48, 48, 24))

    @property
    def train_config(self) -> TrainConfig:
        return TrainConfig.for_study(self.definition, epochs=self.local_epochs, batch_size=self.batch_size, lr=self.lr,
                                     roi=self.roi)

    @property
    def job_name(self) -> str:
        return FEDAVG_JOB_NAME if self.privacy == "none" else PRIVATE_JOB_NAME

    def recipe(self, initial_ckpt: Path | None = None) -> TumourSegFedAvgRecipe:
        """The federated job of this configuration (the committed jobs with the demo's sizes),
        starting from the weights in ``initial_ckpt`` if given."""
        return TumourSegFedAvgRecipe(name=self.job_name, study=self.study, min_clients=self.sites, num_rounds=self.rounds,
                                     local_epochs=self.local_epochs, batch_size=self.batch_size, lr=self.lr,
                                     roi=self.roi, privacy=self.privacy, dp_target_epsilon=self.dp_target_epsilon,
                                     initial_ckpt=str(Path(initial_ckpt).resolve()) if initial_ckpt else None)

    @property
    def total_epochs(self) -> int:
        """Epoch budget of every arm: a federated site sees rounds x local_epochs epochs."""
        return self.rounds * self.local_epochs


def site_names(config: DemoConfig) -> list[str]:
    return [profile_for_site(i, config.study).name for i in range(config.sites)]


class Watcher:
    """What a running experiment reports as it goes. This one says nothing (a benchmark, a test);
    the demo's console watcher (``clinfed.demo``) shows progress bars and a line per round."""

    def message(self, text: str) -> None:
        """A step of the experiment, in one line."""

    @contextlib.contextmanager
    def arm(self, name: str, total: int, unit: str) -> Iterator[Callable[[int], None]]:
        """An arm runs ``total`` ``unit``s of work; the context yields ``advance(n)``."""
        yield lambda n=1: None

    def federated_round(self, entry: dict, spend: dict | None) -> None:
        """A federated round is scored: its ``per_round`` entry of ``results.json`` and, when a
        privacy mechanism ran, the spend after it (an entry of ``privacy.per_round``)."""


def test_data_dir(data_dir: Path) -> Path:
    return Path(data_dir).parent / TEST_DATA_DIR


def synthesise_sites(data_dir: Path, config: DemoConfig, watcher: Watcher | None = None) -> None:
    """Generate the configuration's synthetic sites into ``data_dir`` and each site's held-out
    test patients beside it (:func:`test_data_dir`), unless they are there."""
    from clinfed.data.synth import synthesise

    watcher = watcher or Watcher()
    for folder, patients, held_out in ((data_dir, config.patients, False),
                                       (test_data_dir(data_dir), config.test_patients, True)):
        if not all((folder / name / "fhir").is_dir() for name in site_names(config)):
            watcher.message(f"generating {config.sites} non-IID sites x {patients} {'test ' if held_out else ''}"
                            f"patients of study {config.study} in {folder}")
            synthesise(folder, config.sites, patients, config.volume_shape, config.seed, study_id=config.study,
                       held_out=held_out)


def site_profile_summary(profile: SiteProfile) -> dict:
    """What the report says of a site's scanner and protocol (its generator profile)."""
    return {"modality": profile.modality, "manufacturer": profile.manufacturer, "spacing_mm": list(profile.spacing_mm),
            "tissue": profile.organ, "lesion": profile.organ + profile.lesion_contrast, "background": profile.background,
            "noise_std": profile.noise_std, "blur_mm": profile.blur_mm,
            "lesion_radius_frac": list(profile.lesion_radius_frac), "lesion_count": list(profile.lesion_count),
            "high_grade_bias": profile.high_grade_bias, "protocol": profile.protocol}


# --------------------------------------------------------------------------- cohorts and baselines


@dataclass
class Cohorts:
    """Each site's usable patients, split into training and validation, its held-out test
    patients, and its ingestion reports."""

    train: dict[str, list[Case]] = field(default_factory=dict)
    validation: dict[str, list[Case]] = field(default_factory=dict)
    test: dict[str, list[Case]] = field(default_factory=dict)
    reports: dict[str, dict] = field(default_factory=dict)
    test_reports: dict[str, dict] = field(default_factory=dict)

    @property
    def evaluation(self) -> list[Case]:
        """The union of the sites' validation splits (scores the federated rounds as they go)."""
        return [case for cases in self.validation.values() for case in cases]

    @property
    def pooled_train(self) -> list[Case]:
        return [case for cases in self.train.values() for case in cases]


def ingest_cohorts(data_dir: Path, config: DemoConfig, watcher: Watcher, test_dir: Path | None = None) -> Cohorts:
    """Ingest every site; with ``test_dir``, each site's held-out test patients too (all of them
    test: the pseudonym split does not apply)."""
    cohorts = Cohorts()
    definition = config.definition
    for name in site_names(config):
        ingestion = ingest_site(data_dir / name, definition)
        cohorts.reports[name] = ingestion.report()
        cohorts.train[name], cohorts.validation[name] = split_cases(ingestion.cases)
        tested = ""
        if test_dir is not None:
            held_out = ingest_site(Path(test_dir) / name, definition)
            cohorts.test[name], cohorts.test_reports[name] = held_out.cases, held_out.report()
            tested = f", {len(held_out.cases)} test"
        watcher.message(f"{name}: {len(cohorts.train[name])} train, {len(cohorts.validation[name])} validation"
                        f"{tested}, excluded {cohorts.reports[name]['excluded_by_reason'] or 'none'}")
    return cohorts


def initial_model(config: DemoConfig) -> torch.nn.Module:
    """The initialisation every arm starts from, under the configuration's seed."""
    torch.manual_seed(config.seed)
    return new_model(config.train_config.ehr_size)


def train_model(train: list[Case], config: DemoConfig, advance: Callable[[int], None] = lambda n=1: None):
    """A fresh model trained on ``train`` for the whole epoch budget. One ``train_epochs`` call
    per epoch with one optimiser is the same training as one call for all of them, and lets the
    caller follow it epoch by epoch."""
    model = initial_model(config)
    one_epoch = TrainConfig(**{**asdict(config.train_config), "epochs": 1})
    loader = make_loader(train, one_epoch, train=True)
    optimizer = torch.optim.Adam(model.parameters(), lr=one_epoch.lr)
    for _ in range(config.total_epochs):
        train_epochs(model, loader, one_epoch, optimizer)
        advance(1)
    return model


# --------------------------------------------------------------------------- test-set scores


def score_on_test_sets(model, test_loaders: dict, config: DemoConfig) -> dict[str, dict]:
    """The model's per-case scores on each site's test set (``evaluate(..., per_case=True)``)."""
    return {site: evaluate(model, loader, config.train_config, per_case=True) for site, loader in test_loaders.items()}


def _union(per_site: dict[str, dict], key: str) -> list:
    return [value for scores in per_site.values() for value in scores[key]]


def arm_summary(per_site: dict[str, dict], seed: int) -> dict:
    """An arm's ``results.json`` entry: Dice on the union of the test sets and the outcome AUC
    as trained (``auc``) and with each input zeroed, each a mean with its 95% interval."""
    outcomes = _union(per_site, "outcomes")
    summary = {"dice": mean_interval(_union(per_site, "case_dice"), seed)}
    for variant in OUTCOME_VARIANTS:
        scores = [s for site in per_site.values() for s in site["outcome_scores"][variant]]
        summary["auc" if variant == "fused" else f"auc_{variant}"] = auc_interval(outcomes, scores, seed)
    return summary


def site_arm_table(arms: dict[str, dict[str, dict]], seed: int) -> dict:
    """``results.json``'s ``site_arm``: every arm's Dice on every site's test set."""
    sites = list(next(iter(arms.values())))
    return {"test_sets": sites,
            "arms": {arm: {site: {"dice": mean_interval(per_site[site]["case_dice"], seed)} for site in sites}
                     for arm, per_site in arms.items()}}


def federated_minus_local(federated: dict[str, dict], local: dict[str, dict[str, dict]], seed: int) -> dict:
    """Paired Dice difference federated - local-only per site, over the same test patients: on the
    union of the test sets, on the site's own test set, and on the other sites' test sets."""
    def difference(sites: list[str], name: str) -> dict:
        ours = np.array([d for site in sites for d in federated[site]["case_dice"]])
        theirs = np.array([d for site in sites for d in local[name][site]["case_dice"]])
        return mean_interval(ours - theirs, seed)

    sites = list(federated)
    return {name: {"union": difference(sites, name), "own_site": difference([name], name),
                   "other_sites": difference([s for s in sites if s != name], name)} for name in local}


def comparison(config: DemoConfig, cohorts: Cohorts) -> dict:
    return {"rule": COMPARISON_RULE, "epochs_per_arm": config.total_epochs,
            "test_patients": {site: len(cases) for site, cases in cohorts.test.items()},
            "test_sets": "each site's held-out patients (same generator, never trained on or used for selection)",
            "intervals": "95% percentile bootstrap over test patients (paired for differences)"}


# --------------------------------------------------------------------------- the federated arm


def allow_list_for_simulation(workspace_root: Path, job_name: str) -> None:
    """SimEnv enforces a class allow-list for non-BYOC jobs: admit FLARE's defaults plus ours."""
    from nvflare.app_common.default_component_policy import DEFAULT_CLASS_ALLOW_LIST

    local = workspace_root / job_name / "local"
    local.mkdir(parents=True, exist_ok=True)
    allowed = list(DEFAULT_CLASS_ALLOW_LIST) + ["clinfed."] + list(EXTRA_ALLOWED_CLASSES)
    (local / "resources.json").write_text(json.dumps({"format_version": 2, "class_allow_list": allowed}, indent=2))


def files_only_log_config(workspace_root: Path) -> Path:
    """FLARE's own log configuration minus its console handler, written into the workspace: every
    participant (the server in this process, each client process) then logs to its files only
    (``<workspace>/<job>/<participant>/log.txt``)."""
    from nvflare.fuel.utils.log_utils import default_log_dict

    config = copy.deepcopy(default_log_dict)
    console = [name for name, handler in config["handlers"].items() if handler.get("class") == "logging.StreamHandler"]
    for name in console:
        del config["handlers"][name]
    for logger in config.get("loggers", {}).values():
        logger["handlers"] = [h for h in logger.get("handlers", []) if h not in console]
    path = Path(workspace_root) / FLARE_FILES_ONLY_LOG_CONFIG
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(config, indent=2))
    return path


@contextlib.contextmanager
def _environment(**values: str):
    """Set environment variables for the simulated participants (child processes), then restore."""
    before = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in before.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def simulated_site_config(ledger_path: Path, data_dir: Path, site: str) -> Path:
    """Write what a provisioned kit's ``local/clinfed_site.json`` says, for a simulated site: its
    data folder, masking key and privacy state where the simulator's executor finds them
    (``$CLINFED_DATA_ROOT/<site>``), and its ledger identity (the simulator identity beside the
    ledger file). Returns the file: ``clinfed audit ... --site-config`` reads with it."""
    from clinfed.ledger.pki import simulation_identity_files

    identity = simulation_identity_files(ledger_path, site)
    if identity is None:
        raise ClinfedError(f"{ledger_path}: no simulator identity for {site} beside the ledger")
    site_dir = (data_dir / site).resolve()
    config = {
        "data_dir": str(site_dir),
        "masking_key_file": str(site_dir / MASKING_KEY_FILE),
        "privacy_dir": str(site_dir / PRIVACY_DIR_NAME),
        "ledger": {"participant": site, "backend": "local", "path": str(Path(ledger_path).resolve()),
                   "cert": str(identity.cert.resolve()), "key": str(identity.key.resolve()),
                   "ca": str(identity.ca.resolve()), "head_file": str(identity.head_file.resolve())},
    }
    config_file = Path(ledger_path).parent / SITES_DIR / site / SITE_CONFIG_FILE
    config_file.parent.mkdir(parents=True, exist_ok=True)
    config_file.write_text(json.dumps(config, indent=2) + "\n")
    return config_file


def prepare_ledger(ledger_path: Path, data_dir: Path, sites: list[str], log=print, masking_keys: bool = False,
                   study: str = STUDY_ID) -> int:
    """Initialise the consortium on a LocalLedger file (provisioning's part), then act as each
    site's operator with its own identity: ``consent sync``, and with ``masking_keys`` ``keys
    register``. Returns how many consents the ledger holds for the sites."""
    audit.init_consortium(ledger_path, sites)
    held = 0
    for site in sites:
        config_file = simulated_site_config(ledger_path, data_dir, site)
        settings = site_config_ledger(site, config_file)
        synced = consent_sync(settings, data_dir / site, site, study)
        held += synced.active + synced.revoked
        if masking_keys:
            keys_register(settings, site, data_dir / site / MASKING_KEY_FILE)
        log(f"{site}: consents on the ledger for study {study}: {synced.active} active, {synced.revoked} revoked "
            f"({synced.published} published now)")
    return held


def new_job_id(name: str) -> str:
    """A ledger job ID for a simulator run (FLARE's own is ``simulate_job`` for every run)."""
    return f"{name}-{dt.datetime.now(dt.timezone.utc).strftime('%Y%m%dT%H%M%S')}-{secrets.token_hex(3)}"


def server_run_dir(workspace_root: Path, job_name: str) -> Path:
    return Path(workspace_root) / job_name / "server" / "simulate_job"


def run_federated(data_dir: Path, workspace_root: Path, config: DemoConfig, ledger_path: Path | None = None,
                  job_id: str | None = None, recipe: TumourSegFedAvgRecipe | None = None,
                  flare_log_config: Path | None = None) -> Path:
    """Run the FedAvg job in FLARE's SimEnv, one simulated client per site; returns the server run dir.

    Every participant records to the LocalLedger ``ledger_path`` (default ``ledger.sqlite`` in
    ``workspace_root``, prepared here) under ``job_id`` (default: a fresh one). With
    ``flare_log_config`` (see :func:`files_only_log_config`) FLARE logs as that file says, and
    what its code prints goes to ``<workspace>/flare_console.txt``; without, FLARE's defaults
    (everything on the console too).
    """
    from nvflare.recipe.sim_env import SimEnv

    recipe = recipe or config.recipe()
    allow_list_for_simulation(workspace_root, recipe.name)
    if ledger_path is None:
        ledger_path = Path(workspace_root) / LEDGER_FILE
        prepare_ledger(ledger_path, data_dir, site_names(config), log=lambda message: None,
                       masking_keys="mask" in config.privacy, study=config.study)
    # The simulated clients are processes sharing our cores: one thread each avoids thrashing.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    env = SimEnv(clients=site_names(config), num_threads=config.sites, workspace_root=str(workspace_root),
                 log_config=str(Path(flare_log_config).resolve()) if flare_log_config else None)
    with contextlib.ExitStack() as stack:
        stack.enter_context(_environment(**{LEDGER_ENV: str(Path(ledger_path).resolve()),
                                            DATA_ROOT_ENV: str(data_dir.resolve()),
                                            JOB_ID_ENV: job_id or new_job_id(recipe.name)}))
        if flare_log_config:
            # Beside the job's folder, which the simulator empties when it starts.
            console_file = Path(workspace_root) / FLARE_CONSOLE_FILE
            console_file.parent.mkdir(parents=True, exist_ok=True)
            stack.enter_context(contextlib.redirect_stdout(stack.enter_context(console_file.open("a"))))
        run = recipe.execute(env)
        run.get_result()
        # Participants flush their outboxes at the end of the run; deliver anything left (none
        # normally) before the ledger is read.
        for participant in site_names(config) + [COORDINATOR]:
            ledger_settings(participant, ledger=ledger_path).open().close()
    return server_run_dir(workspace_root, recipe.name)


def read_round_log(path: Path) -> list[dict]:
    """The server's round log (:mod:`clinfed.widgets.round_log`), complete lines only."""
    lines = []
    if not path.is_file():
        return lines
    for text in path.read_text().splitlines():
        try:
            lines.append(json.loads(text))
        except ValueError:  # the line being written
            break
    return lines


def round_entry(k: int, rounds: list[dict], final: dict | None = None, final_site_scores: dict | None = None) -> dict:
    """``results.json``'s entry for round ``k`` (1-based): the scores of the model after k
    aggregations, and round k's time. Round k's log line holds the sites' scores of the model after
    k-1 aggregations, so round k is scored by line k+1, or for the last round by ``final`` (this
    evaluation) and ``final_site_scores`` (cross-site evaluation)."""
    if k < len(rounds):
        after, site_scores = rounds[k]["metrics"], rounds[k]["site_metrics"]
    else:
        after, site_scores = final or {}, final_site_scores or {}
    return {
        "round": k,
        "dice": finite_or_none(after.get("dice")),
        "auc": finite_or_none(after.get("auc")),
        "seconds": rounds[k - 1]["seconds"],
        "participants": rounds[k - 1].get("participants", []),
        "site_dice": {site: finite_or_none(m.get("dice")) for site, m in site_scores.items()},
    }


class RoundFollower:
    """Follows the server's round log while the job runs and hands each round to ``on_round`` as
    soon as it is scored (round k when round k+1's line appears; the last one is the caller's,
    after the run)."""

    def __init__(self, round_log: Path, on_round: Callable[[dict], None], poll_interval: float = 0.5):
        self.round_log = round_log
        self.on_round = on_round
        self.poll_interval = poll_interval
        self.reported = 0
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._follow, name="clinfed-round-follower", daemon=True)

    def __enter__(self):
        self.round_log.unlink(missing_ok=True)  # a previous run's log in the same workspace
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self._poll()  # rounds scored while stopping

    def _follow(self) -> None:
        while not self._stop.wait(self.poll_interval):
            self._poll()

    def _poll(self) -> None:
        try:
            rounds = read_round_log(self.round_log)
            while self.reported + 1 < len(rounds):
                self.reported += 1
                self.on_round(round_entry(self.reported, rounds))
        except Exception as err:  # noqa: BLE001 - a watcher must not stop the job; raised after it
            self.error = self.error or err


def verify_on_ledger(ledger_path: Path, job_id: str, model_file: Path, consents: int, log=print) -> dict:
    """``audit verify`` of the run's final model, printed, and the ``results.json`` summary."""
    with ledger_settings(COORDINATOR, ledger=ledger_path).open(outbox=False) as ledger:
        result = audit.verify(ledger, job_id, model_file)
    log(f"$ clinfed audit verify --ledger {ledger_path} --job {job_id} --model {model_file}")
    log(audit.verification_text(result))
    return {"backend": "local", "path": str(ledger_path), "job_id": job_id, "records": result.job.records,
            "consents": consents, "verified": result.ok, "rounds": result.job.rounds,
            "model_sha256": result.model_sha256, "model_round": result.job.model_round,
            "problems": list(result.job.problems)}


def refuse_spent_budgets(data_dir: Path, sites: list[str], study: str = STUDY_ID) -> None:
    """A DP job plans to spend a site's whole budget for the study: a site whose folder already
    records DP-SGD spend would decline every round, so say so before starting."""
    from clinfed.privacy.accounting import budget_file

    for site in sites:
        spent = budget_file(data_dir / site / PRIVACY_DIR_NAME, study=study, site=site, mechanism="dp_sgd")
        if spent.exists():
            raise ClinfedError(f"{spent}: {site} already spent DP budget on study {study} in an earlier run, and "
                               f"spent budget is never given back; run the demo with a fresh --out")


def spend_of_round(contributions: list, round_index: int, sites: list[str]) -> dict:
    """``privacy.per_round``'s entry for the 0-based ``round_index``: each site's cumulative epsilon
    for the study after that round, per unit (None where that mechanism did not run there), and
    each unit's delta."""
    entry = {"round": round_index + 1}
    for unit in UNITS:
        entry[f"{unit}_epsilon"] = {site: None for site in sites}
        entry[f"{unit}_delta"] = None
    for record in contributions:
        if record.round == round_index:
            for unit in UNITS:
                entry[f"{unit}_epsilon"][record.site] = getattr(record, f"{unit}_epsilon")
                delta = getattr(record, f"{unit}_delta")
                if delta is not None:
                    entry[f"{unit}_delta"] = max(delta, entry[f"{unit}_delta"] or 0.0)
    return entry


def privacy_spend(ledger_path: Path, job_id: str, config: DemoConfig) -> dict:
    """Each site's epsilon spent on the study after this job and after each round, per unit of
    protection (never summed), as its contributions recorded it on the ledger (None where that
    mechanism did not run), with each unit's delta."""
    with ledger_settings(COORDINATOR, ledger=ledger_path).open(outbox=False) as ledger:
        records = sorted(ledger.contributions(job_id), key=lambda c: c.round)
    sites = site_names(config)
    units = {}
    for unit in UNITS:
        epsilon = {site: None for site in sites}
        deltas = set()
        for record in records:  # the last round's figure is the total
            if getattr(record, f"{unit}_epsilon") is not None:
                epsilon[record.site] = getattr(record, f"{unit}_epsilon")
                deltas.add(getattr(record, f"{unit}_delta"))
        units[unit] = {"epsilon": epsilon, "delta": max(deltas) if deltas else None}
    return {"mode": config.privacy, "patient_level": units["patient"], "site_level": units["site"],
            "target_epsilon": config.dp_target_epsilon if "dp" in config.privacy else None,
            "masked": "mask" in config.privacy,
            "per_round": [spend_of_round(records, r, sites) for r in range(config.rounds)]}


def read_federated_results(server_run_dir: Path, evaluation: list[Case], config: DemoConfig) -> tuple[dict, dict]:
    rounds = read_round_log(server_run_dir / ROUND_LOG_FILE)
    model_file = next(server_run_dir.rglob("FL_global_model.pt"))
    model = new_model(config.train_config.ehr_size)
    saved = torch.load(model_file, map_location="cpu", weights_only=False)
    load_numpy_state(model, {k: v for k, v in saved["model"].items()})
    final = evaluate(model, make_loader(evaluation, config.train_config, train=False), config.train_config)

    cross_site_file = next(server_run_dir.rglob("cross_val_results.json"), None)
    cross_site = json.loads(cross_site_file.read_text()) if cross_site_file else {}
    final_site_scores = {site: scores.get(SERVER_MODEL_KEY, {}) for site, scores in cross_site.items()}
    per_round = [round_entry(k, rounds, final, final_site_scores) for k in range(1, len(rounds) + 1)]
    initial = rounds[0]["metrics"] if rounds else {}
    return {
        "dice": finite_or_none(final["dice"]),
        "auc": finite_or_none(final["auc"]),
        "initial_dice": finite_or_none(initial.get("dice")),
        "per_round": per_round,
        "model_file": str(model_file),
    }, cross_site


class _SpendReader:
    """Reads a round's spend from the ledger while the job runs, as the coordinator. Without a
    head file: the job's own coordinator client keeps that participant's head, and two clients
    advancing one head file at once could each see the other's newer head as a truncated chain;
    this reader only watches, ``audit verify`` checks the chain after the run."""

    def __init__(self, ledger_path: Path, job_id: str, sites: list[str]):
        from clinfed.ledger import LocalLedger
        from clinfed.ledger.pki import simulation_identity_files
        from clinfed.ledger.settings import COORDINATOR_MSP

        files = simulation_identity_files(ledger_path, COORDINATOR)
        self._ledger = LocalLedger(ledger_path, identity=files.load(COORDINATOR_MSP), trusted_ca=files.ca_pem())
        self._job_id, self._sites = job_id, sites

    def spend(self, entry: dict, wait: float = 10.0) -> dict:
        """The spend after round ``entry`` (a ``per_round`` entry), waiting up to ``wait`` s for
        each participant's contribution (the sites' outboxes deliver in the background)."""
        k = entry["round"]
        deadline = time.monotonic() + wait
        while True:
            records = [c for c in self._ledger.contributions(self._job_id) if c.round == k - 1]
            if {c.site for c in records} >= set(entry["participants"]) or time.monotonic() > deadline:
                return spend_of_round(records, k - 1, self._sites)
            time.sleep(0.5)

    def close(self) -> None:
        self._ledger.close()


def federated_arm(data_dir: Path, out_dir: Path, config: DemoConfig, evaluation: list[Case], watcher: Watcher,
                  flare_logs_to_files: bool = True) -> tuple[dict, dict, dict, dict]:
    """The federated arm: the sites' setup on the ledger, the FLARE job (followed round by round),
    its scores, the privacy spent and the ledger's verification of the final model. Returns
    ``results.json``'s ``federated``, ``cross_site``, ``privacy`` and ``ledger``."""
    names = site_names(config)
    ledger_path = out_dir / LEDGER_FILE
    consents = prepare_ledger(ledger_path, data_dir, names, log=watcher.message, masking_keys="mask" in config.privacy,
                              study=config.study)
    job_id = new_job_id(config.job_name)
    workspace = out_dir / FLARE_WORKSPACE
    initial_ckpt = out_dir / INITIAL_MODEL_FILE
    torch.save(initial_model(config).state_dict(), initial_ckpt)
    log_config = files_only_log_config(workspace) if flare_logs_to_files else None
    if log_config:
        watcher.message(f"FLARE logs: {workspace / config.job_name}/<server|site-N>/log.txt")
    private = config.privacy != "none"
    spend_reader = _SpendReader(ledger_path, job_id, names) if private else None
    with watcher.arm(f"federated ({config.privacy})" if private else "federated", config.rounds, "round") as advance:
        def on_round(entry: dict) -> None:
            watcher.federated_round(entry, spend_reader.spend(entry) if spend_reader else None)
            advance(1)

        try:
            with RoundFollower(server_run_dir(workspace, config.job_name) / ROUND_LOG_FILE, on_round) as follower:
                run_dir = run_federated(data_dir, workspace, config, ledger_path=ledger_path, job_id=job_id,
                                        recipe=config.recipe(initial_ckpt), flare_log_config=log_config)
            if follower.error is not None:
                raise follower.error
            federated, cross_site = read_federated_results(run_dir, evaluation, config)
            privacy = privacy_spend(ledger_path, job_id, config)
            for entry in federated["per_round"][follower.reported:]:  # the last round, scored after the run
                watcher.federated_round(entry, privacy["per_round"][entry["round"] - 1] if private else None)
                advance(1)
        finally:
            if spend_reader:
                spend_reader.close()
    ledger = verify_on_ledger(ledger_path, job_id, Path(federated["model_file"]), consents, log=watcher.message)
    return federated, cross_site, privacy, ledger


def run_experiment(data_dir: Path, out_dir: Path, config: DemoConfig, watcher: Watcher | None = None,
                   flare_logs_to_files: bool = True) -> dict:
    """Run the arms on the sites in ``data_dir``, score them on the test sets beside it
    (:func:`test_data_dir`; FLARE workspace and ledger in ``out_dir``) and return
    ``results.json``'s content (written by the caller)."""
    watcher = watcher or Watcher()
    names = site_names(config)
    if "dp" in config.privacy:
        refuse_spent_budgets(data_dir, names, config.study)
    cohorts = ingest_cohorts(data_dir, config, watcher, test_dir=test_data_dir(data_dir))
    test_loaders = {site: make_loader(cases, config.train_config, train=False) for site, cases in cohorts.test.items()}
    scored: dict[str, dict[str, dict]] = {}  # arm -> test site -> per-case scores

    timings = {}
    started = time.perf_counter()
    with watcher.arm("centralised", config.total_epochs, "epoch") as advance:
        scored["central"] = score_on_test_sets(train_model(cohorts.pooled_train, config, advance), test_loaders,
                                               config)
    timings["central_seconds"] = time.perf_counter() - started

    started = time.perf_counter()
    for name in names:
        with watcher.arm(f"local-only {name}", config.total_epochs, "epoch") as advance:
            scored[f"local-only {name}"] = score_on_test_sets(train_model(cohorts.train[name], config, advance),
                                                              test_loaders, config)
    timings["local_seconds"] = time.perf_counter() - started

    started = time.perf_counter()
    federated, cross_site, privacy, ledger = federated_arm(data_dir, out_dir, config, cohorts.evaluation, watcher,
                                                           flare_logs_to_files)
    model = new_model(config.train_config.ehr_size)
    load_numpy_state(model, torch.load(federated["model_file"], map_location="cpu", weights_only=False)["model"])
    scored["federated"] = score_on_test_sets(model, test_loaders, config)
    timings["federated_seconds"] = time.perf_counter() - started

    seed = config.seed
    federated_validation = {"validation_dice": federated.pop("dice"), "validation_auc": federated.pop("auc")}
    return {
        "config": {**asdict(config), "sites": names, "total_epochs_per_arm": config.total_epochs},
        "comparison": comparison(config, cohorts),
        "site_profiles": {name: site_profile_summary(profile_for_site(i, config.study)) for i, name in enumerate(names)},
        "ingestion": {name: {**{k: cohorts.reports[name][k] for k in ("usable", "excluded", "excluded_by_reason")},
                             "test_usable": cohorts.test_reports[name]["usable"]} for name in names},
        "central": arm_summary(scored["central"], seed),
        "local": {name: arm_summary(scored[f"local-only {name}"], seed) for name in names},
        "federated": {**arm_summary(scored["federated"], seed), **federated_validation, **federated},
        "site_arm": site_arm_table(scored, seed),
        "federated_minus_local": federated_minus_local(
            scored["federated"], {name: scored[f"local-only {name}"] for name in names}, seed),
        "cross_site": cross_site,
        "ledger": ledger,
        "privacy": privacy,
        "timings": timings,
    }
