"""The committed job folders are exactly what the Python job definitions export."""

import filecmp
import json
from pathlib import Path

from clinfed.jobs.tumour_seg import TASK_REQUEST_INTERVAL, export_jobs

REPO = Path(__file__).resolve().parents[2]


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_committed_jobs_match_their_python_definitions(tmp_path):
    exported = export_jobs(tmp_path)
    assert exported, "no job exported"
    for job_dir in exported:
        committed = REPO / "jobs" / job_dir.name
        assert committed.is_dir(), f"jobs/{job_dir.name} is not committed; run `clinfed jobs export`"
        assert _tree(committed) == _tree(job_dir), (
            f"jobs/{job_dir.name} differs from its Python definition; run `clinfed jobs export` and commit")


def test_exported_job_is_not_byoc_and_names_installed_classes(tmp_path):
    job_dir = export_jobs(tmp_path)[0]
    assert not (job_dir / "app" / "custom").exists(), "a job with app/custom is BYOC"
    client = json.loads((job_dir / "app" / "config" / "config_fed_client.json").read_text())
    server = json.loads((job_dir / "app" / "config" / "config_fed_server.json").read_text())
    assert client["executors"][0]["executor"]["path"] == "clinfed.executors.seg_executor.SegExecutor"
    assert server["workflows"][0]["args"]["aggregator"]["path"] == "clinfed.aggregators.fedavg.WeightedFedAvg"
    # Site data locations come from the site, never from the job.
    assert "data" not in json.dumps(client["executors"][0]["executor"]["args"])


def test_changed_definition_is_detected(tmp_path):
    """The comparison above would notice a drift: a different round count changes the export."""
    from clinfed.jobs.tumour_seg import TumourSegFedAvgRecipe

    TumourSegFedAvgRecipe(num_rounds=3).export(str(tmp_path / "other"))
    default = export_jobs(tmp_path / "default")[0]
    assert not filecmp.cmp(default / "app" / "config" / "config_fed_server.json",
                           tmp_path / "other" / default.name / "app" / "config" / "config_fed_server.json",
                           shallow=False)


def test_private_job_runs_secure_aggregation_around_dp_sgd_and_has_no_cross_site_evaluation(tmp_path):
    job_dir = next(d for d in export_jobs(tmp_path) if d.name == "tumour_seg_private")
    assert not (job_dir / "app" / "custom").exists(), "a job with app/custom is BYOC"
    client = json.loads((job_dir / "app" / "config" / "config_fed_client.json").read_text())
    server = json.loads((job_dir / "app" / "config" / "config_fed_server.json").read_text())
    executor = client["executors"][0]
    assert executor["executor"]["path"] == "clinfed.executors.secagg_client.SecAggClient"
    trainer = executor["executor"]["args"]["trainer"]
    assert trainer["path"] == "clinfed.executors.seg_executor.SegExecutor"
    assert trainer["args"]["dp_target_epsilon"] > 0
    # submit_model would send a site's local model in clear: a masked job does not serve it.
    assert sorted(executor["tasks"]) == ["secagg_setup", "secagg_unmask", "train", "validate"]
    assert [w["path"] for w in server["workflows"]] == ["clinfed.workflows.secagg_fedavg.SecAggFedAvg"]
    # Sites ask for their next task 0.05 s after the last, not FLARE's 2 s: a round is two tasks.
    assert server["server"]["task_request_interval"] == TASK_REQUEST_INTERVAL == 0.05
    # The contribution record hashes the bytes the site sends: the masked input.
    result_filters = [f["path"] for group in client["task_result_filters"] for f in group["filters"]]
    assert result_filters == ["clinfed.filters.contribution_record.ContributionRecorder"]


def test_each_jobs_server_model_is_the_model_its_sites_build_for_the_study(tmp_path):
    """The server's initial model is built from the exported config, the sites' from their study
    definition: a job for a study with another EHR vector must carry that size, or every site
    fails to load the global model (the brain study's job once sent the liver study's model)."""
    from clinfed.data.study import load_study
    from clinfed.models.fusion_seg import FusionSegNet
    from clinfed.training import new_model

    for job_dir in export_jobs(tmp_path):
        server = json.loads((job_dir / "app" / "config" / "config_fed_server.json").read_text())
        client = json.loads((job_dir / "app" / "config" / "config_fed_client.json").read_text())
        persistor = next(c for c in server["components"] if c["id"] == "persistor")
        model_args = persistor["args"]["model"]["args"]
        study = client["executors"][0]["executor"]["args"].get("study", "clinfed-tumour-seg")
        server_shapes = {k: v.shape for k, v in FusionSegNet(**model_args).state_dict().items()}
        site_shapes = {k: v.shape for k, v in new_model(load_study(study).ehr_size).state_dict().items()}
        assert server_shapes == site_shapes, f"{job_dir.name}: the server's model is not the {study} sites' model"
