"""One real FLARE simulator run (2 sites, 2 rounds) recording to a LocalLedger, shared by the
audit tests. Between its rounds a patient of site-1 opts out: the hospital's FHIR export gets a
revoking Consent and ``consent sync`` publishes it, while the job is running."""

from __future__ import annotations

import hashlib
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from audit_helpers import SITES, read_jsonl, revoke_in_fhir_export
from clinfed import audit
from clinfed.data.synth import synthesise
from clinfed.experiment import DemoConfig, new_job_id, prepare_ledger, run_federated
from clinfed.jobs.tumour_seg import TumourSegFedAvgRecipe
from clinfed.ledger.settings import ledger_settings

CONFIG = DemoConfig(sites=2, patients=10, shape=(32, 32, 16), seed=3, rounds=2, local_epochs=2)
# Fixed pseudonymisation keys (normally random secrets) fix the train/validation split: with this
# seed each site validates on two patients, so every round has a key metric and a best model.
SITE_KEYS = {"site-1": "clinfed-e2e-site-1-1", "site-2": "clinfed-e2e-site-2-0"}


@dataclass
class RecordedRun:
    root: Path
    data_dir: Path
    ledger_path: Path
    job_id: str
    server_run_dir: Path
    workspace: Path
    victim: str | None = None
    revoked_after_round: int | None = None
    seconds: float = 0.0
    watcher_error: list = field(default_factory=list)

    @property
    def model_file(self) -> Path:
        return next(self.server_run_dir.rglob("FL_global_model.pt"))

    def cohort_log(self, site: str) -> list[dict]:
        return read_jsonl(next((self.workspace / site).rglob("clinfed_cohort.jsonl")))


def _revoke_between_rounds(run: RecordedRun, stop: threading.Event) -> None:
    """As soon as site-1 logs its round-0 cohort, revoke one of those patients through the
    site's own channel (FHIR export + consent sync), before round 1 can start."""
    try:
        while not stop.is_set():
            for log in (run.workspace / "site-1").rglob("clinfed_cohort.jsonl"):
                round0 = [line for line in read_jsonl(log) if line["round"] == 0 and line["task"] == "train"]
                if round0:
                    victim = round0[0]["train"][0]
                    revoke_in_fhir_export(run.data_dir / "site-1", victim)
                    with ledger_settings("site-1", ledger=run.ledger_path).open(outbox=False) as ledger:
                        synced = audit.sync_consents(run.data_dir / "site-1", ledger, "site-1")
                    assert synced.published == 1, synced
                    run.victim, run.revoked_after_round = victim, 0
                    return
            time.sleep(0.05)
    except Exception as err:  # noqa: BLE001 - reported by the test that needs the revocation
        run.watcher_error.append(repr(err))


@pytest.fixture(scope="session")
def recorded_run(tmp_path_factory) -> RecordedRun:
    root = tmp_path_factory.mktemp("audit_run")
    data_dir = root / "data"
    for site, seed in SITE_KEYS.items():
        (data_dir / site).mkdir(parents=True)
        (data_dir / site / "site_secret.key").write_text(hashlib.sha256(seed.encode()).hexdigest() + "\n")
    synthesise(data_dir, CONFIG.sites, CONFIG.patients, CONFIG.shape, CONFIG.seed)
    ledger_path = root / "ledger.sqlite"
    prepare_ledger(ledger_path, data_dir, SITES, log=lambda message: None)
    recipe = TumourSegFedAvgRecipe(min_clients=CONFIG.sites, num_rounds=CONFIG.rounds,
                                   local_epochs=CONFIG.local_epochs, cross_site_eval=False)
    job_id = new_job_id("audit-test")
    workspace = root / "flare_workspace"
    run = RecordedRun(root, data_dir, ledger_path, job_id, workspace / recipe.name / "server" / "simulate_job",
                      workspace / recipe.name)
    stop = threading.Event()
    watcher = threading.Thread(target=_revoke_between_rounds, args=(run, stop), daemon=True)
    watcher.start()
    started = time.perf_counter()
    try:
        run_federated(data_dir, workspace, CONFIG, ledger_path=ledger_path, job_id=job_id, recipe=recipe)
    finally:
        stop.set()
        watcher.join(30)
    run.seconds = time.perf_counter() - started
    return run
