"""``consortium status`` on a consortium's files: every job is listed (an unreadable one too), and
every failed job gets a cause or says where none was found. The same reading runs against real
FLARE processes in test_consortium_deployment.py; here the files are laid out as FLARE leaves them."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pytest

from clinfed.cli import main
from clinfed.consortium import trial

JOB = "9014f73e-e3e2-47d2-a088-6f9787c5df35"
# FLARE 2.9's line for a component it could not build, as the server logged it in our real run.
REFUSED = ("2026-11-29 09:23:32,601 - ServerAppRunner - ERROR - FL server execution exception: ConfigError: "
           "Error processing '/x/prod_00/server/" + JOB + "/app_server/config/config_fed_server.json' in element "
           "'{\"id\": \"x\", \"path\": \"clinfed.nothing.Nope\", \"args\": {}}': path: 'components.#8', "
           "exception: 'TypeError: Can't load class clinfed.nothing.Nope: No module named 'clinfed.nothing''\n")


@pytest.fixture
def consortium_dir(tmp_path) -> Path:
    kits = {name: tmp_path / "kits" / name for name in ("server", "site-1", "site-2")}
    for kit in kits.values():
        kit.mkdir(parents=True)
    state = {"consortium": "c", "server": "server", "sites": ["site-1", "site-2"], "host": "localhost", "port": 1,
             "kits": {k: str(v) for k, v in kits.items()}, "server_storage": str(tmp_path / "server-storage"),
             "leads": ["lead@c.org"]}
    (tmp_path / "provisioning.json").write_text(json.dumps(state))
    return tmp_path


def _job(out: Path, job_id: str, meta: dict | bytes) -> Path:
    folder = out / "server-storage" / "jobs-storage" / job_id
    folder.mkdir(parents=True)
    (folder / "meta").write_bytes(meta if isinstance(meta, bytes) else json.dumps(meta).encode())
    return folder


def test_cause_in_the_servers_zipped_workspace_is_found_and_said_in_one_line(consortium_dir, capsys):
    folder = _job(consortium_dir, JOB, {"job_id": JOB, "name": "noclass", "status": "FINISHED:EXECUTION_EXCEPTION",
                                        "job_deploy_detail": ["server: OK", "site-1: OK", "site-2: OK"]})
    with zipfile.ZipFile(folder / "workspace", "w") as archive:
        archive.writestr("log.txt", "2026-11-29 09:23:30,000 - INFO - starting\n" + REFUSED)
    [job] = trial.status(consortium_dir, query_server=False)["jobs"]
    [cause] = job["causes"]
    assert cause["participant"] == "server" and cause["kind"] == "job_config"
    assert cause["evidence"] == ["config_fed_server.json components.#8 (clinfed.nothing.Nope): TypeError: Can't load "
                                 "class clinfed.nothing.Nope: No module named 'clinfed.nothing'"]
    assert cause["log"] == f"{folder / 'workspace'}!log.txt"
    assert main(["consortium", "status", str(consortium_dir)]) == 0
    assert "cause at server: the job's configuration was refused" in capsys.readouterr().out


def test_failed_job_without_any_cause_says_where_it_looked(consortium_dir):
    _job(consortium_dir, JOB, {"job_id": JOB, "name": "quiet", "status": "FINISHED:ABORTED"})
    [job] = trial.status(consortium_dir, query_server=False)["jobs"]
    assert job["causes"] == [] and "no error in the logs of server, site-1, site-2" in job["no_cause_found"]
    assert "cause: no error in the logs" in trial.status_text(trial.status(consortium_dir, query_server=False))


def test_a_job_whose_meta_is_unreadable_is_listed_not_dropped(consortium_dir):
    _job(consortium_dir, "aaaa", {"job_id": "aaaa", "name": "fine", "status": "FINISHED:COMPLETED", "submit_time": 1})
    _job(consortium_dir, "bbbb", b"\x00\x01 not json")
    jobs = {j["job_id"]: j for j in trial.status(consortium_dir, query_server=False)["jobs"]}
    assert jobs["aaaa"]["status"] == "FINISHED:COMPLETED"
    assert jobs["bbbb"]["status"].startswith("UNKNOWN (unreadable ") and "bbbb/meta" in jobs["bbbb"]["status"]
