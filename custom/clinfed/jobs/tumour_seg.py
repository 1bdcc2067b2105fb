"""The tumour-segmentation FedAvg job, defined once in Python and exported into ``jobs/``.

Every component is an installed class (``clinfed.*`` or ``nvflare.*``), so the exported job has
no ``app/custom`` code and is not a BYOC job; sites admit it through their class allow-list.

The job records to the audit ledger: the server's ``LedgerRecorder`` writes each round's global
model and absences, each site's ``ContributionRecorder`` (a result filter on ``train``) its own
contribution. Which ledger and identity is each participant's own configuration
(:mod:`clinfed.ledger.settings`); the job names neither.

Privacy (``privacy``): ``dp`` trains with DP-SGD at every site under a per-site budget for the
study (``SegExecutor``'s ``dp_*`` arguments); ``mask`` runs every round as secure aggregation
(``SecAggFedAvg`` at the server, ``SecAggClient`` around each site's ``SegExecutor``): the server
only ever opens the sum of the surviving sites' updates; ``dp+mask`` both. ``mask_noise_multiplier``
adds update-level DP inside the mask (each site's share of Skellam noise). A masked job has no
cross-site evaluation: it would send every site's local model in clear. Sites impose more through
their own privacy policy (``clinfed_site.json``, ``local/privacy.json``), whatever the job asks.
"""

from __future__ import annotations

from pathlib import Path

from nvflare.app_common.app_constant import AppConstants
from nvflare.app_common.workflows.cross_site_model_eval import CrossSiteModelEval
from nvflare.job_config.defs import FilterType
from nvflare.app_opt.pt.file_model_persistor import PTFileModelPersistor
from nvflare.app_opt.pt.job_config.base_fed_job import BaseFedJob
from nvflare.recipe.spec import Recipe

from clinfed import arguments
from clinfed.aggregators.fedavg import WeightedFedAvg
from clinfed.data.profiles import BRAIN_STUDY_ID, STUDY_ID
from clinfed.data.study import load_study
from clinfed.executors.secagg_client import SecAggClient
from clinfed.executors.seg_executor import SegExecutor
from clinfed.filters.contribution_record import ContributionRecorder
from clinfed.privacy.secagg import SETUP_TASK, UNMASK_TASK
from clinfed.models.fusion_seg import FusionSegNet
from clinfed.privacy import PRIVACY_MODES
from clinfed.training import DEFAULT_BATCH_SIZE, DEFAULT_LOCAL_EPOCHS, DEFAULT_LR
from clinfed.widgets.ledger_recorder import LedgerRecorder
from clinfed.widgets.round_log import RoundLogWriter
from clinfed.workflows.fedavg import FedAvg
from clinfed.workflows.secagg_fedavg import SecAggFedAvg

