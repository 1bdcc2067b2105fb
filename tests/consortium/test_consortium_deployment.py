"""A real consortium on this machine: provisioned from consortium.yml, server and three sites as
separate FLARE processes started from their startup kits, jobs submitted through the FLARE API.

site-1 accepts only the strict scope (nothing but masked inputs of secure aggregation leaves it)
and requires update-level DP inside the mask; the others accept public and strict, public by
default. Every site makes its own masking key and registers it on the ledger itself.
"""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path

import pytest
from consortium_helpers import (CONSORTIUM_YML, LEAD, MEMBER, admin_console, consortium_dict, export_plain_job,
                                export_private_job, export_tumour_seg_private, free_port, write_consortium)

from clinfed import audit
from clinfed.consortium import trial
from clinfed.consortium.cli import add_consortium_commands
from clinfed.consortium.provision import load_state
from clinfed.ledger.settings import COORDINATOR, ledger_settings

SITES = ["site-1", "site-2", "site-3"]
# After the last round the server waits this long for a stopped site's end-of-run report.
OUTCOME_WAIT = 15
pytestmark = pytest.mark.timeout(900)


def _cli(*argv: str, capsys=None) -> str:
    parser = argparse.ArgumentParser(prog="clinfed")
    add_consortium_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(list(argv))
    assert args.func(args) == 0
    return capsys.readouterr().out if capsys is not None else ""


def _site_ledger(state: dict, participant: str):
    kit = state["kits"][state["server"] if participant == COORDINATOR else participant]
    return ledger_settings(participant, site_config_dir=Path(kit) / "local").open(outbox=False)


def _run(out: Path, job_dir: Path, timeout: float = 420.0) -> tuple[str, dict, float]:
    """Submit as the lead, wait for the end; returns the job ID, its meta and the seconds taken."""
    with trial.admin_session(out) as session:
        started = time.monotonic()
        job_id = session.submit_job(str(job_dir))
        session.monitor_job(job_id, timeout=timeout, poll_interval=1.0)
        return job_id, session.get_job_meta(job_id), time.monotonic() - started


@pytest.fixture(scope="module")
def consortium(tmp_path_factory):
    from clinfed.data.synth import synthesise

    root = tmp_path_factory.mktemp("consortium")
    out, data = root / "trial", root / "data"
    # 10 patients a site: the validation split follows pseudonyms keyed by a fresh random secret,
    # and with 6 (4 usable) a site drew all of them into validation now and then (no one to train).
    synthesise(data, 4, 10, (32, 32, 16), 1)
    definition = consortium_dict()
    definition["coordinator"]["client_outcome_wait_timeout"] = OUTCOME_WAIT
    consortium_yml = write_consortium(root / "consortium.yml", definition)
    started = time.monotonic()
    parser = argparse.ArgumentParser()
    add_consortium_commands(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["consortium", "provision", str(consortium_yml), "--out", str(out), "--data-root",
                              str(data), "--port", str(free_port()), "--json"])
    assert args.func(args) == 0
    provision_seconds = time.monotonic() - started
    state = load_state(out)
    from clinfed.cli import main

    # Each site, as itself: creates and registers its masking key, publishes its patients' consents.
    for site in state["sites"]:
        site_config = Path(state["kits"][site]) / "local" / "clinfed_site.json"
        assert main(["keys", "register", "--site", site, "--site-config", str(site_config), "--json"]) == 0
        with _site_ledger(state, site) as ledger:
            assert audit.sync_consents(data / site, ledger, site).active > 0
    try:
        result = trial.up(out, sites=SITES, timeout=180)
        yield {"out": out, "data": data, "state": state, "root": root, "provision_seconds": provision_seconds,
               "up_seconds": result.seconds_to_connected}
    finally:
        trial.down(out)


