"""A consortium on a LocalLedger with each site's own masking key registered by the site, and a
runner for secure-aggregation jobs in FLARE's simulator."""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from unittest import mock

import numpy as np
from nvflare.fuel.utils import fobs
from nvflare.job_config.api import FedJob
from nvflare.job_config.defs import FilterType
from secagg_parts import SIZE, ScriptedTrainer

from clinfed import audit
from clinfed.executors.secagg_client import SecAggClient
from clinfed.filters.release_guard import ReleaseGuard
from clinfed.ledger.settings import LEDGER_ENV, ledger_settings
from clinfed.site_config import DATA_ROOT_ENV
from clinfed.workflows.secagg_fedavg import SecAggFedAvg


def site_names(n: int) -> list[str]:
    return [f"site-{i}" for i in range(1, n + 1)]


class Consortium:
    def __init__(self, root: Path, sites: list[str], initialise: bool = True):
        """``initialise``: the coordinator records the consortium as these sites (a test that
        records another consortium itself passes False)."""
        self.root, self.sites = root, sites
        self.ledger = root / "ledger.sqlite"
        self.keys = {site: root / site / "masking_key.pem" for site in sites}
        if initialise:
            audit.init_consortium(self.ledger, sites)
        for site in sites:
            with ledger_settings(site, ledger=self.ledger).open(outbox=False) as ledger:
                audit.register_masking_key(ledger, site, self.keys[site])

    @contextmanager
    def environment(self):
        """This consortium's ledger, and no data root: each site keeps its secure-aggregation state
        in the job's own workspace (a data root left by an earlier test in the process, e.g. by
        ``clinfed.experiment.run_federated``, would share it across tests, whose simulator jobs all
        have the id ``simulate_job``)."""
        with mock.patch.dict(os.environ, {LEDGER_ENV: str(self.ledger)}):  # restores the whole environment
            os.environ.pop(DATA_ROOT_ENV, None)
            yield

    def run(self, workflow: SecAggFedAvg | None = None, trainers: dict | None = None, rounds: int = 1,
            name: str = "secagg") -> Path:
        """Run a job of ``rounds`` rounds, every site under the strict scope's release guard (the
        simulator applies no site privacy scopes, so the job carries it); returns the workspace."""
        trainers = trainers or {}
        workflow = workflow or SecAggFedAvg(num_clients=len(self.sites), num_rounds=rounds, persistor_id="",
                                            model={"w": [0.0] * SIZE}, weight_bound=500.0, setup_timeout=120,
                                            train_timeout=120, unmask_timeout=120)
        job = FedJob(name=name, min_clients=len(self.sites))
        job.set_app_packages(["clinfed", "fhir_adapter"])  # installed: never copied into app/custom
        job.to_server(workflow)
        for site in self.sites:
            client = SecAggClient(trainer=trainers.get(site) or ScriptedTrainer(), private_key_file=str(self.keys[site]))
            tasks = ["train", "secagg_setup", "secagg_unmask"]
            job.to(client, site, tasks=tasks)
            job.to(ReleaseGuard(), site, filter_type=FilterType.TASK_RESULT, tasks=tasks)
        workspace = self.root / f"workspace-{name}"
        with self.environment():
            job.simulator_run(str(workspace), threads=len(self.sites))
        return workspace


def final_model(workspace: Path) -> np.ndarray | None:
    saved = list(workspace.rglob("FL_global_model.pt"))
    return np.asarray(fobs.loadf(str(saved[0])).params["w"], dtype=np.float64) if saved else None


def logs(workspace: Path, participant: str) -> str:
    return "\n".join(p.read_text(errors="replace") for p in workspace.rglob("log.txt") if participant in p.parts)
