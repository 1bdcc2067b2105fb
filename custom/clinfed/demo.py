"""The main job: 3 non-IID synthetic sites, centralised vs local-only vs federated (FLARE SimEnv).

All three arms train the same model with the same total epoch budget and are scored on the
same evaluation set: the union of every site's validation split.

``privacy`` applies to the federated arm only (``dp``: DP-SGD at every site under a budget of
``dp_target_epsilon`` for the study; ``mask``: secure masking; ``dp+mask``): the baselines stay
non-private, as the yardstick. With masking, each site's key is created in its data folder and
registered on the ledger before the run.

The federated arm records to a LocalLedger in the output folder (``ledger.sqlite``): the sites'
consents are published first (``consent sync``), the job records contributions, global models
and absences, and the final model file is checked with ``audit verify``.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import secrets
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from clinfed import audit
from clinfed.data.ingest import Case, ingest_site
from clinfed.data.profiles import profile_for_site
from clinfed.data.synth import synthesise
from clinfed.jobs.tumour_seg import (
    DEFAULT_ROUNDS,
    EXTRA_ALLOWED_CLASSES,
    FEDAVG_JOB_NAME,
    PRIVATE_JOB_NAME,
    TumourSegFedAvgRecipe,
)
from clinfed.ledger.settings import COORDINATOR, JOB_ID_ENV, LEDGER_ENV, ledger_settings
from clinfed.training import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_LOCAL_EPOCHS,
    DEFAULT_LR,
    DEFAULT_ROI,
    TrainConfig,
    evaluate,
    finite_or_none,
    load_numpy_state,
    make_loader,
    new_model,
    split_cases,
    train_epochs,
)
from clinfed.errors import ClinfedError
from clinfed.site_config import DATA_ROOT_ENV, MASKING_KEY_FILE, PRIVACY_DIR_NAME
from clinfed.widgets.round_log import ROUND_LOG_FILE

# Cross-site evaluation names the server's final global model by its file.
SERVER_MODEL_KEY = "SRV_FL_global_model.pt"
LEDGER_FILE = "ledger.sqlite"


@dataclass(frozen=True)
class DemoConfig:
    sites: int = 3
    patients: int = 24
    shape: tuple[int, int, int] = (48, 48, 24)
    seed: int = 0
    rounds: int = DEFAULT_ROUNDS
    local_epochs: int = DEFAULT_LOCAL_EPOCHS
    batch_size: int = DEFAULT_BATCH_SIZE
    lr: float = DEFAULT_LR
    roi: tuple[int, int, int] = DEFAULT_ROI
    privacy: str = "none"  # one of clinfed.privacy.PRIVACY_MODES
    dp_target_epsilon: float = 8.0

    @classmethod
    def quick(cls) -> "DemoConfig":
        # Batch 1: twice the optimiser steps of the default in the same time, which three short
        # rounds need to get the averaged model past predicting background.
        return cls(patients=12, shape=(32, 32, 16), rounds=3, local_epochs=1, batch_size=1)

    @property
    def train_config(self) -> TrainConfig:
        return TrainConfig(epochs=self.local_epochs, batch_size=self.batch_size, lr=self.lr, roi=self.roi)

    @property
    def job_name(self) -> str:
        return FEDAVG_JOB_NAME if self.privacy == "none" else PRIVATE_JOB_NAME

    def recipe(self) -> TumourSegFedAvgRecipe:
        """The federated job of this configuration (the committed jobs with the demo's sizes)."""
        return TumourSegFedAvgRecipe(name=self.job_name, min_clients=self.sites, num_rounds=self.rounds,
                                     local_epochs=self.local_epochs, batch_size=self.batch_size, lr=self.lr,
                                     roi=self.roi, privacy=self.privacy, dp_target_epsilon=self.dp_target_epsilon)

    @property
    def total_epochs(self) -> int:
        """Epoch budget of every arm: a federated site sees rounds x local_epochs epochs."""
        return self.rounds * self.local_epochs


def site_names(config: DemoConfig) -> list[str]:
    return [profile_for_site(i).name for i in range(config.sites)]


def _train_and_score(train: list[Case], evaluation: list[Case], config: DemoConfig) -> dict:
    torch.manual_seed(config.seed)
    model = new_model()
    full_budget = TrainConfig(**{**asdict(config.train_config), "epochs": config.total_epochs})
    train_epochs(model, make_loader(train, full_budget, train=True), full_budget)
    scores = evaluate(model, make_loader(evaluation, full_budget, train=False))
    return {"dice": finite_or_none(scores["dice"]), "auc": finite_or_none(scores["auc"])}


def allow_list_for_simulation(workspace_root: Path, job_name: str) -> None:
    """SimEnv enforces a class allow-list for non-BYOC jobs: admit FLARE's defaults plus ours."""
    from nvflare.app_common.default_component_policy import DEFAULT_CLASS_ALLOW_LIST

    local = workspace_root / job_name / "local"
    local.mkdir(parents=True, exist_ok=True)
    allowed = list(DEFAULT_CLASS_ALLOW_LIST) + ["clinfed."] + list(EXTRA_ALLOWED_CLASSES)
    (local / "resources.json").write_text(json.dumps({"format_version": 2, "class_allow_list": allowed}, indent=2))


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


def prepare_ledger(ledger_path: Path, data_dir: Path, sites: list[str], log=print, masking_keys: bool = False) -> int:
    """Initialise the consortium on a LocalLedger file and publish every site's consents, each as
    its own site (``consent sync``), and with ``masking_keys`` its masking key (``keys register``);
    returns how many consents the ledger holds for the sites."""
    from clinfed.data.profiles import STUDY_ID

    audit.init_consortium(ledger_path, sites)
    held = 0
    for site in sites:
        settings = ledger_settings(site, ledger=ledger_path)
        with settings.open(outbox=False) as ledger:
            synced = audit.sync_consents(data_dir / site, ledger, site)
            held += synced.active + synced.revoked
            if masking_keys:
                audit.register_masking_key(ledger, site, data_dir / site / MASKING_KEY_FILE)
        log(f"{site}: consents on the ledger for study {STUDY_ID}: {synced.active} active, {synced.revoked} revoked "
            f"({synced.published} published now)")
    return held


def new_job_id(name: str) -> str:
    """A ledger job ID for a simulator run (FLARE's own is ``simulate_job`` for every run)."""
    return f"{name}-{dt.datetime.now(dt.timezone.utc).strftime('%Y%m%dT%H%M%S')}-{secrets.token_hex(3)}"


def run_federated(data_dir: Path, workspace_root: Path, config: DemoConfig, ledger_path: Path | None = None,
                  job_id: str | None = None, recipe: TumourSegFedAvgRecipe | None = None) -> Path:
    """Run the FedAvg job in FLARE's SimEnv, one simulated client per site; returns the server run dir.

    Every participant records to the LocalLedger ``ledger_path`` (default ``ledger.sqlite`` in
    ``workspace_root``, prepared here) under ``job_id`` (default: a fresh one).
    """
    from nvflare.recipe.sim_env import SimEnv

    recipe = recipe or config.recipe()
    allow_list_for_simulation(workspace_root, recipe.name)
    if ledger_path is None:
        ledger_path = Path(workspace_root) / LEDGER_FILE
        prepare_ledger(ledger_path, data_dir, site_names(config), log=lambda message: None,
                       masking_keys="mask" in config.privacy)
    # The simulated clients are processes sharing our cores: one thread each avoids thrashing.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    env = SimEnv(clients=site_names(config), num_threads=config.sites, workspace_root=str(workspace_root))
    with _environment(**{LEDGER_ENV: str(Path(ledger_path).resolve()), DATA_ROOT_ENV: str(data_dir.resolve()),
                         JOB_ID_ENV: job_id or new_job_id(recipe.name)}):
        run = recipe.execute(env)
        run.get_result()
        # Participants flush their outboxes at the end of the run; deliver anything left (none
        # normally) before the ledger is read.
        for participant in site_names(config) + [COORDINATOR]:
            ledger_settings(participant, ledger=ledger_path).open().close()
    return Path(workspace_root) / recipe.name / "server" / "simulate_job"


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


def refuse_spent_budgets(data_dir: Path, sites: list[str]) -> None:
    """A DP job plans to spend a site's whole budget for the study: a site whose folder already
    records DP-SGD spend would decline every round, so say so before starting."""
    from clinfed.data.profiles import STUDY_ID
    from clinfed.privacy.accounting import budget_file

    for site in sites:
        spent = budget_file(data_dir / site / PRIVACY_DIR_NAME, study=STUDY_ID, site=site, mechanism="dp_sgd")
        if spent.exists():
            raise ClinfedError(f"{spent}: {site} already spent DP budget on study {STUDY_ID} in an earlier run, and "
                               f"spent budget is never given back; run the demo with a fresh --out")


def privacy_spend(ledger_path: Path, job_id: str, config: DemoConfig) -> dict:
    """Each site's epsilon spent on the study after this job, per unit of protection (never
    summed), as its contributions recorded it on the ledger (None where that mechanism did not run),
    with each unit's delta."""
    with ledger_settings(COORDINATOR, ledger=ledger_path).open(outbox=False) as ledger:
        records = sorted(ledger.contributions(job_id), key=lambda c: c.round)
    units = {}
    for unit in ("patient", "site"):
        epsilon = {site: None for site in site_names(config)}
        deltas = set()
        for record in records:  # the last round's figure is the total
            if getattr(record, f"{unit}_epsilon") is not None:
                epsilon[record.site] = getattr(record, f"{unit}_epsilon")
                deltas.add(getattr(record, f"{unit}_delta"))
        units[unit] = {"epsilon": epsilon, "delta": max(deltas) if deltas else None}
    return {"mode": config.privacy, "patient_level": units["patient"], "site_level": units["site"],
            "target_epsilon": config.dp_target_epsilon if "dp" in config.privacy else None,
            "masked": "mask" in config.privacy}


def read_federated_results(server_run_dir: Path, evaluation: list[Case], config: DemoConfig) -> tuple[dict, dict]:
    rounds = [json.loads(line) for line in (server_run_dir / ROUND_LOG_FILE).read_text().splitlines() if line]
    model_file = next(server_run_dir.rglob("FL_global_model.pt"))
    model = new_model()
    saved = torch.load(model_file, map_location="cpu", weights_only=False)
    load_numpy_state(model, {k: v for k, v in saved["model"].items()})
    final = evaluate(model, make_loader(evaluation, config.train_config, train=False))

    cross_site_file = next(server_run_dir.rglob("cross_val_results.json"), None)
    cross_site = json.loads(cross_site_file.read_text()) if cross_site_file else {}

    # Round k's line holds the sites' scores of the model after k-1 aggregations; its time is round k's.
    per_round = []
    for k in range(1, len(rounds) + 1):
        after = rounds[k]["metrics"] if k < len(rounds) else {"dice": final["dice"], "auc": final["auc"]}
        site_scores = rounds[k]["site_metrics"] if k < len(rounds) else {
            site: scores.get(SERVER_MODEL_KEY, {}) for site, scores in cross_site.items()}
        per_round.append({
            "round": k,
            "dice": finite_or_none(after.get("dice")),
            "auc": finite_or_none(after.get("auc")),
            "seconds": rounds[k - 1]["seconds"],
            "site_dice": {site: finite_or_none(m.get("dice")) for site, m in site_scores.items()},
        })
    initial = rounds[0]["metrics"] if rounds else {}
    return {
        "dice": finite_or_none(final["dice"]),
        "auc": finite_or_none(final["auc"]),
        "initial_dice": finite_or_none(initial.get("dice")),
        "per_round": per_round,
        "model_file": str(model_file),
    }, cross_site


def run_demo(out_dir: Path, config: DemoConfig, log=print) -> dict:
    out_dir.mkdir(parents=True, exist_ok=True)
    data_dir = out_dir / "data"
    names = site_names(config)
    if not all((data_dir / name / "fhir").is_dir() for name in names):
        log(f"generating {config.sites} non-IID sites x {config.patients} patients in {data_dir}")
        synthesise(data_dir, config.sites, config.patients, config.shape, config.seed)

    if "dp" in config.privacy:
        refuse_spent_budgets(data_dir, names)
    train_by_site, val_by_site, reports = {}, {}, {}
    for name in names:
        ingestion = ingest_site(data_dir / name)
        reports[name] = ingestion.report()
        train_by_site[name], val_by_site[name] = split_cases(ingestion.cases)
        log(f"{name}: {len(train_by_site[name])} train, {len(val_by_site[name])} validation, "
            f"excluded {reports[name]['excluded_by_reason']}")
    evaluation = [c for name in names for c in val_by_site[name]]

    timings = {}
    started = time.perf_counter()
    log("training centralised baseline on the pooled training data")
    central = _train_and_score([c for n in names for c in train_by_site[n]], evaluation, config)
    timings["central_seconds"] = time.perf_counter() - started

    local = {}
    started = time.perf_counter()
    for name in names:
        log(f"training local-only baseline at {name}")
        local[name] = _train_and_score(train_by_site[name], evaluation, config)
    timings["local_seconds"] = time.perf_counter() - started

    log(f"running federated FedAvg in FLARE SimEnv ({config.rounds} rounds, privacy: {config.privacy}), "
        f"recording to the local ledger")
    started = time.perf_counter()
    ledger_path = out_dir / LEDGER_FILE
    consents = prepare_ledger(ledger_path, data_dir, names, log=log, masking_keys="mask" in config.privacy)
    job_id = new_job_id(config.job_name)
    server_run_dir = run_federated(data_dir, out_dir / "flare_workspace", config, ledger_path=ledger_path,
                                   job_id=job_id)
    federated, cross_site = read_federated_results(server_run_dir, evaluation, config)
    timings["federated_seconds"] = time.perf_counter() - started
    ledger = verify_on_ledger(ledger_path, job_id, Path(federated["model_file"]), consents, log=log)

    results = {
        "config": {**asdict(config), "sites": names, "evaluation_set": "union of the sites' validation splits",
                   "evaluation_cases": len(evaluation), "total_epochs_per_arm": config.total_epochs},
        "ingestion": {name: {k: reports[name][k] for k in ("usable", "excluded", "excluded_by_reason")}
                      for name in names},
        "central": central,
        "local": local,
        "federated": federated,
        "cross_site": cross_site,
        "ledger": ledger,
        "privacy": privacy_spend(ledger_path, job_id, config),
        "timings": timings,
    }
    (out_dir / "results.json").write_text(json.dumps(results, indent=2))
    plot_results(results, out_dir)
    return results


def plot_results(results: dict, out_dir: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    per_round = results["federated"]["per_round"]
    fig, ax = plt.subplots(figsize=(6, 4))
    rounds = [r["round"] for r in per_round]
    sites = sorted({s for r in per_round for s in r["site_dice"]})
    for site in sites:
        ax.plot(rounds, [r["site_dice"].get(site) for r in per_round], marker="o", label=site)
    ax.plot(rounds, [r["dice"] for r in per_round], marker="s", color="black", label="all sites")
    ax.set(xlabel="federated round", ylabel="validation Dice (global model)", title="Federated Dice per round",
           ylim=(0, 1), xticks=rounds)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_dir / "dice_per_round.png", dpi=120)
    plt.close(fig)

    arms = ["central", "federated"] + [f"local {s}" for s in results["local"]]
    values = [results["central"], results["federated"]] + list(results["local"].values())
    fig, ax = plt.subplots(figsize=(7, 4))
    x = np.arange(len(arms))
    ax.bar(x - 0.2, [v["dice"] or 0 for v in values], width=0.4, label="Dice")
    ax.bar(x + 0.2, [v["auc"] or 0 for v in values], width=0.4, label="outcome AUC")
    ax.set_xticks(x, arms, rotation=20)
    ax.set(ylim=(0, 1), title="Final scores on the shared evaluation set")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_dir / "final_scores.png", dpi=120)
    plt.close(fig)