FEDAVG_JOB_NAME = "tumour_seg_fedavg"
DEFAULT_ROUNDS = 16
# FLARE's workflows check for results every 0.5 s by default, so any work a round adds (masking,
# DP filters) costs a whole period; at 0.05 s a round ends within 0.05 s of its last result.
TASK_CHECK_PERIOD = 0.05
# A site asks for its next task this long after finishing one (FLARE's server default: 2 s, which
# a secure-aggregation round, two tasks, would pay twice).
TASK_REQUEST_INTERVAL = 0.05
PRIVATE_JOB_NAME = "tumour_seg_private"
BRAIN_JOB_NAME = "brain_mr_tumour_fedavg"
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
        study: the study definition the sites ingest and train under (its name; the executor
            finds ``<study>.yml`` at each site); it also sizes the model's EHR input.
        batch_size, lr, roi: passed to ``SegExecutor`` (roi None: the study's).
        cross_site_eval: add the final cross-site evaluation.
        ledger_policy: outbox policy of the job's ledger records: ``async`` (training goes on
            while a record waits for the ledger) or ``strict`` (a round waits for its records);
            None keeps each participant's configured policy.
        privacy: one of ``PRIVACY_MODES`` (see the module docstring).
        dp_target_epsilon: each site's DP-SGD budget for the study (``dp`` modes).
        dp_max_grad_norm: DP-SGD per-sample clipping bound.
        mask_clip_range: the per-coordinate range of the updates in masked fixed point (``mask``
            modes; the L2 bound of a site's update with ``mask_noise_multiplier``); larger values
            are clipped (the site logs it).
        mask_weight_bound: bound on the sum of the sites' ``n_samples`` in the first masked round.
        mask_noise_multiplier: update-level DP inside the mask: sigma of the Skellam noise on the
            sum (0: none). Each site checks it against its own policy.
        initial_ckpt: absolute path, on the server, of the starting weights (a state dict); None:
            the persistor's freshly initialised model. The demo passes the initialisation its
            centralised and local arms start from.
    """

    def __init__(self, *, name: str = FEDAVG_JOB_NAME, min_clients: int = 3, num_rounds: int = DEFAULT_ROUNDS,
                 local_epochs: int = DEFAULT_LOCAL_EPOCHS, batch_size: int = DEFAULT_BATCH_SIZE, lr: float = DEFAULT_LR,
                 roi: tuple[int, int, int] | None = None, cross_site_eval: bool = True, study: str = STUDY_ID,
                 ledger_policy: str | None = None, privacy: str = "none", dp_target_epsilon: float = 8.0,
                 dp_max_grad_norm: float = 1.0, mask_clip_range: float = 0.5, mask_weight_bound: float = 1e4,
                 mask_noise_multiplier: float = 0.0, initial_ckpt: str | None = None):
        # The recipe's own arguments; the executor and the workflows check theirs when built.
        arguments.choice("privacy", privacy, PRIVACY_MODES)
        arguments.positive_int("min_clients", min_clients)
        arguments.positive_int("num_rounds", num_rounds)
        dp, mask = privacy in ("dp", "dp+mask"), privacy in ("mask", "dp+mask")
        model = FusionSegNet(ehr_features=load_study(study).ehr_size)
        persistor = PTFileModelPersistor(model=model, source_ckpt_file_full_name=initial_ckpt) if initial_ckpt else None
        job = BaseFedJob(initial_model=model, name=name, min_clients=min_clients, key_metric="dice",
                         model_persistor=persistor)
        persistor_id = job.comp_ids["persistor_id"]
        if mask:
            workflow = SecAggFedAvg(num_clients=min_clients, num_rounds=num_rounds, persistor_id=persistor_id,
                                    encoding="dp" if mask_noise_multiplier else "exact", clip=mask_clip_range,
                                    weight_bound=mask_weight_bound, noise_multiplier=mask_noise_multiplier,
                                    task_check_period=TASK_CHECK_PERIOD)
        else:
            # A site that declines (its privacy budget or policy) is left out of the round, not fatal.
            workflow = FedAvg(num_clients=min_clients, num_rounds=num_rounds, persistor_id=persistor_id,
                              aggregator=WeightedFedAvg(), task_check_period=TASK_CHECK_PERIOD,
                              ignore_result_error=True)
        job.to_server(workflow)
        job.to_server({"server": {"task_request_interval": TASK_REQUEST_INTERVAL}})
        job.to_server(RoundLogWriter(), id="round_log")
        job.to_server(LedgerRecorder(persistor_id=persistor_id,
                                     aggregation="masked_weighted_fedavg" if mask else "weighted_fedavg",
                                     policy=ledger_policy), id="ledger_recorder")
        if cross_site_eval and not mask:
            job.to_server(CrossSiteModelEval(model_locator_id=job.comp_ids["locator_id"]))
        dp_args = {"dp_target_epsilon": dp_target_epsilon, "dp_max_grad_norm": dp_max_grad_norm} if dp else {}
        trainer = SegExecutor(study=study, local_epochs=local_epochs, batch_size=batch_size, lr=lr,
                              roi=None if roi is None else list(roi), **dp_args)
        if mask:
            job.to_clients(SecAggClient(trainer=trainer), tasks=["train", "validate", SETUP_TASK, UNMASK_TASK])
        else:
            job.to_clients(trainer, tasks=["train", "validate", "submit_model"])
        # The hash of exactly the bytes the site sends: the masked input in a masked job.
        job.to_clients(ContributionRecorder(policy=ledger_policy), filter_type=FilterType.TASK_RESULT,
                       tasks=[AppConstants.TASK_TRAIN])
        # Installed packages: referenced by class path, never copied into app/custom (no BYOC).
        job.set_app_packages(["clinfed", "fhir_adapter"])
        super().__init__(job)


def export_jobs(jobs_dir: Path) -> list[Path]:
    """Write every committed job folder under ``jobs_dir`` (the repository's ``jobs/``)."""
    recipes = [TumourSegFedAvgRecipe(), TumourSegFedAvgRecipe(name=PRIVATE_JOB_NAME, privacy="dp+mask"),
               TumourSegFedAvgRecipe(name=BRAIN_JOB_NAME, study=BRAIN_STUDY_ID)]
    for recipe in recipes:
        recipe.export(str(jobs_dir))
    return [jobs_dir / recipe.name for recipe in recipes]
