"""The tumour-segmentation FedAvg job, defined once in Python and exported into ``jobs/``.

Every component is an installed class (``clinfed.*`` or ``nvflare.*``), so the exported job has
no ``app/custom`` code and is not a BYOC job; sites admit it through their class allow-list.

The job records to the audit ledger: the server's ``LedgerRecorder`` writes each round's global
model and absences, each site's ``ContributionRecorder`` (a result filter on ``train``) its own
contribution. Which ledger and identity is each participant's own configuration
(:mod:`clinfed.audit`); the job names neither.
"""

from __future__ import annotations

from pathlib import Path

from nvflare.app_common.app_constant import AppConstants
from nvflare.app_common.workflows.cross_site_model_eval import CrossSiteModelEval
from nvflare.job_config.defs import FilterType
from nvflare.app_common.workflows.fedavg import FedAvg
from nvflare.app_opt.pt.job_config.base_fed_job import BaseFedJob
from nvflare.recipe.spec import Recipe

from clinfed.aggregators.fedavg import WeightedFedAvg
from clinfed.executors.seg_executor import SegExecutor
from clinfed.filters.contribution_record import ContributionRecorder
from clinfed.models.fusion_seg import FusionSegNet
from clinfed.widgets.ledger_recorder import LedgerRecorder
from clinfed.widgets.round_log import RoundLogWriter

FEDAVG_JOB_NAME = "tumour_seg_fedavg"
# Classes outside clinfed. that our jobs use and FLARE's default allow-list lacks.
EXTRA_ALLOWED_CLASSES = ("nvflare.app_opt.pt.file_model_persistor.PTFileModelPersistor",
                         "nvflare.app_opt.pt.file_model_locator.PTFileModelLocator")


class TumourSegFedAvgRecipe(Recipe):
    """FedAvg over the sites' ``SegExecutor`` with best-model selection on validation Dice and
    a final cross-site evaluation (every site scores the global and every local model).

    Args:
        name: job name.
        min_clients: sites needed for a round.
        num_rounds: federated rounds.
        local_epochs: epochs per site per round.
        batch_size, lr, roi: passed to ``SegExecutor``.
        cross_site_eval: add the final cross-site evaluation.
        ledger_policy: outbox policy of the job's ledger records: ``async`` (training goes on
            while a record waits for the ledger) or ``strict`` (a round waits for its records);
            None keeps each participant's configured policy.
    """

    def __init__(self, *, name: str = FEDAVG_JOB_NAME, min_clients: int = 3, num_rounds: int = 8,
                 local_epochs: int = 2, batch_size: int = 2, lr: float = 5e-3,
                 roi: tuple[int, int, int] = (32, 32, 16), cross_site_eval: bool = True,
                 ledger_policy: str | None = None):
        job = BaseFedJob(initial_model=FusionSegNet(), name=name, min_clients=min_clients, key_metric="dice")
        job.to_server(FedAvg(num_clients=min_clients, num_rounds=num_rounds,
                             persistor_id=job.comp_ids["persistor_id"], aggregator=WeightedFedAvg()))
        job.to_server(RoundLogWriter(), id="round_log")
        job.to_server(LedgerRecorder(persistor_id=job.comp_ids["persistor_id"], aggregation="weighted_fedavg",
                                     policy=ledger_policy), id="ledger_recorder")
        if cross_site_eval:
            job.to_server(CrossSiteModelEval(model_locator_id=job.comp_ids["locator_id"]))
        job.to_clients(SegExecutor(local_epochs=local_epochs, batch_size=batch_size, lr=lr, roi=list(roi)),
                       tasks=["train", "validate", "submit_model"])
        job.to_clients(ContributionRecorder(policy=ledger_policy), filter_type=FilterType.TASK_RESULT,
                       tasks=[AppConstants.TASK_TRAIN])
        # Installed packages: referenced by class path, never copied into app/custom (no BYOC).
        job.set_app_packages(["clinfed", "fhir_adapter"])
        super().__init__(job)


def export_jobs(jobs_dir: Path) -> list[Path]:
    """Write every committed job folder under ``jobs_dir`` (the repository's ``jobs/``)."""
    recipe = TumourSegFedAvgRecipe()
    recipe.export(str(jobs_dir))
    return [jobs_dir / recipe.name]