def results_table(results: dict) -> str:
    def fmt(v):
        return "   n/a" if v is None else f"{v:6.3f}"

    lines = [f"{'arm':<22}{'Dice':>8}{'AUC':>8}", "-" * 38]
    lines.append(f"{'centralised':<22}{fmt(results['central']['dice']):>8}{fmt(results['central']['auc']):>8}")
    federated_arm = "federated" + ("" if results.get("privacy", {}).get("mode", "none") == "none"
                                   else f" ({results['privacy']['mode']})")
    lines.append(f"{federated_arm:<22}{fmt(results['federated']['dice']):>8}{fmt(results['federated']['auc']):>8}")
    for site, scores in results["local"].items():
        lines.append(f"{'local-only ' + site:<22}{fmt(scores['dice']):>8}{fmt(scores['auc']):>8}")
    lines.append("")
    lines.append("federated Dice per round: " + ", ".join(
        f"r{r['round']}={fmt(r['dice']).strip()}" for r in results["federated"]["per_round"]))
    privacy = results.get("privacy") or {}
    for unit, label in (("patient_level", "patient-level (DP-SGD)"), ("site_level", "site-level (update DP)")):
        spend = privacy.get(unit) or {}
        if any(v is not None for v in spend.get("epsilon", {}).values()):
            lines.append(f"{label} epsilon spent at delta {spend['delta']:.2g}: "
                         + ", ".join(f"{site} {fmt(eps).strip()}" for site, eps in spend["epsilon"].items()))
    if privacy.get("masked"):
        lines.append("every round was securely aggregated: the server only ever opened the sum of the sites' updates")
    ledger = results.get("ledger")
    if ledger:
        lines.append(f"ledger ({ledger['backend']}, {ledger['path']}): job {ledger['job_id']}, {ledger['records']} "
                     f"records, {ledger['consents']} consents, final model "
                     f"{'VERIFIED' if ledger['verified'] else 'NOT VERIFIED'}")
    return "\n".join(lines)