def test_provisioned_kits_hold_the_site_policies(consortium):
    out, state = consortium["out"], consortium["state"]
    assert state["sites"] == ["site-1", "site-2", "site-3", "site-4"] and state["leads"] == [LEAD]
    for name in [state["server"], *state["sites"], LEAD, MEMBER]:
        assert (Path(state["kits"][name]) / "startup").is_dir(), name
    site1 = Path(state["kits"]["site-1"]) / "local"
    # Made by the site itself (the fixture ran `clinfed keys register` as each site), not provisioning.
    assert (site1 / "masking_key.pem").stat().st_mode & 0o777 == 0o600
    assert json.loads((site1 / "privacy.json").read_text())["default_scope"] == "strict"
    assert json.loads((site1 / "authorization.json").read_text())["permissions"]["lead"]["byoc"] == "none"
    assert "clinfed." in json.loads((site1 / "resources.json").read_text())["class_allow_list"]
    site_config = json.loads((site1 / "clinfed_site.json").read_text())
    assert site_config["data_dir"] == str(consortium["data"].resolve() / "site-1")
    assert site_config["privacy"]["studies"][state["study"]]["update_dp"]["noise_multiplier"] == 1.0
    server_resources = (Path(state["kits"][state["server"]]) / "local" / "resources.json").read_text()
    assert "/tmp/nvflare" not in server_resources and state["server_storage"] in server_resources
    with _site_ledger(state, "site-2") as ledger:  # registered on the ledger, each by its site
        registered = ledger.site_keys()
    assert sorted(registered) == state["sites"]
    assert {k.recorded_by for k in registered.values()} == {f"Site{i}MSP" for i in range(1, 5)}
    assert json.loads((out / "fabric" / "flare_to_fabric.json").read_text())["site-2"] == "Site2MSP"
    print(f"provisioning {consortium['provision_seconds']:.1f} s; start to sites connected "
          f"{consortium['up_seconds']:.1f} s")


