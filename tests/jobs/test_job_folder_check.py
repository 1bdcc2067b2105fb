"""``clinfed jobs check``: a broken job folder is named by file and field before FLARE sees it;
a good folder checked in the same call is still reported OK."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from clinfed.cli import main
from clinfed.jobs.tumour_seg import export_jobs

SERVER = Path("app/config/config_fed_server.json")
CLIENT = Path("app/config/config_fed_client.json")


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("jobs")
    return {path.name: path for path in export_jobs(root)}


def _edit_json(path: Path, change) -> None:
    content = json.loads(path.read_text())
    change(content)
    path.write_text(json.dumps(content, indent=2))


def _write(path: Path, text: str) -> None:
    path.write_text(text)


def _server_workflow_args(job: Path, **args) -> None:
    _edit_json(job / SERVER, lambda c: c["workflows"][0]["args"].update(args))


def _client_executor_args(job: Path, **args) -> None:
    _edit_json(job / CLIENT, lambda c: c["executors"][0]["executor"]["args"].update(args))


BAD_JOB_FOLDERS = [
    # (case, damage, file the message names, what it must say)
    ("meta.json not JSON", lambda j: _write(j / "meta.json", '{"name": "x",\n "deploy_map": {"app": ["@ALL"]},,\n}'),
     "meta.json:2", "not valid JSON"),
    ("meta.json duplicate key", lambda j: _write(j / "meta.json", '{"name": "a", "name": "b", "deploy_map": '
                                                                  '{"app": ["@ALL"]}}'),
     "meta.json", "duplicate key 'name'"),
    ("meta.json a list", lambda j: _write(j / "meta.json", "[]"), "meta.json", "must hold a JSON object"),
    ("meta.json missing", lambda j: (j / "meta.json").unlink(), "meta.json", "cannot read it"),
    ("no deploy_map", lambda j: _edit_json(j / "meta.json", lambda m: m.pop("deploy_map")), "meta.json",
     "field 'deploy_map'"),
    ("deploy_map to a missing app", lambda j: _edit_json(j / "meta.json", lambda m: m.update(
        deploy_map={"app_other": ["@ALL"]})), "meta.json", "names app 'app_other'"),
    ("min_clients 0", lambda j: _edit_json(j / "meta.json", lambda m: m.update(min_clients=0)), "meta.json",
     "field 'min_clients' must be an integer >= 1"),
    ("scope not a name", lambda j: _edit_json(j / "meta.json", lambda m: m.update(scope=["strict"])), "meta.json",
     "field 'scope'"),
    ("BYOC app/custom", lambda j: (j / "app" / "custom").mkdir(), "app/custom", "BYOC"),
    ("server config not JSON", lambda j: _write(j / SERVER, '{"format_version": 2,\n "workflows": [\n'),
     "config_fed_server.json:3", "not valid JSON"),
    ("client config NaN", lambda j: _write(j / CLIENT, (j / CLIENT).read_text().replace(
        '"format_version": 2', '"format_version": 2, "x": NaN')), "config_fed_client.json", "NaN"),
    ("format_version 1", lambda j: _edit_json(j / SERVER, lambda c: c.update(format_version=1)),
     "config_fed_server.json", "field 'format_version' must be 2"),
    ("num_rounds -1", lambda j: _server_workflow_args(j, num_rounds=-1), "config_fed_server.json",
     "field 'workflows[0]' (clinfed.workflows.fedavg.FedAvg): ArgumentError: num_rounds: must be >= 1, got -1"),
    ("lr 0", lambda j: _client_executor_args(j, lr=0), "config_fed_client.json",
     "field 'executors[0].executor' (clinfed.executors.seg_executor.SegExecutor): ArgumentError: lr: must be > 0"),
    ("local_epochs 0", lambda j: _client_executor_args(j, local_epochs=0), "config_fed_client.json",
     "local_epochs: must be >= 1, got 0"),
    ("roi not a multiple of 16", lambda j: _client_executor_args(j, roi=[30, 30, 16]), "config_fed_client.json",
     "roi: each side must be a multiple of 16"),
    ("unknown executor argument", lambda j: _client_executor_args(j, epochs=3), "config_fed_client.json",
     "unexpected keyword argument 'epochs'"),
    ("nonexistent class", lambda j: _edit_json(j / SERVER, lambda c: c["components"].append(
        {"id": "x", "path": "clinfed.nothing.Nope", "args": {}})), "config_fed_server.json",
     "field 'components[7]' (clinfed.nothing.Nope): class cannot be loaded"),
    ("nonexistent nested aggregator", lambda j: _server_workflow_args(
        j, aggregator={"path": "clinfed.aggregators.fedavg.NoSuchAggregator", "args": {}}),
     "config_fed_server.json", "NoSuchAggregator"),
    ("component without a path", lambda j: _edit_json(j / CLIENT, lambda c: c["executors"][0]["executor"].pop(
        "path")), "config_fed_client.json", "field 'executors[0].executor' must be a component"),
    ("filter with a bad argument", lambda j: _edit_json(j / CLIENT, lambda c: c["task_result_filters"][0][
        "filters"][0]["args"].update(policy="eventually")), "config_fed_client.json",
     "task_result_filters[0].filters[0]"),
]


@pytest.mark.parametrize("case,damage,file,problem", BAD_JOB_FOLDERS, ids=[b[0] for b in BAD_JOB_FOLDERS])
def test_bad_job_folder_is_named_and_the_good_one_beside_it_checked(exported, tmp_path, capsys, case, damage, file,
                                                                   problem):
    bad = tmp_path / "bad_job"
    shutil.copytree(exported["tumour_seg_fedavg"], bad)
    damage(bad)
    good = exported["tumour_seg_private"]
    assert main(["jobs", "check", str(bad), str(good)]) == 1
    captured = capsys.readouterr()
    errors = [line for line in captured.err.splitlines() if line.startswith("clinfed: error: ")]
    assert errors, captured.err
    assert any(str(bad) in line and file in line and problem in line for line in errors), errors
    assert "Traceback" not in captured.err
    assert f"{good}: OK" in captured.out  # the good folder was still checked


def test_every_problem_of_a_folder_is_reported_at_once(exported, tmp_path, capsys):
    bad = tmp_path / "bad_job"
    shutil.copytree(exported["tumour_seg_fedavg"], bad)
    _server_workflow_args(bad, num_rounds=0)
    _client_executor_args(bad, lr=-1, batch_size=0)  # the executor stops at its first bad argument
    _edit_json(bad / "meta.json", lambda m: m.update(min_clients=-2))
    assert main(["jobs", "check", str(bad), "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] is False and len(report["problems"]) == 3, report["problems"]
    assert [p for p in report["problems"] if "min_clients" in p] and [p for p in report["problems"] if "num_rounds" in p]


def test_committed_jobs_pass_the_check(capsys):
    repo = Path(__file__).resolve().parents[2]
    assert main(["jobs", "check", str(repo / "jobs" / "tumour_seg_fedavg"), str(repo / "jobs" / "tumour_seg_private")]) == 0
    assert capsys.readouterr().out.count(": OK (") == 2
