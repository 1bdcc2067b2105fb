"""Shared pieces of the consortium tests: a consortium file on a free port, tiny jobs."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
CONSORTIUM_YML = REPO / "provisioning" / "consortium.yml"
LEAD = "lead@coordinator.org"
MEMBER = "member@hospital-1.org"
ROI = (32, 32, 16)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def consortium_dict() -> dict:
    return yaml.safe_load(CONSORTIUM_YML.read_text())


def write_consortium(path: Path, raw: dict) -> Path:
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


# site-1's policy (consortium.yml) requires update-level DP of at least this noise, at most this clip.
UPDATE_DP = {"mask_noise_multiplier": 1.0, "mask_clip_range": 0.5}


def export_private_job(jobs_dir: Path, name: str = "tiny_private", num_rounds: int = 2,
                       scope: str | None = "strict", num_clients: int = 3, train_timeout: int = 0) -> Path:
    """A tiny job with secure aggregation and update-level DP inside the mask, no DP-SGD, asking
    for the sites' ``strict`` scope."""
    from nvflare.app_common.app_constant import AppConstants
    from nvflare.app_opt.pt.job_config.base_fed_job import BaseFedJob
    from nvflare.job_config.defs import FilterType

    from clinfed.executors.secagg_client import SecAggClient
    from clinfed.jobs.tumour_seg import TASK_REQUEST_INTERVAL
    from clinfed.executors.seg_executor import SegExecutor
    from clinfed.filters.contribution_record import ContributionRecorder
    from clinfed.models.fusion_seg import FusionSegNet
    from clinfed.privacy.secagg import SETUP_TASK, UNMASK_TASK
    from clinfed.widgets.ledger_recorder import LedgerRecorder
    from clinfed.workflows.secagg_fedavg import SecAggFedAvg

    job = BaseFedJob(initial_model=FusionSegNet(), name=name, min_clients=num_clients, key_metric="dice")
    persistor_id = job.comp_ids["persistor_id"]
    job.to_server(SecAggFedAvg(num_clients=num_clients, num_rounds=num_rounds, persistor_id=persistor_id,
                               encoding="dp", clip=UPDATE_DP["mask_clip_range"], weight_bound=1e3,
                               noise_multiplier=UPDATE_DP["mask_noise_multiplier"], train_timeout=train_timeout))
    job.to_server({"server": {"task_request_interval": TASK_REQUEST_INTERVAL}})
    job.to_server(LedgerRecorder(persistor_id=persistor_id, aggregation="secagg_fedavg"), id="ledger_recorder")
    trainer = SegExecutor(local_epochs=1, batch_size=2, lr=2e-3, roi=list(ROI))
    job.to_clients(SecAggClient(trainer=trainer), tasks=["train", "validate", SETUP_TASK, UNMASK_TASK])
    job.to_clients(ContributionRecorder(), filter_type=FilterType.TASK_RESULT, tasks=[AppConstants.TASK_TRAIN])
    job.set_app_packages(["clinfed", "fhir_adapter"])
    job.export_job(str(jobs_dir))
    return set_scope(jobs_dir / name, scope)


def export_tumour_seg_private(jobs_dir: Path, name: str = "tiny_tumour_seg_private", num_rounds: int = 2,
                              scope: str | None = None) -> Path:
    """A tiny variant of ``jobs/tumour_seg_private`` (the same recipe, ``privacy="dp+mask"``): DP-SGD
    in the executor, secure aggregation with the update-level DP site-1 requires."""
    from clinfed.jobs.tumour_seg import TumourSegFedAvgRecipe

    recipe = TumourSegFedAvgRecipe(name=name, min_clients=3, num_rounds=num_rounds, local_epochs=1, batch_size=2,
                                   roi=ROI, privacy="dp+mask", mask_weight_bound=1e3, **UPDATE_DP)
    recipe.export(str(jobs_dir))
    return set_scope(jobs_dir / name, scope)


def export_plain_job(jobs_dir: Path, name: str = "tiny_plain", num_rounds: int = 1, scope: str | None = None) -> Path:
    """The plain FedAvg job (no privacy filters of its own), tiny."""
    from clinfed.jobs.tumour_seg import TumourSegFedAvgRecipe

    recipe = TumourSegFedAvgRecipe(name=name, min_clients=3, num_rounds=num_rounds, local_epochs=1, batch_size=2,
                                   roi=ROI, cross_site_eval=False)
    recipe.export(str(jobs_dir))
    return set_scope(jobs_dir / name, scope)


def admin_console(kit: Path, username: str, commands: list[str], timeout: float = 120.0) -> str:
    """Run FLARE's admin console from an admin's startup kit (``startup/fl_admin.sh``), typing the
    user name and ``commands``; returns what it printed."""
    import subprocess

    from clinfed.consortium.provision import tool_env

    script = "\n".join([username, *commands, "bye"]) + "\n"
    proc = subprocess.run(["bash", str(Path(kit) / "startup" / "fl_admin.sh")], input=script, text=True,
                          capture_output=True, cwd=kit, env=tool_env(), timeout=timeout)
    return proc.stdout + proc.stderr


def set_scope(job_dir: Path, scope: str | None) -> Path:
    meta_file = job_dir / "meta.json"
    meta = json.loads(meta_file.read_text())
    if scope is None:
        meta.pop("scope", None)
    else:
        meta["scope"] = scope
    meta_file.write_text(json.dumps(meta, indent=2))
    return job_dir