def test_private_job_through_the_flare_api_and_each_site_verifies_it(consortium, tmp_path, capsys):
    """A tiny ``jobs/tumour_seg_private`` (DP-SGD, secure aggregation with update-level DP inside
    the mask) naming no scope: site-1 runs it under its strict scope, the others as it is."""
    out, state = consortium["out"], consortium["state"]
    job_dir = export_tumour_seg_private(tmp_path / "jobs", num_rounds=2)
    job_id, meta, seconds = _run(out, job_dir)
    assert meta["status"] == "FINISHED:COMPLETED", trial.status_text(trial.status(out, query_server=False))

    with trial.admin_session(out) as session:
        result_dir = Path(session.download_job_result(job_id))
    model_file = next(result_dir.rglob("FL_global_model.pt"))

    # Every site reads the ledger with its own identity and verifies the job and the final model.
    for participant in [*SITES, COORDINATOR]:
        with _site_ledger(state, participant) as ledger:
            verified = audit.verify(ledger, job_id, model_file)
            assert verified.ok, (participant, verified.job.problems)
            assert verified.matched_rounds == [1]
    with _site_ledger(state, "site-1") as ledger:
        rows = audit.contributions(ledger, job_id)
    assert sorted((r["round"], r["site"]) for r in rows) == [(r, s) for r in (0, 1) for s in SITES]
    # Both units recorded at every site, separately: DP-SGD (patient) and update DP (site).
    assert all(r.get("patient_epsilon") and r.get("site_epsilon") for r in rows), rows
    # What each site recorded is the masked input it sent.
    assert {r["hash_stage"] for r in rows} == {"after_masking"}, rows
    site1_log = "\n".join(p.read_text(errors="replace") for p in (Path(state["kits"]["site-1"]) / job_id).rglob("log.txt"))
    assert "round 1: update-level DP (site level" in site1_log and "round 1: masked input sent" in site1_log

    # The site operator's command, with the site's own configuration and identity.
    from clinfed.cli import main

    capsys.readouterr()
    site_config = Path(state["kits"]["site-2"]) / "local" / "clinfed_site.json"
    assert main(["audit", "verify", "--site-config", str(site_config), "--as", "site-2", "--job", job_id,
                 "--model", str(model_file), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["verified"] is True

    report = json.loads(_cli("consortium", "status", str(out), "--json", capsys=capsys))
    assert report["connected_sites"] == SITES
    assert any(j["job_id"] == job_id and j["status"] == "FINISHED:COMPLETED" for j in report["jobs"])
    print(f"tiny tumour_seg_private, 2 rounds: submit to finished {seconds:.1f} s")


def test_job_asking_for_the_strict_scope_gets_it_at_every_site(consortium, tmp_path):
    """A job that asks for ``strict`` (meta ``scope``): every site's guard lets out only masked
    inputs, and the server opens only their sum."""
    out, state = consortium["out"], consortium["state"]
    job_dir = export_private_job(tmp_path / "jobs", num_rounds=1, scope="strict")
    job_id, meta, _ = _run(out, job_dir)
    assert meta["status"] == "FINISHED:COMPLETED", trial.status_text(trial.status(out, query_server=False))
    with _site_ledger(state, "site-2") as ledger:
        rows = audit.contributions(ledger, job_id)
        assert audit.verify(ledger, job_id).ok
    assert sorted(r["site"] for r in rows) == SITES
    assert all(r.get("site_epsilon") and r["hash_stage"] == "after_masking" for r in rows), rows


def test_job_naming_a_scope_the_site_lacks_is_refused_at_deploy(consortium, tmp_path, capsys):
    """Submitted from the admin console this time (``submit_job`` typed at the prompt)."""
    out, state = consortium["out"], consortium["state"]
    # site-1 defines only "strict": a job asking for "public" is refused there.
    job_dir = export_plain_job(tmp_path / "jobs", name="tiny_public", scope="public")
    printed = admin_console(Path(state["kits"][LEAD]), LEAD, [f"submit_job {job_dir}"])
    submitted = re.search(r"Submitted job: ([0-9a-f-]{36})", printed)
    assert submitted, printed
    job_id = submitted.group(1)
    with trial.admin_session(out) as session:
        session.monitor_job(job_id, timeout=120, poll_interval=1.0)
        meta = session.get_job_meta(job_id)
    assert meta["status"] == "FINISHED:FAILED_TO_RUN"
    assert "site-1: NVFLARE_ERROR: privacy scope 'public' is not allowed" in meta["job_deploy_detail"]
    assert "site-2: OK" in meta["job_deploy_detail"]
    job = next(j for j in trial.status(out, query_server=False)["jobs"] if j["job_id"] == job_id)
    assert [(c["participant"], c["kind"]) for c in job["causes"]] == [("site-1", "privacy_scope")]
    text = _cli("consortium", "status", str(out), capsys=capsys)
    assert "the job names a privacy scope this site does not define" in text


def test_component_off_the_allow_list_is_refused_and_status_says_why(consortium, tmp_path):
    """A non-BYOC job that asks a site to run a subprocess launcher: the sites refuse the
    component (deploy says OK, the job ends ABNORMAL); ``status`` shows the cause from the site logs."""
    out = consortium["out"]
    job_dir = export_plain_job(tmp_path / "jobs", name="tiny_launcher", scope="strict")
    client_config = job_dir / "app" / "config" / "config_fed_client.json"
    config = json.loads(client_config.read_text())
    config.setdefault("components", []).append(
        {"id": "launcher", "path": "nvflare.app_common.launchers.subprocess_launcher.SubprocessLauncher",
         "args": {"script": "bash -c id"}})
    client_config.write_text(json.dumps(config, indent=2))
    job_id, meta, _ = _run(out, job_dir, timeout=180)
    assert meta["status"] == "FINISHED:ABNORMAL"
    job = next(j for j in trial.status(out, query_server=False)["jobs"] if j["job_id"] == job_id)
    refused = {c["participant"]: c for c in job["causes"] if c["kind"] == "allow_list"}
    assert set(refused) == set(SITES), job["causes"]
    assert re.search(r"SubprocessLauncher' at config path 'components\.#\d+' is not in allow_list",
                     refused["site-1"]["evidence"][0]), refused["site-1"]["evidence"]
    assert "not on this participant's class allow-list" in trial.status_text(trial.status(out, query_server=False))


def _edit_config(job_dir: Path, name: str, change) -> None:
    path = job_dir / "app" / "config" / name
    config = json.loads(path.read_text())
    change(config)
    path.write_text(json.dumps(config, indent=2))


def test_bad_job_arguments_fail_at_deploy_and_status_names_them(consortium, tmp_path, capsys):
    """``num_rounds: -1`` in the server config (FLARE's own FedAvg ran zero rounds and reported
    COMPLETED) and ``lr: 0`` in the client config: both jobs fail when FLARE builds them, and
    ``consortium status`` names the argument at each participant that refused it."""
    out, state = consortium["out"], consortium["state"]
    rounds_job = export_plain_job(tmp_path / "jobs", name="tiny_negative_rounds", scope="strict")
    _edit_config(rounds_job, "config_fed_server.json", lambda c: c["workflows"][0]["args"].update(num_rounds=-1))
    lr_job = export_plain_job(tmp_path / "jobs", name="tiny_zero_lr", scope="strict")
    _edit_config(lr_job, "config_fed_client.json", lambda c: c["executors"][0]["executor"]["args"].update(lr=0))

    rounds_id, meta, seconds = _run(out, rounds_job, timeout=180)
    assert meta["status"] == "FINISHED:EXECUTION_EXCEPTION", meta["status"]
    lr_id, lr_meta, _ = _run(out, lr_job, timeout=180)
    assert lr_meta["status"] == "FINISHED:ABNORMAL", lr_meta["status"]

    jobs = {j["job_id"]: j for j in trial.status(out, query_server=False)["jobs"]}
    [server_cause] = jobs[rounds_id]["causes"]
    assert server_cause["participant"] == state["server"]
    assert "num_rounds: must be >= 1, got -1" in server_cause["evidence"][0]
    assert "jobs-storage" in server_cause["log"]  # read from the server's zipped job workspace
    site_causes = {c["participant"]: c for c in jobs[lr_id]["causes"]}
    assert set(site_causes) == set(SITES), jobs[lr_id]["causes"]
    for cause in site_causes.values():
        assert cause["kind"] == "job_config"
        assert cause["evidence"] == ["config_fed_client.json executors.#1.executor "
                                     "(clinfed.executors.seg_executor.SegExecutor): ArgumentError: lr: must be > 0, got 0"]
    text = _cli("consortium", "status", str(out), capsys=capsys)
    assert "num_rounds: must be >= 1, got -1" in text and "lr: must be > 0, got 0" in text
    with _site_ledger(state, COORDINATOR) as ledger:  # nothing ran, nothing was recorded
        assert audit.models(ledger, rounds_id) == [] and audit.contributions(ledger, lr_id) == []
    print(f"num_rounds -1: submit to failed {seconds:.1f} s")


def test_unknown_class_in_the_server_config_shows_its_cause(consortium, tmp_path):
    """A job naming a class that does not exist ends EXECUTION_EXCEPTION with every deploy
    detail OK; the cause is only in the server's job workspace, which FLARE zips into its job store."""
    out, state = consortium["out"], consortium["state"]
    job_dir = export_plain_job(tmp_path / "jobs", name="tiny_unknown_class", scope="strict")
    _edit_config(job_dir, "config_fed_server.json", lambda c: c["components"].append(
        {"id": "typo", "path": "clinfed.widgets.round_log.RoundLogWritter", "args": {}}))
    job_id, meta, _ = _run(out, job_dir, timeout=180)
    assert meta["status"] == "FINISHED:EXECUTION_EXCEPTION"
    assert all(detail.endswith(": OK") for detail in meta["job_deploy_detail"])
    job = next(j for j in trial.status(out, query_server=False)["jobs"] if j["job_id"] == job_id)
    causes = {c["participant"]: c for c in job["causes"]}
    assert causes[state["server"]]["kind"] == "job_config"
    assert "RoundLogWritter" in causes[state["server"]]["evidence"][0]
    assert "config_fed_server.json components." in causes[state["server"]]["evidence"][0]
    assert "Can't load class" in causes[state["server"]]["evidence"][0]


def test_member_cannot_submit(consortium, tmp_path):
    from nvflare.fuel.flare_api.api_spec import AuthorizationError

    job_dir = export_plain_job(tmp_path / "jobs", name="tiny_member")
    with trial.admin_session(consortium["out"], username=MEMBER) as session:
        with pytest.raises(AuthorizationError, match="not authorized for 'submit_job'"):
            session.submit_job(str(job_dir))
        assert not [j for j in session.list_jobs() if j.get("job_name") == "tiny_member"]


def test_strict_site_releases_nothing_unmasked_for_a_job_without_privacy(consortium, tmp_path):
    """A plain FedAvg job names no scope and has no secure aggregation; site-1's default (strict)
    scope's guard replaces its weight difference by an error reply: the server receives no update
    of site-1 at all, the round goes on with the others, and the ledger says why site-1 is absent."""
    out, state = consortium["out"], consortium["state"]
    job_dir = export_plain_job(tmp_path / "jobs", name="tiny_plain", num_rounds=1)
    job_id, meta, _ = _run(out, job_dir)
    assert meta["status"] == "FINISHED:COMPLETED", trial.status_text(trial.status(out, query_server=False))

    with trial.admin_session(out) as session:
        result_dir = Path(session.download_job_result(job_id))
    server_log = (result_dir / "workspace" / "log.txt").read_text(errors="replace")
    site1_results = [line for line in server_log.splitlines()
                     if "peer=site-1" in line and "task_name=train" in line and "peer_rc=" in line]
    assert site1_results, "the server logged no train result of site-1"
    assert all("peer_rc=TASK_RESULT_FILTER_ERROR" in line for line in site1_results)
    with _site_ledger(state, "site-1") as ledger:
        assert [r for r in audit.contributions(ledger, job_id) if r["site"] == "site-1"] == []
        rounds = audit.models(ledger, job_id)
    assert rounds[0]["participants"] == ["site-2", "site-3"]
    absent = {a["site"]: a["reason"] for a in rounds[0]["absent"]}
    assert "strict privacy scope released nothing" in absent["site-1"] and "not masked" in absent["site-1"]


def test_site_provisioned_elsewhere_cannot_connect(consortium, tmp_path):
    from clinfed.consortium.provision import provision

    out, state = consortium["out"], consortium["state"]
    # Same consortium file, same server address, but another provisioning: another root CA.
    other = provision(CONSORTIUM_YML, tmp_path / "other", port=state["port"])
    outsider = trial.start_participant(other.out, other.kit("site-4"), "site-4")
    try:
        log = other.out / "run" / "site-4.out"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and "CERTIFICATE_VERIFY_FAILED" not in log.read_text(errors="replace"):
            time.sleep(1)
        assert "CERTIFICATE_VERIFY_FAILED" in log.read_text(errors="replace")
        with trial.admin_session(out) as session:
            assert trial.connected_sites(session) == SITES
    finally:
        trial.stop_participant(outsider.pid)


def test_site_stopped_mid_job_the_others_finish_and_the_ledger_shows_the_absence(consortium, tmp_path):
    """site-4 joins, trains round 0, and is stopped; round 1 opens from the other three (SecAgg
    dropout recovery: no one retrains or uploads twice), and the ledger records site-4 as absent."""
    out, state = consortium["out"], consortium["state"]
    trial.up(out, sites=[*SITES, "site-4"], timeout=120)
    job_dir = export_private_job(tmp_path / "jobs", name="tiny_dropout", num_rounds=2, num_clients=4,
                                 train_timeout=20)
    with trial.admin_session(out) as session:
        started = time.monotonic()
        job_id = session.submit_job(str(job_dir))
        with _site_ledger(state, COORDINATOR) as ledger:
            while not audit.models(ledger, job_id):
                assert time.monotonic() - started < 300, "round 0 never finished"
                time.sleep(0.5)
        trial.down(out, ["site-4"])
        session.monitor_job(job_id, timeout=420, poll_interval=1.0)
        meta = session.get_job_meta(job_id)
    assert meta["status"] == "FINISHED:COMPLETED", trial.status_text(trial.status(out, query_server=False))
    with _site_ledger(state, "site-2") as ledger:
        rounds = audit.models(ledger, job_id)
        verified = audit.verify(ledger, job_id)
    assert verified.ok, verified.job.problems
    assert rounds[0]["participants"] == [*SITES, "site-4"] and rounds[0]["absent"] == []
    assert rounds[1]["participants"] == SITES
    assert [a["site"] for a in rounds[1]["absent"]] == ["site-4"]
    print(f"dropout job: submit to finished {time.monotonic() - started:.1f} s")
